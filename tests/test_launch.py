"""launch/: TPU-pod and SLURM launchers.

Dry runs are checked command by command with every way of starting a process blocked. The shell
snippets meant for the TPU workers are then run here, with bash in a fake home directory, so their
quoting and process handling are tested for real; only gcloud itself is not.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sr_jax.config import ConfigError, load_config

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def _load(name: str):
    # The launchers are plain scripts, not a package.
    spec = importlib.util.spec_from_file_location(f"launch_{name}", LAUNCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


tpu = _load("tpu")
slurm = _load("slurm")
common = sys.modules["launch_common"]

POD = {"name": "my-pod", "zone": "us-central2-b", "project": "proj-1", "accelerator_type": "v4-32"}
RECIPE = ["sr-jax", "train", "--config", "configs/sft/spatialreward_8b_lora.yaml"]


@pytest.fixture
def no_exec(monkeypatch):
    """Fails the test if anything tries to start a process."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a process was started: {args!r}")
    monkeypatch.setattr(subprocess, "Popen", refuse)
    for name in ("system", "execv", "execvp", "execvpe", "posix_spawn", "posix_spawnp"):
        monkeypatch.setattr(os, name, refuse)


def pod_yaml(tmp_path: Path, **extra) -> str:
    path = tmp_path / "pod.yaml"
    path.write_text(json.dumps({**POD, **extra}))  # JSON is YAML
    return str(path)


def dry_run(module, argv: list[str], capsys) -> list[tuple[str, list[str]]]:
    """Runs a launcher with --dry-run and parses what it printed into (description, argv) pairs."""
    capsys.readouterr()
    head, sep, tail = (argv[:argv.index("--")], ["--"], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [], [])
    assert module.main([*head, "--dry-run", *sep, *tail]) == 0
    steps, what = [], None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("# "):
            what = what if line.startswith(("# write ", "# | ")) else line[2:]
        else:
            steps.append((what, shlex.split(line)))
    return steps


def remote_script(argv: list[str]) -> str:
    [flag] = [a for a in argv if a.startswith("--command=")]
    return flag.removeprefix("--command=")


def run_remote(script: str, home: Path, timeout: float = 20) -> subprocess.CompletedProcess:
    """What a worker's login shell does with an ssh command; HOME stands in for the worker's home."""
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    return subprocess.run(["bash", "-c", script], cwd=home, env=env, capture_output=True, text=True,
                          timeout=timeout)


def fake_executable(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


# --- pod config ----------------------------------------------------------------------------------

def test_example_pod_config_loads_with_overrides():
    cfg = tpu.load_pod_config(str(LAUNCH / "tpu_pod.yaml"), ["zone=europe-west4-b", "env.XLA_FLAGS=--a --b"])
    assert cfg.zone == "europe-west4-b" and cfg.accelerator_type == "v5p-64"
    assert cfg.env == {"JAX_PLATFORMS": "tpu", "XLA_FLAGS": "--a --b"}
    assert cfg.command == RECIPE
    assert tpu.runtime_version(cfg) == "v2-alpha-tpuv5" and tpu.num_workers(cfg) == 8
    assert cfg.setup_commands == tpu.DEFAULT_SETUP_COMMANDS  # defaults fill keys the file leaves out


def test_pod_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="acelerator_type"):
        load_config(tpu.PodConfig, pod_yaml(tmp_path, acelerator_type="v4-8"))
    cases = {
        "name": {"name": "My_Pod"}, "zone": {"zone": ""},
        "spot and preemptible": {"spot": True, "preemptible": True},
        "preemptible: queued": {"queued": True, "preemptible": True},
        "repo_url and local_path": {"repo_url": "https://example.com/r.git", "local_path": "/src"},
        "remote_dir": {"remote_dir": "~"}, "'BAD-NAME'": {"env": {"BAD-NAME": "1"}},
    }
    for message, extra in cases.items():
        with pytest.raises(common.LaunchError, match=message):
            tpu.load_pod_config(pod_yaml(tmp_path, **extra), [])
    with pytest.raises(common.LaunchError, match="num_workers"):
        tpu.num_workers(tpu.PodConfig(accelerator_type="v6e-16"))
    assert tpu.num_workers(tpu.PodConfig(accelerator_type="v6e-16", num_workers=4)) == 4
    hosts = [tpu.num_workers(tpu.PodConfig(accelerator_type=t)) for t in ("v4-8", "v4-32", "v5p-128", "v3-2048")]
    assert hosts == [1, 4, 16, 256]


