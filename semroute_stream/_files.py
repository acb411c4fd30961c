"""Where semroute-stream keeps its caches, and how it writes files so no reader sees half of one.

Every file (the built model, the route head cache, a written routes file) is written to a
temporary name in its directory and moved into place with ``os.replace``; a failure removes the
temporary file and re-raises.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "atomic_copy",
    "atomic_output",
    "atomic_write_bytes",
    "default_cache_root",
    "file_stamp",
    "sha256_file",
]


def default_cache_root() -> Path:
    """``$SEMROUTE_CACHE_DIR``, else ``$XDG_CACHE_HOME/semroute-stream``, else ``~/.cache/...``."""
    env = os.environ.get("SEMROUTE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "semroute-stream"
    return Path.home() / ".cache" / "semroute-stream"


@contextlib.contextmanager
def atomic_output(
    path: Path, *, durable: bool = False, mode: int | None = None
) -> Iterator[BinaryIO]:
    """A binary file that becomes ``path`` when the block ends without an exception.

    The directory is created when missing. ``durable``: flushed and fsync'ed before the move
    (the model cache); ``mode``: the file's permissions (default: ``mkstemp``'s 0o600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            if durable:
                out.flush()
                os.fsync(out.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(
    path: Path, data: bytes, *, durable: bool = False, mode: int | None = None
) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path, durable=durable, mode=mode) as out:
        out.write(data)


def atomic_copy(src: Path, dst: Path, *, durable: bool = False, mode: int | None = None) -> None:
    """Copy ``src`` to ``dst`` atomically (see :func:`atomic_output`)."""
    with atomic_output(dst, durable=durable, mode=mode) as out, src.open("rb") as inp:
        shutil.copyfileobj(inp, out)


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """``(mtime_ns, size, inode)`` of a file, None when it cannot be read: a change of any
    means the file was written or replaced (what the routes watchers compare)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def sha256_file(path: Path) -> str:
    """The file's sha256, hex, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
