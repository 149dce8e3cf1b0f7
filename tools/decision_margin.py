"""Where a stage-3 model stands on the edit / no-edit decision: on the held-out SC examples of a
learning-check config, the teacher-forced probability of the token that opens the region list
(' [{"' = boxes follow, ' [],' = no edit) at that position, by outcome and edit type. Greedy
decoding answers "no edit" where p(no edit) > p(boxes); the percentiles show whether the misses are
near that line (a threshold a little off) or far from it (the images were not compared).

    python tools/decision_margin.py --model runs/learn_stage3_v24/model \
        [--config configs/sft/learn_stage3_sc_single.yaml] [--examples 400] [--seed 20261123]

`--model` may also be a training checkpoint (`runs/<run>/checkpoints/<step>`; several may be
given), which shows how the decision forms over a run (keep the steps with `run.keep_checkpoints`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BOXES, NO_EDIT = ' [{"', " [],"


def decision_probabilities(model, data_cfg, source: str, tokenizer: str) -> dict[int, tuple[float, float]]:
    """{record index: (p(boxes), p(no edit))} at the first position whose target is one of the two
    tokens, softmax over the model's vocabulary, true images."""
    import jax
    import jax.numpy as jnp

    from sr_jax.data.packing import model_inputs
    from sr_jax.data.pipeline import DataPipeline
    from sr_jax.data.processor import Processor
    from sr_jax.data.vocab import vocab_map_of
    from sr_jax.train.loss import next_token_targets, resolve_token_weights
    from sr_jax.train.step import VISION_KEYS

    vocab_map = vocab_map_of(model)
    ids = dict(resolve_token_weights({BOXES: 1.0, NO_EDIT: 1.0}, Processor(tokenizer).tokenizer, vocab_map))
    boxes_id, no_edit_id = (int(i) for i in ids)
    cfg = dataclasses.replace(data_cfg, sources=[source], shuffle=False, num_epochs=1, workers=0,
                              tokenizer=tokenizer, mode="pad", batch_size=8)

    @jax.jit
    def probabilities(batch):
        vision = tuple(batch[k] for k in VISION_KEYS) if "pixel_values" in batch else None
        out = model.features(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                             position_ids=batch["position_ids"], vision=vision)
        targets = next_token_targets(batch["labels"], None)
        hit = (targets == boxes_id) | (targets == no_edit_id)
        first = jnp.argmax(hit, axis=1)  # the region list opens once per SC answer
        rows = jnp.take_along_axis(out.hidden, first[:, None, None], axis=1)[:, 0]
        p = jax.nn.softmax(model.logits(rows).astype(jnp.float32), axis=-1)
        return p[:, boxes_id], p[:, no_edit_id], hit.any(axis=1)

    result = {}
    for batch in DataPipeline(cfg, vision=model.config.vision, vocab_map=vocab_map):
        p_boxes, p_none, found = jax.device_get(probabilities(model_inputs(batch)))
        for r, index in enumerate(np.asarray(batch["record_index"])[:, 0]):
            if index >= 0 and found[r]:
                result[int(index)] = (float(p_boxes[r]), float(p_none[r]))
    return result


def _report(name: str, probs: dict, examples, seed: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Print one model's margins by outcome and edit type; ((failed wrong, n), (completed wrong, n))."""
    groups = collections.defaultdict(list)
    for index, ex in enumerate(examples):  # a synthetic source's record index is its example index
        if index not in probs:
            continue
        p_boxes, p_none = probs[index]
        margin = float(np.log(p_boxes) - np.log(p_none))  # > 0: greedy opens the region list with boxes
        done = ex.meta["outcome"] != "failed"
        groups[("outcome", ex.meta["outcome"])].append((margin, done))
        groups[("edit type (completed)" if done else "edit type (failed)", ex.meta["edit_type"])].append((margin, done))
    print(f"{name}: {len(probs)} held-out SC examples (seed {seed}); margin = log p(boxes) - "
          f"log p(no edit) at the region list's first token; wrong = greedy picks the other one")
    print(f"{'group':<34} {'n':>4} {'wrong':>6} {'q10':>7} {'q25':>7} {'median':>7} {'q75':>7} {'q90':>7}")
    totals = {False: [0, 0], True: [0, 0]}
    for (kind, group), rows in sorted(groups.items()):
        m = np.array([r[0] for r in rows])
        wrong = int(sum((mm > 0) != done for mm, done in rows))
        if kind == "outcome":
            totals[rows[0][1]][0] += wrong
            totals[rows[0][1]][1] += len(rows)
        q = np.percentile(m, [10, 25, 50, 75, 90])
        print(f"{kind + ': ' + group:<34} {len(rows):>4} {wrong:>6} " + " ".join(f"{v:>7.2f}" for v in q))
    return tuple(totals[False]), tuple(totals[True])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, nargs="+",
                    help="exported model folders (run.out_dir/model) or training checkpoints (checkpoints/<step>)")
    ap.add_argument("--config", default="configs/sft/learn_stage3_sc_single.yaml")
    ap.add_argument("--examples", type=int, default=400)
    ap.add_argument("--seed", type=int, default=20261123, help="the learning check's held-out seed")
    args = ap.parse_args(argv)

    from sr_jax.config import load_config
    from sr_jax.convert.cli import load_checkpoint_model
    from sr_jax.data.pipeline import SyntheticSource
    from sr_jax.data.synthetic import generate_examples
    from sr_jax.eval.stages import heldout_spec
    from sr_jax.train.sft import SFTConfig

    cfg = load_config(SFTConfig, args.config)
    synth = SyntheticSource(cfg.data.sources[0]).config
    examples = list(generate_examples(args.examples, seed=args.seed, split="test", config=synth))
    spec = heldout_spec(cfg.data.sources[0], args.examples, args.seed)
    curve = []
    for name in args.model:
        # an exported folder may carry its tokenizer, else it is the run's tokenizer/ beside it
        model, sidecar = load_checkpoint_model(name)
        tokenizer = Path(sidecar) if sidecar else None
        if tokenizer is None or not (tokenizer / "tokenizer.json").exists():
            tokenizer = Path(name).parent / "tokenizer"
        probs = decision_probabilities(model, cfg.data, spec, str(tokenizer))
        curve.append((name, _report(name, probs, examples, args.seed)))
    if len(curve) > 1:
        print("\nthe decision by model (wrong = greedy opens the region list the other way)")
        print(f"{'model':<48} {'failed wrong':>13} {'completed wrong':>16}")
        for name, (failed, completed) in curve:
            print(f"{name:<48} {failed[0]:>6} of {failed[1]:<4} {completed[0]:>8} of {completed[1]:<4}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