# --- dry runs ------------------------------------------------------------------------------------

WHERE = ["--zone=us-central2-b", "--project=proj-1"]


@pytest.mark.parametrize("extra, expected", [
    ({}, ["tpu-vm", "create", "my-pod", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]),
    ({"spot": True, "runtime_version": "custom-rt", "create_flags": ["--network=n1"]},
     ["tpu-vm", "create", "my-pod", "--accelerator-type=v4-32", "--version=custom-rt", "--spot", "--network=n1"]),
    ({"preemptible": True}, ["tpu-vm", "create", "my-pod", "--accelerator-type=v4-32",
                             "--version=tpu-ubuntu2204-base", "--preemptible"]),
    ({"queued": True, "spot": True, "accelerator_type": "v5p-64"},
     ["queued-resources", "create", "my-pod", "--node-id=my-pod", "--accelerator-type=v5p-64",
      "--runtime-version=v2-alpha-tpuv5", "--spot"]),
])
def test_create_prints_the_exact_command(tmp_path, capsys, no_exec, extra, expected):
    [(_, argv)] = dry_run(tpu, ["create", "--config", pod_yaml(tmp_path, **extra)], capsys)
    assert argv == ["gcloud", "compute", "tpus", *expected, *WHERE]


def test_teardown_and_status(tmp_path, capsys, no_exec):
    [(_, argv)] = dry_run(tpu, ["teardown", "--config", pod_yaml(tmp_path)], capsys)
    assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-pod", "--quiet", *WHERE]
    [(_, argv)] = dry_run(tpu, ["teardown", "--config", pod_yaml(tmp_path, queued=True)], capsys)
    assert argv == ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-pod", "--force", "--quiet", *WHERE]
    [(_, argv)] = dry_run(tpu, ["status", "--no-workers", "--config", pod_yaml(tmp_path, queued=True)], capsys)
    assert argv == ["gcloud", "compute", "tpus", "queued-resources", "describe", "my-pod", *WHERE]


ALL_SUBCOMMANDS = [["create"], ["setup"], ["run", "--run-name", "r1"], ["logs"], ["logs", "--tail", "5"],
                   ["status"], ["stop"], ["teardown"], ["exec", "--", "nproc"]]


def _with_config(sub: list[str], config: str) -> list[str]:
    """Puts `--config FILE` before a program given after `--`."""
    cut = sub.index("--") if "--" in sub else len(sub)
    return [*sub[:cut], "--config", config, *sub[cut:]]


@pytest.mark.parametrize("project", ["proj-1", ""])
def test_every_command_carries_zone_project_and_targets_all_workers(tmp_path, capsys, no_exec, project,
                                                                  monkeypatch):
    config = pod_yaml(tmp_path, project=project, command=RECIPE, ssh_flags=["--internal-ip"])
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for sub in ALL_SUBCOMMANDS:
        steps = dry_run(tpu, _with_config(sub, config), capsys)
        gcloud = [argv for _, argv in steps if argv[0] == "gcloud"]
        assert gcloud, sub
        for argv in gcloud:
            assert "--zone=us-central2-b" in argv
            assert [a for a in argv if a.startswith("--project")] == (["--project=proj-1"] if project else [])
            if argv[4] in ("ssh", "scp"):
                assert "--internal-ip" in argv
                assert "--worker=all" in argv or sub == ["logs"], argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pod.yaml"]  # no tarball, no log directory


