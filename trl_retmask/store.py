"""Resumable, sharded, fingerprinted results: every stage (detection, NIAH, evaluation, pair generation) writes its
results as they finish, shares the work across processes and resumes a killed run without redoing a finished item."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

from accelerate.utils import gather_object
from tqdm.auto import tqdm

from .atomic import write_text, writing_to
from .distributed import from_main_process, process_state
from .fingerprints import _canonical
from .locks import check_directory, directory_lock
from .shared_disk import check_shared_directory

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
    write_text(path, text)
    return True


class ResultStore:
    """The records of one resumable output: `<dir>/<name>.meta.json` holds the fingerprint of everything the
    records depend on, and each process appends a line per finished item to `<dir>/<name>.rank<i>.jsonl`.

    `open()` (every process) checks the fingerprint: another one is refused, or its run discarded with
    `overwrite=True` (first `outputs`, the files made from its records, then the records): never reused, never left
    beside the new run's records. The main process then reads the records and hands them to every process (all
    agree on what is done): a line cut short by a kill is dropped, and an unreadable line, an unknown key or a
    record that fails `verify` is named in a warning and dropped, so that item is redone. Nothing is written, and
    nothing locked, when the directory is complete and unchanged (a read-only copy works); otherwise the main
    process holds the directory's lock (`locks.directory_lock`) until `close()`, so a second run on it is refused
    instead of appending duplicates, and every process must see the main process's directory (one disk:
    `shared_disk.check_shared_directory`), since each appends its own file there.

    `cache=True`: the directory is named after the fingerprint (the pair cache), so a missing or unreadable meta file,
    or another fingerprint, is damage, not another run's work: the records are discarded with a warning and redone,
    never refused.
    """

    def __init__(
        self,
        output_dir,
        name: str,
        fingerprint: str,
        *,
        info: dict | None = None,
        overwrite: bool = False,
        cache: bool = False,
        outputs: Sequence[str] = (),
    ):
        self.dir, self.name, self.fingerprint = Path(output_dir), name, fingerprint
        self.info, self.overwrite, self.cache = _canonical(info or {}), overwrite, cache
        self.outputs = tuple(outputs)
        self.state = process_state()
        self._file = None
        self._repair: dict[Path, list[str]] = {}
        self._hold = ExitStack()

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
        if self.cache and (stored is not None or files):
            warnings.warn(
                f"{self.meta_path} is missing, unreadable or of other inputs; the {len(files)} record "
                "file(s) there are discarded and their items redone.",
                UserWarning,
                stacklevel=3,
            )
        discard = stored is not None or bool(files)
        if discard:
            if not self.overwrite and not self.cache:
                if not isinstance(stored, dict) or "fingerprint" not in stored:
                    why = f"{self.meta_path.name} is missing or unreadable"
                else:
                    old = stored.get("info", {})
                    changed = sorted(k for k in set(old) | set(self.info) if old.get(k) != self.info.get(k))
                    why = "they depend on other inputs" + (
                        f" ({', '.join(changed)} differ)" if changed else " (model weights, data or settings differ)"
                    )
                raise ValueError(
                    f"{self.dir} holds {self.name} results of another run: {why}. Use a fresh output "
                    "directory, or pass overwrite=True (`--overwrite True` on the command line) to "
                    "discard them and redo the work."
                )
        if discard or self.overwrite:  # the old run's results first: a kill from here on leaves no mixed directory
            for path in [self.dir / name for name in self.outputs] + files:
                if path.is_file() or path.is_symlink():
                    path.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.meta_path, {"fingerprint": self.fingerprint, "name": self.name, "info": self.info})

    def open(
        self,
        verify: Callable[[str, dict], bool] | None = None,
        *,
        complete: Callable[[dict[str, dict]], bool] | None = None,
    ) -> dict[str, dict]:
        """Check the fingerprint and read the finished records, `{key: record}`; every process calls it.

        `complete(records)` says whether the stored records already hold every item: then nothing is locked or
        written. Otherwise the main process locks the directory (a busy one is refused) before it checks, and reads
        under the lock. The main process's records are every process's."""
        error, writing = None, False
        if self.state.is_main_process:
            try:
                check_directory(self.dir, "output directory")
                if not self._finished(verify, complete):
                    self._hold.enter_context(directory_lock(self.dir))
                    writing = True
            except (ValueError, OSError) as e:
                error = self._error(e)
        error, writing = from_main_process((error, writing))  # every process fails alike, none waits forever
        try:
            if error is not None:
                raise error
            if writing:  # every process appends its own file here: one disk for all, before anything is changed
                fix = "turn the pair cache off (`cache_pairs=False`, `--cache_pairs False`)" if self.cache else ""
                check_shared_directory(self.dir, f"{self.name} directory", fix)
            records = {}
            if self.state.is_main_process:
                try:
                    if writing:
                        self._check_fingerprint()
                    for path in self._rank_files():
                        records.update({k: v for k, v in self._read(path, verify).items() if k not in records})
                    self._repair_files()
                except (ValueError, OSError) as e:
                    error = self._error(e)
            # The main process's records are every process's: all agree on what is done, none reads its own disk.
            error, records = from_main_process((error, records))
            if error is not None:
                raise error
        except ValueError:
            self._hold.close()
            raise
        return records

    def _error(self, e: Exception) -> ValueError:
        """A refusal as is; an OS error as the one line a user can act on."""
        if isinstance(e, ValueError):
            return e
        return ValueError(
            f"Cannot write the {self.name} records in {self.dir} ({getattr(e, 'strerror', None) or e}); make it "
            "writable or use another directory."
        )

    def _finished(self, verify, complete) -> bool:
        """The directory holds this fingerprint's records, undamaged, and `complete` says they are all there."""
        if complete is None:
            return False
        try:
            stored = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if not isinstance(stored, dict) or stored.get("fingerprint") != self.fingerprint:
            return False
        records: dict[str, dict] = {}
        for path in self._rank_files():
            found, _, problems, cut = self._parse(path, verify)
            if problems or cut:
                return False
            records.update({k: v for k, v in found.items() if k not in records})
        return complete(records)

    def _parse(self, path: Path, verify) -> tuple[dict[str, dict], list[str], list[str], bool]:
        """(records, their lines, problems, whether the last line was cut short) of one rank file."""
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
        return records, good, problems, bool(tail.strip())

    def _read(self, path: Path, verify) -> dict[str, dict]:
        records, good, problems, cut = self._parse(path, verify)
        if problems:
            warnings.warn(
                f"{path}: {len(problems)} unusable record(s) ({'; '.join(problems[:3])}); "
                "they are dropped and their items redone.",
                UserWarning,
                stacklevel=3,
            )
        if cut:
            logger.info("%s: dropped a last line cut short (an interrupted write); that item is redone.", path)
        if problems or cut:
            self._repair[path] = good
        return records

    def _repair_files(self) -> None:
        """Main process, under the lock: rewrite damaged files with their good lines only, so appends start on a
        clean line (before any process appends)."""
        for path, good in self._repair.items():
            try:
                write_text(path, "".join(line + "\n" for line in good))
            except OSError as e:
                warnings.warn(f"Could not rewrite {path} without its damaged lines ({e}).", UserWarning, stacklevel=3)
        self._repair.clear()

    def append(self, record: dict) -> None:
        """Store one finished record (a line, flushed at once) in this process's file."""
        path = self.dir / f"{self.name}.rank{self.state.process_index}.jsonl"
        with writing_to(path):  # a full disk: one line naming the file (a cut last line is dropped on resume)
            if self._file is None:
                self._file = open(path, "a", encoding="utf-8")
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        """Close this process's file and release the directory's lock."""
        try:
            if self._file is not None:
                self._file.close()
                self._file = None
        finally:
            self._hold.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_resumable(
    items: Sequence,
    fn: Callable[[Any], dict],
    output_dir=None,
    *,
    name: str,
    fingerprint: str = "",
    key: Callable[[Any], str] = lambda item: item.key,
    verify: Callable[[Any, dict], bool] | None = None,
    info: dict | None = None,
    overwrite: bool = False,
    cache: bool = False,
    outputs: Sequence[str] = (),
    desc: str | None = None,
    show_progress: bool = True,
) -> list[dict]:
    """`{"key": key(item), **fn(item)}` for every item, in order, on every process; work shared across processes.

    Processes take every n-th unfinished item (balanced when items are sorted by cost) and their records are
    gathered. With `output_dir`, records go to a `ResultStore` there as they finish, so a killed run resumes
    without redoing or losing a finished item, with any number of processes; `fingerprint` must cover everything
    the records depend on (see `ResultStore` for what is refused and what is redone); `verify(item, record)`
    checks a stored record before it is reused; `info` (a few readable settings) is stored beside the fingerprint
    to name what changed when a directory is refused; `cache`: see `ResultStore`; `outputs`: the names of the files
    the caller makes from the records in `output_dir` (results, plots), removed with the records they were made from.
    """
    keys = [key(item) for item in items]
    if len(set(keys)) != len(keys):
        raise ValueError(f"Items of {name} must have distinct keys; {len(keys) - len(set(keys))} repeat.")
    by_key = dict(zip(keys, items))
    state = process_state()
    store = (
        ResultStore(output_dir, name, fingerprint, info=info, overwrite=overwrite, cache=cache, outputs=outputs)
        if output_dir is not None
        else None
    )
    done = (
        store.open(
            lambda k, r: k in by_key and (verify is None or verify(by_key[k], r)),
            complete=lambda records: by_key.keys() <= records.keys(),
        )
        if store
        else {}
    )
    todo = [i for i, k in enumerate(keys) if k not in done]
    mine = todo[state.process_index :: state.num_processes]
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
    a warning and recomputed. The directory is locked while the result is computed (one writer).
    """
    path = Path(path)
    stored = _stored_json(path, fingerprint, overwrite)
    if stored is not None:
        return stored
    with directory_lock(path.parent, main_process=process_state().is_main_process):
        stored = _stored_json(path, fingerprint, overwrite)  # another run may have finished it meanwhile
        if stored is not None:
            return stored
        result = fn()
        write_json(path, {**result, "fingerprint": fingerprint})
    return result


def _stored_json(path: Path, fingerprint: str, overwrite: bool) -> dict | None:
    """The result stored at `path` under `fingerprint`; None when absent, unreadable or (with `overwrite`) stale."""
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            valid = isinstance(stored, dict)
        except (OSError, ValueError) as e:
            stored, valid = None, False
            warnings.warn(f"{path} is unreadable ({e}); computing it again.", UserWarning, stacklevel=3)
        if valid and stored.get("fingerprint") == fingerprint:
            return {k: v for k, v in stored.items() if k != "fingerprint"}
        if valid and not overwrite:
            raise ValueError(
                f"{path} holds a result of other inputs (model, data or settings differ); delete it, "
                "use another output directory, or pass overwrite=True (`--overwrite True` on the command "
                "line) to recompute it."
            )
    return None
