"""Tiny ImageNet as published and ImageNet-1K from an ImageFolder tree, decoded once into an on-disk cache.

* ``data.dataset: tiny-imagenet`` reads the ``tiny-imagenet-200`` folder exactly as it is distributed
  (Le & Yang 2015): ``wnids.txt`` (the 200 class ids), ``words.txt`` (``wnid<TAB>synonym, synonym, ...``),
  ``train/<wnid>/images/*.JPEG`` and ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt``
  (``file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1``). The unlabelled ``test/`` folder is not used: the
  ``test`` split is ``val/``, as in MTT / DATM. Labels index the *sorted* wnids (what ``ImageFolder``
  gives for the same classes), ``classes`` are the wnids, ``class_names`` the first synonym in
  ``words.txt`` (``n01443537`` -> ``goldfish``).
* ``data.dataset: imagenet`` reads ``train/<wnid>/*`` and ``val/<wnid>/*`` as torchvision's
  ``ImageFolder`` lays them out (the usual ImageNet-1K preparation); class names from ``words.txt`` or
  ``LOC_synset_mapping.txt`` in the root when present, else the folder names. Images are resized to
  ``data.resolution`` (default 64) as MTT's ImageNet loaders do: ``Resize(res)`` (shorter side, bilinear,
  PIL) then ``CenterCrop(res)``.

Both are decoded once (PIL, ``convert("RGB")``, 8-bit modes only: the rules of
:func:`contra_ray.data.image_files.decode_images`) in chunks by ``data.decode_threads`` threads into
``<cache_dir>/decoded/<name>-<key>-<split>/`` (``images.npy`` uint8 ``[N, 3, R, R]``, ``labels.npy``,
``meta.json`` written last), keyed by every file's path, size and mtime, the resolution and the decoder
version. The images are then served from that file (:class:`contra_ray.data.disk_images.DiskImages`, never
more than a batch in memory) or, with ``data.in_memory``, loaded whole.

On a cluster whose nodes share no folder, the driver publishes each decoded folder once to a storage location
(:func:`share_streamed`; ``data.shared_cache``, default ``<output_dir>/data-cache`` for a URI ``output_dir``):
``<location>/decoded/<folder>/``, ``meta.json`` last. A worker that unpickles the set's
:class:`~contra_ray.data.disk_images.DiskImages` fills its node's ``data.cache_dir`` copy from there before its
first read (:class:`DecodedReadThrough`: under a lock, the content hash recomputed, renamed into place).
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from contra_ray.common import storage
from contra_ray.common.fileio import atomic_write
from contra_ray.common.raycluster import available_cpus
from contra_ray.data.cache import files_key
from contra_ray.data.disk_images import DiskImages, write_npy
from contra_ray.data.image_files import NOT_8BIT, decode_images, differences, list_split, undecodable

__all__ = ["Listing", "tiny_imagenet_listing", "imagefolder_listing", "read_class_names", "load_imagenet_split",
           "IMAGENET_DEFAULT_RESOLUTION", "decode_resized", "decoded_hash", "publish_decoded",
           "DecodedReadThrough", "share_streamed"]

IMAGENET_DEFAULT_RESOLUTION = 64
_CACHE_VERSION = "npy-v1"  # bump when the decoded layout or the resizing changes
_CHUNK = 256  # images per decoding job


def _image_ext(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


@dataclasses.dataclass
class Listing:
    """The files of one split, in label order, before decoding.

    Attributes:
        files: image paths; labels: int64 ``[N]`` (index into ``classes``); classes: class ids (wnids);
        class_names: one readable name per class; folder: the split's folder (for messages and the key).
    """

    files: list[str]
    labels: np.ndarray
    classes: list[str]
    class_names: list[str]
    folder: Path


def _read_wnids(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"data.root: {path} is missing; a Tiny ImageNet root (tiny-imagenet-200/) lists "
                                "its class ids there, one per line")
    wnids, seen = [], {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        w = line.strip()
        if not w:
            continue
        if w in seen:
            raise ValueError(f"{path}:{n}: class id {w!r} is listed twice (first at line {seen[w]})")
        seen[w] = n
        wnids.append(w)
    if not wnids:
        raise ValueError(f"{path}: lists no class ids")
    return wnids


def read_class_names(path: Path, wnids: list[str], required: bool = True) -> list[str]:
    """First synonym of each wnid in ``words.txt`` (``wnid<TAB>a, b``) or ``LOC_synset_mapping.txt``
    (``wnid a, b``); ``None`` entries are filled with the wnid when ``required`` is false.

    Raises:
        FileNotFoundError: ``required`` and the file is missing (names it).
        ValueError: ``required`` and a wnid has no line in the file (names the wnid and the file).
    """
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"data.root: {path} is missing; Tiny ImageNet's class names come from it")
        return list(wnids)
    names: dict[str, str] = {}
    wanted = set(wnids)
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t", 1) if "\t" in line else line.rstrip("\n").split(" ", 1)
            if len(parts) == 2 and parts[0].strip() in wanted:
                names[parts[0].strip()] = parts[1].split(",")[0].strip() or parts[0].strip()
    missing = [w for w in wnids if w not in names]
    if missing and required:
        raise ValueError(f"{path}: no name for class id(s) {missing[:10]}{' ...' if len(missing) > 10 else ''} "
                         f"({len(missing)} of {len(wnids)})")
    return [names.get(w, w) for w in wnids]


def tiny_imagenet_listing(root: str | os.PathLike, split: str) -> Listing:
    """The files and labels of a published Tiny ImageNet split (``train``, or ``test`` = ``val/``).

    Raises:
        FileNotFoundError: the root, ``wnids.txt``, ``words.txt``, ``train/``, ``val/images/`` or
            ``val/val_annotations.txt`` is missing, or an annotated val image does not exist (names the
            annotation file and line and the missing path).
        ValueError: ``train/`` holds other classes than ``wnids.txt`` (names both lists' differences);
            a class without training images; a val annotation naming a wnid that is not in ``wnids.txt``
            (names file, line and wnid); a malformed or repeated annotation; an image in ``val/images``
            that ``val_annotations.txt`` does not list (names the image and the file).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={str(root)!r}: no such directory (expected the tiny-imagenet-200 folder)")
    wnids_path = root / "wnids.txt"
    wnids = _read_wnids(wnids_path)
    classes = sorted(wnids)
    index = {w: i for i, w in enumerate(classes)}
    names = read_class_names(root / "words.txt", classes, required=True)
    if split == "train":
        train = root / "train"
        if not train.is_dir():
            raise FileNotFoundError(f"data.root={str(root)!r}: no train/ folder in {root}")
        folders = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
        if folders != classes:
            missing, extra = sorted(set(classes) - set(folders)), sorted(set(folders) - set(classes))
            raise ValueError(f"data.root={str(root)!r}: {train} holds other classes than {wnids_path}: "
                             f"{differences(missing, extra, 'missing', 'extra', sep=', ')} ({len(folders)} folders, "
                             f"{len(classes)} wnids)")
        files, labels = [], []
        for w in classes:
            d = train / w / "images"
            found = sorted(str(p) for p in d.iterdir() if _image_ext(p.name)) if d.is_dir() else []
            if not found:
                raise ValueError(f"data.root={str(root)!r}: class {w!r} has no images in {d}")
            files += found
            labels += [index[w]] * len(found)
        return Listing(files, np.asarray(labels, dtype=np.int64), classes, names, train)
    if split != "test":
        raise ValueError(f"split={split!r}: must be train or test")
    val = root / "val"
    ann = val / "val_annotations.txt"
    images_dir = val / "images"
    if not ann.is_file():
        raise FileNotFoundError(f"data.root={str(root)!r}: {ann} is missing; Tiny ImageNet's val/ labels come from "
                                "it (file<TAB>wnid<TAB>box per line)")
    if not images_dir.is_dir():
        raise FileNotFoundError(f"data.root={str(root)!r}: no val/images/ folder in {root}")
    listed: dict[str, tuple[int, int]] = {}
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise ValueError(f"{ann}:{n}: expected file<TAB>wnid<TAB>box, got {line!r}")
        fname, wnid = parts[0].strip(), parts[1].strip()
        if wnid not in index:
            raise ValueError(f"{ann}:{n}: image {fname} is labelled {wnid!r}, which is not a class of {wnids_path}")
        if fname in listed:
            raise ValueError(f"{ann}:{n}: image {fname} is listed twice (first at line {listed[fname][1]})")
        if not (images_dir / fname).is_file():
            raise FileNotFoundError(f"{ann}:{n} lists {fname}, but {images_dir / fname} does not exist")
        listed[fname] = (index[wnid], n)
    present = sorted(p.name for p in images_dir.iterdir() if _image_ext(p.name))
    unlisted = [f for f in present if f not in listed]
    if unlisted:
        raise ValueError(f"{images_dir / unlisted[0]} is not listed in {ann} ({len(unlisted)} unlisted image(s): "
                         f"{unlisted[:5]}); every val image needs its label there")
    order = sorted(listed, key=lambda f: (listed[f][0], f))  # class by class, as ImageFolder would list them
    return Listing([str(images_dir / f) for f in order], np.asarray([listed[f][0] for f in order], dtype=np.int64),
                   classes, names, val)


def imagefolder_listing(root: str | os.PathLike, split: str) -> Listing:
    """``root/train`` or ``root/val`` (``root/test``) as ``torchvision.datasets.ImageFolder`` lists them, without
    hidden folders and files (:func:`contra_ray.data.image_files.list_image_folder`).

    Raises:
        FileNotFoundError / ValueError: as :func:`contra_ray.data.image_files.check_split_classes`, a missing split,
            or an empty class folder (named by its path).
    """
    root = Path(root).expanduser()
    folder, listing = list_split(root, split)
    names_file = next((root / n for n in ("words.txt", "LOC_synset_mapping.txt") if (root / n).is_file()),
                      root / "words.txt")
    names = read_class_names(names_file, list(listing.classes), required=False)
    return Listing([p for p, _ in listing.samples], np.asarray(listing.targets, dtype=np.int64),
                   list(listing.classes), names, folder)


def decode_resized(path: str, resolution: int) -> np.ndarray:
    """One image file -> uint8 ``[3, R, R]``: PIL ``convert("RGB")`` (8-bit modes only), then torchvision's
    ``Resize(R)`` (shorter side to ``R``, bilinear with PIL's antialiasing) and ``CenterCrop(R)``.

    Raises:
        ValueError: unreadable file, a file whose pixels cannot be decoded (a truncated or corrupt JPEG), or a
            mode that is not 8 bits per channel (names the file and the cause).
    """
    try:
        im = Image.open(path)
    except Exception as e:  # noqa: BLE001 - PIL raises many types
        raise ValueError(f"{path}: not a readable image ({e})") from None
    with im:
        if im.mode.startswith(NOT_8BIT):
            raise ValueError(f"{path}: image mode {im.mode!r} is not 8 bits per channel; convert it to 8-bit RGB first")
        try:  # the header opened; the pixels are read here (PIL: "image file is truncated")
            rgb = im.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(undecodable(path, e)) from None
    out = TF.center_crop(TF.resize(rgb, resolution, interpolation=TF.InterpolationMode.BILINEAR), resolution)
    return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)


