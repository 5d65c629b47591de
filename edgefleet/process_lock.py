"""One process per folder: an exclusive `flock` on a lock file, held for the process's life.

The server takes `<data-dir>/server.lock`, the agent `<state-dir>/agent.lock`. The lock file holds the pid of
its holder so the refusal can name it. The kernel drops the lock when the holder dies (even by SIGKILL), so a
stale file never blocks a restart; the file itself is never removed (removing it would let two processes
each lock a different inode).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from edgefleet.errors import ConflictError


class LockHeldError(ConflictError):
    """Another live process holds the lock; `pid` is the one its file names (0 when unreadable)."""

    def __init__(self, path: Path, pid: int):
        holder = f"pid {pid}" if pid else "another process"
        super().__init__(f"{path} is locked by {holder}: only one process may use {path.parent}")
        self.path, self.pid = path, pid


class ProcessLock:
    """`acquire()` or raise LockHeldError; `release()` (or process exit) lets the next one in."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> ProcessLock:
        """Raises LockHeldError when another process holds it, OSError when the file cannot be opened."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _pid_in(fd)
            os.close(fd)
            raise LockHeldError(self.path, pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _pid_in(fd: int) -> int:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0)
    except (OSError, ValueError):
        return 0
