"""Files and directories that are whole or absent.

Everything the package writes goes through here: the content is written under a hidden temporary name in the target's
own directory and renamed onto the target only once complete (`os.replace`, atomic on POSIX file systems). A run that
is killed or runs out of disk space leaves at most a hidden `.NAME.*.tmp*` file, never a cut file under the real name
that a rerun would trust as a finished result, or protect as the user's own file.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_sibling(path: Path) -> Path:
    """A hidden, unique name beside `path` that keeps its suffix (tools such as matplotlib infer the format from it)."""
    return path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename the finished `tmp` onto `path`; without `overwrite` an existing `path` (a file created while this run
    worked) is kept and `FileExistsError` raised: the hard link fails atomically when the name is taken."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "already exists", str(path)) from None
    except OSError:  # a file system without hard links: check, then rename (a narrow window remains)
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "already exists", str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


@contextmanager
def atomic_path(path, *, overwrite: bool = True) -> Iterator[Path]:
    """A temporary path for the body to write the file `path` to; renamed onto `path` when the body returns, removed
    when it raises (a full disk, a kill). Without `overwrite`, a file that appeared at `path` meanwhile is not
    replaced (`FileExistsError`). Parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        _publish(tmp, path, overwrite)
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


def write_text(path, text: str, *, overwrite: bool = True, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` whole or not at all (see `atomic_path`)."""
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "w", encoding=encoding, newline="") as f:
        f.write(text)
    return path


@contextmanager
def atomic_directory(path, *, overwrite: bool = True) -> Iterator[Path]:
    """A temporary directory for the body to fill; it replaces the directory `path` when the body returns (an old
    `path`, e.g. a damaged copy, is removed first) and is removed when the body raises. Without `overwrite`, only a
    missing or empty `path` is replaced (`FileExistsError` otherwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        if overwrite and os.path.lexists(path):
            _remove(path)
        try:
            os.rename(tmp, path)  # replaces an empty directory only
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise FileExistsError(errno.EEXIST, "already exists", str(path)) from None
            raise
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


__all__ = ["atomic_directory", "atomic_path", "temporary_sibling", "write_text"]
