"""File helpers shared by every module that writes: one atomic writer, one sha256.

Every file contra_ray writes (caches, expert trajectories, checkpoints, artifacts, plots, JSON results)
goes through :func:`atomic_write`, so a reader sees either the previous file or the complete new one,
never half a file, and an interrupted write leaves no temporary file behind.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "sha256_file"]


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Path], None], *,
                 fsync: bool = True) -> Path:
    """Write ``path`` atomically: a temporary file in the same directory, then ``os.replace``.

    Args:
        path: destination; its parent directory is created.
        data: the bytes or text (UTF-8) to write, or ``write(tmp_path)``, a function that writes the
            whole file at the path it is given (``torch.save``, ``safetensors.torch.save_file``,
            ``fig.savefig``: keep the suffix in mind, the temporary name ends in ``.tmp``).
        fsync: flush the file to disk before the rename (a crash then never leaves an empty file).

    Returns:
        ``Path(path)``.

    Raises:
        OSError: the directory is not writable (no temporary file is left behind); whatever ``data``
            raises, after removing the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
