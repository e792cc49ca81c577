"""Writing output files whole or not at all.

A file is written to a temporary file in the same folder, flushed to disk (fsync) and renamed over
the target (``os.replace``, atomic on POSIX and Windows), so a killed process or a full disk never
leaves a truncated file in place of the old one. An error names the file the caller asked for, not
the temporary one: the CLI prints it as one line (``llmqueue: error: PATH: No space left on device``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text"]


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: Literal["w", "wb"] = "w", *,
                 encoding: str | None = "utf-8", newline: str | None = None) -> Iterator[IO[Any]]:
    """An open file whose content replaces ``path`` when the block ends without an exception.

    The new file gets the old file's permissions (a new one: the umask's, as ``open`` gives). A
    symlink is followed (its target is replaced). A target that is not a regular file (``/dev/stdout``,
    a named pipe) cannot be replaced and is written in place. An error of the write names ``path``.
    """
    target = Path(os.path.realpath(path))
    binary = mode == "wb"
    try:
        existing = target.stat()
    except FileNotFoundError:
        existing = None
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        try:
            with open(target, mode, encoding=None if binary else encoding, newline=newline) as out:
                yield out
        except OSError as err:
            raise OSError(err.errno, err.strerror, str(path)) from None
        return
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    in_body = False  # an OSError of the caller's own code on another file keeps that file's name
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        with os.fdopen(fd, mode, encoding=None if binary else encoding, newline=newline) as out:
            in_body = True
            yield out
            in_body = False
            out.flush()
            if existing is not None:
                os.chmod(tmp, stat.S_IMODE(existing.st_mode))
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and (not in_body or err.filename in (None, str(tmp))):
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible everywhere)
        folder = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "w", encoding=encoding, newline="") as out:
        out.write(text)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "wb") as out:
        out.write(data)
