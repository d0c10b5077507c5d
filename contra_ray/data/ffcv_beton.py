"""FFCV for expert training: ``.beton`` files written from a decoded train set, and a :class:`BatchLoader`
that serves exactly the sample order :func:`contra_ray.experts.train_expert` asks for.

* :func:`write_beton` writes an :class:`~contra_ray.data.ImageSet` (after our decoding and resizing, so
  the pixels are the ones every other path sees) as ``<out>/<name>.beton`` with fields ``image``
  (``RGBImageField``, ``raw``: exact pixels, or ``jpeg``: smaller, lossy), ``label`` and ``index`` (the
  row number), and records beside it ``<name>.beton.json``: format, dataset id, content hash,
  resolution, mode, number of samples, image shape, classes, FFCV version. ``python -m contra_ray.data
  prepare`` is its CLI.
* :func:`check_beton` refuses a ``.beton`` written for another data set, content or resolution,
  naming the path and both values.
* :class:`FFCVBatchLoader`: FFCV ``Loader`` s with ``indices=`` the epoch's indices and
  ``OrderOption.SEQUENTIAL`` (FFCV 1.0.2's custom traversal orders are broken; a sequential order over
  given indices visits them in exactly the given order), one per curriculum pacing stage (epoch size):
  a later epoch of the same size reuses its stage's compiled ``Loader`` with that epoch's indices (a new
  ``Loader`` costs ~2 s of numba compilation on its first batch). So shuffled and curriculum experts
  (App. B: epoch ``e`` is the ``ceil(h(e) N)`` easiest samples, permuted) see the same samples in the same
  order as with the in-memory loader; batches are decoded by ``num_workers`` threads (the task's CPU
  share) and preprocessed by the run's :class:`~contra_ray.data.Preprocessor`. Every ``Loader``
  construction is bounded by a timeout whose error names the pipeline (1.0.2's constructor can spin).

FFCV is optional (``pip install .[ffcv]``, needs ``libturbojpeg`` and OpenCV); importing this module
does not import it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from contra_ray.common.fileio import atomic_write

__all__ = ["BETON_FORMAT", "MODES", "beton_name", "write_beton", "read_beton_meta", "check_beton", "check_beton_for",
           "FFCVBatchLoader", "FFCVLoaderFactory", "call_with_timeout", "ffcv_available"]

BETON_FORMAT = "contra_ray.beton/1"
MODES = ("raw", "jpeg")
LOADER_TIMEOUT_S = 120.0


def ffcv_available() -> bool:
    """True when ``import ffcv`` works."""
    try:
        import ffcv  # noqa: F401
    except Exception:  # noqa: BLE001 - missing native libraries raise OSError/ImportError
        return False
    return True


def call_with_timeout(fn: Callable, seconds: float, what: str):
    """``fn()`` in a daemon thread; its result, or ``TimeoutError`` naming ``what`` after ``seconds``.

    A call that never returns is left running in its daemon thread (a thread cannot be killed): the caller
    should fail (a Ray task then dies and is retried), not retry in-process.
    """
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=run, name=f"ffcv: {what}", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise TimeoutError(f"FFCV: {what} did not finish within {seconds:.0f} s (FFCV 1.0.2's Loader constructor can "
                           "spin forever on some pipelines)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def beton_name(dataset_id: str, mode: str) -> str:
    """File name of the ``.beton`` of a data set id and mode, e.g. ``imagenet@64px-train-raw.beton``."""
    safe = "".join(ch if ch.isalnum() or ch in "@-_." else "-" for ch in dataset_id.replace("/", "-"))
    return f"{safe}-{mode}.beton"


def write_beton(data, out_dir: str | os.PathLike, mode: str = "raw", num_workers: int = 1,
                jpeg_quality: int = 90) -> Path:
    """Write ``data`` (an :class:`~contra_ray.data.ImageSet`) as an FFCV ``.beton`` plus its ``.json``.

    Args:
        data: the decoded set (uint8 images, tensor or :class:`~contra_ray.data.disk_images.DiskImages`).
        out_dir: destination folder; the name is :func:`beton_name` of ``data.dataset_id`` and ``mode``.
        mode: ``raw`` (exact pixels) or ``jpeg`` (``jpeg_quality``, lossy; smaller and usually faster
            to read from slow disks).
        num_workers: FFCV writer processes (forked: call from the main thread).

    Returns:
        The ``.beton`` path. The JSON (written last, atomically) is ``<path>.json``.

    Raises:
        ValueError: unknown mode. ImportError: FFCV is not installed.
    """
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r}: must be one of {', '.join(MODES)}")
    import ffcv
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / beton_name(data.dataset_id, mode)
    labels = data.labels.numpy()
    images = data.images

    class _Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return images[i].permute(1, 2, 0).contiguous().numpy(), int(labels[i]), int(i)

    fields = {"image": RGBImageField(write_mode="raw" if mode == "raw" else "jpg", jpeg_quality=jpeg_quality),
              "label": IntField(), "index": IntField()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:  # in this thread: the writer forks its workers, which numba's TBB layer only allows from the main thread
        DatasetWriter(str(tmp), fields, num_workers=num_workers).from_indexed_dataset(_Rows())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    meta = {"format": BETON_FORMAT, "dataset_id": data.dataset_id, "content_hash": data.content_hash,
            "resolution": int(data.images.shape[-1]), "mode": mode, "num_samples": len(labels),
            "image_shape": [int(s) for s in data.images.shape[1:]], "classes": list(data.classes),
            "ffcv_version": getattr(ffcv, "__version__", "?"), "jpeg_quality": jpeg_quality if mode == "jpeg" else None}
    atomic_write(str(path) + ".json", json.dumps(meta, indent=1))
    return path


def read_beton_meta(path: str | os.PathLike) -> dict:
    """The JSON written beside a ``.beton``.

    Raises:
        FileNotFoundError: the ``.beton`` or its JSON is missing (names the path).
        ValueError: the JSON is unreadable or of another format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FFCV file {path} does not exist; write it with python -m contra_ray.data prepare")
    side = Path(str(path) + ".json")
    if not side.is_file():
        raise FileNotFoundError(f"FFCV file {path} has no {side.name} beside it (which data set it holds is unknown); "
                                "rewrite it with python -m contra_ray.data prepare")
    try:
        meta = json.loads(side.read_text())
    except ValueError as e:
        raise ValueError(f"{side}: unreadable ({e})") from None
    if meta.get("format") != BETON_FORMAT:
        raise ValueError(f"{side}: format {meta.get('format')!r}, expected {BETON_FORMAT!r}")
    return meta


