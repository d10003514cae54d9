"""Safe file writes: atomic replacement, clear errors on full or read-only disks, no symlink followed.

* :func:`atomic_write` writes a temporary file in the target's folder, flushes it, then renames it over the
  target. A crash or a full disk mid-write leaves the previous file intact, never a truncated one, and a full or
  read-only disk is one :class:`~slim.errors.OutputError` naming the folder, with the temporary file removed.
* Nothing slim writes follows a symbolic link planted at its name (output folders are often shared): temporary
  files are created with ``O_EXCL | O_NOFOLLOW`` (``mkstemp``), the rename replaces a link instead of writing
  through it, and :func:`open_append` (log-like files) refuses to follow one.
* :func:`atomic_files` does the same for files that belong together and are written by someone else's code (an ONNX
  model and its external-data files, a prototxt and its caffemodel): they are written into a temporary folder
  beside the target and renamed into place only when all are complete, the target itself last.
* A writer killed mid-write (``kill -9``) leaves its temporary file (or folder), named ``.<target>.<8 random>.tmp``.
  The writer holds an advisory lock on it while it writes, so :func:`remove_stale_temps` can later tell a leftover
  from a file being written and remove only leftovers, only of that exact pattern.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path

from slim.errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so no leftover is ever judged stale
    fcntl = None

__all__ = ["atomic_write", "atomic_files", "open_append", "open_regular", "output_error", "check_output_path",
           "probe_folder", "temp_pattern", "remove_stale_temps"]

_log = logging.getLogger(__name__)

# The errors that mean "this folder cannot take the file", reported as an OutputError.
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ELOOP,
                  errno.EISDIR}
# tempfile's names: 8 characters from this alphabet between prefix and suffix.
_RANDOM = r"[a-z0-9_]{8}"
_SUFFIX = ".tmp"
# A leftover must also be this old: covers the instant between a writer creating its file and locking it.
_STALE_AFTER_S = 2.0


def check_output_path(path, what: str = "output") -> None:
    """Refuse a path that no file system accepts (a NUL byte), naming it.

    Raises:
        OutputError: the path holds a NUL byte.
    """
    if "\0" in os.fspath(path):
        raise OutputError(f"The {what} path {os.fspath(path)!r} contains a NUL byte, which no file name may hold; "
                          f"fix the path.")


def output_error(exc: OSError, path) -> OutputError:
    """An OutputError that says why ``path`` could not be written and what to do, from the OSError."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        why = f"the folder {folder} has no space left ({exc.strerror})"
        fix = "Free space there or write somewhere else"
    elif code == errno.EROFS:
        why = f"the folder {folder} is on a read-only file system"
        fix = "Write somewhere else, or remount it read-write"
    elif code in (errno.EACCES, errno.EPERM):
        why = f"the folder {folder} is not writable ({exc.strerror})"
        fix = "Make it writable or write somewhere else"
    elif code == errno.EFBIG:
        why = "the file is larger than the file system (or ulimit -f) allows"
        fix = "Write to another file system or raise the limit"
    elif code in (errno.ENOENT, errno.ENOTDIR):
        why = f"the folder {folder} does not exist"
        fix = "Create it or write somewhere else"
    elif code == errno.ELOOP:
        why = "a symbolic link is in the way and slim does not write through links"
        fix = "Remove the link"
    elif code == errno.EISDIR:
        why = "a folder of that name is in the way"
        fix = "Remove or rename it, or write somewhere else"
    else:
        why = exc.strerror or str(exc)
        fix = "Check the folder"
    return OutputError(f"Cannot write {path}: {why}. No partial file was left and any previous {path.name} is "
                       f"unchanged. {fix}.")


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temporary file beside ``path`` for writing; on success rename it to ``path``.

    A symbolic link at ``path`` is replaced by the new file, never written through.

    Args:
        path: the file to (re)write; its folder must exist.
        mode: "wb" or "w" (text, UTF-8); "w+b" where the writer also reads back (h5py).

    Raises:
        OutputError: the folder is full, read-only or not writable (the temporary file is removed).
    """
    check_output_path(path)
    path = Path(path)
    try:
        # mkstemp opens with O_CREAT | O_EXCL | O_NOFOLLOW: it never reuses or follows an existing name.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_SUFFIX, dir=path.parent or ".")
    except OSError as exc:
        raise output_error(exc, path) from None
    _lock(fd)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            # mkstemp creates 0600; give the file the mode a plain open() would, or keep the target's mode (not
            # that of a link's target: a link is replaced, not followed).
            os.chmod(tmp, _mode_for(path))
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in _OUTPUT_ERRNOS:
            raise output_error(exc, path) from None
        raise


@contextlib.contextmanager
def atomic_files(path):
    """Write ``path`` and the files that go with it (written by code that takes a file name) all or nothing.

    Yields a new, empty temporary folder in ``path``'s folder (``.<name>.<8 random>.tmp``, locked while in use):
    the caller writes ``path``'s file there under ``path``'s own name, with any side files beside it (an ONNX
    model's external data, a caffemodel beside its prototxt). When the block ends without an error, every file in
    the folder is synced and renamed into ``path``'s folder, ``path``'s own name last (the file that names the
    others appears only once they are in place), and the folder is removed. On any error the folder is removed
    with everything in it and nothing in ``path``'s folder has changed. A symbolic link planted at any of the
    names is replaced, never written through; an existing file's mode is kept. Temporary folders that killed
    writers left for ``path`` are removed first (only that exact pattern, only when unlocked: see
    :func:`remove_stale_temps`). The renames are one per file: a crash in the instant between them can leave new side
    files beside the previous ``path``, never a partial file.

    Raises:
        OutputError: the folder does not exist, or is full, read-only or not writable (nothing is left behind).
    """
    check_output_path(path)
    path = Path(path)
    folder = path.parent
    for stale in remove_stale_temps(folder, re.escape(path.name), folders=True):
        _log.warning("Removed %s, left by a write of %s that was interrupted.", stale, path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=_SUFFIX, dir=folder))
    except OSError as exc:
        raise output_error(exc, path) from None
    fd = None
    try:
        fd = os.open(tmp, os.O_RDONLY)
        _lock(fd)
        yield tmp
        names = sorted((e.name for e in os.scandir(tmp) if e.is_file(follow_symlinks=False)),
                       key=lambda name: (name == path.name, name))
        if path.name not in names:
            raise OutputError(f"Cannot write {path}: the writer left no file of that name (it wrote "
                              f"{', '.join(names) or 'nothing'}). Nothing was written.")
        for name in names:
            file_fd = os.open(tmp / name, os.O_RDONLY)
            try:
                os.fchmod(file_fd, _mode_for(folder / name))  # a plain open()'s mode, or the replaced file's
                os.fsync(file_fd)
            finally:
                os.close(file_fd)
        for name in names:
            os.replace(tmp / name, folder / name)
    except BaseException as exc:
        cause = _os_error(exc)
        if cause is not None:
            raise output_error(cause, path) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if fd is not None:
            os.close(fd)


def _os_error(exc: BaseException):
    """The OSError that says a folder cannot take files, if ``exc`` is one or was raised from one (exporters wrap)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _OUTPUT_ERRNOS:
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _mode_for(path: Path) -> int:
    try:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            return st.st_mode & 0o777
    except FileNotFoundError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def open_append(path):
    """Open ``path`` to append text (UTF-8), creating it, never through a symbolic link.

    A link found at ``path`` (planted in a shared folder) is removed, with a warning, and a regular file is
    created in its place: appending must not reach the file it points to.

    Raises:
        OutputError: the folder is full, read-only or not writable.
    """
    check_output_path(path)
    # O_NONBLOCK: a FIFO planted at the name fails at once instead of blocking until someone reads it.
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    for attempt in range(2):
        try:
            fd = os.open(path, flags, 0o666)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OSError(errno.ENXIO, "not a regular file")
            os.set_blocking(fd, True)
            return os.fdopen(fd, "a", encoding="utf-8")
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # a FIFO without a reader, a device
                raise OutputError(f"Cannot append to {path}: it is not a regular file. Remove it or choose another "
                                  f"name.") from None
            if attempt == 0 and os.path.islink(path):
                _log.warning("%s was a symbolic link (to %s); it was replaced by a regular file rather than "
                             "followed.", path, os.readlink(path))
                os.unlink(path)  # removes the link, not its target
                flags |= os.O_EXCL
                continue
            raise output_error(exc, path) from None
    raise AssertionError("unreachable")


def open_regular(path):
    """Open ``path`` to read text (UTF-8) if it is a regular file, without following a link or blocking on a FIFO.

    Returns:
        The open file, or None when there is no regular file at ``path``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    os.set_blocking(fd, True)
    return os.fdopen(fd, encoding="utf-8")


def probe_folder(path, size: int = 4096) -> None:
    """Write ``size`` bytes to a temporary file beside ``path``, sync and remove it: proof that the folder takes
    files (an empty file can be created on a full disk; a synced block cannot). The temporary file has the name
    :func:`atomic_write` would use for ``path``.

    Raises:
        OutputError: the folder is full, read-only or not writable.
    """
    with contextlib.suppress(_Probed):
        with atomic_write(path) as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
            raise _Probed  # leave before the rename: nothing is left behind


class _Probed(Exception):
    """Ends a probe write without keeping its file."""


def temp_pattern(name_regex: str) -> str:
    """The regular expression of :func:`atomic_write`'s temporary files for targets matching ``name_regex``."""
    return rf"\.(?:{name_regex})\.{_RANDOM}{re.escape(_SUFFIX)}"


def remove_stale_temps(folder, name_regex: str, folders: bool = False) -> list[str]:
    """Remove the temporary files that killed writers left in ``folder`` for targets matching ``name_regex``.

    Only files of :func:`atomic_write`'s exact naming pattern are considered, and of those only the ones no
    live writer holds (its lock) and that have not changed for a moment. Links are never touched, nor folders
    unless ``folders`` is set: then :func:`atomic_files`' temporary folders of the same pattern are removed too,
    under the same conditions, when they hold nothing but regular files.

    Returns:
        The paths removed.
    """
    if fcntl is None:
        return []
    pattern = re.compile(temp_pattern(name_regex))
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    for name in names:
        if not pattern.fullmatch(name):
            continue
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue  # a link (O_NOFOLLOW), or gone meanwhile; O_NONBLOCK: a FIFO so named does not block
        try:
            st = os.fstat(fd)
            is_folder = folders and stat.S_ISDIR(st.st_mode)
            if not (stat.S_ISREG(st.st_mode) or is_folder) or time.time() - st.st_mtime < _STALE_AFTER_S:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer holds it (or the file system has no locks: keep it)
            if is_folder:
                if not _empty_folder(fd):
                    continue
                os.rmdir(path)
            else:
                os.unlink(path)
            removed.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _empty_folder(fd: int) -> bool:
    """Remove the files in the open folder ``fd`` if all are regular files (by ``fd``: no path is followed)."""
    entries = list(os.scandir(fd))
    if not all(e.is_file(follow_symlinks=False) for e in entries):
        return False
    for e in entries:
        os.unlink(e.name, dir_fd=fd)
    return True


def _lock(fd: int) -> None:
    """Hold an advisory lock on a file being written, so that :func:`remove_stale_temps` leaves it alone."""
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
