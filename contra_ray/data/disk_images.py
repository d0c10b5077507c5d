"""Image sets larger than memory: uint8 arrays on disk, read a batch at a time, and their lazy
preprocessed view.

* :func:`write_npy` writes a uint8 ``[N, C, H, W]`` array as a standard ``.npy`` file from chunks
  (header first, then each chunk as it is decoded), so the whole array is never in memory, and returns the
  :func:`contra_ray.data.content_hash` of the array and its labels computed on the way.
* :class:`DiskImages` is that file seen as an image tensor: ``shape``, ``dtype`` (uint8), ``len``,
  ``images[i]`` / ``images[a:b]`` / ``images[index_tensor]`` -> a uint8 tensor of just those rows.
  Every read fetches just the rows asked for with ``os.preadv`` (consecutive rows in one call), so
  the process's resident memory never holds more than those rows (the page cache is the kernel's; a
  memory map would pull neighbouring pages of random rows into this process's resident set).
  It pickles as its path and row selection, so a Ray task reads the same file (one machine or shared
  storage); with a ``fill`` (e.g. :class:`contra_ray.data.imagenet.DecodedReadThrough`), a process that
  unpickles it first fills its node's copy of the file from the storage location the driver published it to.
* :class:`PreprocessedImages` is ``preprocessor(images)`` for a :class:`DiskImages`, evaluated per
  request: ``x[idx]`` -> float32 rows in the model's input space, ``x.split(n)`` -> chunks. Calling a
  :class:`contra_ray.data.Preprocessor` on a :class:`DiskImages` returns one, which is how the stages
  (``prepare_data``, experts, distiller initialization, evaluation) run unchanged on streamed data:
  they only ever index, split and measure their image tensors.

Plain NumPy / PyTorch, no Ray.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from contra_ray.common.fileio import atomic_write

__all__ = ["DiskImages", "PreprocessedImages", "write_npy", "is_lazy"]


def write_npy(path: str | os.PathLike, shape: tuple[int, ...], chunks: Iterable[np.ndarray],
              labels: np.ndarray) -> str:
    """Write uint8 ``shape`` from ``chunks`` (consecutive row blocks, C order) into ``.npy`` file ``path``.

    Written with :func:`contra_ray.common.fileio.atomic_write` (a crash leaves no half file).

    Returns:
        The content hash of the images and ``labels`` (first 16 hex digits of sha256 over the image
        bytes, then the int64 label bytes; equal to :func:`contra_ray.data.content_hash`).

    Raises:
        ValueError: a chunk of another dtype or row shape, or rows adding up to another count than
            ``shape[0]``.
    """
    h = hashlib.sha256()

    def write(tmp: Path) -> None:
        rows = 0
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                    "shape": tuple(int(s) for s in shape)})
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk)
                if chunk.dtype != np.uint8 or chunk.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"{path}: chunk of {chunk.dtype} {chunk.shape}, expected uint8 [n, "
                                     f"{', '.join(map(str, shape[1:]))}]")
                data = chunk.tobytes()
                h.update(data)
                f.write(data)
                rows += len(chunk)
        if rows != shape[0]:
            raise ValueError(f"{path}: {rows} rows written, expected {shape[0]}")

    atomic_write(path, write)
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def is_lazy(x) -> bool:
    """True for :class:`DiskImages` / :class:`PreprocessedImages` (read on demand), False for tensors."""
    return isinstance(x, (DiskImages, PreprocessedImages))


def _as_index(key, n: int) -> np.ndarray | slice | int:
    if isinstance(key, (int, np.integer)):
        k = int(key)
        if not -n <= k < n:
            raise IndexError(f"index {k} is out of bounds for {n} images")
        return k % n
    if isinstance(key, slice):
        return key
    idx = key.cpu().numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise IndexError(f"boolean index of shape {idx.shape} for {n} images")
        return np.nonzero(idx)[0]
    idx = idx.astype(np.int64).reshape(-1)
    if len(idx) and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"index out of bounds for {n} images")
    return idx % n if len(idx) else idx


class DiskImages:
    """A uint8 ``[N, C, H, W]`` ``.npy`` file (or a row selection of it) read on demand.

    Args:
        path: the ``.npy`` file (uint8, 4-D, C order), e.g. written by :func:`write_npy`.
        rows: optional int64 row numbers into the file: this object is then those rows, in that order.
        fill: optional picklable callable that makes ``path`` present and complete on this node (a
            read-through cache fill, see :func:`contra_ray.common.storage.read_through`); called once per
            process that unpickled this object, before its first read. The file must exist where the
            object is created.

    Raises:
        ValueError: the file is not a 4-D uint8 C-order ``.npy`` (names it).
    """

    def __init__(self, path: str | os.PathLike, rows: np.ndarray | None = None,
                 fill: Callable[[], object] | None = None):
        self.path = str(path)
        self.fill = fill
        self._ready = True  # the file is here (read below); an unpickled copy calls fill first
        with open(self.path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
            except ValueError as e:
                raise ValueError(f"{self.path}: not a .npy file ({e})") from None
            self._offset = f.tell()
        if dtype != np.uint8 or fortran or len(shape) != 4:
            raise ValueError(f"{self.path}: {dtype} {'Fortran' if fortran else 'C'}-order {shape} array, expected a "
                             "uint8 C-order [N, C, H, W] image array")
        self._file_rows = int(shape[0])
        self._row_bytes = int(np.prod(shape[1:]))
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        n = self._file_rows if self.rows is None else len(self.rows)
        self.shape = torch.Size((n, *(int(s) for s in shape[1:])))

    dtype = torch.uint8
    device = torch.device("cpu")

    def dim(self) -> int:
        return 4

    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes the rows would take in memory (uint8)."""
        return self.numel()

    def __len__(self) -> int:
        return int(self.shape[0])

    def __repr__(self) -> str:
        return f"DiskImages({self.path!r}, shape={tuple(self.shape)})"

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._ready = state.get("fill") is None

    def _ensure(self) -> None:
        if not self._ready:
            self.fill()
            self._ready = True

    def take(self, idx) -> "DiskImages":
        """The rows ``idx`` (int64 tensor / array, any order) as another lazy :class:`DiskImages`."""
        sel = _as_index(idx, len(self))
        if isinstance(sel, slice):
            sel = np.arange(len(self))[sel]
        sel = np.atleast_1d(sel)
        out = copy.copy(self)  # the same file, header and fill: nothing read here
        out.rows = sel.astype(np.int64) if self.rows is None else self.rows[sel]
        out.shape = torch.Size((len(out.rows), *self.shape[1:]))
        return out

    def _read(self, file_rows: np.ndarray | slice) -> np.ndarray:
        """Rows of the file, by ``pread`` into the output (no memory map: random rows never pull their
        neighbours' pages into this process's resident memory); consecutive rows in one read each."""
        self._ensure()
        if isinstance(file_rows, slice):
            file_rows = np.arange(self._file_rows)[file_rows]
        out = np.empty((len(file_rows), *self.shape[1:]), dtype=np.uint8)
        if len(file_rows) == 0:
            return out
        order = np.argsort(file_rows, kind="stable")  # read in file order, hand back in the asked order
        srt = file_rows[order]
        buf = out if np.array_equal(order, np.arange(len(order))) else np.empty_like(out)
        flat = buf.reshape(len(srt), -1)
        starts = np.concatenate([[0], np.nonzero(np.diff(srt) != 1)[0] + 1, [len(srt)]])
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
                view = memoryview(flat[a:b]).cast("B")
                pos, offset = 0, self._offset + int(srt[a]) * self._row_bytes
                while pos < len(view):
                    got = os.preadv(fd, [view[pos:]], offset + pos)
                    if got <= 0:
                        raise OSError(f"{self.path}: file ends before row {int(srt[a]) + pos // self._row_bytes} "
                                      f"(truncated cache?)")
                    pos += got
        finally:
            os.close(fd)
        if buf is not out:
            out[order] = buf
        return out

    def __getitem__(self, key) -> torch.Tensor:
        """uint8 rows: ``[C, H, W]`` for an int, ``[n, C, H, W]`` for a slice, index tensor/array/list."""
        sel = _as_index(key, len(self))
        if isinstance(sel, int):
            return self[np.array([sel])][0]
        if self.rows is not None:
            sel = self.rows[sel] if not isinstance(sel, slice) else self.rows[sel]
        return torch.from_numpy(self._read(sel))

    def split(self, size: int) -> Iterator[torch.Tensor]:
        """Consecutive uint8 chunks of ``size`` rows (the last may be smaller)."""
        for s in range(0, len(self), size):
            yield self[s:s + size]


