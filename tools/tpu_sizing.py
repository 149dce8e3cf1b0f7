"""TPU sizing table: the smallest v5e / v5p / v6e slice on which one SFT row per chip fits.

For each model preset (2b, 4b, 8b, 32b) x {LoRA as SpatialReward's SFT recipe
(configs/sft/spatialreward_8b_lora.yaml: r32 on every decoder linear, bf16 weights), full
fine-tuning (configs/sft/spatialreward_8b_full.yaml: fp32 master weights, vision frozen)} x
generation, the SFT step of `sr-jax plan` (`sr_jax.plan.run_plan`, the project's own step) is
compiled by the real TPU compiler (libtpu, no TPU needed) for a slice with fsdp over every chip,
one row of 8192 tokens per chip with the configs' image budget (4096 patches per row: four 512x512
images) and 1024 labelled tokens, full remat, `model.scan_layers=true`. A row's answer is the
fewest chips whose compiled program fits the chip's published HBM (`sr_jax.tpu.CHIPS`):

    python tools/tpu_sizing.py                       # every row, smaller models first
    python tools/tpu_sizing.py --models 2b,4b --gens v6e --modes lora
    python tools/tpu_sizing.py --breakdown 8b/lora/v5p   # top ops of that row's compiled step

Search: an HBM estimate (parameters + gradients + optimizer state over the chips, plus one row's
activations) picks the first slice to compile; a slice that does not fit doubles the chips (or
jumps past the doublings where even the whole per-chip program shrunk by the chip count would not
fit), one that fits tries half the chips while its measured state says half could fit. Each
compile runs in its own process under `nice -n 10`, one at a time; its peak RSS is recorded, and
a row is skipped ("skipped: RAM") when the same mode and generation needed more than
--max-rss-gb for a smaller model. Every compile and every finished row is appended to <out>/sizing.jsonl as it ends: a rerun skips finished rows and reuses
finished compiles. <out>/sizing.csv and sizing.md (the README table) are rewritten from it.

Step time, MFU and tokens/s are a roofline ESTIMATE (`sr_jax.plan.roofline`: analytic FLOPs +
remat's recomputed forward at the chip's peak bf16 FLOP/s, or the compiled bytes at HBM bandwidth;
no communication), not measurements.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import gzip
import json
import math
import os
import re
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIGS = {"lora": os.path.join(ROOT, "configs/sft/spatialreward_8b_lora.yaml"),
           "full": os.path.join(ROOT, "configs/sft/spatialreward_8b_full.yaml")}
MODELS = ("2b", "4b", "8b", "32b")
MODES = ("lora", "full")
GENS = ("v5e", "v5p", "v6e")
MAX_CHIPS = {"v5e": 256, "v6e": 256, "v5p": 1024}  # v5e/v6e pods are 256 chips; v5p larger
SEQ, IMAGES, IMAGE_SIZE, LABELS = 8192, 4, 512, 1024


@dataclasses.dataclass(frozen=True)
class Row:
    model: str
    mode: str
    gen: str

    @property
    def key(self) -> str:
        return f"{self.model}/{self.mode}/{self.gen}"

    @classmethod
    def parse(cls, text: str) -> "Row":
        parts = text.split("/")
        if len(parts) != 3:
            raise ValueError(f"row {text!r}: expected MODEL/MODE/GEN, e.g. 8b/lora/v5p")
        return cls(*parts)


def topology_name(gen: str, chips: int) -> str:
    """`gen:AxB[xC]` with Cloud TPU's balanced shape for `chips` (a power of two)."""
    from sr_jax import tpu

    chip = tpu.CHIPS[gen]
    return tpu.Topology(chip, tpu._balanced(chips, chip.dims)).name


# ---------------------------------------------------------------------------------------------
# the HBM estimate that picks the first slice


def estimate_bytes(model_cfg, mode: str, chips: int, *, seq: int = SEQ, labels: int = LABELS) -> dict:
    """Per-chip bytes, roughly: the sharded state (LoRA: bf16 weights; full: fp32 weights, grads
    and two Adam moments for the decoder, fp32 weights for the frozen vision tower) and one row's
    activations under full remat (each layer's saved input, one layer's working set in the
    backward pass, the label logits)."""
    t, v = model_cfg.text, model_cfg.vision
    text = t.vocab_size * t.hidden_size * (1 if model_cfg.tie_word_embeddings else 2) + t.num_hidden_layers * (
        t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
        + 3 * t.hidden_size * t.intermediate_size)
    vision = v.depth * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    state = (text + vision) * 2 if mode == "lora" else text * 16 + vision * 4
    layer = seq * (3 * t.intermediate_size + 8 * t.hidden_size) * 4
    act = t.num_hidden_layers * seq * t.hidden_size * 4 + 2 * layer + labels * t.vocab_size * 4 * 3
    return {"state": state / chips, "activations": act, "total": state / chips + act + 2**30}


