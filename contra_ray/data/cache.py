"""The decoded-image caches under ``<cache_dir>/decoded/``: their keys and the ``.pt`` entries.

Two layouts live there, each with its own name so existing caches keep being hit:

* ``.pt`` files (``cifar10-jpeg`` and ``imagefolder``, :mod:`contra_ray.data.sources`): one ``torch.save``
  dict ``{images, labels, classes, content_hash}`` (:func:`read_decoded`, :func:`write_decoded`), named
  ``<name>-<key>-<DECODER>-<split>.pt`` or ``imagefolder-<key>-<split>.pt``.
* ``.npy`` folders (``tiny-imagenet`` and ``imagenet``, :func:`contra_ray.data.imagenet.decoded_cache`),
  read a batch at a time by :class:`contra_ray.data.disk_images.DiskImages`.

Both key a decoded folder by the same hash of its files (:func:`files_key`): a header (decoder or cache
version, folder, ...) then every file's path, label, size and mtime. Every write is atomic
(:func:`contra_ray.common.fileio.atomic_write`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

import torch

from contra_ray.common.fileio import atomic_write

__all__ = ["DECODER", "files_key", "read_decoded", "write_decoded"]

DECODER = "rgb8v2"  # in every .pt decoded-cache name: bump when decoding changes (v2: always RGB, modes checked)


def files_key(header: Iterable[object], samples: Iterable[tuple[str, int]]) -> str:
    """First 16 hex digits of sha256 over ``header`` (its parts as ``str``, joined by NUL) then one line
    ``path NUL label NUL size NUL mtime_ns`` per ``(path, label)`` of ``samples``: a touched, resized,
    added, removed or relabelled file gives another key.

    Raises:
        FileNotFoundError: a listed file no longer exists.
    """
    h = hashlib.sha256("\0".join(str(part) for part in header).encode())
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def read_decoded(path: Path):
    """``(images, labels, classes, content_hash)`` from the ``.pt`` cache entry ``path``, or ``None``."""
    if not path.is_file():
        return None
    d = torch.load(path, weights_only=True)
    return d["images"], d["labels"], list(d["classes"]), d["content_hash"]


def write_decoded(path: Path, images: torch.Tensor, labels: torch.Tensor, classes: list[str], digest: str) -> None:
    """Write the ``.pt`` cache entry ``path`` that :func:`read_decoded` reads (atomically)."""
    atomic_write(path, lambda tmp: torch.save({"images": images, "labels": labels,
                                               "classes": list(classes), "content_hash": digest}, tmp))
