"""`sr-jax plan`: the ahead-of-time plan against the real step (state bytes, XLA analyses), the
CLI report, LoRA vs full fine-tuning, and clear errors for impossible meshes."""

import json

import jax
import numpy as np
import pytest

from sr_jax.cli import main
from sr_jax.plan import (BatchShape, PlanSpec, build_plan, format_report, run_plan, sft_config, shard_bytes,
                         synthetic_batch)
from sr_jax.sharding import shard_batch
from sr_jax.train.sft import Trainer

# Small vocabulary with the vision token ids remapped below it: fast compiles for CLI checks.
SMALL_VOCAB = ["text.vocab_size=1024", "image_token_id=1000", "vision_start_token_id=1001",
               "vision_end_token_id=1002", "video_token_id=1003"]


def _xla_fields(stats) -> dict:
    return {k: getattr(stats, k) for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                                           "temp_size_in_bytes", "generated_code_size_in_bytes")}


def test_plan_matches_real_state_and_compiled_step():
    """Tiny preset (real vocabulary), batch 2 x 256 tokens with one 64x64 image per row, fsdp=2."""
    spec = PlanSpec(model="tiny", mesh={"fsdp": 2}, batch=BatchShape(rows=2, seq=256, images_per_example=1,
                                                                     image_size=64),
                    dtype="float32", param_dtype="float32")
    report = run_plan(spec, devices=jax.devices()[:2])
    mem = report["memory_per_device"]

    # The real thing: weights and optimizer state initialised on the same mesh.
    trainer = Trainer(sft_config(spec), devices=jax.devices()[:2], total_steps=1000)
    state = trainer.init_state()

    def real_bytes(tree):
        per_device = {}
        for x in jax.tree.leaves(tree):
            for shard in x.addressable_shards:
                per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
        return max(per_device.values(), default=0)

    real_params, real_opt = real_bytes(state.params), real_bytes(state.opt_state)
    assert real_bytes(state.frozen) == mem["frozen"] == 0
    assert mem["params"] == pytest.approx(real_params, rel=0.02)
    assert mem["optimizer"] == pytest.approx(real_opt, rel=0.02)
    assert mem["params"] + mem["optimizer"] == pytest.approx(real_params + real_opt, rel=0.02)
    # fsdp=2 really shards: one device holds about half of all parameters.
    total_param_bytes = 4 * report["num_params"]
    assert 0.45 * total_param_bytes < mem["params"] < 0.6 * total_param_bytes

    # XLA's argument buffers are exactly what the plan counted (+ step, rng and the RNG streams).
    assert mem["xla"]["argument"] == pytest.approx(mem["params"] + mem["optimizer"] + mem["batch"], rel=0.01)
    # Donation: the new state reuses the old state's buffers.
    assert mem["xla"]["alias"] >= mem["params"] + mem["optimizer"]

    # The same step compiled on real arrays has the identical memory analysis, and it runs.
    batch = shard_batch(synthetic_batch(trainer.model_cfg, spec.batch), trainer.mesh)
    real = trainer.step.lower(state, batch).compile()
    assert _xla_fields(real.memory_analysis()) == _xla_fields(report["_compiled"].memory_analysis())
    new_state, metrics = report["_compiled"](state, trainer.step.rest, batch)
    assert np.isfinite(float(metrics["loss"])) and int(new_state.step) == 1
    # Activations of this step: a real, nonzero amount, but far below a GiB for a tiny model.
    assert 1 << 20 < mem["xla"]["temp"] < 1 << 30

    # FLOPs: the analytic count and XLA's agree closely when nothing is scanned.
    flops = report["flops_per_step"]
    assert flops["xla"] == pytest.approx(2 * flops["xla_per_device"])
    assert 0.8 < flops["xla"] / flops["analytic"] < 1.25


