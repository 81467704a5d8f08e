"""One writer per output or cache directory.

A run that writes resumable records into a directory holds `<dir>/.trl_retmask.lock` (filelock's `flock` lock) for
as long as it writes: a second run on the same directory is refused at once with a one-line error naming the run
that holds it (pid, host, start time and stage, from the side file `.trl_retmask.lock.owner`; never the command
line, which can hold a token), instead of both generating everything and appending duplicates. The operating system
releases the lock when its process dies, so a run killed with `kill -9` never blocks the next one. The lock is
reentrant within a process (a stage that holds its output directory may open stores in it). Under `accelerate
launch` only the main process takes it; the other ranks follow the main process as they always do. Only a run that
will write takes the lock (a complete result is read without it), so a lock that cannot be taken (a read-only
directory, a lock file this process may not open) refuses the run with one line: a writer without the lock could
append duplicates beside another run's.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .atomic import write_text

LOCK_NAME = ".trl_retmask.lock"
OWNER_NAME = ".trl_retmask.lock.owner"
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


def check_directory(path, name: str = "output_dir") -> Path:
    """`path` as a directory we may create: refused with one line when it, or a parent, is a file."""
    path = Path(path).expanduser()
    blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        what = "is a file" if blocking == path else f"is under {str(blocking)!r}, which is a file"
        raise ValueError(
            f"`{name}` {str(path)!r} {what}, not a directory; give a directory path (e.g. "
            f"{str(path.with_name(path.name + '_dir'))!r})."
        )
    return path


_running_stage: str | None = None
"""The `trl-retmask` stage this process runs (set by `scripts.run_stage` through `running_stage`), if any."""


@contextmanager
def running_stage(stage: str) -> Iterator[None]:
    """Name `stage` in the owner records of the locks taken meanwhile. Handed down by the CLI (`run_stage`), so this
    module needs nothing from the CLI's."""
    global _running_stage
    previous, _running_stage = _running_stage, stage
    try:
        yield
    finally:
        _running_stage = previous


def run_name() -> str:
    """What this process runs, without any value a user passed (a value can be a secret, e.g. `--hub_token`): the
    program's file name, and the `trl-retmask` stage it runs (`running_stage`), if any."""
    program = os.path.basename(sys.argv[0] or "python") if sys.argv else "python"
    return f"{program} {_running_stage}" if _running_stage else program


def _owner_text(directory: Path) -> str:
    try:
        owner = json.loads((directory / OWNER_NAME).read_text(encoding="utf-8"))
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(owner["started"]))
        return f"pid {int(owner['pid'])} on {owner['host']}, started {started}: {owner['stage']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class DirectoryBusyError(ValueError):
    """Another live run holds the directory."""


@contextmanager
def directory_lock(directory, *, main_process: bool = True) -> Iterator[None]:
    """Hold `directory` (created if needed) for the body, which writes there; refused with `DirectoryBusyError` when
    another run holds it, and with a `ValueError` when the lock cannot be taken at all (read-only directory, lock file
    not ours to open). `main_process=False` (the other ranks of a distributed run) takes nothing."""
    directory = check_directory(directory, "directory")
    if not main_process:
        yield
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(directory.resolve() / LOCK_NAME), timeout=0, is_singleton=True)
        lock.acquire()
    except Timeout:
        raise DirectoryBusyError(
            f"{directory} is in use by another run ({_owner_text(directory)}); wait for it to "
            "finish, or give this run another directory."
        ) from None
    except OSError as e:
        if e.errno not in _READ_ONLY:
            raise
        raise ValueError(
            f"Cannot lock {directory} for writing: {directory / LOCK_NAME} cannot be created or opened "
            f"({e.strerror or e}); a run writes there only while it holds that lock. Make the directory and the lock "
            "file writable (or remove a lock file no live run uses), or use another directory."
        ) from None
    try:
        if lock.lock_counter == 1:
            try:
                write_text(
                    directory / OWNER_NAME,
                    json.dumps(
                        {
                            "pid": os.getpid(),
                            "host": socket.gethostname(),
                            "started": time.time(),
                            "stage": run_name(),
                        }
                    ),
                )
            except OSError:
                pass  # the side file only names the holder
        yield
    finally:
        if lock.lock_counter == 1:
            try:
                (directory / OWNER_NAME).unlink()
            except OSError:
                pass
        lock.release()


__all__ = [
    "DirectoryBusyError",
    "LOCK_NAME",
    "OWNER_NAME",
    "check_directory",
    "directory_lock",
    "run_name",
    "running_stage",
]
