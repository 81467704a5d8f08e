"""Resumable, sharded, fingerprinted results: every stage (detection, NIAH, evaluation, pair generation) writes its
results as they finish, shares the work across processes and resumes a killed run without redoing a finished item."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from accelerate.utils import gather_object
from tqdm.auto import tqdm

from .distributed import from_main_process, process_state
from .fingerprints import _canonical

logger = logging.getLogger(__name__)

__all__ = ["ResultStore", "cached_json", "run_resumable", "write_json"]


def write_json(path, obj) -> bool:
    """Write `obj` as JSON (atomically) unless the file already holds exactly that; whether it wrote.

    Rewriting nothing when nothing changed keeps a finished, read-only output directory readable.
    """
    path = Path(path)
    text = json.dumps(obj, indent=2)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return True


class ResultStore:
    """The records of one resumable output: `<dir>/<name>.meta.json` holds the fingerprint of everything the
    records depend on, and each process appends a line per finished item to `<dir>/<name>.rank<i>.jsonl`.

    `open()` (every process) checks the fingerprint: another one is refused, or its records deleted with
    `overwrite=True`; never reused. It then reads the records: a line cut short by a kill is dropped, and an
    unreadable line, an unknown key or a record that fails `verify` is named in a warning and dropped, so that item
    is redone. Nothing is written when the directory is complete and unchanged.
    """

    def __init__(self, output_dir, name: str, fingerprint: str, *, info: dict | None = None, overwrite: bool = False):
        self.dir, self.name, self.fingerprint = Path(output_dir), name, fingerprint
        self.info, self.overwrite = _canonical(info or {}), overwrite
        self.state = process_state()
        self._file = None
        self._repair: dict[Path, list[str]] = {}

    @property
    def meta_path(self) -> Path:
        return self.dir / f"{self.name}.meta.json"

    def _rank_files(self) -> list[Path]:
        return sorted(self.dir.glob(f"{self.name}.rank*.jsonl"))

    def _check_fingerprint(self) -> None:
        """Main process: accept a matching directory as is, initialise a fresh one, refuse or clear another run's."""
        try:
            stored = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            stored = None
        except (OSError, ValueError):
            stored = {}
        if isinstance(stored, dict) and stored.get("fingerprint") == self.fingerprint:
            return
        files = self._rank_files() if self.dir.is_dir() else []
        if stored is not None or files:
            if not self.overwrite:
                if not isinstance(stored, dict) or "fingerprint" not in stored:
                    why = f"{self.meta_path.name} is missing or unreadable"
                else:
                    old = stored.get("info", {})
                    changed = sorted(k for k in set(old) | set(self.info) if old.get(k) != self.info.get(k))
                    why = "they depend on other inputs" + (f" ({', '.join(changed)} differ)" if changed else
                                                           " (model weights, data or settings differ)")
                raise ValueError(f"{self.dir} holds {self.name} results of another run: {why}. Use a fresh output "
                                 "directory, or pass overwrite=True (`--overwrite True` on the command line) to "
                                 "discard them and redo the work.")
            for path in files:
                path.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.meta_path, {"fingerprint": self.fingerprint, "name": self.name, "info": self.info})

    def open(self, verify: Callable[[str, dict], bool] | None = None) -> dict[str, dict]:
        """Check the fingerprint and read the finished records, `{key: record}`; every process calls it."""
        error = None
        if self.state.is_main_process:
            try:
                self._check_fingerprint()
            except (ValueError, OSError) as e:
                error = e
        error = from_main_process(error)  # every process fails alike, none waits forever
        if error is not None:
            raise error
        records: dict[str, dict] = {}
        for path in self._rank_files():
            records.update({k: v for k, v in self._read(path, verify).items() if k not in records})
        self.state.wait_for_everyone()  # all have read before anyone appends
        self._repair_own_files()
        return records

    def _read(self, path: Path, verify) -> dict[str, dict]:
        text = path.read_bytes().decode("utf-8", errors="replace")
        *lines, tail = text.split("\n")  # `tail` is "" unless the last line was cut short
        good, problems, records = [], [], {}
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                problems.append(f"line {n} is not JSON")
                continue
            key = record.get("key") if isinstance(record, dict) else None
            if not isinstance(key, str) or (verify is not None and not verify(key, record)):
                problems.append(f"line {n} is not a valid record")
            elif key in records:
                problems.append(f"line {n} repeats key {key!r}")
            else:
                records[key] = record
                good.append(line)
        if problems:
            warnings.warn(f"{path}: {len(problems)} unusable record(s) ({'; '.join(problems[:3])}); "
                          "they are dropped and their items redone.", UserWarning, stacklevel=3)
        if tail.strip():
            logger.info("%s: dropped a last line cut short (an interrupted write); that item is redone.", path)
        if problems or tail.strip():
            self._repair[path] = good
        return records

    def _repair_own_files(self) -> None:
        """Rewrite this process's damaged files with their good lines only, so appends start on a clean line."""
        for path, good in self._repair.items():
            suffix = path.name[len(self.name) + len(".rank"):-len(".jsonl")]
            owner = int(suffix) % self.state.num_processes if suffix.isdigit() else 0
            if owner != self.state.process_index:
                continue
            try:
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text("".join(line + "\n" for line in good), encoding="utf-8")
                os.replace(tmp, path)
            except OSError as e:
                warnings.warn(f"Could not rewrite {path} without its damaged lines ({e}).", UserWarning, stacklevel=3)
        self._repair.clear()

    def append(self, record: dict) -> None:
        """Store one finished record (a line, flushed at once) in this process's file."""
        if self._file is None:
            self._file = open(self.dir / f"{self.name}.rank{self.state.process_index}.jsonl", "a", encoding="utf-8")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_resumable(items: Sequence, fn: Callable[[Any], dict], output_dir=None, *, name: str, fingerprint: str = "",
                  key: Callable[[Any], str] = lambda item: item.key,
                  verify: Callable[[Any, dict], bool] | None = None, info: dict | None = None,
                  overwrite: bool = False, desc: str | None = None, show_progress: bool = True) -> list[dict]:
    """`{"key": key(item), **fn(item)}` for every item, in order, on every process; work shared across processes.

    Processes take every n-th unfinished item (balanced when items are sorted by cost) and their records are
    gathered. With `output_dir`, records go to a `ResultStore` there as they finish, so a killed run resumes
    without redoing or losing a finished item, with any number of processes; `fingerprint` must cover everything
    the records depend on (see `ResultStore` for what is refused and what is redone); `verify(item, record)`
    checks a stored record before it is reused; `info` (a few readable settings) is stored beside the fingerprint
    to name what changed when a directory is refused.
    """
    keys = [key(item) for item in items]
    if len(set(keys)) != len(keys):
        raise ValueError(f"Items of {name} must have distinct keys; {len(keys) - len(set(keys))} repeat.")
    by_key = dict(zip(keys, items))
    state = process_state()
    store = ResultStore(output_dir, name, fingerprint, info=info, overwrite=overwrite) if output_dir is not None \
        else None
    done = store.open(lambda k, r: k in by_key and (verify is None or verify(by_key[k], r))) if store else {}
    todo = [i for i, k in enumerate(keys) if k not in done]
    mine = todo[state.process_index::state.num_processes]
    new = []
    with store or nullcontext():
        for i in tqdm(mine, desc=desc or name, disable=not (show_progress and state.is_local_main_process)):
            record = {"key": keys[i], **fn(items[i])}
            if store is not None:
                store.append(record)
            new.append(record)
    if state.num_processes > 1:
        new = gather_object(new)
    done.update({r["key"]: r for r in new})
    return [done[k] for k in keys]


def cached_json(path, fingerprint: str, fn: Callable[[], dict], *, overwrite: bool = False) -> dict:
    """A JSON result computed once: stored at `path` with its fingerprint and reused only under the same one.

    A file made from other inputs is refused (or recomputed with `overwrite=True`); an unreadable file is named in
    a warning and recomputed.
    """
    path = Path(path)
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            valid = isinstance(stored, dict)
        except (OSError, ValueError) as e:
            stored, valid = None, False
            warnings.warn(f"{path} is unreadable ({e}); computing it again.", UserWarning, stacklevel=2)
        if valid and stored.get("fingerprint") == fingerprint:
            return {k: v for k, v in stored.items() if k != "fingerprint"}
        if valid and not overwrite:
            raise ValueError(f"{path} holds a result of other inputs (model, data or settings differ); delete it, "
                             "use another output directory, or pass overwrite=True (`--overwrite True` on the command "
                             "line) to recompute it.")
    result = fn()
    write_json(path, {**result, "fingerprint": fingerprint})
    return result
