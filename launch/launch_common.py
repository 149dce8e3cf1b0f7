"""Shared plumbing of the launch scripts: a plan is a list of steps, printed (`--dry-run`) or run.

Every side effect of a launcher is a `Step` (an external command, or one local file to write), so
`--dry-run` can show exactly what would happen and tests can check it without running anything.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from sr_jax.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

INSTALL_HINTS = {
    "gcloud": "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), then run "
              "`gcloud auth login` and `gcloud config set project PROJECT`",
    "sbatch": "run this on a SLURM login node, or use `render` to write the script and submit it there",
}


class LaunchError(RuntimeError):
    """A problem the user must fix (bad config, missing tool); reported without a traceback."""


@dataclass(frozen=True)
class Step:
    what: str
    argv: tuple[str, ...] = ()
    write_path: str = ""  # a local file to write instead of a command
    write_text: str = ""

    def __post_init__(self):
        if bool(self.argv) == bool(self.write_path):
            raise ValueError("a step is either a command or a file to write")


def command(what: str, *argv: str) -> Step:
    return Step(what, tuple(argv))


def print_plan(steps: list[Step], out: TextIO) -> None:
    """One `# what` line per step, then the exact shell-quoted command (or the file's content)."""
    for step in steps:
        print(f"# {step.what}", file=out)
        if step.argv:
            print(shlex.join(step.argv), file=out)
        else:
            print(f"# write {step.write_path}:", file=out)
            for line in step.write_text.splitlines():
                print(f"# | {line}", file=out)


def missing_tools(steps: list[Step]) -> list[str]:
    names = dict.fromkeys(s.argv[0] for s in steps if s.argv)
    return [n for n in names if shutil.which(n) is None]


def execute(steps: list[Step], dry_run: bool, out: TextIO | None = None) -> int:
    """Prints the plan (dry run) or runs it step by step, stopping at the first failure."""
    if dry_run:
        print_plan(steps, out or sys.stdout)
        return 0
    missing = missing_tools(steps)
    if missing:
        lines = [f"{name} not found on PATH: {INSTALL_HINTS.get(name, 'install it first')}" for name in missing]
        raise LaunchError("; ".join(lines) + ". Use --dry-run to only print the commands.")
    for step in steps:
        if step.write_path:
            print(f"+ write {step.write_path}", file=sys.stderr)
            Path(step.write_path).write_text(step.write_text)
            continue
        print(f"+ {shlex.join(step.argv)}", file=sys.stderr)
        rc = subprocess.run(list(step.argv)).returncode
        if rc != 0:
            print(f"error: step '{step.what}' failed with exit code {rc}", file=sys.stderr)
            return rc
    return 0


def check_env_names(env: dict, where: str) -> dict[str, str]:
    """Environment variables as strings; a bad name is an error naming it."""
    for key in env:
        if not _ENV_NAME.fullmatch(str(key)):
            raise LaunchError(f"{where}: {key!r} is not a valid environment variable name")
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def parse_env_flags(items: list[str] | None) -> dict[str, str]:
    env = {}
    for item in items or []:
        if "=" not in item:
            raise LaunchError(f"--env {item!r} is not of the form NAME=VALUE")
        key, value = item.split("=", 1)
        env[key] = value
    return check_env_names(env, "--env")


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """Splits `launcher args -- program args` at the first `--`."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main_wrapper(fn, argv: list[str] | None) -> int:
    try:
        return fn(list(sys.argv[1:] if argv is None else argv))
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:  # names the config file and key
        print(f"error: {e}", file=sys.stderr)
        return 2