def _decode_chunk(files: list[str], resolution: int | None) -> np.ndarray:
    if resolution is None:
        return decode_images(files).numpy()
    return np.stack([decode_resized(f, resolution) for f in files])


def _release_freed_memory() -> None:
    """Hand memory freed by the decoding threads back to the OS (glibc ``malloc_trim``; no-op elsewhere):
    their per-thread malloc arenas otherwise keep it resident for the rest of the process."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _cache_key(listing: Listing, resolution: int | None, name: str) -> str:
    return files_key([_CACHE_VERSION, name, resolution, listing.folder.resolve()],
                     zip(listing.files, listing.labels.tolist()))


def decoded_cache(listing: Listing, split: str, name: str, resolution: int | None, cache_dir: str | os.PathLike,
                  threads: int = 0) -> tuple[Path, dict]:
    """Decode ``listing`` once into ``<cache_dir>/decoded/<name>-<key>-<split>/``; returns (folder, meta).

    ``meta`` (``meta.json``, written last, so its presence marks a complete cache): ``classes``,
    ``class_names``, ``content_hash`` (of all images and labels, computed while writing), ``shape``,
    ``resolution``, ``source`` (the split folder), ``version``.

    Raises:
        ValueError: as :func:`decode_resized` / :func:`contra_ray.data.image_files.decode_images`; images of different
            sizes when ``resolution`` is ``None`` (names two files).
    """
    folder = Path(cache_dir) / "decoded" / f"{name}-{_cache_key(listing, resolution, name)}-{split}"
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        return folder, json.loads(meta_path.read_text())
    if not listing.files:
        raise ValueError(f"{listing.folder}: no images")
    if threads <= 0:
        threads = available_cpus()
    first = _decode_chunk(listing.files[:1], resolution)[0]
    shape = (len(listing.files), *first.shape)
    chunks = [listing.files[s:s + _CHUNK] for s in range(0, len(listing.files), _CHUNK)]

    def decoded():
        window = 2 * max(1, threads)  # chunks in flight: decoded chunks never pile up ahead of the writer
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            pending = collections.deque()
            bar = tqdm(total=len(chunks), desc=f"decoding {name}/{split}", unit="chunk", mininterval=2.0,
                       leave=False, disable=len(chunks) < 20)
            for k in range(len(chunks)):
                pending.append((chunks[k], pool.submit(_decode_chunk, chunks[k], resolution)))
                while len(pending) > window or (k == len(chunks) - 1 and pending):
                    files, job = pending.popleft()
                    arr = job.result()
                    if arr.shape[1:] != first.shape:
                        raise ValueError(f"{files[0]}: decodes to {arr.shape[1:]} but {listing.files[0]} to "
                                         f"{first.shape}; all images must share one size (set data.resolution)")
                    bar.update(1)
                    yield arr
            bar.close()

    digest = write_npy(folder / "images.npy", shape, decoded(), listing.labels)
    _release_freed_memory()

    def save_labels(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
            np.save(f, listing.labels.astype(np.int64))

    atomic_write(folder / "labels.npy", save_labels)
    meta = {"version": _CACHE_VERSION, "classes": listing.classes, "class_names": listing.class_names,
            "content_hash": digest, "shape": list(shape), "resolution": resolution, "source": str(listing.folder)}
    atomic_write(meta_path, json.dumps(meta, indent=1))
    return folder, meta


def load_imagenet_split(cfg, split: str):
    """``(images, labels, classes, class_names, content_hash)`` of a ``tiny-imagenet`` / ``imagenet`` split.

    ``images`` is a :class:`~contra_ray.data.disk_images.DiskImages` over the decoded cache, or, with
    ``cfg.in_memory`` (default: true for ``tiny-imagenet``, false for ``imagenet``), a uint8 tensor.
    """
    if not cfg.root:
        raise FileNotFoundError(f"data.root=None: data.dataset={cfg.dataset} needs the dataset's root directory")
    resolution = effective_resolution(cfg)
    if cfg.dataset == "tiny-imagenet":
        listing = tiny_imagenet_listing(cfg.root, split)
    else:
        listing = imagefolder_listing(cfg.root, split)
    folder, meta = decoded_cache(listing, split, cfg.dataset, resolution, cfg.cache_dir, cfg.decode_threads)
    labels = torch.from_numpy(np.load(folder / "labels.npy")).long()
    images = DiskImages(folder / "images.npy")
    if in_memory(cfg):
        images = torch.from_numpy(np.load(folder / "images.npy"))
    return images, labels, list(meta["classes"]), list(meta["class_names"]), meta["content_hash"]


def effective_resolution(cfg) -> int | None:
    """``data.resolution``, defaulting to 64 for ``imagenet`` (``None`` = native size, no resizing)."""
    if cfg.resolution is not None:
        return int(cfg.resolution)
    return IMAGENET_DEFAULT_RESOLUTION if cfg.dataset == "imagenet" else None


def in_memory(cfg) -> bool:
    """``data.in_memory``, defaulting to streamed (False) for ``imagenet`` and in memory otherwise."""
    return bool(cfg.in_memory) if cfg.in_memory is not None else cfg.dataset != "imagenet"


# ---------------------------------------------------------------------- clusters without a shared folder

def decoded_hash(folder: str | os.PathLike) -> str:
    """The content hash of a decoded folder, recomputed from its files: first 16 hex digits of sha256 over the
    image bytes of ``images.npy`` (after its header) then ``labels.npy`` as int64, as :func:`decoded_cache`
    records it in ``meta.json`` (``content_hash``); read in 8 MiB blocks.

    Raises:
        ValueError: ``images.npy`` is not a 4-D uint8 ``.npy`` or is shorter than its header says.
    """
    folder = Path(folder)
    d = DiskImages(folder / "images.npy")
    h = hashlib.sha256()
    want = d.numel()
    with open(d.path, "rb") as f:
        f.seek(d._offset)
        got = 0
        while block := f.read(8 << 20):
            h.update(block)
            got += len(block)
    if got != want:
        raise ValueError(f"{d.path}: {got} image bytes, its header says {want} (truncated)")
    h.update(np.ascontiguousarray(np.load(folder / "labels.npy"), dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def _meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def publish_decoded(folder: str | os.PathLike, location: str) -> str:
    """Publish the decoded folder to ``<location>/decoded/<folder name>`` (``meta.json`` last), unless a copy with
    the same ``content_hash`` is there already; returns that location.

    Raises:
        StorageError: the location is not writable (names it).
        ValueError: ``folder`` has no ``meta.json`` (not a complete decoded folder).
    """
    folder = Path(folder)
    meta = _meta(folder)
    if meta is None:
        raise ValueError(f"{folder}: no meta.json, not a complete decoded cache folder")
    dest = storage.join(location, "decoded", folder.name)
    meta_loc = storage.join(dest, "meta.json")
    if storage.exists(meta_loc):
        try:
            if json.loads(storage.read_bytes(meta_loc)).get("content_hash") == meta["content_hash"]:
                return dest
        except ValueError:
            pass
    print(f"publishing the decoded set {folder.name} to {dest} (nodes read it through their data.cache_dir)",
          flush=True)
    # every file goes up: the push record of a cache folder (not a mirror of dest) may describe another location
    (folder / ".contra_ray-sync.json").unlink(missing_ok=True)
    storage.push(folder, dest, files=["images.npy", "labels.npy", "meta.json"], last=["meta.json"])
    return dest


@dataclasses.dataclass(frozen=True)
class DecodedReadThrough:
    """The ``fill`` of a streamed set's :class:`~contra_ray.data.disk_images.DiskImages` on a cluster: makes
    ``folder`` (this node's ``data.cache_dir`` copy) a complete decoded folder with ``content_hash``, fetched from
    ``source`` (where :func:`publish_decoded` put it) by :func:`contra_ray.common.storage.read_through` when
    missing or different: once per node, under a lock, the hash recomputed (:func:`decoded_hash`) before the copy
    is renamed into place.

    Raises (when called):
        StorageError: ``source`` unreadable or incomplete; ValueError: the fetched copy's hash differs.
    """

    source: str
    folder: str
    content_hash: str

    def _complete(self, folder: Path) -> bool:
        meta = _meta(folder)
        return (meta is not None and meta.get("content_hash") == self.content_hash
                and (folder / "images.npy").is_file() and (folder / "labels.npy").is_file())

    def _verify(self, folder: Path) -> None:
        got = decoded_hash(folder)
        if got != self.content_hash:
            raise ValueError(f"content hash {got}, expected {self.content_hash}")

    def __call__(self) -> Path:
        return storage.read_through(self.source, self.folder, complete=self._complete, verify=self._verify,
                                    what=f"the decoded set {Path(self.folder).name}",
                                    files=["images.npy", "labels.npy", "meta.json"])


def share_streamed(image_sets, location: str) -> int:
    """Publish the decoded folders behind the streamed images of ``image_sets`` (``ImageSet``s,
    :class:`DiskImages` or preprocessed views; in-memory ones are skipped) to ``location``
    (:func:`publish_decoded`) and give each :class:`DiskImages` the :class:`DecodedReadThrough` that fills a
    node's copy from there; returns how many folders were published or found there.

    Raises:
        StorageError: the location is not writable.
    """
    seen: dict[str, DecodedReadThrough] = {}
    for x in image_sets:
        x = getattr(x, "images", x)  # ImageSet -> images; PreprocessedImages -> DiskImages
        x = getattr(x, "images", x)
        if not isinstance(x, DiskImages):
            continue
        folder = str(Path(x.path).parent)
        if folder not in seen:
            source = publish_decoded(folder, location)
            seen[folder] = DecodedReadThrough(source, folder, _meta(Path(folder))["content_hash"])
        x.fill = seen[folder]
    return len(seen)
