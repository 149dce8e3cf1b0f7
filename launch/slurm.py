#!/usr/bin/env python3
"""Multi-node GPU runs under SLURM: fills launch/slurm/train.sbatch and submits it with sbatch.

    python launch/slurm.py render --config launch/slurm/cluster.yaml [--set key=value] [-- PROGRAM ...]
    python launch/slurm.py submit --config launch/slurm/cluster.yaml [--dry-run] [-- PROGRAM ...]

One task per GPU (`--ntasks-per-node` = `--gpus-per-node`); see the template for why.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Runnable straight from a checkout: the sibling helper and sr_jax's config loader need no install.
for _p in (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from launch_common import (  # noqa: E402
    LaunchError, Step, check_env_names, command, execute, main_wrapper, split_command,
)
from sr_jax.config import load_config  # noqa: E402

TEMPLATE = Path(__file__).resolve().parent / "slurm" / "train.sbatch"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass
class SlurmConfig:
    job_name: str = "sr-jax-train"
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 8
    mem: str = "0"  # per node; 0 asks for all of it
    time: str = "24:00:00"
    partition: str = ""
    account: str = ""
    qos: str = ""
    workdir: str = ""  # the checkout on the cluster; empty: where sbatch is called
    log_dir: str = "slurm_logs"  # relative to workdir
    sbatch_extra: list[str] = field(default_factory=list)  # more options, e.g. --constraint=h100
    setup: list[str] = field(default_factory=list)  # shell lines, e.g. "source .venv/bin/activate"
    env: dict[str, str] = field(default_factory=lambda: {"JAX_PLATFORMS": "cuda"})
    command: list[str] = field(default_factory=list)  # default program


def _sbatch_value(key: str, value) -> str:
    # sbatch reads #SBATCH lines itself, without a shell: no quoting, so no whitespace allowed.
    text = str(value)
    if not text or re.search(r"\s", text):
        raise LaunchError(f"{key}: {text!r} must be non-empty and contain no whitespace")
    return text


def validate(cfg: SlurmConfig) -> SlurmConfig:
    for key in ("nodes", "gpus_per_node", "cpus_per_task"):
        if getattr(cfg, key) < 1:
            raise LaunchError(f"{key}: must be at least 1, got {getattr(cfg, key)}")
    for key in ("job_name", "mem", "time", "log_dir"):
        _sbatch_value(key, getattr(cfg, key))
    for key in ("partition", "account", "qos", "workdir"):
        if getattr(cfg, key):
            _sbatch_value(key, getattr(cfg, key))
    for option in cfg.sbatch_extra:
        _sbatch_value("sbatch_extra", option)
    cfg.env = check_env_names(cfg.env, "env")
    return cfg


def load_slurm_config(path: str | None, overrides: list[str]) -> SlurmConfig:
    return validate(load_config(SlurmConfig, path, overrides))


def fill(template: str, values: dict[str, str]) -> str:
    """Replaces every {{name}}; a placeholder without a value, or a value without a placeholder, is an error."""
    used = set(_PLACEHOLDER.findall(template))
    if used != set(values):
        raise LaunchError(f"template placeholders {sorted(used)} do not match the values {sorted(values)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def render(cfg: SlurmConfig, program: list[str], template: str | None = None) -> str:
    program = program or cfg.command
    if not program:
        raise LaunchError("no program; pass it after `--` (e.g. -- sr-jax train --config FILE) "
                          "or set `command` in the cluster config")
    options = [f"--{key}={getattr(cfg, key)}" for key in ("partition", "account", "qos") if getattr(cfg, key)]
    options += [f"--chdir={cfg.workdir}"] if cfg.workdir else []
    options += cfg.sbatch_extra
    values = {
        "job_name": cfg.job_name, "nodes": str(cfg.nodes), "gpus_per_node": str(cfg.gpus_per_node),
        "cpus_per_task": str(cfg.cpus_per_task), "mem": cfg.mem, "time": cfg.time,
        "log_dir": cfg.log_dir, "log_dir_sh": shlex.quote(cfg.log_dir),
        "sbatch_options": "\n".join(f"#SBATCH {opt}" for opt in options),
        "setup": "\n".join(cfg.setup),
        "env": "\n".join(f"export {k}={shlex.quote(v)}" for k, v in cfg.env.items()),
        "command": shlex.join(program),
    }
    return fill(TEMPLATE.read_text() if template is None else template, values)


def plan_submit(cfg: SlurmConfig, script: str, script_path: str) -> list[Step]:
    # sbatch opens its --output file before the job starts, so the log directory must exist first.
    log_dir = Path(cfg.workdir or ".") / cfg.log_dir
    return [command("create the log directory", "mkdir", "-p", str(log_dir)),
            Step("the filled job script", write_path=script_path, write_text=script),
            command("submit", "sbatch", script_path)]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="cluster config YAML (see launch/slurm/cluster.yaml)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    parser = argparse.ArgumentParser(prog="launch/slurm.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="subcommand", required=True)
    p = sub.add_parser("render", parents=[common], help="print the filled job script (or write it)")
    p.add_argument("--out", default="", help="write the script here instead of printing it")
    p = sub.add_parser("submit", parents=[common], help="write the script and sbatch it")
    p.add_argument("--out", default="", help="script path (default: LOG_DIR/JOB_NAME.sbatch)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and the script, run nothing")
    return parser


def _main(argv: list[str]) -> int:
    own, program = split_command(argv)
    args = build_parser().parse_args(own)
    cfg = load_slurm_config(args.config, args.overrides)
    script = render(cfg, program)
    if args.subcommand == "render":
        if args.out:
            Path(args.out).write_text(script)
        else:
            sys.stdout.write(script)
        return 0
    script_path = args.out or str(Path(cfg.workdir or ".") / cfg.log_dir / f"{cfg.job_name}.sbatch")
    return execute(plan_submit(cfg, script, script_path), args.dry_run)


def main(argv: list[str] | None = None) -> int:
    return main_wrapper(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
