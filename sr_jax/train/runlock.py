"""An exclusive lock on a run directory, held while a trainer (SFT or RL) writes it.

Two trainers on one `run.out_dir` interleave checkpoints and metrics rows; the second one is
refused with the holder's host and pid. The lock is `fcntl.flock` on `out_dir/run.lock`, so the
kernel releases it when the holder dies, however it dies (`kill -9` included); the file's JSON
content only says who holds it.

A lock can outlive its trainer when a child process forked without exec (a data-loader worker)
inherits the descriptor: the fork hook closes it in children, and a lock whose recorded holder is
on this host and no longer alive is taken over (the file is replaced, so the orphan's lock on the
old file no longer counts).

Several processes (multi-host): process 0 takes `run.lock`, process i > 0 `run.lock.<i>`, so a
second job on the same directory is refused on every host, on a shared or a per-host disk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
_HELD_FDS: set[int] = set()


def _close_in_child() -> None:
    for fd in list(_HELD_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)  # the parent's flock stays: it is released only when its last descriptor closes
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunDirLocked(RuntimeError):
    """Another live trainer holds the run directory."""


def lock_name(process_index: int = 0) -> str:
    return LOCK_NAME if process_index == 0 else f"{LOCK_NAME}.{process_index}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode("utf-8", "replace")) if data.strip() else {}
    except (OSError, ValueError):
        holder = {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process (the lock file names no holder)"
    started = holder.get("started")
    since = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else ""
    return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}{since} ({holder.get('command', '?')})"


class RunLock:
    """`with RunLock(out_dir):` holds the directory; raises RunDirLocked when another trainer has it."""

    def __init__(self, out_dir: str | Path, process_index: int = 0):
        self.path = Path(out_dir) / lock_name(process_index)
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # retries only after replacing a stale file, or losing a race for it
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                holder = _read_holder(fd)
                if not self._stale(holder):
                    os.close(fd)
                    raise RunDirLocked(
                        f"{self.path.parent} is in use by another trainer: {_describe(holder)}. Wait for it to "
                        f"finish, stop it, or choose another run.out_dir.") from None
                log.warning("%s: taking over the lock of %s, which no longer runs (a child process kept "
                            "the lock)", self.path, _describe(holder))
                self._unlink_if_same(fd)
                os.close(fd)
                continue
            if not self._same_file(fd):  # replaced by a takeover between our open and our lock
                os.close(fd)
                continue
            previous = _read_holder(fd)
            if previous.get("pid") not in (None, os.getpid()):
                log.info("%s: previous holder %s is gone; lock taken", self.path, _describe(previous))
            me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                  "command": " ".join(sys.argv[:4])[:200]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            self.fd = fd
            _HELD_FDS.add(fd)
            return self
        raise RunDirLocked(f"{self.path}: could not take the lock (it kept changing hands)")

    @staticmethod
    def _stale(holder: dict) -> bool:
        pid = holder.get("pid")
        return (holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid()
                and not _pid_alive(pid))

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _unlink_if_same(self, fd: int) -> None:
        if self._same_file(fd):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        _HELD_FDS.discard(fd)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # the file stays (deleting it would race a waiting trainer)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