def test_logs_fetch_one_worker_at_a_time(tmp_path, capsys, no_exec):
    # gcloud refuses scp --worker=all towards the local machine: one scp per host (v4-32 has 4).
    steps = dry_run(tpu, ["logs", "--config", pod_yaml(tmp_path), "--run", "r7", "--out", "got"], capsys)
    scps = [argv for _, argv in steps if argv[0] == "gcloud"]
    assert [argv[-3] for argv in scps] == [f"--worker={i}" for i in range(4)]
    for i, argv in enumerate(scps):
        assert argv[4:8] == ["scp", "--recurse", "my-pod:sr_jax_logs/r7", f"got/worker-{i}"]
    assert [argv for _, argv in steps if argv[0] == "mkdir"] == [["mkdir", "-p", f"got/worker-{i}"] for i in range(4)]


def test_bad_input_is_a_clear_error(tmp_path, capsys, no_exec):
    config = pod_yaml(tmp_path)
    for argv, message in [
        (["run", "--config", config], "no program"),
        (["run", "--config", config, "--run-name", "latest", "--", "x"], "reserved"),
        (["run", "--config", config, "--run-name", "a b", "--", "x"], "run name"),
        (["run", "--config", config, "--env", "NOVALUE", "--", "x"], "NAME=VALUE"),
        (["create", "--config", config, "--", "x"], "takes no program"),
        (["create", "--config", config, "--set", "zone"], "key=value"),
        (["create", "--config", str(tmp_path / "missing.yaml")], "not found"),
    ]:
        assert tpu.main([argv[0], "--dry-run", *argv[1:]]) == 2, argv
        assert message in capsys.readouterr().err, argv


# --- the worker-side scripts, run with bash ------------------------------------------------------

def _worker_scripts(tmp_path, capsys, program) -> dict[str, str]:
    """The ssh --command scripts of run (a check, then the start), status, stop and logs --tail."""
    config = pod_yaml(tmp_path)
    run = dry_run(tpu, ["run", "--run-name", "r1", "--env", "MSG=hello  world", "--config", config,
                        "--", *program], capsys)
    found = dict(zip(["check", "start"], [remote_script(argv) for _, argv in run]))
    for name, sub in [("status", ["status"]), ("stop", ["stop"]), ("tail", ["logs", "--tail", "3"])]:
        found[name] = remote_script(dry_run(tpu, [*sub, "--config", config], capsys)[-1][1])
    return found


def test_run_lifecycle_on_a_fake_worker(tmp_path, capsys, no_exec, monkeypatch):
    home = tmp_path / "home"
    (home / "sr_jax").mkdir(parents=True)
    report = home / "report.json"
    # The program the pod would run: it records how it was started, starts a child process (as data
    # loader workers would), then waits to be stopped.
    fake_executable(home / "sr_jax_venv" / "bin" / "sr-jax", (
        "import json, os, subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '60'])\n"
        f"json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd(), 'pgid': os.getpgid(0), 'pid': os.getpid(),"
        f" 'child': child.pid, 'env': {{k: os.environ.get(k) for k in ('JAX_PLATFORMS', 'MSG')}}}},"
        f" open({str(report)!r} + '.tmp', 'w'))\n"
        f"os.rename({str(report)!r} + '.tmp', {str(report)!r})\n"
        "print('step 1 loss 0.5', flush=True)\ntime.sleep(60)\n"))
    program = ["sr-jax", "train", "--config", "configs/sft/spatialreward_8b_lora.yaml",
               "train.name=my run", "q='x' \"y\" $HOME;rm -rf /"]
    scripts = _worker_scripts(tmp_path, capsys, program)
    monkeypatch.undo()  # from here on the test itself starts processes
    started = None
    try:
        assert run_remote(scripts["check"], home).returncode == 0  # nothing ran before
        result = run_remote(scripts["start"], home)
        assert result.returncode == 0 and "started run r1" in result.stdout, result.stderr
        deadline = time.time() + 10
        while not report.exists() and time.time() < deadline:
            time.sleep(0.05)
        started = json.loads(report.read_text())
        assert started["argv"] == program[1:]  # every argument intact through three shells
        assert started["cwd"] == str(home / "sr_jax")
        assert started["env"] == {"JAX_PLATFORMS": "tpu", "MSG": "hello  world"}
        assert started["pgid"] == started["pid"]  # leads its own process group, so stop can signal it
        host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
        assert (home / "sr_jax_logs" / "LATEST").read_text().strip() == "r1"
        assert (home / "sr_jax_logs" / "r1" / f"{host}.pid").read_text().strip() == str(started["pid"])

        assert f"{host}: running" in run_remote(scripts["status"], home).stdout
        refused = run_remote(scripts["check"], home)
        assert refused.returncode == 1 and "still running" in refused.stderr
        deadline = time.time() + 5
        while "loss" not in (home / "sr_jax_logs" / "r1" / f"{host}.log").read_text() and time.time() < deadline:
            time.sleep(0.05)
        assert run_remote(scripts["tail"], home).stdout == f"[{host}] step 1 loss 0.5\n"

        assert "sent SIGTERM" in run_remote(scripts["stop"], home).stdout
        deadline = time.time() + 10
        while "not running" not in run_remote(scripts["status"], home).stdout and time.time() < deadline:
            time.sleep(0.1)
        assert f"{host}: not running" in run_remote(scripts["status"], home).stdout
        deadline = time.time() + 5
        while _alive(started["child"]) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(started["child"])  # stop reaches the whole process group
        assert "nothing running" in run_remote(scripts["stop"], home).stdout
        assert run_remote(scripts["check"], home).returncode == 0
    finally:
        if started:
            for pid in (started["child"], started["pid"]):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


