"""FFCV for expert training: ``.beton`` files written from a decoded train set, and a :class:`BatchLoader`
that serves exactly the sample order :func:`contra_ray.experts.train_expert` asks for.

* :func:`write_beton` writes an :class:`~contra_ray.data.ImageSet` (after our decoding and resizing, so
  the pixels are the ones every other path sees) as ``<out>/<name>.beton`` with fields ``image``
  (``RGBImageField``, ``raw``: exact pixels, or ``jpeg``: smaller, lossy), ``label`` and ``index`` (the
  row number), and records beside it ``<name>.beton.json``: format, dataset id, content hash,
  resolution, mode, number of samples, image shape, classes, FFCV version and the ``.beton``'s ``sha256``.
  ``python -m contra_ray.data prepare`` is its CLI; its ``--out`` may be a URI (``s3://``, ``gs://``,
  :mod:`contra_ray.common.storage`): the files are written into this node's :func:`beton_cache` folder and
  published there (:func:`publish_beton`: the ``.json`` last, so a ``.beton`` is never seen without it).
* ``experts.ffcv_dir`` a URI: each node reads a node-local copy, a read-through cache (:class:`BetonReadThrough`,
  :func:`contra_ray.common.storage.read_through`): ``<mirror of ffcv_dir>/<name>.beton.d/`` holding the
  ``.beton`` and its ``.json``, filled once per node under a lock, the ``sha256`` recomputed before the copy is
  renamed into place (a crash leaves only a ``.<name>.beton.d.fill-*`` folder, deleted by the next fill);
  one folder per ``.beton``, so filling one never touches another. A local ``ffcv_dir`` is read in place.
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

from contra_ray.common import storage
from contra_ray.common.fileio import atomic_write, sha256_file

__all__ = ["BETON_FORMAT", "MODES", "beton_name", "write_beton", "read_beton_meta", "check_beton", "check_beton_for",
           "is_remote", "beton_cache", "publish_beton", "BetonReadThrough", "open_beton", "FFCVBatchLoader",
           "FFCVLoaderFactory", "call_with_timeout", "ffcv_available"]

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
        The ``.beton`` path. The JSON (written last, atomically; a JSON already there is deleted before the new
        ``.beton`` takes its place) is ``<path>.json``, with ``sha256``: the hex sha256 of the ``.beton``'s bytes.

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
        Path(str(path) + ".json").unlink(missing_ok=True)  # never a new .beton beside the old one's JSON
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    meta = {"format": BETON_FORMAT, "dataset_id": data.dataset_id, "content_hash": data.content_hash,
            "resolution": int(data.images.shape[-1]), "mode": mode, "num_samples": len(labels),
            "image_shape": [int(s) for s in data.images.shape[1:]], "classes": list(data.classes),
            "ffcv_version": getattr(ffcv, "__version__", "?"), "jpeg_quality": jpeg_quality if mode == "jpeg" else None,
            "sha256": sha256_file(path)}
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
    return check_beton_meta(read_beton_meta(path), path, dataset_id=dataset_id, content_hash=content_hash,
                            resolution=resolution, num_samples=num_samples)


def check_beton_meta(meta: dict, path: str | os.PathLike, *, dataset_id: str, content_hash: str, resolution: int,
                     num_samples: int) -> dict:
    """:func:`check_beton` on a ``.beton``'s meta already read (``path``, a local path or a URI, is named in the
    error); returns ``meta``. Raises: ValueError, the first mismatch."""
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


def is_remote(location: str | os.PathLike) -> bool:
    """Whether ``location`` (``--out`` / ``experts.ffcv_dir``) is object storage, read through node-local copies:
    a URI other than ``file://`` (a local path written as a URI, used in place)."""
    return storage.is_uri(location) and not str(location).lower().startswith("file://")


def beton_cache(location: str, name: str) -> Path:
    """This node's folder for the ``.beton`` ``name`` of the URI ``location`` (an ``experts.ffcv_dir``):
    ``<storage.local_mirror(location)>/<name>.d/``, holding ``<name>`` and ``<name>.json``."""
    return storage.local_mirror(location) / f"{name}.d"


def publish_beton(path: str | os.PathLike, location: str) -> str:
    """Publish a ``.beton`` written by :func:`write_beton` and its JSON to the folder ``location`` (a URI), the
    JSON last: the JSON already there is deleted first, so a reader never pairs the new ``.beton`` with it.

    Returns:
        The ``.beton``'s URI. Raises: StorageError, ``location`` not writable (names the file).
    """
    path = Path(path)
    side = path.name + ".json"
    storage.delete(storage.join(location, side))
    storage.push(path.parent, location, files=[path.name, side], last=[side])
    return storage.join(location, path.name)


