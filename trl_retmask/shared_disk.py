"""Directories that every process must see alike.

A resumable store is written by every process and read back by the main one, and the trainer's saved pairs are
written by the main process and read by all: both need one disk for all processes. On a multi-node job without a
shared file system each node would see its own copy of the path (rank files the main process never reads, a saved
dataset the other nodes cannot find), and the ranks would disagree on what is done: a `KeyError` on some, a hang in
the next collective on the rest. `check_shared_directory` finds that out before any work: the main process writes a
fresh nonce into the directory and every process must read it back; otherwise every process raises the same one-line
`ValueError`.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

from accelerate.utils import gather_object

from .atomic import write_text
from .distributed import from_main_process, process_state

PROBE_PREFIX = ".trl_retmask.shared."


def check_shared_directory(directory, what: str = "directory", fix: str = "") -> None:
    """Every process sees the main process's `directory` (created if needed); a collective: every process calls it.

    Refused with one line on every process (none left waiting) when a process does not see the nonce file the main
    process wrote there, naming the processes and hosts that did not; `what` names the directory, `fix` is appended
    to the message. A no-op in a single process."""
    state = process_state()
    if state.num_processes == 1:
        return
    directory = Path(directory)
    nonce, error = None, None
    if state.is_main_process:
        nonce = uuid.uuid4().hex
        try:
            directory.mkdir(parents=True, exist_ok=True)
            write_text(directory / f"{PROBE_PREFIX}{nonce}", nonce)
        except OSError as e:
            error = f"Cannot write in the {what} {directory} ({e.strerror or e}); make it writable or use another one."
    nonce, error = from_main_process((nonce, error))
    if error is not None:
        raise ValueError(error)
    try:
        seen = (directory / f"{PROBE_PREFIX}{nonce}").read_text(encoding="utf-8") == nonce
    except (OSError, UnicodeDecodeError):
        seen = False
    views = gather_object([(state.process_index, socket.gethostname(), seen)])  # everyone has read: now remove
    if state.is_main_process:
        try:
            (directory / f"{PROBE_PREFIX}{nonce}").unlink()
        except OSError:
            pass
    blind = [(rank, host) for rank, host, ok in views if not ok]
    if blind:
        ranks = ", ".join(str(rank) for rank, _ in blind)
        hosts = ", ".join(sorted({host for _, host in blind}))
        raise ValueError(
            f"The {what} {directory} is not on a disk shared by all {state.num_processes} processes: process(es) "
            f"{ranks} (on {hosts}) do not see the file the main process wrote there, so the processes would disagree "
            "on what is done. Use a directory on a file system every node mounts (NFS, Lustre, ...)"
            + (f", or {fix}" if fix else "")
            + "."
        )


__all__ = ["PROBE_PREFIX", "check_shared_directory"]
