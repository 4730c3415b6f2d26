"""Atomic files: written to a temporary file of their own in the destination's directory,
flushed and fsync'ed, then ``os.replace``d over the destination (and the directory fsync'ed). A
process killed at any moment leaves the previous file or the new one, never a torn file, and
processes writing the same file at once do not mix their writes. Used by the training loop's
checkpoints and reports, the benchmark outputs and the JIT build's stamp."""
from __future__ import annotations

import os
import tempfile

_TMP_PREFIX = ".tmp-"


class WriteError(OSError):
    """An output file could not be written (disk full, read-only...): one line naming the file;
    the previous version of the file, if any, is left as it was."""


def _temporary_prefix(name: str) -> str:
    return _TMP_PREFIX + name + "."


def _file_mode() -> int:
    # mkstemp creates 0600 files; outputs get the mode open() would give them. os.umask can only
    # be read by setting it, so set it back at once.
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Raises WriteError (naming ``path`` and the OS error) when the file cannot be written."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(os.path.basename(path)), dir=directory)
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise WriteError(f"cannot write {path}: {exc.strerror or exc} (any earlier version "
                             "of it is left as it was)") from exc
        raise
    _fsync_dir(directory)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())
