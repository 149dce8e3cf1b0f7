"""tools/tpu_sizing.py: the slice search, the resumable JSONL, the RAM skip, the tables, and one
real TPU compile of the tiny model (skipped without libtpu)."""

import gzip
import importlib.util
import json
import os
import sys

import pytest

from sr_jax.tpu import CHIPS, libtpu_available

_spec = importlib.util.spec_from_file_location(
    "tpu_sizing", os.path.join(os.path.dirname(__file__), "..", "tools", "tpu_sizing.py"))
sizing = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("tpu_sizing", sizing)  # dataclasses look the module up by name
_spec.loader.exec_module(sizing)

needs_libtpu = pytest.mark.skipif(not libtpu_available(),
                                  reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler")
GiB = 2**30
TINY = {"seq": 256, "images": 1, "image_size": 64, "labels": 32,
        "overrides": ["text.vocab_size=1024", "image_token_id=1000", "vision_start_token_id=1001",
                      "vision_end_token_id=1002", "video_token_id=1003"]}


def _rec(status, used=None, resident=None):
    return {"status": status, "hbm_used": used, "resident": resident}


def test_search_grows_until_it_fits_then_stops_at_the_fewest_chips():
    row, chip = sizing.Row("8b", "full", "v5p"), CHIPS["v5p"]  # 95 GiB, slices from 4 chips
    # 4 chips: 120 GiB needed of which 100 GiB sharded state -> 8 chips give 20 + 50 = 70 GiB: try 8
    assert sizing.next_chips(row, chip, {4: _rec("does not fit", 120 * GiB, 100 * GiB)}) == 8
    # 8 chips fit with 70 GiB of which 50 sharded: 4 chips would need 120 GiB -> the answer is 8
    tried = {4: _rec("does not fit", 120 * GiB, 100 * GiB), 8: _rec("fits", 70 * GiB, 50 * GiB)}
    assert sizing.next_chips(row, chip, tried) is None
    # a first guess that fits with room to spare tries half the chips
    assert sizing.next_chips(row, chip, {16: _rec("fits", 40 * GiB, 20 * GiB)}) == 8
    # never below the generation's smallest slice
    assert sizing.next_chips(row, chip, {4: _rec("fits", 10 * GiB, 5 * GiB)}) is None
    # far from fitting: skip the doublings where even all of it shrunk by the chip count stays
    # too big (420 GiB on 4 chips: 105 GiB on 16, 52.5 on 32), not one doubling at a time
    assert sizing.next_chips(row, chip, {4: _rec("does not fit", 420 * GiB, 400 * GiB)}) == 32
    # temporaries shrink with the chips too (measured), so a big non-state share does not stop
    # the search: 130 GiB on 64 chips of which 120 are not sharded state -> try 128
    assert sizing.next_chips(row, chip, {64: _rec("does not fit", 130 * GiB, 10 * GiB)}) == 128
    # the generation's largest slice did not fit: no answer
    assert sizing.next_chips(row, chip, {1024: _rec("does not fit", 130 * GiB, 10 * GiB)}) is None
    # 32B LoRA on v6e measured 38.6 GiB of 29.8 on 8 chips: 16 chips are next, not the pod
    v6e = sizing.Row("32b", "lora", "v6e")
    assert sizing.next_chips(v6e, CHIPS["v6e"], {8: _rec("does not fit", 38.6 * GiB, 8.9 * GiB)}) == 16
    # refused before compiling (state alone too big, size of the rest unknown): double
    assert sizing.next_chips(row, chip, {4: _rec("does not fit", None, 200 * GiB)}) == 8
    # out of HBM in the compiler (temporaries known, the state's share not): double
    assert sizing.next_chips(row, chip, {4: _rec("does not fit", 120 * GiB, None)}) == 8


def test_first_guess_comes_from_the_hbm_estimate():
    from sr_jax.plan import PlanSpec, sft_config
    from sr_jax.train.sft import model_config

    cfg8 = model_config(sft_config(PlanSpec(model="8b")).model)
    cfg2 = model_config(sft_config(PlanSpec(model="2b")).model)
    full = sizing.first_chips(sizing.Row("8b", "full", "v5e"), cfg8, CHIPS["v5e"])
    lora = sizing.first_chips(sizing.Row("8b", "lora", "v5e"), cfg8, CHIPS["v5e"])
    assert full > lora >= 1 and full & (full - 1) == 0  # powers of two, full needs more chips
    assert sizing.first_chips(sizing.Row("2b", "lora", "v6e"), cfg2, CHIPS["v6e"]) == 1
    assert sizing.first_chips(sizing.Row("2b", "lora", "v5p"), cfg2, CHIPS["v5p"]) == 4  # v5p-8 is the smallest
    e = sizing.estimate_bytes(cfg8, "full", 64)
    assert 16 * 8e9 / 64 < e["state"] < 16 * 10e9 / 64  # ~8.8 B parameters, 16 bytes each, over 64 chips


def _fake_child(calls, outcome):
    def run_child(row, chips, out_dir, **kw):
        calls.append((row.key, chips))
        return dict(outcome(row, chips), kind="compile", row=row.key, chips=chips,
                    topology=sizing.topology_name(row.gen, chips))
    return run_child


def test_driver_resumes_from_the_jsonl_and_skips_rows_by_ram(tmp_path, monkeypatch):
    """Rows are appended as they finish; a rerun compiles nothing already done, reuses the
    compiles of an unfinished row, and skips a row when a smaller model needed too much RAM."""
    monkeypatch.setattr("sr_jax.tpu.libtpu_available", lambda: True)
    calls = []

    def outcome(row, chips):
        fits = chips >= 8
        return {"status": "fits" if fits else "does not fit", "hbm_used": (12 if fits else 18) * GiB,
                "resident": (4 if fits else 8) * GiB, "hbm_available": 16 * GiB, "flops_xla": 1e15,
                "flops_analytic": 2e15, "step_seconds": 1.5, "mfu": 0.4, "tokens_per_second_per_chip": 5000.0,
                "compile_seconds": 60.0, "bound": "compute",
                "peak_rss": 13e9 if row.model == "4b" else 3e9}

    monkeypatch.setattr(sizing, "run_child", _fake_child(calls, outcome))
    monkeypatch.setattr(sizing, "first_chips", lambda row, cfg, chip: 4)
    out = str(tmp_path)
    args = ["--out", out, "--models", "2b,4b,8b", "--modes", "lora", "--gens", "v5e"]
    assert sizing.main(args) == 0
    # 2b: 4 does not fit, 8 fits, 4 already known -> done; 4b the same; 8b skipped (4b needed 13 GB)
    assert calls == [("2b/lora/v5e", 4), ("2b/lora/v5e", 8), ("4b/lora/v5e", 4), ("4b/lora/v5e", 8)]
    records = [json.loads(x) for x in open(os.path.join(out, "sizing.jsonl"))]
    rows = {r["row"]: r for r in records if r["kind"] == "row"}
    assert rows["2b/lora/v5e"]["status"] == "fits" and rows["2b/lora/v5e"]["chips"] == 8
    assert rows["8b/lora/v5e"]["status"] == "skipped: RAM" and "4b/lora/v5e" in rows["8b/lora/v5e"]["reason"]
    table = open(os.path.join(out, "sizing.md")).read()
    assert "| 2b | LoRA r32 | v5e | v5e:2x4 | 8 | 12.0 of 16.0 GiB |" in table and "skipped: RAM" in table

    # A rerun compiles nothing; an interrupted row (compiles logged, no summary) reuses them.
    calls.clear()
    assert sizing.main(args) == 0
    assert calls == []
    with open(os.path.join(out, "sizing.jsonl"), "a") as f:
        f.write(json.dumps(dict(outcome(sizing.Row("2b", "lora", "v6e"), 4), kind="compile",
                                row="2b/lora/v6e", chips=4, status="does not fit")) + "\n")
        f.write('{"kind": "compile", "row": "2b/lora/v6e", "chi')  # a line cut by a killed run
    assert sizing.main(["--out", out, "--models", "2b", "--modes", "lora", "--gens", "v6e"]) == 0
    assert calls == [("2b/lora/v6e", 8)]  # 4 chips known not to fit: straight to 8
    records = sizing.load_records(os.path.join(out, "sizing.jsonl"))  # the cut line did not swallow the next
    assert [r["status"] for r in records if r["kind"] == "row" and r["row"] == "2b/lora/v6e"] == ["fits"]
    assert [r["chips"] for r in records if r["kind"] == "compile" and r["row"] == "2b/lora/v6e"] == [4, 8]


@needs_libtpu
def test_one_real_compile_of_the_tiny_model_for_v6e(tmp_path):
    """The child's record from the TPU compiler (one chip of v6e): HBM used against the chip's,
    FLOPs, the roofline estimate, compile time, RSS; and the breakdown of its saved HLO finds the
    matmuls and the splash kernel."""
    hlo = str(tmp_path / "hlo" / "tiny.hlo.txt.gz")
    rec = sizing.compile_one(sizing.Row("tiny", "lora", "v6e"), 1, shape=TINY, hlo_path=hlo)
    assert rec["status"] == "fits" and rec["topology"] == "v6e:1x1" and rec["device_kind"].startswith("TPU v6")
    assert 0 < rec["hbm_used"] < rec["hbm_available"] == CHIPS["v6e"].hbm_bytes
    assert rec["flops_analytic"] > 0 and rec["step_seconds"] > 0 and 0 < rec["mfu"] < 1
    assert rec["compile_seconds"] > 0 and rec["peak_rss"] > 100e6 and rec["attention"] == "splash"
    b = sizing.breakdown(gzip.open(hlo, "rt").read())
    kinds = b["groups"]
    assert sum(g["flops"] for k, g in kinds.items() if "matmul" in k or k in ("dot", "convolution")) > 0
    assert any(k.startswith("custom-call") or "custom-call" in k for k in kinds)
    assert b["unknown_trip_loops"] == 0  # scanned layers: the trip counts are known
    assert "op kind" in sizing.format_breakdown(b)


HLO = """HloModule m

%cond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%fused_dot (a: f32[8,32], b: f32[32,16]) -> f32[8,16] {
  %a = f32[8,32]{1,0} parameter(0)
  %b = f32[32,16]{1,0} parameter(1)
  ROOT %conv = f32[8,16]{1,0} convolution(%a, %b), dim_labels=bf_io->bf, metadata={op_name="jit(f)/dot_general"}
}

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]) parameter(0)
  %x = f32[8,32]{1,0} constant({...})
  %w = f32[32,16]{1,0} constant({...})
  %f = f32[8,16]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[8,16]) tuple(%i, %f)
}

ENTRY %main (x: f32[8,16]) -> f32[16,16] {
  %x = f32[8,16]{1,0} parameter(0)
  %z = s32[] constant(0)
  %t = (s32[], f32[8,16]) tuple(%z, %x)
  %w = (s32[], f32[8,16]) while(%t), condition=%cond, body=%body
  %ag = f32[16,16]{1,0} all-gather(%x), dimensions={0}
  %cl = f32[2,8,1]{2,1,0} parameter(1)
  %cr = f32[4,16,8]{2,1,0} parameter(2)
  %cv = f32[2,4,16]{2,1,0} convolution(%cl, %cr), window={size=4 pad=3_3 rhs_reversal=1}, dim_labels=bf0_0oi->b0f
  ROOT %d = f32[16,16]{1,0} dot(%ag, %ag), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""


def test_breakdown_weights_loop_bodies_by_their_trip_count():
    """A scan's body (a matmul fusion) counts 5 times (trip count read from `i < 5`), operands
    printed by name are looked up, collectives are their own kind."""
    b = sizing.breakdown(HLO)
    g = b["groups"]
    assert g["matmul fusion"]["flops"] == 5 * 2 * 8 * 16 * 32
    assert g["matmul fusion"]["bytes"] == 5 * 4 * (8 * 32 + 32 * 16 + 8 * 16)
    assert g["dot"]["flops"] == 2 * 16 * 16 * 16
    assert g["all-gather"]["bytes"] == 4 * (16 * 16 + 8 * 16)
    # a batched dot written as a convolution over a padded size-1 dim: one real tap per output
    assert g["convolution"]["flops"] == 2 * (2 * 4 * 16) * 8
    assert b["unknown_trip_loops"] == 0
    assert "matmul fusion" in sizing.format_breakdown(b)
