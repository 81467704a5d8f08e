"""Files and directories that are whole or absent.

Everything the package writes goes through here: the content is written under a hidden temporary name in the target's
own directory and renamed onto the target only once complete (`os.replace`, atomic on POSIX file systems). A run that
is killed or runs out of disk space leaves at most a hidden `.NAME.*.tmp*` file, never a cut file under the real name
that a rerun would trust as a finished result, or protect as the user's own file. A write that fails for a reason
the user can fix (a full disk, a quota, a read-only or forbidden location) is reported as one `OSError` naming the
target (`writing_to`), and published files get the mode of any file the user creates (`ordinary_modes`): libraries
that write through their own temporary files (safetensors: Rust's `tempfile`) would leave them 0600.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import stat
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_sibling(path: Path) -> Path:
    """A hidden, unique name beside `path` that keeps its suffix (tools such as matplotlib infer the format from it),
    no longer than `path`'s own name when that is long (a name the file system takes has a temporary name it takes)."""
    tag = f".{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}"
    stem = path.stem[: max(1, len(path.name) - len(tag) - 1)] if len(path.name) > 200 else path.stem
    return path.with_name(f".{stem}{tag}")


WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG}
)
"""Failed writes the user fixes, not bugs: full disk, quota, file too large, read-only or forbidden place, long name."""

_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
"""How Rust's `std::io::Error` prints an OS error (safetensors and tokenizers raise it inside their own errors)."""


def write_failure(error: BaseException, path=None, within=None) -> OSError | None:
    """`error` as an `OSError(errno, strerror, path)` when it is a failed write of `WRITE_ERRNOS`, else None. With
    `path`, only errors about no file or a file under `within` (default `path`) are renamed to `path`: a temporary
    file is reported under the name the user gave."""
    code = error.errno if isinstance(error, OSError) else None
    if code is None:
        found = _RUST_OS_ERROR.search(str(error))
        code = int(found.group(1)) if found else None
    if code not in WRITE_ERRNOS:
        return None
    filename = getattr(error, "filename", None)
    if path is not None and (filename is None or str(filename).startswith(str(within or path))):
        filename = str(path)
    return OSError(code, os.strerror(code), filename)


@contextmanager
def writing_to(path, within=None) -> Iterator[None]:
    """Re-raise a failed write of the body (`write_failure`) as an `OSError` naming `path`, so that the CLI reports
    it in one line with the file the user named."""
    try:
        yield
    except Exception as error:
        failure = write_failure(error, path, within)
        if failure is None or (isinstance(error, OSError) and error.filename == failure.filename):
            raise
        raise failure from error


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, racing other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_modes(path) -> None:
    """Give the file `path`, or the directory `path` and everything in it, the mode `open()`/`mkdir()` would give
    (0666 less the umask; 0777 for directories and executables): a library's own temporary file is 0600. Links are
    not followed."""
    mask = _umask()
    path = Path(path)
    if not os.path.lexists(path) or path.is_symlink():
        return
    entries = [(path, path.is_dir())]
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            entries += [(Path(root) / d, True) for d in dirs] + [(Path(root) / f, False) for f in files]
    for entry, is_dir in entries:
        mode = entry.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        wanted = (0o777 if is_dir or mode & 0o111 else 0o666) & ~mask
        if mode & 0o7777 != wanted:
            os.chmod(entry, wanted)


@contextmanager
def ordinary_modes_of_new_files(directory) -> Iterator[Path]:
    """For libraries that write straight into a directory (`save_pretrained` into an existing one, the `Trainer`'s
    `save_model`): the files the body creates or replaces there get `ordinary_modes`; the others are left alone."""
    directory = Path(directory)

    def listing() -> dict[str, tuple[int, int]]:
        if not directory.is_dir():
            return {}
        return {e.name: (e.stat().st_ino, e.stat().st_mtime_ns) for e in os.scandir(directory) if e.is_file()}

    before = listing()
    yield directory
    for name, state in listing().items():
        if before.get(name) != state:
            ordinary_modes(directory / name)


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
        with writing_to(path, within=tmp):
            yield tmp
            ordinary_modes(tmp)
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


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # linux/fcntl.h, linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where the system or the file
    system cannot, and the caller moves them one at a time."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc < 2.28, musl < 1.2.3)
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def atomic_directory(path, *, overwrite: bool = True) -> Iterator[Path]:
    """A temporary directory for the body to fill; it replaces the directory `path` when the body returns (an old
    `path`, e.g. a damaged copy, is swapped out in one step where Linux can, else moved aside, then removed) and is
    removed when the body raises. Without
    `overwrite`, only a missing or empty `path` is replaced (`FileExistsError` otherwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    with writing_to(path, within=tmp):
        tmp.mkdir()
    try:
        with writing_to(path, within=tmp):
            yield tmp
            ordinary_modes(tmp)
        if overwrite and os.path.lexists(path) and _exchange(tmp, path):
            return  # swapped in one step: a kill leaves the old copy or the new one at `path`; `tmp` has the old now
        old = None
        if overwrite and os.path.lexists(path):
            old = temporary_sibling(path)
            os.rename(path, old)  # aside first: never a mix of the two (a kill before the next rename leaves neither)
        try:
            os.rename(tmp, path)  # replaces an empty directory only
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise FileExistsError(errno.EEXIST, "already exists", str(path)) from None
            raise
        if old is not None:
            _remove(old)
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


__all__ = [
    "WRITE_ERRNOS",
    "atomic_directory",
    "atomic_path",
    "ordinary_modes",
    "ordinary_modes_of_new_files",
    "temporary_sibling",
    "write_failure",
    "write_text",
    "writing_to",
]