def first_chips(row: Row, model_cfg, chip) -> int:
    n = chip.min_chips
    while n < MAX_CHIPS[row.gen] and estimate_bytes(model_cfg, row.mode, n)["total"] > chip.hbm_bytes:
        n *= 2
    return n


def next_chips(row: Row, chip, tried: dict[int, dict]) -> int | None:
    """The next slice to compile given the attempts so far (chips -> record), or None when the
    answer is known: the fewest fitting chips whose half does not fit (or is below the minimum)."""
    fit = sorted(n for n, r in tried.items() if r["status"] == "fits")
    miss = sorted(n for n, r in tried.items() if r["status"] == "does not fit")
    if fit:
        n = fit[0]
        half = n // 2
        if half < chip.min_chips or half in miss:
            return None
        r = tried[n]
        # at half the chips the sharded state per chip doubles; the rest stays
        if r["hbm_used"] + r["resident"] > chip.hbm_bytes * 1.02:
            return None
        return half
    if not miss:
        return None
    n = miss[-1]
    r = tried[n]
    if n * 2 > MAX_CHIPS[row.gen]:
        return None
    need = r.get("hbm_used") or 0
    # Skip doublings that cannot fit even if the whole per-chip program shrank with the chips. Only
    # that is a safe bound: the temporaries shrink too, not just the sharded state (measured: 8B
    # full on v6e, 8 -> 16 chips: state 11.7 -> 5.9 GiB, the rest 20.1 -> 15.4 GiB; 4B LoRA on
    # v5e, 2 -> 4 chips: the rest 12.3 -> 9.3 GiB), so "the rest stays" would overshoot.
    m = n * 2
    while m < MAX_CHIPS[row.gen] and need * n / m > chip.hbm_bytes:
        m *= 2
    return m


# ---------------------------------------------------------------------------------------------
# one compile (in a child process)


DEFAULT_SHAPE = {"seq": SEQ, "images": IMAGES, "image_size": IMAGE_SIZE, "labels": LABELS, "overrides": []}


def _plan_args(row: Row, chips: int, shape: dict | None = None) -> argparse.Namespace:
    """`sr-jax plan` arguments of a row: its SFT config, fsdp over every chip, one row per chip."""
    s = dict(DEFAULT_SHAPE, **(shape or {}))
    return argparse.Namespace(
        config=CONFIGS[row.mode], config_overrides=[], model=row.model,
        topology=topology_name(row.gen, chips), mesh=None, batch=chips, seq=s["seq"], grad_accum=1,
        images_per_example=s["images"], image_size=s["image_size"], label_tokens=s["labels"], lora=False,
        lora_rank=None, freeze_vision=False, remat=None, dtype=None, param_dtype=None, override=list(s["overrides"]),
        attention_backend=None, scan_layers=True, stage="sft", completion_tokens=256)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def compile_one(row: Row, chips: int, *, shape: dict | None = None, hlo_path: str | None = None) -> dict:
    """Compiles the row's SFT step for `chips` chips in this process: the attempt's record."""
    from sr_jax import plan

    args = _plan_args(row, chips, shape)
    spec = plan.spec_from_args(args)
    record = {"kind": "compile", "row": row.key, "chips": chips, "topology": args.topology,
              "model": args.model, "date": time.strftime("%Y-%m-%d", time.gmtime())}
    t0 = time.perf_counter()
    try:
        report = plan.run_plan(spec)
    except plan.DoesNotFit as e:
        record.update(status="does not fit", reason=str(e), hbm_used=None, resident=_resident_from(e))
    except Exception as e:  # noqa: BLE001 - the TPU compiler's out-of-HBM is an XlaRuntimeError
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
            raise
        record.update(status="does not fit", reason="TPU compiler: " + _oom_line(text),
                      hbm_used=_oom_used(text), resident=None)
        record["seconds"] = time.perf_counter() - t0
    else:
        m, x, r = report["memory_per_device"], report["memory_per_device"]["xla"], report["roofline"]
        record.update(
            status="fits" if report["fits"] else "does not fit", reason=report["fit_line"],
            device_kind=report["target"]["device_kind"], attention=report["attention_backend"],
            hbm_used=x["total"], hbm_available=report["target"]["hbm_bytes_per_device"],
            resident=m["params"] + m["frozen"] + m["optimizer"], memory=m,
            flops_xla=report["flops_per_step"]["xla"], flops_analytic=report["flops_per_step"]["analytic"],
            bytes_xla_per_device=report["bytes_per_step"]["xla_per_device"],
            step_seconds=r["step_seconds"], bound=r["bound"], mfu=r["mfu"], compute_seconds=r["compute_seconds"],
            memory_seconds=r["memory_seconds"],
            tokens_per_second_per_chip=r["tokens_per_second_per_chip"], tokens_per_step=report["tokens_per_step"],
            compile_seconds=report["seconds"]["compile"], num_params=report["num_params"],
            num_trainable=report["num_trainable"])
        if hlo_path:
            os.makedirs(os.path.dirname(hlo_path), exist_ok=True)
            with gzip.open(hlo_path, "wt") as f:
                f.write(report["_compiled"].as_text())
            record["hlo"] = os.path.relpath(hlo_path, os.path.dirname(os.path.dirname(hlo_path)))
    record["peak_rss"] = _peak_rss()
    return record