def test_setup_ships_the_local_checkout(tmp_path, capsys, no_exec, monkeypatch):
    src = tmp_path / "src"
    for rel in ("sr_jax/a.py", "configs/x y.yaml", ".git/HEAD", "sr_jax/__pycache__/a.pyc", "b.egg-info/PKG"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    steps = dry_run(tpu, ["setup", "--code-only", "--config", pod_yaml(tmp_path, local_path=str(src))], capsys)
    (_, tar), (_, scp), (_, unpack) = steps
    tarball = tar[2]
    assert tarball == str(tmp_path / "sr_jax_my-pod.tar.gz") and not Path(tarball).exists()
    assert scp[4:7] == ["scp", tarball, "my-pod:sr_jax_src.tar.gz"] and "--worker=all" in scp
    monkeypatch.undo()
    subprocess.run(tar, check=True)  # the local step, as printed
    home = tmp_path / "home"
    home.mkdir()
    (home / "sr_jax_src.tar.gz").write_bytes(Path(tarball).read_bytes())  # what scp delivers
    assert run_remote(remote_script(unpack), home).returncode == 0
    shipped = sorted(str(p.relative_to(home / "sr_jax")) for p in (home / "sr_jax").rglob("*") if p.is_file())
    assert shipped == ["configs/x y.yaml", "sr_jax/a.py"]
    assert not (home / "sr_jax_src.tar.gz").exists()


def _git(*args, cwd):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@x"}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def test_setup_clones_and_updates_a_git_repo(tmp_path, capsys, no_exec, monkeypatch):
    steps = dry_run(tpu, ["setup", "--code-only", "--config",
                          pod_yaml(tmp_path, repo_url=str(tmp_path / "origin repo"), repo_ref="dev")], capsys)
    [(_, ssh)] = steps
    assert "--worker=all" in ssh
    monkeypatch.undo()
    origin = tmp_path / "origin repo"
    origin.mkdir()
    _git("init", "-q", "-b", "dev", cwd=origin)
    (origin / "f.txt").write_text("one")
    _git("add", "f.txt", cwd=origin)
    _git("commit", "-q", "-m", "1", cwd=origin)
    home = tmp_path / "home"
    home.mkdir()
    result = run_remote(remote_script(ssh), home)
    assert result.returncode == 0, result.stderr
    assert (home / "sr_jax" / "f.txt").read_text() == "one"
    (origin / "f.txt").write_text("two")
    _git("commit", "-q", "-am", "2", cwd=origin)
    assert run_remote(remote_script(ssh), home).returncode == 0  # second setup: fetch, not clone
    assert (home / "sr_jax" / "f.txt").read_text() == "two"


def test_setup_installs_into_the_venv(tmp_path, capsys, no_exec, monkeypatch):
    config = pod_yaml(tmp_path, repo_url="https://example.com/sr_jax.git", pip_extra=["orbax-checkpoint>=0.11"],
                      setup_commands=['echo ran > "$HOME/setup-marker"'])
    steps = dry_run(tpu, ["setup", "--config", config], capsys)
    install = remote_script(steps[-1][1])
    monkeypatch.undo()
    home = tmp_path / "home"
    calls = home / "calls.jsonl"
    # An existing venv whose python records each call, so the script's pip invocations can be read back.
    fake_executable(home / "sr_jax_venv" / "bin" / "python",
                    f"import json, sys\nopen({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    result = run_remote(install, home)
    assert result.returncode == 0, result.stderr
    assert (home / "setup-marker").read_text() == "ran\n"
    got = [json.loads(line) for line in calls.read_text().splitlines()]
    assert got[:2] == [["-m", "pip", "install", "--quiet", "--upgrade", "pip"],
                       ["-m", "pip", "install", "--quiet", "-e", str(home / "sr_jax"), "jax[tpu]",
                        "orbax-checkpoint>=0.11"]]
    assert got[2][0] == "-c" and "import jax, sr_jax" in got[2][1]


def test_all_worker_scripts_are_valid_shell(tmp_path, capsys, no_exec, monkeypatch):
    config = pod_yaml(tmp_path, command=RECIPE, repo_url="https://example.com/r.git")
    scripts = []
    for sub in [*ALL_SUBCOMMANDS, ["status", "--run", "r1"], ["stop", "--run", "r1", "--signal", "KILL"]]:
        scripts += [remote_script(a) for _, a in dry_run(tpu, [*_with_config(sub, config)], capsys)
                    if a[0] == "gcloud" and a[4] == "ssh"]
    assert len(scripts) == 10  # setup 2, run 2, logs --tail, status 2, stop 2, exec
    monkeypatch.undo()
    for script in scripts:
        assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0, script


# --- real execution path -------------------------------------------------------------------------

def test_missing_gcloud_is_a_clear_error(tmp_path, capsys, no_exec, monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert tpu.main(["create", "--config", pod_yaml(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "gcloud not found on PATH" in err and "cloud.google.com/sdk" in err and "--dry-run" in err
    assert tpu.main(["setup", "--config", pod_yaml(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "gcloud not found" in err and "tar not found" in err


def test_without_dry_run_the_commands_run_in_order(tmp_path, capsys, monkeypatch):
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    fake_executable(bin_dir / "gcloud", (
        "import json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "sys.exit(3 if 'describe' in sys.argv else 0)\n"))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = pod_yaml(tmp_path)
    expected = [argv for _, argv in dry_run(tpu, ["create", "--config", config], capsys)]
    assert tpu.main(["create", "--config", config]) == 0
    assert [["gcloud", *json.loads(line)] for line in log.read_text().splitlines()] == expected
    log.unlink()
    assert tpu.main(["status", "--config", config]) == 3  # describe fails: the ssh step never runs
    assert len(log.read_text().splitlines()) == 1
    assert "failed with exit code 3" in capsys.readouterr().err


# --- SLURM ---------------------------------------------------------------------------------------

def _sbatch_options(script: str) -> dict[str, str]:
    lines = [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]
    return dict(line.lstrip("-").split("=", 1) for line in lines)


def test_slurm_render_fills_the_template(capsys, no_exec):
    program = ["sr-jax", "train", "--config", "configs/sft/spatialreward_8b_lora.yaml", "train.name=a b"]
    assert slurm.main(["render", "--config", str(LAUNCH / "slurm" / "cluster.yaml"),
                       "--set", "nodes=4", "--set", "account=lab", "--", *program]) == 0
    script = capsys.readouterr().out
    assert "{{" not in script and script.startswith("#!/bin/bash\n")
    options = _sbatch_options(script)
    assert options["nodes"] == "4" and options["account"] == "lab" and options["partition"] == "gpu"
    assert options["ntasks-per-node"] == options["gpus-per-node"] == "8"  # one task per GPU
    assert options["output"] == "slurm_logs/%x-%j.out"
    [srun] = [line for line in script.splitlines() if line.startswith("srun ")]
    argv = shlex.split(srun)
    assert argv[-len(program):] == program and "--kill-on-bad-exit=1" in argv
    # The default program is the paper's recipe.
    assert slurm.main(["render", "--config", str(LAUNCH / "slurm" / "cluster.yaml")]) == 0
    assert shlex.split(capsys.readouterr().out.splitlines()[-1])[-4:] == RECIPE


def test_slurm_script_runs_srun_with_the_program(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"setup": ["export FROM_SETUP=yes"], "env": {"MSG": "two  words"},
                                  "log_dir": "logs_dir"}))
    program = ["sr-jax", "train", "x=it's here"]
    out = tmp_path / "job.sbatch"
    assert slurm.main(["render", "--config", str(config), "--out", str(out), "--", *program]) == 0
    bin_dir, record = tmp_path / "bin", tmp_path / "srun.json"
    fake_executable(bin_dir / "srun", (
        "import json, os, sys\n"
        "env = {k: os.environ.get(k) for k in ('FROM_SETUP', 'MSG', 'JAX_PLATFORMS')}\n"
        f"json.dump({{'argv': sys.argv[1:], 'env': env}}, open({str(record)!r}, 'w'))\n"))
    work = tmp_path / "work"
    work.mkdir()
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path)}
    subprocess.run(["bash", str(out)], cwd=work, env=env, check=True, timeout=20)
    got = json.loads(record.read_text())
    assert got["argv"] == ["--kill-on-bad-exit=1", "--gpu-bind=none", "--output=logs_dir/%x-%j-task%t.out", *program]
    # An `env` in the file replaces the default mapping (JAX_PLATFORMS=cuda) as a whole.
    assert got["env"] == {"FROM_SETUP": "yes", "MSG": "two  words", "JAX_PLATFORMS": None}
    assert (work / "logs_dir").is_dir()


def test_slurm_submit(tmp_path, capsys, monkeypatch, no_exec):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"workdir": str(tmp_path / "repo"), "command": RECIPE}))
    capsys.readouterr()
    assert slurm.main(["submit", "--config", str(config), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    script_path = tmp_path / "repo" / "slurm_logs" / "sr-jax-train.sbatch"
    commands = [line for line in printed.splitlines() if not line.startswith("#")]
    assert commands == [f"mkdir -p {tmp_path}/repo/slurm_logs", f"sbatch {script_path}"]
    assert f"# | #SBATCH --chdir={tmp_path}/repo" in printed and not script_path.exists()

    monkeypatch.setenv("PATH", "")
    assert slurm.main(["submit", "--config", str(config)]) == 2
    assert "sbatch not found on PATH" in capsys.readouterr().err

    monkeypatch.undo()
    bin_dir = tmp_path / "bin"
    args_file = tmp_path / "sbatch.args"
    fake_executable(bin_dir / "sbatch", f"import sys\nopen({str(args_file)!r}, 'w').write(sys.argv[1])\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert slurm.main(["submit", "--config", str(config)]) == 0
    assert args_file.read_text() == str(script_path)
    assert _sbatch_options(script_path.read_text())["chdir"] == f"{tmp_path}/repo"


def test_slurm_bad_input(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    for values, message in [({"time": "1 day"}, "time"), ({"gpus_per_node": 0}, "gpus_per_node"),
                            ({"sbatch_extra": ["--a b"]}, "sbatch_extra"), ({}, "no program")]:
        config.write_text(json.dumps(values))
        assert slurm.main(["render", "--config", str(config)]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(common.LaunchError, match="placeholders"):
        slurm.fill("{{a}} {{b}}", {"a": "1"})


def test_jax_slurm_detection_gives_each_task_its_own_gpu(monkeypatch):
    # Why the template runs one task per GPU: JAX maps each SLURM task to GPU SLURM_LOCALID.
    from jax._src.clusters import ClusterEnv
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "16",
                       "SLURM_PROCID": "11", "SLURM_LOCALID": "3"}.items():
        monkeypatch.setenv(key, value)
    address, count, process, local = ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, "slurm", None)
    assert (address.split(":")[0], count, process, list(local)) == ("gpu07", 16, 11, [3])
