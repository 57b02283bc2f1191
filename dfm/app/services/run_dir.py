"""The run directory of a training run: checked up front, held by one run at a time, files replaced atomically.

- :class:`RunDirLock`: an advisory lock (``fcntl.flock``) on ``RUN_DIR/.lock``, taken by global rank 0
  before anything is written and held for the life of the run. The file names the holder (PID, host,
  start time). A second run on the same directory is refused at once, naming the first. The kernel
  drops the lock when its process dies, so a lock file left with a holder's name by a process that was
  killed (SIGKILL, out of memory, a lost node) is not held: the next run reports it as stale and takes
  it over. A run that ends normally (or by an exception or a SIGTERM/SIGINT) empties the file.
- :func:`disk_full_error`: the error a full disk gives while ``config.yaml`` or ``metrics.jsonl`` is
  rewritten (``dfm.adapters.tracking.write_text_atomic`` leaves the previous file whole).

``flock`` locks are only as good as the filesystem's support for them: local filesystems and most
network filesystems (NFSv4, Lustre with ``flock`` mounted) honour them across hosts; where the
filesystem refuses locks the run goes on with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from dfm.app.logging import get_logger

LOCK_NAME = ".lock"
"""The lock file inside the run directory."""

log = get_logger("dfm.train")


class RunDirError(ValueError):
    """A run directory that cannot be used: not a directory, not writable, in use by another run, or full."""


def disk_full_error(path: Path | str, exc: OSError, *, kept: bool = True) -> RunDirError | None:
    """A :class:`RunDirError` for an out-of-space ``exc`` while writing ``path`` (else ``None``).

    Args:
        path: The file being written.
        exc: The error the write raised.
        kept: Whether the previous content of ``path`` survived (it does with ``write_text_atomic``).
    """
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    intact = f" ({Path(path).name} is as it was before)" if kept else ""
    return RunDirError(
        f"out of disk space writing {path}{intact}; free some space or choose a run.dir on a larger disk, "
        "then run again"
    )


def _create(run_dir: Path) -> None:
    """Create ``run_dir`` (and its parents), with a :class:`RunDirError` that says what is in the way."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run.dir: {run_dir} is a file, not a directory; choose another run.dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in run_dir.parents if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise RunDirError(
                f"run.dir: cannot create {run_dir}: {blocker} is a file, not a directory; choose another run.dir"
            ) from None
        raise RunDirError(f"run.dir: cannot create {run_dir} ({exc.strerror}); choose a writable run.dir") from None


def _read_holder(fd: int) -> dict[str, object]:
    """The holder recorded in the lock file (``{}`` when empty or unreadable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        holder = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, ValueError):
        return {"pid": "?", "host": "?"}
    return holder if isinstance(holder, dict) else {"pid": "?", "host": "?"}


class RunDirLock:
    """The advisory lock on ``run_dir`` that one training run holds (see the module docstring).

    Use as a context manager, or :meth:`acquire` / :meth:`release`.

    Args:
        run_dir: The run directory (created if missing).
    """

    def __init__(self, run_dir: Path | str) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Create the run directory if needed and take its lock, or refuse.

        Raises:
            RunDirError: ``run_dir`` is a file or cannot be created or written, another live process holds
                the lock (naming its PID and host), or the disk is full.
        """
        _create(self.run_dir)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise RunDirError(
                f"run.dir: cannot write to {self.run_dir} ({exc.strerror}); choose a writable run.dir"
            ) from None
        try:
            self._lock(fd)
            self._record(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            if not holder:  # the holder has locked but not yet written its record
                time.sleep(0.2)
                holder = _read_holder(fd)
            since = f", since {holder['started']}" if holder.get("started") else ""
            raise RunDirError(
                f"run.dir: {self.run_dir} is in use by another training run (PID {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')}{since}); wait for it to finish or stop it, or choose another run.dir"
            ) from None
        except OSError as exc:  # a filesystem without locks: go on, unprotected
            log.warning("run.dir cannot be locked on this filesystem", path=str(self.path), reason=exc.strerror)

    def _record(self, fd: int) -> None:
        stale = _read_holder(fd)
        if stale:
            log.warning(
                "stale run.dir lock taken over (its process has ended)",
                pid=stale.get("pid"),
                host=stale.get("host"),
                started=stale.get("started"),
                path=str(self.path),
            )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode("utf-8"), 0)
            os.fsync(fd)
        except OSError as exc:
            raise disk_full_error(self.path, exc, kept=False) or RunDirError(
                f"run.dir: cannot write {self.path} ({exc.strerror}); choose a writable run.dir"
            ) from None

    def release(self) -> None:
        """Empty the lock file (a clean end) and drop the lock; idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:  # the next run then reports a stale lock, which is harmless
            pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)  # also for forked children (data workers) sharing the descriptor
            os.close(fd)

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
