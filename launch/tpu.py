#!/usr/bin/env python3
"""Multi-host Cloud TPU slices with `gcloud compute tpus tpu-vm`: create, set up, run, logs, stop, delete.

    python launch/tpu.py SUBCOMMAND --config launch/tpu_pod.yaml [--set key=value ...] [--dry-run]

Every subcommand builds a list of commands; `--dry-run` prints them (exact argv, shell-quoted)
and runs nothing. Commands that touch the workers use `ssh --worker=all`, so every host of the
slice does the same thing. On a TPU slice the hosts find each other by themselves (libtpu reads the
slice layout from the VM metadata; `jax.distributed.initialize()` with no arguments also works
there): starting the same program on every worker is all a multi-host run needs.

Remote paths in the config (code, venv, logs) are relative to each worker's home directory.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Runnable straight from a checkout: the sibling helper and sr_jax's config loader need no install.
for _p in (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from launch_common import (  # noqa: E402
    REPO_ROOT, LaunchError, Step, check_env_names, command, execute, main_wrapper, parse_env_flags,
    split_command,
)
from sr_jax.config import load_config  # noqa: E402

# The TPU VM base images meant for JAX (which is pip-installed on top), by accelerator generation.
RUNTIME_BY_GENERATION = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# Generations whose accelerator type counts TensorCores, with 8 per host (4 chips x 2 cores).
CORES_PER_HOST = {"v2": 8, "v3": 8, "v4": 8, "v5p": 8}

# The runtime images ship Ubuntu 22.04's Python 3.10; sr_jax needs 3.11, which apt has.
_APT = "sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600"
DEFAULT_SETUP_COMMANDS = [f"{_APT} update -qq", f"{_APT} install -y -qq python3.11 python3.11-venv"]

_TPU_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_REMOTE_TARBALL = "sr_jax_src.tar.gz"


@dataclass
class PodConfig:
    name: str = ""  # TPU VM (and queued resource) name
    zone: str = ""
    project: str = ""  # empty: gcloud's configured project
    accelerator_type: str = "v5p-64"
    runtime_version: str = "auto"  # auto: RUNTIME_BY_GENERATION
    num_workers: int = 0  # hosts in the slice; 0: derived from accelerator_type where possible
    spot: bool = False
    preemptible: bool = False
    queued: bool = False  # create through `queued-resources` (waits for capacity)
    create_flags: list[str] = field(default_factory=list)  # passed to create as is, e.g. --network=...
    ssh_flags: list[str] = field(default_factory=list)  # passed to ssh/scp, e.g. --internal-ip
    # Code: a git URL cloned on every worker, else a local checkout (default: this one) copied over.
    repo_url: str = ""
    repo_ref: str = "main"
    local_path: str = ""
    exclude: list[str] = field(default_factory=lambda: [
        ".git", "__pycache__", "*.pyc", "*.egg-info", ".venv", ".pytest_cache", "tpu_logs", "slurm_logs"])
    remote_dir: str = "sr_jax"
    # Python environment on the workers.
    python: str = "python3.11"
    venv: str = "sr_jax_venv"
    setup_commands: list[str] = field(default_factory=lambda: list(DEFAULT_SETUP_COMMANDS))
    jax_package: str = "jax[tpu]"
    pip_extra: list[str] = field(default_factory=list)
    # Runs.
    log_dir: str = "sr_jax_logs"
    env: dict[str, str] = field(default_factory=lambda: {"JAX_PLATFORMS": "tpu"})
    command: list[str] = field(default_factory=list)  # default program for `run`


def validate(cfg: PodConfig) -> PodConfig:
    if not cfg.name or not _TPU_NAME.fullmatch(cfg.name):
        raise LaunchError(f"name: {cfg.name!r} is not a valid TPU name (lowercase letters, digits, '-')")
    if not cfg.zone:
        raise LaunchError("zone: required (e.g. us-east5-a)")
    if cfg.spot and cfg.preemptible:
        raise LaunchError("spot and preemptible: choose one")
    if cfg.queued and cfg.preemptible:
        raise LaunchError("preemptible: queued resources take spot=true instead")
    if cfg.repo_url and cfg.local_path:
        raise LaunchError("repo_url and local_path: set one (git clone on the workers, or copy a local checkout)")
    for key in ("remote_dir", "venv", "log_dir"):
        value = getattr(cfg, key).removeprefix("~/").strip("/")
        if not value or value in (".", "~"):
            raise LaunchError(f"{key}: {getattr(cfg, key)!r} must name a directory below the home directory")
    cfg.env = check_env_names(cfg.env, "env")
    return cfg


def load_pod_config(path: str | None, overrides: list[str]) -> PodConfig:
    return validate(load_config(PodConfig, path, overrides))


def runtime_version(cfg: PodConfig) -> str:
    if cfg.runtime_version != "auto":
        return cfg.runtime_version
    generation = cfg.accelerator_type.rsplit("-", 1)[0]
    if generation not in RUNTIME_BY_GENERATION:
        raise LaunchError(f"runtime_version: no default for accelerator {cfg.accelerator_type!r}; set it")
    return RUNTIME_BY_GENERATION[generation]


def num_workers(cfg: PodConfig) -> int:
    if cfg.num_workers > 0:
        return cfg.num_workers
    generation, _, size = cfg.accelerator_type.rpartition("-")
    if generation in CORES_PER_HOST and size.isdigit():
        return max(1, int(size) // CORES_PER_HOST[generation])
    raise LaunchError(f"num_workers: cannot derive the host count of {cfg.accelerator_type!r}; set it")


# --- gcloud command lines ------------------------------------------------------------------------

def _where(cfg: PodConfig) -> list[str]:
    return [f"--zone={cfg.zone}"] + ([f"--project={cfg.project}"] if cfg.project else [])


def _gcloud_tpus(cfg: PodConfig, *args: str) -> tuple[str, ...]:
    return ("gcloud", "compute", "tpus", *args, *_where(cfg))


def ssh_all(cfg: PodConfig, script: str) -> tuple[str, ...]:
    """Runs a shell snippet on every worker, in parallel."""
    return _gcloud_tpus(cfg, "tpu-vm", "ssh", cfg.name, "--worker=all", *cfg.ssh_flags, f"--command={script}")


def _home_relative(path: str) -> str:
    return path.removeprefix("~/")


def remote_path(path: str) -> str:
    """A worker path as a shell word; relative paths hang off $HOME (ssh may not start there)."""
    path = _home_relative(path)
    return shlex.quote(path) if path.startswith("/") else '"$HOME"/' + shlex.quote(path)


def _run_dir(cfg: PodConfig, run: str) -> str:
    """Shell lines setting L (log root), h (this host) and d (the run's directory)."""
    chosen = '"$(cat "$L/LATEST" 2>/dev/null)"' if run == "latest" else shlex.quote(_check_run_name(run))
    return f"L={remote_path(cfg.log_dir)}; h=$(hostname); d=\"$L\"/{chosen}"


# Opens an `if` taken when this host's process of the run in "$d" is alive (f: its pid file).
_IF_ALIVE = 'f="$d/$h.pid"; if [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then'


def _check_run_name(run: str) -> str:
    if not _RUN_NAME.fullmatch(run):
        raise LaunchError(f"run name {run!r}: use letters, digits, '.', '_' and '-'")
    return run


# --- subcommands ---------------------------------------------------------------------------------

def plan_create(cfg: PodConfig) -> list[Step]:
    version, tier = runtime_version(cfg), (["--spot"] if cfg.spot else [])
    if cfg.queued:
        argv = _gcloud_tpus(cfg, "queued-resources", "create", cfg.name, f"--node-id={cfg.name}",
                            f"--accelerator-type={cfg.accelerator_type}", f"--runtime-version={version}",
                            *tier, *cfg.create_flags)
        return [command(f"queue a request for {cfg.accelerator_type} (see `status`)", *argv)]
    tier += ["--preemptible"] if cfg.preemptible else []
    argv = _gcloud_tpus(cfg, "tpu-vm", "create", cfg.name, f"--accelerator-type={cfg.accelerator_type}",
                        f"--version={version}", *tier, *cfg.create_flags)
    return [command(f"create the {cfg.accelerator_type} slice", *argv)]


def _code_steps(cfg: PodConfig) -> list[Step]:
    code = remote_path(cfg.remote_dir)
    if cfg.repo_url:
        script = (f"set -e; R={code}; if [ ! -d \"$R/.git\" ]; then git clone --quiet "
                  f"{shlex.quote(cfg.repo_url)} \"$R\"; fi; "
                  f"git -C \"$R\" fetch --quiet origin {shlex.quote(cfg.repo_ref)}; "
                  f"git -C \"$R\" checkout --quiet --force FETCH_HEAD")
        return [command(f"clone {cfg.repo_url} at {cfg.repo_ref} on every worker", *ssh_all(cfg, script))]
    source = Path(cfg.local_path).expanduser() if cfg.local_path else REPO_ROOT
    tarball = str(Path(tempfile.gettempdir()) / f"sr_jax_{cfg.name}.tar.gz")
    excludes = [f"--exclude={pattern}" for pattern in cfg.exclude]
    unpack = (f"set -e; mkdir -p {code}; tar -xzf \"$HOME\"/{_REMOTE_TARBALL} -C {code}; "
              f"rm -f \"$HOME\"/{_REMOTE_TARBALL}")
    return [
        command(f"pack {source}", "tar", "-czf", tarball, *excludes, "-C", str(source), "."),
        command("copy it to every worker", *_gcloud_tpus(
            cfg, "tpu-vm", "scp", tarball, f"{cfg.name}:{_REMOTE_TARBALL}", "--worker=all", *cfg.ssh_flags)),
        command(f"unpack into ~/{_home_relative(cfg.remote_dir)}", *ssh_all(cfg, unpack)),
    ]


def _install_script(cfg: PodConfig) -> str:
    venv = remote_path(cfg.venv)
    packages = " ".join(shlex.quote(p) for p in [cfg.jax_package, *cfg.pip_extra])
    return "; ".join([
        "set -e", *cfg.setup_commands, f"V={venv}",
        f"if [ ! -x \"$V/bin/python\" ]; then {shlex.quote(cfg.python)} -m venv \"$V\"; fi",
        "\"$V/bin/python\" -m pip install --quiet --upgrade pip",
        f"\"$V/bin/python\" -m pip install --quiet -e {remote_path(cfg.remote_dir)} {packages}",
        "\"$V/bin/python\" -c 'import jax, sr_jax; print(\"jax\", jax.__version__)'",
    ])


def plan_setup(cfg: PodConfig, code_only: bool = False) -> list[Step]:
    steps = _code_steps(cfg)
    if not code_only:
        steps.append(command(f"install sr_jax and {cfg.jax_package} into ~/{_home_relative(cfg.venv)} "
                             "on every worker", *ssh_all(cfg, _install_script(cfg))))
    return steps


def plan_run(cfg: PodConfig, program: list[str], run_name: str, extra_env: dict[str, str]) -> list[Step]:
    program = program or cfg.command
    if not program:
        raise LaunchError("run: no program; pass it after `--` (e.g. -- sr-jax train --config FILE) "
                          "or set `command` in the pod config")
    run = _check_run_name(run_name)
    if run == "latest":
        raise LaunchError("run name 'latest' is reserved: it means the most recent run")
    env = {**cfg.env, **extra_env}
    # Refuse to start while a previous run is alive anywhere, before any worker starts: a partial
    # launch would sit waiting for its missing peers while holding the TPUs.
    check = (f"{_run_dir(cfg, 'latest')}; {_IF_ALIVE} "
             f"echo \"$h: run $(cat \"$L/LATEST\") is still running; use stop first\" >&2; exit 1; fi")
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    # setsid: the program leads its own process group, so `stop` can signal it with its children;
    # nohup and the redirections let it outlive the ssh session.
    start = (f"set -e; {_run_dir(cfg, run)}; mkdir -p \"$d\"; echo {shlex.quote(run)} > \"$L/LATEST\"; "
             f"cd {remote_path(cfg.remote_dir)}; "
             f"export PATH={remote_path(cfg.venv)}/bin:\"$PATH\"{' ' + exports if exports else ''}; "
             f"setsid nohup {shlex.join(program)} > \"$d/$h.log\" 2>&1 < /dev/null & "
             f"echo $! > \"$d/$h.pid\"; echo \"$h: started run {run} (pid $!), log $d/$h.log\"")
    return [command("check that no run is active", *ssh_all(cfg, check)),
            command(f"start run {run} on every worker", *ssh_all(cfg, start))]


def plan_logs(cfg: PodConfig, run: str, out_dir: str, tail: int) -> list[Step]:
    if tail > 0:
        script = f"{_run_dir(cfg, run)}; tail -n {tail} \"$d/$h.log\" | sed \"s/^/[$h] /\""
        return [command(f"last {tail} log lines of every worker", *ssh_all(cfg, script))]
    # gcloud refuses `scp --worker=all` towards the local machine, so fetch worker by worker.
    source = _home_relative(cfg.log_dir)
    if run != "latest":
        source += "/" + _check_run_name(run)
    steps = []
    for worker in range(num_workers(cfg)):
        dest = str(Path(out_dir) / f"worker-{worker}")
        steps += [command(f"worker {worker}", "mkdir", "-p", dest),
                  command(f"fetch logs of worker {worker}", *_gcloud_tpus(
                      cfg, "tpu-vm", "scp", "--recurse", f"{cfg.name}:{source}", dest,
                      f"--worker={worker}", *cfg.ssh_flags))]
    return steps


def plan_status(cfg: PodConfig, run: str, workers: bool) -> list[Step]:
    kind = "queued-resources" if cfg.queued else "tpu-vm"
    steps = [command("describe the slice", *_gcloud_tpus(cfg, kind, "describe", cfg.name))]
    if workers:
        script = (f"{_run_dir(cfg, run)}; {_IF_ALIVE} s=running; else s='not running'; fi; "
                  f"echo \"$h: $s\"; tail -n 2 \"$d/$h.log\" 2>/dev/null | sed \"s/^/[$h] /\"")
        steps.append(command("process and last log lines on every worker", *ssh_all(cfg, script)))
    return steps


def plan_stop(cfg: PodConfig, run: str, signal: str) -> list[Step]:
    script = (f"{_run_dir(cfg, run)}; {_IF_ALIVE} "
              f"kill -{signal} -- \"-$(cat \"$f\")\"; echo \"$h: sent SIG{signal} to process group $(cat \"$f\")\"; "
              f"else echo \"$h: nothing running\"; fi")
    return [command(f"stop the run on every worker (SIG{signal})", *ssh_all(cfg, script))]


def plan_exec(cfg: PodConfig, shell_command: list[str]) -> list[Step]:
    if not shell_command:
        raise LaunchError("exec: pass the shell command after `--`")
    script = (f"cd {remote_path(cfg.remote_dir)} && export PATH={remote_path(cfg.venv)}/bin:\"$PATH\" && "
              f"{' '.join(shell_command)}")
    return [command("run a shell command on every worker", *ssh_all(cfg, script))]


def plan_teardown(cfg: PodConfig) -> list[Step]:
    if cfg.queued:  # --force deletes the TPU VMs the request created along with it
        argv = _gcloud_tpus(cfg, "queued-resources", "delete", cfg.name, "--force", "--quiet")
    else:
        argv = _gcloud_tpus(cfg, "tpu-vm", "delete", cfg.name, "--quiet")
    return [command(f"delete {cfg.name}", *argv)]


# --- command line --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="pod config YAML (see launch/tpu_pod.yaml)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set zone=us-central2-b (repeatable)")
    common.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")

    parser = argparse.ArgumentParser(prog="launch/tpu.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="subcommand", required=True)
    sub.add_parser("create", parents=[common], help="create the slice (or queue a request)")
    p = sub.add_parser("setup", parents=[common], help="ship the code and install it on every worker")
    p.add_argument("--code-only", action="store_true", help="ship the code, skip the Python environment")
    p = sub.add_parser("run", parents=[common], help="start PROGRAM (after --) on every worker, in the background")
    p.add_argument("--run-name", default="", help="names the log directory (default: a timestamp)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment")
    p = sub.add_parser("logs", parents=[common], help="fetch every worker's logs, or tail them")
    p.add_argument("--run", default="latest", help="run name (default: the latest; fetch copies all runs)")
    p.add_argument("--out", default="", help="local directory (default: tpu_logs/NAME)")
    p.add_argument("--tail", type=int, default=0, metavar="N", help="print the last N lines instead")
    p = sub.add_parser("status", parents=[common], help="slice state, and whether the run is alive")
    p.add_argument("--run", default="latest")
    p.add_argument("--no-workers", action="store_true", help="only describe the slice (no ssh)")
    p = sub.add_parser("stop", parents=[common], help="signal the run's process group on every worker")
    p.add_argument("--run", default="latest")
    p.add_argument("--signal", default="TERM", choices=["TERM", "INT", "KILL"])
    sub.add_parser("exec", parents=[common], help="run a shell command (after --) on every worker")
    sub.add_parser("teardown", parents=[common], help="delete the slice")
    return parser


def _main(argv: list[str]) -> int:
    own, program = split_command(argv)
    args = build_parser().parse_args(own)
    cfg = load_pod_config(args.config, args.overrides)
    if program and args.subcommand not in ("run", "exec"):
        raise LaunchError(f"{args.subcommand}: takes no program after `--`")
    match args.subcommand:
        case "create":
            steps = plan_create(cfg)
        case "setup":
            steps = plan_setup(cfg, args.code_only)
        case "run":
            run_name = args.run_name or time.strftime("%Y%m%d-%H%M%S")
            steps = plan_run(cfg, program, run_name, parse_env_flags(args.env))
        case "logs":
            steps = plan_logs(cfg, args.run, args.out or f"tpu_logs/{cfg.name}", args.tail)
        case "status":
            steps = plan_status(cfg, args.run, not args.no_workers)
        case "stop":
            steps = plan_stop(cfg, args.run, args.signal)
        case "exec":
            steps = plan_exec(cfg, program)
        case "teardown":
            steps = plan_teardown(cfg)
    return execute(steps, args.dry_run)


def main(argv: list[str] | None = None) -> int:
    return main_wrapper(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