class PreprocessedImages:
    """``preprocessor(images)`` of a :class:`DiskImages`, computed for the rows asked for.

    Behaves like the float32 ``[N, C, H, W]`` tensor it stands for wherever the stages use one:
    ``len``, ``shape``, ``dtype``, ``x[idx]`` (float32 rows, on the CPU), ``x.split(n)``; ``cpu()``,
    ``detach()`` and ``contiguous()`` return the view itself (so it can be ``ray.put`` as a few bytes).
    Anything that needs the whole tensor at once (``x.to(device)``) raises instead of silently reading
    it all: take a slice first.
    """

    def __init__(self, images: DiskImages, preprocessor):
        self.images, self.preprocessor = images, preprocessor
        self.shape = images.shape

    dtype = torch.float32
    device = torch.device("cpu")

    def dim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return f"PreprocessedImages({self.images!r})"

    def __getitem__(self, key) -> torch.Tensor:
        rows = self.images[key]
        if rows.dim() == 3:
            return self.preprocessor(rows[None])[0]
        return self.preprocessor(rows)

    def take(self, idx) -> "PreprocessedImages":
        """The rows ``idx`` as another lazy view."""
        return PreprocessedImages(self.images.take(idx), self.preprocessor)

    def split(self, size: int) -> Iterator[torch.Tensor]:
        for s in range(0, len(self), size):
            yield self[s:s + size]

    def cpu(self) -> "PreprocessedImages":
        return self

    detach = contiguous = cpu

    def to(self, *args, **kwargs):
        raise TypeError("PreprocessedImages streams from disk and cannot move as a whole; index or split it "
                        "(x[a:b].to(...)) instead")