def _resident_from(e: Exception) -> int | None:
    m = re.search(r"needs ([\d.]+) GiB", str(e))
    return int(float(m.group(1)) * 2**30) if m else None


def _oom_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if "memory" in ln.lower()), text.splitlines()[0])[:300]


def _oom_used(text: str) -> int | None:
    m = re.search(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm", text) \
        or re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", text)  # temporaries alone: a lower bound
    if not m:
        return None
    return int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)


# ---------------------------------------------------------------------------------------------
# the driver: resumable JSONL, one child at a time, RAM guard


def load_records(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a killed run: the rest still counts
                print(f"{path}:{i}: unreadable line skipped", file=sys.stderr)
    return out


def append_record(path: str, record: dict) -> None:
    cut = False
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"  # a line left unfinished by a killed run: start a new one
    with open(path, "a") as f:
        f.write(("\n" if cut else "") + json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _watch(proc, kill_rss: float, timeout: float, t0: float) -> tuple[int, str | None]:
    """Waits for the child, sampling its RSS; kills it past kill_rss bytes or timeout seconds."""
    peak, killed = 0, None
    while proc.poll() is None:
        peak = max(peak, _rss_of(proc.pid))
        if peak > kill_rss:
            killed = f"killed: RSS passed {kill_rss / 1e9:.0f} GB"
        elif time.perf_counter() - t0 > timeout:
            killed = f"killed: compile passed {timeout:.0f} s"
        if killed:
            proc.kill()
            proc.wait()
            break
        time.sleep(0.5)
    return peak, killed


def run_child(row: Row, chips: int, out_dir: str, *, kill_rss: float, timeout: float,
              shape: dict | None = None) -> dict:
    """One compile in a fresh `nice -n 10` process; killed past `kill_rss` bytes or `timeout` s."""
    hlo = os.path.join(out_dir, "hlo", f"{row.key.replace('/', '_')}_{chips}.hlo.txt.gz")
    cmd = ["nice", "-n", "10", sys.executable, os.path.abspath(__file__), "--child", row.key, "--chips", str(chips),
           "--hlo", hlo] + (["--shape", json.dumps(shape)] if shape else [])
    # libtpu takes a machine-wide lock file unless told otherwise: a long compile here would make
    # every other libtpu process on the machine (tests, `sr-jax plan`) fail at start
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    # the child's output goes to files: a pipe nobody reads while polling would stall a chatty libtpu
    logs = os.path.join(out_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    stem = os.path.join(logs, f"{row.key.replace('/', '_')}_{chips}")
    t0 = time.perf_counter()
    with open(stem + ".out", "w") as fo, open(stem + ".err", "w") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, env=env)
        peak, killed = _watch(proc, kill_rss, timeout, t0)
    out, err = open(stem + ".out").read(), open(stem + ".err").read()
    wall = time.perf_counter() - t0
    base = {"kind": "compile", "row": row.key, "chips": chips, "topology": topology_name(row.gen, chips),
            "wall_seconds": wall, "date": time.strftime("%Y-%m-%d", time.gmtime())}
    if killed:
        return dict(base, status="error", reason=killed, peak_rss=peak)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = " | ".join(err.strip().splitlines()[-3:])[-600:]
        return dict(base, status="error", reason=f"exit {proc.returncode}: {tail}", peak_rss=peak)
    record = json.loads(lines[-1])
    record["wall_seconds"] = wall
    record["peak_rss"] = max(record.get("peak_rss") or 0, peak)
    return record


def ram_blocker(row: Row, records: list[dict], max_rss: float) -> dict | None:
    """A compile of a smaller model with the same mode and generation that needed > max_rss."""
    rank = MODELS.index(row.model) if row.model in MODELS else len(MODELS)
    for r in records:
        if r.get("kind") != "compile":
            continue
        other = Row.parse(r["row"])
        if (other.mode, other.gen) == (row.mode, row.gen) and other.model in MODELS \
                and MODELS.index(other.model) < rank and (r.get("peak_rss") or 0) > max_rss:
            return r
    return None


def summarize(row: Row, tried: dict[int, dict], chip) -> dict:
    fit = sorted(n for n, r in tried.items() if r["status"] == "fits")
    base = {"kind": "row", "row": row.key, "model": row.model, "mode": row.mode, "gen": row.gen,
            "compiles": len(tried), "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "peak_rss": max((r.get("peak_rss") or 0) for r in tried.values()) if tried else None}
    if not fit:
        worst = tried[max(tried)] if tried else {}
        return dict(base, status="does not fit", chips=None, topology=None,
                    reason=f"up to {max(tried) if tried else '?'} chips: {worst.get('reason')}")
    r = tried[fit[0]]
    keep = ("topology", "chips", "device_kind", "attention", "hbm_used", "hbm_available", "flops_xla",
            "flops_analytic", "bytes_xla_per_device", "step_seconds", "bound", "mfu", "tokens_per_second_per_chip",
            "compile_seconds", "hlo", "compute_seconds", "tokens_per_step")
    out = dict(base, status="fits", **{k: r.get(k) for k in keep})
    out["compile_peak_rss"] = r.get("peak_rss")
    return out


def run_row(row: Row, records: list[dict], jsonl: str, out_dir: str, args) -> dict:
    from sr_jax import tpu
    from sr_jax.train.sft import model_config
    from sr_jax.plan import sft_config, PlanSpec

    chip = tpu.CHIPS[row.gen]
    tried = {r["chips"]: r for r in records if r.get("kind") == "compile" and r["row"] == row.key
             and r["status"] in ("fits", "does not fit")}
    blocker = ram_blocker(row, records, args.max_rss_gb * 1e9)
    if blocker and not tried:
        return {"kind": "row", "row": row.key, "model": row.model, "mode": row.mode, "gen": row.gen,
                "status": "skipped: RAM", "chips": None, "topology": None, "compiles": 0,
                "reason": f"{blocker['row']} on {blocker['chips']} chips needed "
                          f"{blocker['peak_rss'] / 1e9:.1f} GB of host RAM to compile (limit {args.max_rss_gb} GB)",
                "date": time.strftime("%Y-%m-%d", time.gmtime())}
    mcfg = model_config(sft_config(PlanSpec(model=row.model)).model)
    n = next_chips(row, chip, tried) if tried else first_chips(row, mcfg, chip)
    while n is not None:
        if n in tried:  # already measured in an earlier run
            n = next_chips(row, chip, tried)
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {row.key}: compiling for {topology_name(row.gen, n)} ({n} chips)",
              flush=True)
        rec = run_child(row, n, out_dir, kill_rss=args.kill_rss_gb * 1e9, timeout=args.timeout, shape=args.shape)
        append_record(jsonl, rec)
        records.append(rec)
        print(f"    {rec['status']}: {rec.get('reason')}; compile {rec.get('compile_seconds') or 0:.0f} s, "
              f"peak RSS {(rec.get('peak_rss') or 0) / 1e9:.2f} GB", flush=True)
        if rec["status"] == "error":
            return {"kind": "row", "row": row.key, "model": row.model, "mode": row.mode, "gen": row.gen,
                    "status": "error", "chips": n, "topology": rec["topology"], "reason": rec["reason"],
                    "compiles": len(tried) + 1, "peak_rss": rec.get("peak_rss"),
                    "date": time.strftime("%Y-%m-%d", time.gmtime())}
        tried[n] = rec
        n = next_chips(row, chip, tried)
    return summarize(row, tried, chip)


# ---------------------------------------------------------------------------------------------
# tables


COLUMNS = ["model", "mode", "gen", "status", "topology", "chips", "hbm_used_gib", "hbm_available_gib",
           "step_tflops", "step_seconds_est", "mfu_est", "tokens_per_s_per_chip_est", "compile_s", "peak_rss_gb",
           "compiles"]


def estimate(r: dict, out_dir: str | None) -> dict:
    """Step time, MFU and tokens/s per chip of a fitting row: the plan's compute time (analytic
    FLOPs + remat's recomputed forward at peak) against the HBM time of the compiled program's
    bytes with every loop body counted as often as it runs (the saved HLO's breakdown; XLA's own
    cost analysis counts a scanned layer once). No communication, perfect overlap."""
    from sr_jax import tpu

    chip = tpu.CHIPS[r["gen"]]
    compute = r.get("compute_seconds") or (r["step_seconds"] if r.get("bound") == "compute" else None)
    hlo_bytes = r.get("hlo_bytes")
    path = os.path.join(out_dir, r["hlo"]) if out_dir and r.get("hlo") else None
    if hlo_bytes is None and path and os.path.exists(path):
        with gzip.open(path, "rt") as f:
            b = breakdown(f.read())
        hlo_bytes = sum(g["bytes"] for g in b["groups"].values())
    memory = hlo_bytes / chip.hbm_bandwidth if hlo_bytes else None
    if compute is None:
        return {"step": r["step_seconds"], "mfu": r["mfu"], "tps": r["tokens_per_second_per_chip"], "bound": r["bound"]}
    step = max(compute, memory or 0.0)
    tokens = r.get("tokens_per_step") or r["chips"] * SEQ
    return {"step": step, "mfu": r["flops_analytic"] / (r["chips"] * chip.peak_bf16_flops * step),
            "tps": tokens / step / r["chips"], "bound": "compute" if compute >= (memory or 0) else "HBM",
            "hbm_seconds": memory, "compute_seconds": compute}


def _step_cell(e: dict) -> str:
    if e.get("hbm_seconds") is None:
        return f"{e['step']:.2f} ({e['bound']}-bound)"
    other = (f"HBM {e['hbm_seconds']:.2f}" if e["bound"] == "compute" else f"compute {e['compute_seconds']:.2f}")
    return f"{e['step']:.2f} ({e['bound']}-bound; {other})"


def table_rows(records: list[dict], out_dir: str | None = None) -> list[dict]:
    rows = {}
    for r in records:
        if r.get("kind") == "row":
            rows[r["row"]] = r  # the latest summary of a row wins
    order = {(m, mo, g): i for i, (m, mo, g) in enumerate(
        (m, mo, g) for m in MODELS for mo in MODES for g in GENS)}
    out = []
    for r in sorted(rows.values(), key=lambda r: order.get((r["model"], r["mode"], r["gen"]), 1e9)):
        fits = r["status"] == "fits"
        e = estimate(r, out_dir) if fits else {}
        out.append({
            "model": r["model"], "mode": "LoRA r32" if r["mode"] == "lora" else "full", "gen": r["gen"],
            "status": r["status"] if not fits else "fits",
            "topology": r.get("topology") or "", "chips": r.get("chips") or "",
            "hbm_used_gib": f"{r['hbm_used'] / 2**30:.1f}" if fits else "",
            "hbm_available_gib": f"{r['hbm_available'] / 2**30:.1f}" if fits else "",
            "step_tflops": f"{max(r['flops_xla'] or 0, r['flops_analytic']) / 1e12:.0f}" if fits else "",
            "step_seconds_est": _step_cell(e) if fits else "",
            "mfu_est": f"{100 * e['mfu']:.0f}%" if fits else "",
            "tokens_per_s_per_chip_est": f"{e['tps']:.0f}" if fits else "",
            "compile_s": f"{r['compile_seconds']:.0f}" if fits else "",
            "peak_rss_gb": f"{(r.get('compile_peak_rss') or r.get('peak_rss') or 0) / 1e9:.1f}"
            if (r.get('compile_peak_rss') or r.get('peak_rss')) else "",
            "compiles": r.get("compiles", ""),
            "reason": "" if fits else (r.get("reason") or ""),
        })
    return out


def write_tables(records: list[dict], out_dir: str) -> str:
    rows = table_rows(records, out_dir)
    with open(os.path.join(out_dir, "sizing.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + ["reason"])
        w.writeheader()
        w.writerows(rows)
    head = ["model", "fine-tuning", "TPU", "smallest slice", "chips", "HBM used / chip", "step TFLOP",
            "step s (est.)", "MFU (est.)", "tokens/s/chip (est.)", "compile s", "compile RAM GB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["status"] == "fits":
            cells = [r["model"], r["mode"], r["gen"], r["topology"], str(r["chips"]),
                     f"{r['hbm_used_gib']} of {r['hbm_available_gib']} GiB", r["step_tflops"],
                     r["step_seconds_est"], r["mfu_est"], r["tokens_per_s_per_chip_est"], r["compile_s"],
                     r["peak_rss_gb"]]
        else:
            cells = [r["model"], r["mode"], r["gen"], f"{r['status']}: {r['reason']}"[:160].replace("|", "/"),
                     "", "", "", "", "", "", "", r["peak_rss_gb"]]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "sizing.md"), "w") as f:
        f.write(text)
    return text


# ---------------------------------------------------------------------------------------------
# per-op breakdown of a compiled HLO module


_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+|c64|c128|token)\[([\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16, "token": 0}
_HEADER = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _dtype_bytes(dtype: str) -> float:
    if dtype in _BYTES:
        return _BYTES[dtype]
    bits = re.sub(r"\D", "", dtype.split("e")[0]) if dtype.startswith("f8") else dtype[1:]
    return 1 if dtype.startswith("f8") else int(bits) / 8


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _SHAPE.findall(text)]


def _nbytes(shapes) -> float:
    return sum(_dtype_bytes(d) * math.prod(s) for d, s in shapes)


def _split_call(rhs: str) -> tuple[str, str, str, str] | None:
    """(result type, opcode, operands, attributes) of an instruction's right-hand side."""
    m = re.search(r"(?:^|\s)([a-z][a-z0-9\-_]*)\(", rhs)
    if not m:
        return None
    depth, i = 0, m.end() - 1
    for j in range(i, len(rhs)):
        depth += {"(": 1, ")": -1}.get(rhs[j], 0)
        if depth == 0:
            return rhs[:m.start()].strip(), m.group(1), rhs[i + 1:j], rhs[j + 1:]
    return rhs[:m.start()].strip(), m.group(1), rhs[i + 1:], ""


def _operand_shapes(operands: str, table: dict[str, str]) -> list[tuple[str, tuple[int, ...]]]:
    """Shapes of an instruction's operands: printed inline, or (compiled modules print names
    only) looked up among the computation's instructions."""
    inline = _shapes(operands)
    if inline:
        return inline
    out = []
    for name in re.findall(r"%([\w.\-]+)", operands):
        out += _shapes(table.get(name, ""))[:1] if not table.get(name, "").startswith("(") else _shapes(table[name])
    return out


def _dot_flops(out_type: str, ops: list, attrs: str, opcode: str) -> float:
    out = _shapes(out_type)
    if not out or not ops:
        return 0.0
    n_out = math.prod(out[0][1])
    lhs = ops[0][1]
    if opcode == "dot":
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
        k = math.prod(lhs[int(c)] for c in m.group(1).split(",") if c) if m else 1
        return 2.0 * n_out * k
    m = re.search(r"dim_labels=([\w]+)_([\w]+)->", attrs)
    if not m or "f" not in m.group(1):
        return 0.0
    k = lhs[m.group(1).index("f")]
    g = re.search(r"feature_group_count=(\d+)", attrs)
    k //= int(g.group(1)) if g else 1
    # Taps per output along each spatial dim, at most the input's extent there: the TPU compiler
    # writes some batched dots as a convolution over a padded size-1 dim (window 32, pad 31_31),
    # where each output sees one real tap.
    w = re.search(r"window=\{size=([\dx]+)", attrs)
    sizes = [int(x) for x in w.group(1).split("x")] if w else []
    window = 1
    for d, size in enumerate(sizes):
        where = m.group(1).find(str(d))
        window *= min(size, lhs[where]) if 0 <= where < len(lhs) else size
    return 2.0 * n_out * k * window


def parse_hlo(text: str) -> dict:
    """{computation: [instruction dicts]} of an HLO module's text, and the ENTRY's name."""
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h and "=" not in line.split("(")[0]:
            current = h.group(2)
            comps[current] = []
            if h.group(1):
                entry = current
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        parts = _split_call(m.group(3))
        if parts is None:
            continue
        out_type, opcode, operands, attrs = parts
        calls = re.findall(r"(?:calls|body|to_apply)=%?([\w.\-]+)", attrs)
        branches = re.search(r"branch_computations=\{([^}]*)\}", attrs)
        if branches:
            calls += [c.strip().lstrip("%") for c in branches.group(1).split(",")]
        trip = re.search(r"known_trip_count\D*(\d+)", attrs)
        op_name = re.search(r'op_name="([^"]*)"', attrs)
        comps[current].append({
            "name": m.group(2), "opcode": opcode, "out": out_type, "operands": operands, "attrs": attrs,
            "calls": calls, "trip": int(trip.group(1)) if trip else None,
            "op_name": op_name.group(1) if op_name else "",
            "kind": (re.search(r"kind=(k\w+)", attrs) or [None, ""])[1],
        })
    return {"computations": comps, "entry": entry}


def _op_bytes(ins: dict, operands: list) -> float:
    """HBM bytes of a top-level op: its operands and result, except that a dynamic-update-slice
    (a scan stacking its per-layer residuals) writes only its update in place, and a (dynamic-)slice
    reads only the slice it returns, not the whole buffer."""
    out = _nbytes(_shapes(ins["out"]))
    sizes = sorted((_nbytes([o]) for o in operands), reverse=True)
    tag = ins["opcode"] if ins["opcode"] != "fusion" else ins["name"]
    if "dynamic-update-slice" in tag and sizes:
        return 2.0 * sum(sizes[1:])  # the buffer (largest operand) is aliased by the result
    if ("dynamic-slice" in tag or tag == "slice") and sizes and sizes[0] > out:
        return 2.0 * out + sum(sizes[1:])
    return out + sum(sizes)


def _trip_from_condition(comps: dict, attrs: str) -> int | None:
    """A scan's trip count from its loop condition `counter < N` (counter from 0 by 1, as
    lax.scan/fori_loop lower), when the compiler did not annotate it."""
    cond = re.search(r"condition=%?([\w.\-]+)", attrs)
    body = comps.get(cond.group(1), []) if cond else []
    consts = [int(m.group(1)) for ins in body if ins["opcode"] == "constant"
              for m in [re.fullmatch(r"\s*(\d+)\s*", ins["operands"])] if m]
    lt = [ins for ins in body if ins["opcode"] == "compare" and "direction=LT" in ins["attrs"]]
    return consts[0] if len(consts) == 1 and len(lt) == 1 else None


def breakdown(text: str) -> dict:
    """Per-op FLOPs (dots and convolutions, inside fusions too) and HBM bytes (each top-level op's
    operands + result), weighted by loop trip counts, grouped by op kind."""
    mod = parse_hlo(text)
    comps = mod["computations"]
    tables = {c: {ins["name"]: ins["out"] for ins in body} for c, body in comps.items()}
    fused_flops: dict[str, float] = {}

    def comp_flops(name: str, seen=()) -> float:
        if name in fused_flops:
            return fused_flops[name]
        total = 0.0
        for ins in comps.get(name, []):
            if ins["opcode"] in ("dot", "convolution"):
                total += _dot_flops(ins["out"], _operand_shapes(ins["operands"], tables[name]), ins["attrs"],
                                    ins["opcode"])
            elif ins["opcode"] == "fusion" and ins["calls"] and ins["calls"][0] not in seen:
                total += comp_flops(ins["calls"][0], seen + (name,))
        fused_flops[name] = total
        return total

    def comp_contains(name: str, ops: tuple[str, ...], seen=()) -> str | None:
        for ins in comps.get(name, []):
            if ins["opcode"] in ops:
                return ins["opcode"]
            if ins["opcode"] == "fusion" and ins["calls"] and ins["calls"][0] not in seen:
                hit = comp_contains(ins["calls"][0], ops, seen + (name,))
                if hit:
                    return hit
        return None

    groups = collections.defaultdict(lambda: {"flops": 0.0, "bytes": 0.0, "count": 0})
    top = []
    unknown_loops = 0

    def visit(name: str, mult: float, seen=()):
        nonlocal unknown_loops
        for ins in comps.get(name, []):
            op = ins["opcode"]
            if op == "while":
                trip = ins["trip"] or _trip_from_condition(comps, ins["attrs"])
                if trip is None:
                    unknown_loops += 1
                body = re.search(r"body=%?([\w.\-]+)", ins["attrs"])
                if body and body.group(1) not in seen:
                    visit(body.group(1), mult * (trip or 1), seen + (name,))
                continue
            if op in ("call", "conditional") or (op == "async-start" and ins["calls"]):
                for c in ins["calls"]:
                    if c not in seen:
                        visit(c, mult, seen + (name,))
                continue
            if op in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast") or op.endswith("-done"):
                continue
            if op == "fusion":
                inner = ins["calls"][0] if ins["calls"] else ""
                flops = comp_flops(inner)
                hit = comp_contains(inner, ("convolution", "dot", "custom-call") + _COLLECTIVES)
                kind = {"convolution": "matmul fusion", "dot": "matmul fusion"}.get(hit, None) if hit else None
                if kind is None:
                    kind = f"fusion ({hit})" if hit else f"fusion ({ins['kind'] or 'loop'})"
            else:
                flops = (_dot_flops(ins["out"], _operand_shapes(ins["operands"], tables[name]), ins["attrs"], op)
                         if op in ("dot", "convolution") else 0.0)
                base = op[:-len("-start")] if op.endswith("-start") else op
                kind = base
                if op == "custom-call":
                    target = re.search(r'custom_call_target="([^"]*)"', ins["attrs"])
                    kind = f"custom-call {target.group(1) if target else ''}".strip()
            nbytes = _op_bytes(ins, _operand_shapes(ins["operands"], tables[name]))
            g = groups[kind]
            g["flops"] += flops * mult
            g["bytes"] += nbytes * mult
            g["count"] += 1
            top.append({"name": ins["name"], "kind": kind, "flops": flops * mult, "bytes": nbytes * mult,
                        "times": mult, "op_name": ins["op_name"]})

    if mod["entry"]:
        visit(mod["entry"], 1.0)
    return {"groups": dict(groups), "top": top, "unknown_trip_loops": unknown_loops}


def format_breakdown(b: dict, n: int = 10) -> str:
    groups = b["groups"]
    tf, tb = sum(g["flops"] for g in groups.values()), sum(g["bytes"] for g in groups.values())
    lines = [f"per-op cost of the compiled per-device program (loop bodies x trip count): "
             f"{tf:.4e} FLOPs (dots/convolutions), {tb:.4e} bytes (operands + results of each op)",
             f"{'op kind':44s} {'count':>6s} {'FLOPs':>11s} {'%':>5s} {'bytes':>11s} {'%':>5s}"]
    ranked = sorted(groups.items(), key=lambda kv: (-kv[1]["flops"], -kv[1]["bytes"]))
    for kind, g in ranked[:15]:
        lines.append(f"{kind[:44]:44s} {g['count']:6d} {g['flops']:11.3e} {100 * g['flops'] / (tf or 1):5.1f} "
                     f"{g['bytes']:11.3e} {100 * g['bytes'] / (tb or 1):5.1f}")
    for title, key in (("top ops by FLOPs", "flops"), ("top ops by bytes", "bytes")):
        lines.append(title + ":")
        for t in sorted(b["top"], key=lambda t: -t[key])[:n]:
            lines.append(f"  {t[key]:11.3e}  x{t['times']:<5.0f} {t['kind'][:24]:24s} {t['name'][:28]:28s} "
                         f"{t['op_name'][-70:]}")
    if len(ranked) > 15:
        lines.append(f"  ... {len(ranked) - 15} more kinds ({sum(g['bytes'] for _, g in ranked[15:]):.3e} bytes)")
    lines.append("(custom calls, e.g. the splash attention kernels, show no FLOPs here: their work is inside the kernel)")
    if b["unknown_trip_loops"]:
        lines.append(f"({b['unknown_trip_loops']} loop(s) without a known trip count counted once)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI


def _csv(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {bad}: choose from {list(allowed)}")
    return items


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "tpu_sizing"), help="folder of sizing.jsonl/csv/md")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--gens", default=",".join(GENS))
    ap.add_argument("--max-rss-gb", type=float, default=12.0,
                    help="skip a row when a smaller model of the same mode and generation needed more host RAM")
    ap.add_argument("--kill-rss-gb", type=float, default=16.0, help="stop a compile past this much host RAM")
    ap.add_argument("--timeout", type=float, default=1800.0, help="stop a compile after this many seconds")
    ap.add_argument("--breakdown", default=None, metavar="MODEL/MODE/GEN",
                    help="print the per-op cost breakdown of that row's compiled step (compiles it if needed)")
    ap.add_argument("--top", type=int, default=10, help="ops listed in the breakdown")
    ap.add_argument("--table", action="store_true", help="only rewrite and print the tables from the JSONL")
    # internal: one compile in this process (the driver's child)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--chips", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--hlo", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rows", default=None, metavar="MODEL/MODE/GEN,...",
                    help="these rows, in this order, instead of --models x --modes x --gens")
    # tests: a smaller step shape (JSON, keys of DEFAULT_SHAPE)
    ap.add_argument("--shape", type=json.loads, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        record = compile_one(Row.parse(args.child), args.chips, hlo_path=args.hlo, shape=args.shape)
        print(json.dumps(record))
        return 0

    os.makedirs(args.out, exist_ok=True)
    jsonl = os.path.join(args.out, "sizing.jsonl")
    records = load_records(jsonl)
    if args.table:
        print(write_tables(records, args.out))
        return 0

    from sr_jax import tpu

    if not tpu.libtpu_available():
        print("tpu_sizing: libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler", file=sys.stderr)
        return 2

    if args.breakdown:
        row = Row.parse(args.breakdown)
        done = [r for r in records if r.get("kind") == "row" and r["row"] == row.key and r["status"] == "fits"]
        if not done:
            summary = run_row(row, records, jsonl, args.out, args)
            append_record(jsonl, summary)
            records.append(summary)
            done = [summary] if summary["status"] == "fits" else []
        if not done:
            print(f"tpu_sizing: {row.key} fits no slice, so there is no step to break down", file=sys.stderr)
            return 1
        r = done[-1]
        path = os.path.join(args.out, r["hlo"]) if r.get("hlo") else None
        if not path or not os.path.exists(path):
            rec = run_child(row, r["chips"], args.out, kill_rss=args.kill_rss_gb * 1e9, timeout=args.timeout,
                            shape=args.shape)
            path = os.path.join(args.out, rec.get("hlo") or "")
        with gzip.open(path, "rt") as f:
            text = f.read()
        print(f"{row.key} on {r['topology']} ({r['chips']} chips); XLA cost analysis: "
              f"{(r.get('flops_xla') or 0) / r['chips']:.4e} FLOPs and {r.get('bytes_xla_per_device') or 0:.4e} "
              f"bytes per device (loop bodies once)")
        print(format_breakdown(breakdown(text), args.top))
        return 0

    done = {r["row"] for r in records if r.get("kind") == "row" and r["status"] != "error"}  # errors are retried
    rows = [Row(m, mo, g) for m in _csv(args.models, MODELS, "models") for mo in _csv(args.modes, MODES, "modes")
            for g in _csv(args.gens, GENS, "generations")]
    if args.rows:
        rows = [Row.parse(k) for k in args.rows.split(",")]
    for row in rows:
        if row.key in done:
            print(f"{row.key}: done in {jsonl}, skipped")
            continue
        summary = run_row(row, records, jsonl, args.out, args)
        append_record(jsonl, summary)
        records.append(summary)
        write_tables(records, args.out)
        print(f"==> {row.key}: {summary['status']} {summary.get('topology') or ''} {summary.get('reason') or ''}",
              flush=True)
    print(write_tables(records, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