def check_beton(path: str | os.PathLike, *, dataset_id: str, content_hash: str, resolution: int,
                num_samples: int) -> dict:
    """Refuse ``path`` unless it holds exactly this train set: same dataset id, resolution, sample count and
    content hash (``ImageSet.dataset_id`` / ``content_hash`` / ``image_size`` / ``len``).

    Returns:
        The ``.beton``'s meta.

    Raises:
        FileNotFoundError: no such ``.beton`` or JSON (names the path).
        ValueError: the first mismatch, naming the path, the field and both values.
    """
    meta = read_beton_meta(path)
    want = {"dataset_id": dataset_id, "resolution": int(resolution), "num_samples": int(num_samples),
            "content_hash": content_hash}
    for key, value in want.items():
        if meta.get(key) != value:
            raise ValueError(f"FFCV file {path} was written for {key}={meta.get(key)!r}, this run's train set has "
                             f"{key}={value!r}; write one for it with python -m contra_ray.data prepare")
    return meta


def check_beton_for(path: str | os.PathLike, data) -> dict:
    """:func:`check_beton` against an :class:`~contra_ray.data.ImageSet`."""
    return check_beton(path, dataset_id=data.dataset_id, content_hash=data.content_hash,
                       resolution=int(data.images.shape[-1]), num_samples=len(data.labels))