class BetonReadThrough:
    """This node's copy of the ``.beton`` ``name`` published under the URI ``source`` (an ``experts.ffcv_dir``),
    filled when missing or stale by :func:`contra_ray.common.storage.read_through` into :func:`beton_cache`:
    once per node, under a lock, the ``.beton``'s sha256 recomputed and compared with its JSON's before the copy
    is renamed into place. Picklable (Ray tasks call it on their own node).

    Args:
        source: the folder URI; name: the ``.beton`` file name; sha256: the hash the driver read in the
            published JSON (a copy recording another one is fetched again).

    Returns (when called):
        The local ``.beton`` path.

    Raises (when called):
        StorageError: ``source`` unreadable or without this ``.beton`` and a JSON recording ``sha256``.
        ValueError: the fetched ``.beton``'s sha256 differs from its JSON's (both named); nothing is left.
    """

    def __init__(self, source: str, name: str, sha256: str):
        self.source, self.name, self.sha256 = str(source), name, sha256

    def _recorded(self, folder: Path) -> str | None:
        try:
            return json.loads((folder / f"{self.name}.json").read_text()).get("sha256")
        except (OSError, ValueError, AttributeError):
            return None

    def _complete(self, folder: Path) -> bool:
        return self._recorded(folder) == self.sha256 and (folder / self.name).is_file()

    def _verify(self, folder: Path) -> None:
        got, want = sha256_file(folder / self.name), self._recorded(folder)
        if got != want:
            raise ValueError(f"{self.name} has sha256 {got}, its {self.name}.json records sha256 {want}")

    def __call__(self) -> Path:
        folder = storage.read_through(self.source, beton_cache(self.source, self.name), complete=self._complete,
                                      verify=self._verify, what=f"the FFCV file {self.name}",
                                      files=[self.name, f"{self.name}.json"])
        return folder / self.name


def open_beton(ffcv_dir: str, name: str, **want) -> tuple[Path, BetonReadThrough | None]:
    """The ``.beton`` ``name`` of ``experts.ffcv_dir``, checked with :func:`check_beton` (``want``: its keyword
    arguments). A local folder (or ``file://``): the file in place and no fill. A URI: its published JSON is read
    and checked first (nothing large is fetched for a ``.beton`` of another data set), then this node's copy is
    filled (:class:`BetonReadThrough`, returned for the tasks of other nodes) and checked.

    Raises:
        FileNotFoundError: no such ``.beton`` or JSON (names the path or URI).
        ValueError: a mismatch (:func:`check_beton`); under a URI, a JSON without ``sha256`` (written before
            copies were verified: rerun ``python -m contra_ray.data prepare``); a fetched copy failing its hash.
        StorageError: the URI is not readable.
    """
    if not is_remote(ffcv_dir):
        path = (storage.local_mirror(ffcv_dir) if storage.is_uri(ffcv_dir) else Path(ffcv_dir).expanduser()) / name
        check_beton(path, **want)
        return path, None
    remote = storage.join(ffcv_dir, name)
    try:
        meta = json.loads(storage.read_bytes(remote + ".json"))
    except FileNotFoundError:
        raise FileNotFoundError(f"FFCV file {remote} does not exist (no {name}.json there); write it with "
                                f"python -m contra_ray.data prepare --out {ffcv_dir}") from None
    except ValueError as e:
        raise ValueError(f"{remote}.json: unreadable ({e})") from None
    meta = meta if isinstance(meta, dict) else {}
    if meta.get("format") != BETON_FORMAT:
        raise ValueError(f"{remote}.json: format {meta.get('format')!r}, expected {BETON_FORMAT!r}")
    if not meta.get("sha256"):
        raise ValueError(f"FFCV file {remote}: its {name}.json records no sha256 (written before node-local copies "
                         f"were verified by content hash); rerun python -m contra_ray.data prepare --out {ffcv_dir}")
    check_beton_meta(meta, remote, **want)
    fill = BetonReadThrough(ffcv_dir, name, meta["sha256"])
    path = fill()
    check_beton(path, **want)
    return path, fill


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
    ``timeout_s``, ``fill``: for an ``experts.ffcv_dir`` URI, the :class:`BetonReadThrough` (it carries the
    source location) called in the task before the ``Loader`` is built, which reads the ``.beton`` it returns
    (that node's copy) instead of ``path`` (the driver's).

    Raises (when called): see :class:`BetonReadThrough`.
    """

    def __init__(self, path: str | os.PathLike, preprocessor, batch_size: int, timeout_s: float = LOADER_TIMEOUT_S,
                 fill: Callable[[], Path] | None = None):
        self.path, self.preprocessor = str(path), preprocessor
        self.batch_size, self.timeout_s, self.fill = int(batch_size), float(timeout_s), fill

    def __call__(self, device: str | torch.device, num_workers: int) -> FFCVBatchLoader:
        path = self.fill() if self.fill is not None else self.path
        return FFCVBatchLoader(path, self.preprocessor, self.batch_size, device, num_workers, self.timeout_s)
