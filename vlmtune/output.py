"""The run's output folder: made usable or refused with one clear line, held by one run at a time, and never
filled past the disk's free space by a save."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from vlmtune.errors import OutputError
from vlmtune.parallel import sum_over_ranks, world

LOCK = ".vlmtune.lock"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def prepare(path: str | Path) -> Path:
    """`path` as an existing, writable folder (made if missing), or an OutputError that says why not."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output_dir={str(path)!r} is a file, not a folder; choose a folder for the run's outputs")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"output_dir={str(path)!r} cannot be written ({e.strerror or e}); choose a folder on a "
                          "writable file system you have permission to write to") from e
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunLock:
    """An exclusive claim on an output folder: ``output_dir/.vlmtune.lock`` holds the holder's host, pid and start
    time. A second run into the same folder stops with a one-line error naming the holder; a lock whose process is
    gone (same host) is stale and taken over, saying so; one from another host is reported, with how to remove it."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self.held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._refuse_or_clear(me["host"])
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise OutputError(f"output_dir: could not take the lock {self.path}; another run keeps taking it")

    def _refuse_or_clear(self, host: str) -> None:
        holder = self._holder()
        if holder is None:  # unreadable: a lock being written this instant, or a torn one; read it again
            time.sleep(0.2)
            holder = self._holder()
        if holder is not None and holder.get("host") == host and _pid_alive(int(holder.get("pid", -1))):
            raise OutputError(f"output_dir={str(self.path.parent)!r} is in use by another vlmtune run (host "
                              f"{holder['host']}, pid {holder['pid']}, started {holder.get('started')}); wait for "
                              f"it to finish, stop it, or choose another output_dir (if no run is going on there, "
                              f"delete {self.path})")
        if holder is not None and holder.get("host") != host:
            raise OutputError(f"output_dir={str(self.path.parent)!r} is locked by a run on host {holder.get('host')} "
                              f"(pid {holder.get('pid')}, started {holder.get('started')}); if that run is over, "
                              f"delete {self.path}, else choose another output_dir")
        print(f"vlmtune: {self.path}: the run that held it (pid {holder and holder.get('pid')}) is gone; taking "
              "over its stale lock", flush=True)
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is not None and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def hold(path: str | Path) -> Iterator[Path]:
    """`path` made usable and held by this run for the block: rank 0 takes the lock, and every rank learns whether
    it could (so that no rank goes on alone)."""
    folder = prepare(path)
    lock, problem = RunLock(folder), None
    if world()[0] == 0:
        try:
            lock.acquire()
        except OutputError as e:
            problem = e
    if sum_over_ranks(float(problem is not None)) > 0:
        raise problem or OutputError(f"output_dir={str(folder)!r} is in use by another run (rank 0 says which)")
    try:
        yield folder
    finally:
        lock.release()


def free_bytes(path: Path) -> int:
    """Free space on the file system of `path` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def no_space(path: Path, needed: int, free: int | None = None, keep: str = "") -> OutputError:
    free = free_bytes(path) if free is None else free
    return OutputError(f"no space left on {path}: {needed / 2**20:,.0f} MB needed, {free / 2**20:,.0f} MB free; free "
                       f"some space (or point output_dir elsewhere) and resume{keep}")


def ensure_space(path: Path, needed: int, keep: str = "") -> None:
    """Refuse a save of about `needed` bytes that the disk under `path` cannot hold (5% and 16 MB to spare)."""
    free = free_bytes(path)
    if needed * 1.05 + 16 * 2**20 > free:
        raise no_space(path, needed, free, keep)


def is_no_space(e: BaseException) -> bool:
    """An OSError of a full disk, or an error that reports one (DCP gathers the ranks' errors into its own)."""
    return getattr(e, "errno", None) in _NO_SPACE or "No space left" in str(e)
