"""Run-directory guards: a metrics file torn by a kill mid-write still resumes; one trainer per
`run.out_dir` (a second is refused naming the holder's host and pid; a dead holder's lock is free,
also when an orphaned child process still holds it)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sr_jax.train.metrics import MetricsWriter, read_metrics
from sr_jax.train.runlock import RunDirLocked, RunLock

ROOT = Path(__file__).resolve().parents[2]
TORN = '{"step": 4, "loss": 0.71'  # what a kill during the row's write leaves


def _metrics_file(out: Path, last: str = TORN) -> Path:
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path = out / "metrics.jsonl"
    path.write_text("\n".join(rows) + "\n" + last)
    return path


def test_resume_truncates_a_torn_last_metrics_line_and_says_so_once(tmp_path, caplog):
    path = _metrics_file(tmp_path)
    writer = MetricsWriter(tmp_path, tensorboard=False)
    with caplog.at_level("WARNING", logger="sr_jax.train.metrics"):
        writer.truncate_after(3)  # what a resume at step 3 does
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert path.read_text().endswith("}\n") and TORN not in path.read_text()
    torn = [r for r in caplog.records if "torn last line" in r.getMessage()]
    assert len(torn) == 1 and "metrics.jsonl:4" in torn[0].getMessage()
    writer.write(4, {"loss": 0.5})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]


def test_metrics_reader_drops_only_a_torn_tail_and_names_a_corrupt_middle_line(tmp_path):
    path = _metrics_file(tmp_path)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: corrupt metrics line"):
        read_metrics(path)


# ---- the run-directory lock ----------------------------------------------------------------------

HOLD = """
import sys, time
from sr_jax.train.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def _holder(directory: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_trainer_on_a_run_dir_exits_naming_the_holder(tmp_path, capsys):
    from sr_jax.cli import main

    holder = _holder(tmp_path)
    try:
        # A real `sr-jax rl` on the held directory: refused before it builds or writes anything.
        rc = main(["rl", "--config", str(ROOT / "configs" / "rl" / "demo_cpu.yaml"), f"run.out_dir={tmp_path}",
                   "run.progress_bar=false", "run.tensorboard=false"])
        assert rc == 3
        err = capsys.readouterr().err
        assert f"host {socket.gethostname()} pid {holder.pid}" in err and "in use by another trainer" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]  # nothing else written
        with pytest.raises(RunDirLocked, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
        assert RunLock(tmp_path, process_index=1).acquire()  # another host's lock of the same job
    finally:
        holder.kill()
        holder.wait()
    # killed (SIGKILL): the kernel dropped its flock, so the next trainer takes the directory
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_lock_kept_by_an_orphaned_child_of_a_dead_trainer_is_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    # An orphan (think: a data-loader worker of the killed trainer) still holds the flock of the
    # file in which the dead trainer wrote itself as the holder.
    (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid}))
    orphan = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               "f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True)\n"
                               "time.sleep(60)", str(tmp_path / "run.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert orphan.stdout.readline().strip() == "held"
        with caplog.at_level("WARNING", logger="sr_jax.train.runlock"), RunLock(tmp_path) as lock:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
            assert f"pid {dead_pid}" in caplog.text and "taking over" in caplog.text
            with pytest.raises(RunDirLocked, match=f"pid {os.getpid()}"):
                RunLock(tmp_path).acquire()
    finally:
        orphan.kill()
        orphan.wait()


def test_forked_children_do_not_keep_the_lock(tmp_path):
    lock = RunLock(tmp_path).acquire()
    ready_r, ready_w = os.pipe()
    child = os.fork()  # the child only signals, sleeps and exits
    if child == 0:  # a worker forked without exec: it must not inherit the lock
        os.write(ready_w, b"1")  # the fork hooks have run by now
        time.sleep(3)
        os._exit(0)
    os.read(ready_r, 1)
    os.close(ready_r), os.close(ready_w)
    try:
        os.close(lock.fd)  # the trainer dies (the kernel closes its descriptors; no unlock runs)
        with RunLock(tmp_path):  # would be refused while the child kept the inherited descriptor
            pass
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