class FFCVBatchLoader:
    """:class:`contra_ray.experts.BatchLoader` over a ``.beton``: exactly the given indices, in order.

    Args:
        path: the ``.beton`` (checked by the caller with :func:`check_beton`).
        preprocessor: the run's :class:`~contra_ray.data.Preprocessor` (uint8 batch -> model input).
        batch_size: samples per batch (the last of an epoch may be smaller, as the in-memory loader).
        device: training device.
        num_workers: FFCV decoding threads (the task's CPU share).
        timeout_s: bound on each ``Loader`` construction.

    Attributes:
        served: when ``record`` is true, per epoch the int64 row numbers FFCV actually delivered (read from
            the ``index`` field), for tests.
    """

    def __init__(self, path: str | os.PathLike, preprocessor, batch_size: int, device: str | torch.device = "cpu",
                 num_workers: int = 1, timeout_s: float = LOADER_TIMEOUT_S, record: bool = False):
        if batch_size < 1:
            raise ValueError(f"experts.batch_size={batch_size}: must be >= 1")
        self.path, self.preprocessor = str(path), preprocessor
        self.batch_size, self.device = int(batch_size), torch.device(device)
        self.num_workers, self.timeout_s = max(1, int(num_workers)), float(timeout_s)
        self.meta = read_beton_meta(path)
        self.record, self.served = record, []
        self.construct_s: list[float] = []  # seconds each Loader construction took
        self._loaders: dict[int, object] = {}  # one FFCV Loader per epoch size (= curriculum pacing stage)

    def __len__(self) -> int:
        return int(self.meta["num_samples"])

    def identity(self) -> str:
        """What a resumed expert must have been trained with: ``ffcv-raw`` reads the in-memory loader's exact
        pixels, ``ffcv-jpeg`` other (lossy) ones."""
        return "memory" if self.meta["mode"] == "raw" else f"ffcv-{self.meta['mode']}"

    def pipeline(self) -> str:
        """The decoding pipeline, in words (named in timeouts)."""
        return (f"{self.path} [image: SimpleRGBImageDecoder ({self.meta['mode']}) -> ToTensor -> ToTorchImage; label, "
                f"index: IntDecoder -> ToTensor -> Squeeze], SEQUENTIAL over given indices, batch {self.batch_size}, "
                f"{self.num_workers} workers")

    def _loader(self, indices: np.ndarray):
        from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

        pipelines = {"image": [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage(channels_last=False)],
                     "label": [IntDecoder(), ToTensor(), Squeeze()], "index": [IntDecoder(), ToTensor(), Squeeze()]}
        return call_with_timeout(
            lambda: Loader(self.path, batch_size=self.batch_size, num_workers=self.num_workers,
                           order=OrderOption.SEQUENTIAL, indices=indices, drop_last=False, pipelines=pipelines,
                           os_cache=True),
            self.timeout_s, f"Loader construction for {self.pipeline()}")

    def batches(self, indices: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = indices.detach().cpu().numpy().astype(np.int64)
        if len(idx) == 0:
            return
        loader = self._loaders.get(len(idx))
        if loader is None:  # a new pacing stage (epoch size): a new Loader
            t0 = time.perf_counter()
            loader = self._loaders[len(idx)] = self._loader(idx)
            self.construct_s.append(time.perf_counter() - t0)
        else:  # same size: reuse the compiled Loader, sequential over this epoch's indices
            loader.indices = loader.traversal_order.indices = loader.first_traversal_order = idx
        seen = []
        for x, y, i in loader:
            if self.record:
                seen.append(i.detach().cpu().long().reshape(-1).clone())
            x = self.preprocessor(x.contiguous())  # a fresh float32 tensor: FFCV reuses its buffers
            yield x.to(self.device), y.detach().long().reshape(-1).clone().to(self.device)
        if self.record:
            self.served.append(torch.cat(seen) if seen else torch.empty(0, dtype=torch.long))


class FFCVLoaderFactory:
    """Picklable recipe for an :class:`FFCVBatchLoader`, built inside each expert task with its CPU share.

    Args: ``path`` (checked ``.beton``), ``preprocessor`` (the run's ``Preprocessor``), ``batch_size``,
    ``timeout_s``.
    """

    def __init__(self, path: str | os.PathLike, preprocessor, batch_size: int, timeout_s: float = LOADER_TIMEOUT_S):
        self.path, self.preprocessor = str(path), preprocessor
        self.batch_size, self.timeout_s = int(batch_size), float(timeout_s)

    def __call__(self, device: str | torch.device, num_workers: int) -> FFCVBatchLoader:
        return FFCVBatchLoader(self.path, self.preprocessor, self.batch_size, device, num_workers, self.timeout_s)