def test_plan_cli_tiny_on_8_devices(capsys):
    argv = ["plan", "--model", "tiny", "--mesh", "fsdp=8", "--batch", "8", "--seq", "64",
            "--images-per-example", "1", "--image-size", "64", "--label-tokens", "16", "--dtype", "float32"]
    argv += [x for o in SMALL_VOCAB for x in ("--override", o)]
    assert main(argv + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["devices"] == 8 and report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert report["rows_per_device"] == 1 and report["tokens_per_step"] == 8 * 64
    mem = report["memory_per_device"]
    for key in ("params", "optimizer", "batch"):
        assert mem[key] > 0
    for key in ("argument", "output", "alias", "temp", "code", "total"):
        assert key in mem["xla"]
    x = mem["xla"]
    assert x["total"] == x["argument"] + x["output"] - x["alias"] + x["temp"] + x["code"]
    assert report["flops_per_step"]["analytic"] > 0 and report["flops_per_step"]["xla"] > 0
    assert report["seconds"]["compile"] > 0

    text = format_report(report)  # what the command prints without --json
    for label in ("parameters (trainable)", "optimizer state", "activations/temporaries", "total (peak estimate)",
                  "analytic (train_flops)", "XLA cost analysis", "compile:"):
        assert label in text


def test_lora_plan_has_far_smaller_optimizer_state():
    def plan(lora):
        spec = PlanSpec(model="tiny", mesh={"fsdp": 4}, batch=BatchShape(rows=4, seq=64), lora=lora, lora_rank=4,
                        dtype="float32", model_overrides=SMALL_VOCAB)
        _, state, _ = build_plan(spec, devices=jax.devices()[:4])  # the state alone needs no compile
        return {name: shard_bytes(getattr(state, name)) for name in ("params", "frozen", "opt_state")}

    full, lora = plan(False), plan(True)
    assert lora["opt_state"] < 0.1 * full["opt_state"]
    assert lora["params"] < 0.1 * full["params"]
    assert full["frozen"] == 0 and lora["frozen"] == pytest.approx(full["params"], rel=0.01)  # base weights, frozen


@pytest.mark.parametrize("mesh, batch, message", [
    ("fsdp=3", 8, "does not split over data x fsdp = 3"),
    ("pipeline=2", 8, "bad mesh entry 'pipeline=2'"),
    ("fsdp=0", 8, "mesh axis sizes must be >= 1"),
    ("fsdp=x", 8, "is not an integer"),
])
def test_impossible_mesh_is_a_clear_error(capsys, mesh, batch, message):
    assert main(["plan", "--model", "tiny", "--mesh", mesh, "--batch", str(batch), "--seq", "32"]) == 2
    assert message in capsys.readouterr().err


def test_mesh_larger_than_the_process_names_the_device_count(capsys, monkeypatch):
    # In a re-executed child (or any process whose JAX already started) a too-large mesh is an error.
    monkeypatch.setenv("SR_JAX_PLAN_CHILD", "1")
    assert main(["plan", "--model", "tiny", "--mesh", "data=2,fsdp=8", "--batch", "16", "--seq", "32"]) == 2
    err = capsys.readouterr().err
    assert "needs 16 devices" in err and "xla_force_host_platform_device_count=16" in err


def test_image_tokens_must_fit_the_row():
    spec = PlanSpec(model="tiny", mesh={"fsdp": 1}, batch=BatchShape(rows=1, seq=64, images_per_example=1,
                                                                     image_size=512))
    with pytest.raises(ValueError, match="cannot hold 258 image tokens"):
        run_plan(spec, devices=jax.devices()[:1])


def test_fake_device_flag_replaces_an_existing_count():
    from sr_jax.plan import _with_device_count

    flags = "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8"
    assert _with_device_count(flags, 64) == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=64"
    assert _with_device_count("", 2) == "--xla_force_host_platform_device_count=2"


def test_plan_config_rules_override_changes_the_per_device_bytes(capsys):
    """`sr-jax plan --config` sizes the layout of the training YAML's `train.mesh.rules`: replicating
    the embedding dimension (sharded over fsdp by default) puts most weights whole on every device."""
    vocab = "[" + ",".join(SMALL_VOCAB) + "]"
    base = ["plan", "--config", "configs/sft/demo_cpu.yaml", "--mesh", "fsdp=2", "--json", "data.seq_lens=[128]",
            "data.patch_budgets=[64]", "data.batch_size=2", "data.max_pixels=4096", "train.loss.max_label_tokens=null",
            f"model.overrides={vocab}"]

    def plan(*overrides):
        code = main(base + list(overrides))
        out = capsys.readouterr()
        assert code == 0, out.err
        return json.loads(out.out)

    default, replicated = plan(), plan("train.mesh.rules.embed=[]", "train.mesh.rules.vision_embed=null",
                                       "train.mesh.rules.mlp=fsdp")
    assert default["rules"] == {} and replicated["rules"] == {"embed": [], "vision_embed": [], "mlp": ["fsdp"]}
    params, more = default["memory_per_device"]["params"], replicated["memory_per_device"]["params"]
    assert 1.6 * params < more <= 2.0 * params  # fsdp=2 halves what the rules shard
    assert replicated["memory_per_device"]["optimizer"] > 1.6 * default["memory_per_device"]["optimizer"]
    assert "sharding rules changed from the default: embed -> [], vision_embed -> [], mlp -> [fsdp]" in format_report(
        dict(replicated, _compiled=None))


def test_plan_refuses_a_bad_rule_by_name(capsys):
    code = main(["plan", "--config", "configs/sft/demo_cpu.yaml", "train.mesh.rules.mlp=[fsdp,pipe]"])
    assert code == 2
    assert "train.mesh.rules.mlp: unknown mesh axis 'pipe'" in capsys.readouterr().err
    assert main(["plan", "--model", "tiny", "train.mesh.rules.mlp=[fsdp]"]) == 2  # overrides need --config
    assert "give --config" in capsys.readouterr().err
