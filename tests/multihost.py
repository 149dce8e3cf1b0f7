"""Runs one command as a real multi-process JAX job on this machine: N processes that find each
other through a local coordinator (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID,
read by `sr_jax.sharding.maybe_initialize_distributed`), each with its own CPU devices; the
cross-process collectives are gloo's over TCP, as on a CPU cluster."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices: int, **extra: str) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]), **extra)
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        if var not in extra:
            env.pop(var, None)
    return env


def run_sr_jax(args: list[str], *, processes: int, devices: int, log_dir: Path, timeout: float = 600) -> None:
    """`sr-jax ARGS` in `processes` processes of `devices` CPU devices each (1 process: a plain
    run). Raises with the failing process's log when any exits non-zero; a failure stops the rest
    (they would wait on it in a collective)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    for i in range(processes):
        extra = {} if processes == 1 else dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                               JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))
        log = open(log_dir / f"process{i}.log", "wb")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-m", "sr_jax.cli", *args], cwd=ROOT, stdout=log,
                                      stderr=subprocess.STDOUT, env=process_env(devices, **extra)))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    bad = [i for i, p in enumerate(procs) if p.returncode != 0]
    if bad:
        i = bad[0]
        text = (log_dir / f"process{i}.log").read_text(errors="replace")
        raise AssertionError(f"process {i} of {processes} exited with {procs[i].returncode} "
                             f"(timeout {timeout:.0f} s); its log ends:\n{text[-4000:]}")
