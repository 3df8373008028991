"""One writer per run folder: a lock file naming the process that holds it.

Two fine-tunes on the same run folder would both write `checkpoint.keras` and `finetuned.keras`.
`run_lock(folder, command)` takes `RUN/lock.json` for the duration of a block: an exclusive
`flock` on the file (released by the kernel when the holder dies, so a crash never leaves the
folder locked), with the holder's pid, host, start time and command written in it. A second
process refuses at once with `RunLockedError`, naming the holder. A lock file whose holder is
gone (its `flock` is free) is taken over, and the block is told so (`RunLock.note`).

Where `fcntl` is missing (Windows), the file is created exclusively and the recorded pid is
checked for liveness instead.

Nesting in one process (e.g. `run` holding the lock while its `finetune` takes it again) is
allowed: the inner block shares the outer one's lock.

Example:
    >>> with run_lock("savedmodels/default", "finetune") as lock:
    ...     if lock.note: print(lock.note)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = "lock.json"

# Locks this process holds: resolved path -> [open fd or None, nesting depth].
_HELD: dict[str, list] = {}


class RunLockedError(FileExistsError):
    """The run folder is locked by another process (the message names it)."""


@dataclasses.dataclass(frozen=True)
class LockInfo:
    """What a lock file records.

    Attributes:
        pid: the holder's process id.
        host: the holder's host name.
        started_at: when it took the lock (ISO 8601, UTC).
        command: what it runs (e.g. "finetune").
    """

    pid: int
    host: str
    started_at: str
    command: str

    @classmethod
    def here(cls, command: str) -> LockInfo:
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        return cls(os.getpid(), socket.gethostname(), now, command)

    @classmethod
    def parse(cls, text: str) -> LockInfo | None:
        """The info in a lock file's text, or None where it is not (yet) a complete record."""
        try:
            d = json.loads(text)
            return cls(int(d["pid"]), str(d["host"]), str(d["started_at"]), str(d["command"]))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} (`{self.command}`, since {self.started_at})"


@dataclasses.dataclass(frozen=True)
class RunLock:
    """A held lock.

    Attributes:
        path: the lock file.
        note: set when a stale lock (its holder gone) was taken over, saying whose it was.
    """

    path: Path
    note: str | None = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _refusal(path: Path, holder: LockInfo | None, command: str) -> RunLockedError:
    who = holder.describe() if holder is not None else "another process"
    return RunLockedError(
        f"{path.parent} is in use by {who}: wait for it to finish (or stop it) before running "
        f"`keras-lean {command}` on this run folder. If that process is gone, delete {path}."
    )


def _stale_note(path: Path, holder: LockInfo | None) -> str | None:
    if holder is None:
        return None
    return f"took over the stale lock {path} of {holder.describe()}, which is no longer running"


def _acquire_flock(path: Path, info: LockInfo) -> tuple[int, str | None]:
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = LockInfo.parse(path.read_text()) if path.exists() else None
            os.close(fd)
            raise _refusal(path, holder, info.command) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder unlinked it between our open and flock: try the new file
            os.close(fd)
            continue
        old = os.read(fd, 1 << 16).decode("utf-8", "replace")
        previous = LockInfo.parse(old) if old.strip() else None
        if previous is not None and previous.host != info.host:
            os.close(fd)  # another host's lock: its flock may not be visible from here
            raise _refusal(path, previous, info.command)
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(dataclasses.asdict(info)).encode())
        os.fsync(fd)
        return fd, _stale_note(path, previous)


def _acquire_exclusive(path: Path, info: LockInfo) -> tuple[None, str | None]:
    note = None
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = LockInfo.parse(path.read_text())
            if holder is None or holder.host != info.host or _pid_alive(holder.pid):
                raise _refusal(path, holder, info.command) from None
            note = _stale_note(path, holder)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(dataclasses.asdict(info), f)
        return None, note
    raise _refusal(path, LockInfo.parse(path.read_text()), info.command)


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, command: str, *, create: bool = False) -> Iterator[RunLock]:
    """Holds the run folder's lock for the block.

    Args:
        folder: the run folder.
        command: what this process runs, recorded for whoever is refused.
        create: create a missing folder and lock it; without it, a missing folder is not locked
            (there is nothing in it to protect, and the step will say what to run first).

    Yields:
        A `RunLock` (its `note` says when a stale lock was taken over).

    Raises:
        RunLockedError: another live process holds the lock.
    """
    folder = Path(folder)
    path = folder / LOCK_NAME
    if not folder.is_dir():
        if not create:
            yield RunLock(path)
            return
        folder.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield RunLock(path)
        finally:
            _HELD[key][1] -= 1
        return
    info = LockInfo.here(command)
    acquire = _acquire_exclusive if sys.platform == "win32" else _acquire_flock
    fd, note = acquire(path, info)
    _HELD[key] = [fd, 1]
    try:
        yield RunLock(path, note)
    finally:
        del _HELD[key]
        # Unlink before unlocking, so a waiter never takes a lock on a file about to vanish
        # (and one that opened it already sees a different inode and retries).
        path.unlink(missing_ok=True)
        if fd is not None:
            os.close(fd)


def lock_holder(folder: str | os.PathLike) -> LockInfo | None:
    """Who the lock file says holds the run folder (None: no readable lock file)."""
    path = Path(folder) / LOCK_NAME
    try:
        return LockInfo.parse(path.read_text())
    except OSError:
        return None


__all__ = ["LOCK_NAME", "LockInfo", "RunLock", "RunLockedError", "lock_holder", "run_lock"]
