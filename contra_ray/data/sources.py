"""Real image data: loading and class-balanced subsets.

* :func:`load_split` returns an :class:`ImageSet` (uint8 images, int64 labels, class names, a dataset id
  and a content hash) for ``cifar10`` / ``cifar100`` (torchvision format), ``cifar10-jpeg`` (the tarball
  of real CIFAR-10 JPEGs, verified against ``SHA256SUMS`` once and extracted into the cache) and any
  ``imagefolder`` tree; ``tiny-imagenet`` (the published folder layout) and ``imagenet`` (an ImageFolder
  tree, resized to ``data.resolution``) come from :mod:`contra_ray.data.imagenet`, streamed from an
  on-disk cache when ``data.in_memory`` is false (:mod:`contra_ray.data.disk_images`). Decoded images are
  cached in ``cfg.cache_dir`` (:mod:`contra_ray.data.cache`) so the JPEGs are decoded once.

The preprocessing (mean/std, ZCA) is :mod:`contra_ray.data.preprocess`.

Inputs are never silently wrong: the splits of a data set must list the same classes (else a test image of
class ``c`` would be scored as another class's index), every image is decoded to 8-bit RGB as
torchvision's ``ImageFolder`` default loader does (PIL ``.convert("RGB")``, so the channel count never
depends on which file comes first), and images whose samples are not 8-bit are refused, naming the file.
Hidden folders and files (names starting with ``.``) are neither classes nor images, and an empty class
folder is refused by its path (:func:`contra_ray.data.image_files.list_image_folder`).

Every cache write goes to a temporary file or directory first and is moved into place with
``os.replace``, so an interrupted run never leaves a half-written cache entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

from contra_ray.common.fileio import atomic_write, sha256_file
from contra_ray.common.seeds import derive_seed
from contra_ray.config import DataConfig
from contra_ray.data.cache import DECODER, files_key, read_decoded, write_decoded
from contra_ray.data.disk_images import DiskImages
from contra_ray.data.image_files import decode_images, list_split
from contra_ray.data.imagenet import effective_resolution, load_imagenet_split

__all__ = ["ImageSet", "load_split", "content_hash", "imagefolder_root", "shared_dir", "SPLITS", "KNOWN_SPLITS",
           "check_known_counts"]

SPLITS = ("train", "test")
REPO_ROOT = Path(__file__).resolve().parents[2]
_MARKER = ".contra_ray_extracted.json"
_CHUNK = 4096  # images per chunk when hashing a streamed set
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# what the known data sets are: {dataset: (number of classes, their names or None, {split: images per class})}
KNOWN_SPLITS: dict[str, tuple[int, tuple[str, ...] | None, dict[str, int]]] = {
    "cifar10": (10, CIFAR10_CLASSES, {"train": 5000, "test": 1000}),
    "cifar10-jpeg": (10, CIFAR10_CLASSES, {"train": 5000, "test": 1000}),
    "cifar100": (100, None, {"train": 500, "test": 100}),
}


def shared_dir() -> Path:
    """The shared read-only folder (``$CONTRA_RAY_SHARED`` or ``<repo>/../shared``)."""
    return Path(os.environ.get("CONTRA_RAY_SHARED", REPO_ROOT.parent / "shared"))


# ---------------------------------------------------------------------------------------- ImageSet

@dataclasses.dataclass
class ImageSet:
    """A labelled image set held in memory.

    Attributes:
        images: uint8 ``[N, C, H, W]``, pixel values 0..255: a tensor, or for a streamed set a
            :class:`~contra_ray.data.disk_images.DiskImages` (same ``shape``/indexing, read from disk on demand).
        labels: int64 ``[N]``, class indices in ``0..num_classes-1``.
        classes: class identifiers; ``classes[k]`` is the class of label ``k`` (folder names; the wnids
            for Tiny ImageNet / ImageNet). This is what artifacts and expert stores record and compare.
        dataset_id: ``"<dataset>/<split>"``, with the subset appended for a class-balanced train subset,
            e.g. ``"cifar10-jpeg/train[1000pc,seed0]"``, and the resolution for resized sets
            (``"imagenet@64px/train"``).
        content_hash: first 16 hex digits of sha256(images bytes + labels bytes) (see :func:`content_hash`).
        class_names: readable names, one per class (``words.txt``'s first synonym for Tiny ImageNet:
            ``n01443537`` -> ``goldfish``), or ``None`` when the identifiers are the names.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    dataset_id: str
    content_hash: str
    class_names: list[str] | None = None

    @property
    def names(self) -> list[str]:
        """Readable class names for tables and image grids (``class_names``, else ``classes``)."""
        return list(self.class_names) if self.class_names is not None else list(self.classes)

    @property
    def streamed(self) -> bool:
        """True when the images are read from disk on demand (:class:`DiskImages`)."""
        return isinstance(self.images, DiskImages)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        """Height in pixels (= width for the square images of every supported data set)."""
        return int(self.images.shape[-2])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def class_counts(self) -> torch.Tensor:
        """Images per class, int64 ``[num_classes]``."""
        return torch.bincount(self.labels, minlength=self.num_classes)


def content_hash(images: torch.Tensor, labels: torch.Tensor) -> str:
    """First 16 hex digits of sha256 over the raw bytes of ``images`` then ``labels`` (CPU, contiguous).

    ``images`` may be a :class:`DiskImages` (hashed in chunks, never whole in memory)."""
    h = hashlib.sha256()
    if isinstance(images, DiskImages):
        for chunk in images.split(_CHUNK):
            h.update(chunk.numpy().tobytes())
    else:
        h.update(images.detach().cpu().contiguous().numpy().tobytes())
    h.update(labels.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------- loading

def load_split(cfg: DataConfig, split: str) -> ImageSet:
    """Load one split of ``cfg.dataset`` as uint8 tensors (decoded once, then read from the cache).

    For ``split="train"`` with ``cfg.train_per_class`` set, returns a class-balanced subset: for each
    class, the first ``train_per_class`` images of a permutation drawn from a generator seeded with
    ``cfg.subset_seed`` (classes in order 0..C-1, one ``randperm`` each), kept in their original order.

    Args:
        cfg: the data section of the validated config.
        split: ``"train"`` or ``"test"`` (an ImageFolder's ``val/`` folder serves as ``test``).

    Returns:
        :class:`ImageSet` with images uint8 ``[N, C, H, W]`` and labels int64 ``[N]``.

    Raises:
        ValueError: unknown split or dataset; a class with fewer than ``cfg.train_per_class`` images; an
            image whose size differs from the first one, or whose mode is not 8-bit (names the file and
            the mode); train and test splits with different class lists (names both lists, the missing and
            extra classes and both folders); a tarball whose sha256 differs from ``SHA256SUMS``, or that is
            not a tar archive, truncated or corrupt (names ``data.root`` and the file); a copy of CIFAR-10/100
            whose classes or images per class differ from the known ones, checked on the full split before
            any ``train_per_class`` subset (:func:`check_known_counts`).
        OSError: the cache cannot be written (``filename`` names the path; ENOSPC when the disk is full).
        FileNotFoundError: data not found (names the path and the ``data.root`` / ``data.download`` fix).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    class_names = None
    dataset_id = f"{cfg.dataset}/{split}"
    if cfg.dataset in ("tiny-imagenet", "imagenet"):
        images, labels, classes, class_names, digest = load_imagenet_split(cfg, split)
        res = effective_resolution(cfg)
        if res is not None:
            dataset_id = f"{cfg.dataset}@{res}px/{split}"
    elif cfg.dataset in ("cifar10", "cifar100"):
        images, labels, classes, digest = _load_torchvision_cifar(cfg, split)
    elif cfg.dataset == "cifar10-jpeg":
        images, labels, classes, digest = _load_cifar10_jpeg(cfg, split)
    elif cfg.dataset == "imagefolder":
        if not cfg.root:
            raise FileNotFoundError("data.root=None: data.dataset=imagefolder needs the ImageFolder root directory")
        images, labels, classes, digest = _load_imagefolder_cached(Path(cfg.root).expanduser(), split, cfg.cache_dir)
    else:
        raise ValueError(f"data.dataset={cfg.dataset!r}: unknown dataset")
    check_known_counts(cfg.dataset, _where(cfg), split, labels, classes)  # the full split, before any subset
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
        raise ValueError(f"data.dataset={cfg.dataset!r} {split}: labels span {int(labels.min())}..{int(labels.max())} "
                         f"but there are {len(classes)} classes")
    if split == "train" and cfg.train_per_class is not None:
        idx = _balanced_subset(labels, classes, cfg.train_per_class, cfg.subset_seed)
        images = images.take(idx) if isinstance(images, DiskImages) else images[idx].contiguous()
        labels = labels[idx].contiguous()
        dataset_id += f"[{cfg.train_per_class}pc,seed{cfg.subset_seed}]"
        digest = content_hash(images, labels)
    return ImageSet(images, labels, list(classes), dataset_id, digest, class_names)


def check_known_counts(dataset: str, where: str, split: str, labels, classes: list[str]) -> None:
    """Refuse a damaged copy of a known data set (:data:`KNOWN_SPLITS`): every class present, each with its known
    number of images in ``split`` (CIFAR-10: 5,000 train and 1,000 test per class; CIFAR-100: 500 / 100).

    Args:
        dataset: ``data.dataset``; other data sets are not checked.
        where: how the message names the copy, e.g. ``"data.root='/data/cifar10-jpeg.tar'"``.
        labels: int64 ``[N]`` (tensor or array) or a sequence of ints, the full split (before any subset).
        classes: the split's class names, in label order.

    Raises:
        ValueError: ``<where>: split train has 2,500 images of class truck (9), expected 5,000`` (the first
            five differing classes, then how many more), or the classes that are missing or unknown.
    """
    known = KNOWN_SPLITS.get(dataset)
    if known is None or split not in known[2]:
        return
    num, names, per_class = known
    expected = per_class[split]
    if names is not None and list(classes) != list(names):
        missing = [c for c in names if c not in classes]
        extra = [c for c in classes if c not in names]
        raise ValueError(f"{where}: split {split} has {len(classes)} classes, expected the {num} of {dataset}"
                         + (f"; missing: {', '.join(missing)}" if missing else "")
                         + (f"; unknown: {', '.join(extra)}" if extra else "")
                         + ("" if missing or extra else f"; order: {', '.join(classes)}")
                         + "; the copy is damaged or not this data set")
    if len(classes) != num:
        raise ValueError(f"{where}: split {split} has {len(classes)} classes, expected {num}; the copy is damaged "
                         "or not this data set")
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num)
    wrong = [(c, int(n)) for c, n in enumerate(counts[:num]) if n != expected]
    if wrong:
        shown = [f"{n:,} images of class {classes[c]} ({c})" for c, n in wrong[:5]]
        more = f" and {len(wrong) - 5} more classes" if len(wrong) > 5 else ""
        raise ValueError(f"{where}: split {split} has {', '.join(shown)}{more}, expected {expected:,} per class "
                         f"({expected * num:,} in all, found {int(counts.sum()):,}); the copy is damaged (e.g. a "
                         "truncated tarball): replace it with a complete one")


def _balanced_subset(labels: torch.Tensor, classes: list[str], per_class: int, seed: int) -> torch.Tensor:
    """Sorted int64 indices: the first ``per_class`` of a permutation of each class (seed role ``subset``)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "subset"))
    picked = []
    for c, name in enumerate(classes):
        members = torch.nonzero(labels == c).flatten()
        if len(members) < per_class:
            raise ValueError(f"data.train_per_class={per_class}: class {c} ({name!r}) has only "
                             f"{len(members)} training images")
        picked.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    return torch.cat(picked).sort().values


def _where(cfg: DataConfig) -> str:
    """How messages name the copy of the data set: ``data.root='...'`` (or the dataset when root is unset)."""
    return f"data.root={cfg.root!r}" if cfg.root else f"data.dataset={cfg.dataset!r} (data.root unset)"


def _load_torchvision_cifar(cfg: DataConfig, split: str):
    """torchvision ``CIFAR10`` / ``CIFAR100`` at ``cfg.root`` (default ``<cache_dir>/torchvision``)."""
    import torchvision

    root = Path(cfg.root).expanduser() if cfg.root else Path(cfg.cache_dir) / "torchvision"
    cls = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10" else torchvision.datasets.CIFAR100
    try:
        ds = cls(str(root), train=(split == "train"), download=cfg.download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise FileNotFoundError(
            f"data.root={cfg.root!r}: no {cfg.dataset} data (torchvision format) in {root}; pass "
            f"data.download=true to download it there, or data.root=<dir> holding an existing copy") from e
    # one meta file (batches.meta / meta) names the classes of both splits, so they always agree
    if not (isinstance(ds.data, np.ndarray) and ds.data.dtype == np.uint8 and ds.data.ndim == 4
            and ds.data.shape[-1] == 3):
        raise ValueError(f"data.root={cfg.root!r}: {cfg.dataset} {split} split in {root} holds "
                         f"{getattr(ds.data, 'dtype', type(ds.data))} {getattr(ds.data, 'shape', '')} data, "
                         "expected uint8 [N, H, W, 3]")
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    return images, labels, list(ds.classes), content_hash(images, labels)


# ---------------------------------------------------------------------------------------- cifar10-jpeg

def _load_cifar10_jpeg(cfg: DataConfig, split: str):
    root = Path(cfg.root).expanduser() if cfg.root else None
    def expect(labels, classes) -> None:  # before decoding: a damaged copy is refused at once
        check_known_counts(cfg.dataset, _where(cfg), split, labels, classes)

    if root is not None and root.is_dir() and (root / "train").is_dir():  # an already extracted copy
        return _load_imagefolder_cached(root, split, cfg.cache_dir, expect)
    tarball = root if root is not None else shared_dir() / "datasets" / "cifar10-jpeg.tar.gz"
    if tarball.is_dir():
        tarball = tarball / "cifar10-jpeg.tar.gz"
    if not tarball.is_file():
        raise FileNotFoundError(f"data.root={cfg.root!r}: CIFAR-10 JPEG tarball not found at {tarball}; pass "
                                f"data.root=<path to cifar10-jpeg.tar.gz> (or set CONTRA_RAY_SHARED)")
    name = tarball.name.split(".")[0]

    def cache_for(sha: str) -> Path:
        return Path(cfg.cache_dir) / "decoded" / f"{name}-{sha[:16]}-{DECODER}-{split}.pt"

    marker = _read_marker(Path(cfg.cache_dir) / name)
    if marker and _same_stat(marker, tarball):  # verified before: no hashing, no listing
        cached = read_decoded(cache_for(marker["sha256"]))
        if cached is not None:
            return cached
    folder, sha = _extract_tarball(tarball, Path(cfg.cache_dir))
    return _decode_cached(imagefolder_root(folder), split, cache_for(sha), expect=expect)


def _expected_sha256(tarball: Path) -> str | None:
    """The hash listed for ``tarball`` in ``SHA256SUMS`` beside it, or ``None``."""
    sums = tarball.parent / "SHA256SUMS"
    if not sums.is_file():
        return None
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == tarball.name:
            return parts[0].lower()
    return None


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _same_stat(marker: dict, tarball: Path) -> bool:
    st = tarball.stat()
    return marker.get("size") == st.st_size and marker.get("mtime_ns") == st.st_mtime_ns


def _extract_tarball(tarball: Path, cache_dir: Path) -> tuple[Path, str]:
    """Verify ``tarball`` (once) and extract it into ``cache_dir/<name>/``; returns (folder, sha256).

    The sha256 is checked against ``SHA256SUMS`` beside the tarball when that file lists it. A marker
    file in the extracted folder records the verified hash and the tarball's size and mtime, so later
    calls neither hash nor extract again. Extraction goes to a temporary sibling directory that is
    renamed into place, so a crash never leaves a half extraction.

    Raises:
        ValueError: the tarball's sha256 does not match ``SHA256SUMS``; the file is not a tar archive, is
            truncated or corrupt, or holds a member that would land outside the folder (names
            ``data.root`` and the file; nothing is left in ``cache_dir``).
    """
    name = tarball.name.split(".")[0]
    final = cache_dir / name
    marker = _read_marker(final)
    if marker and _same_stat(marker, tarball):
        return final, marker["sha256"]
    sha = sha256_file(tarball)
    expected = _expected_sha256(tarball)
    if expected is not None and sha != expected:
        raise ValueError(f"data.root: {tarball} has sha256 {sha}, but {tarball.parent / 'SHA256SUMS'} "
                         f"lists {expected}; the file is corrupt or not the expected data set")
    st = tarball.stat()
    record = {"sha256": sha, "source": str(tarball), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if marker and marker.get("sha256") == sha:  # same content, touched file: just refresh the marker
        atomic_write(final / _MARKER, json.dumps(record))
        return final, sha
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.extract-", dir=cache_dir))
    try:
        try:
            tf = tarfile.open(tarball)
        except tarfile.ReadError:  # its message lists every method tried, over several lines
            raise _bad_tarball(tarball, "is not a tar archive (plain, gzip, bzip2 or xz) or is damaged at its "
                                        "start") from None
        try:
            with tf:
                tf.extractall(tmp, filter="data")
        except (EOFError, zlib.error, lzma.LZMAError, tarfile.ReadError) as e:
            raise _bad_tarball(tarball, "is truncated or corrupt", e) from None
        except tarfile.TarError as e:  # e.g. a member that would land outside the folder (filter="data")
            raise _bad_tarball(tarball, "holds a member that cannot be extracted safely", e) from None
        except OSError as e:
            if e.errno is not None:  # disk full, permissions: not the archive's fault; name where it happened
                raise OSError(e.errno, e.strerror, e.filename or str(cache_dir)) from e
            raise _bad_tarball(tarball, "is truncated or corrupt", e) from None  # gzip.BadGzipFile, bz2 data
        (tmp / _MARKER).write_text(json.dumps(record))
        if final.exists():  # stale extraction of other content: move it aside, then drop it
            trash = Path(tempfile.mkdtemp(prefix=f".{name}.stale-", dir=cache_dir))
            os.replace(final, trash / name)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first: use its copy if it holds the same content
            other = _read_marker(final)
            if not other or other.get("sha256") != sha:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, sha


def _bad_tarball(tarball: Path, what: str, e: BaseException | None = None) -> ValueError:
    why = f" ({type(e).__name__}: {' '.join(str(e).split())})" if e is not None else ""
    return ValueError(f"data.root: {tarball} {what}{why}; nothing was extracted. Replace it with a complete copy "
                      "of the data set tarball, or point data.root at an extracted folder")


def imagefolder_root(folder: Path) -> Path:
    """``folder`` itself if it holds ``train/``, else its single subdirectory that does."""
    if (folder / "train").is_dir():
        return folder
    subs = [p for p in folder.iterdir() if p.is_dir() and (p / "train").is_dir()]
    if len(subs) == 1:
        return subs[0]
    raise FileNotFoundError(f"{folder}: no train/ folder in the extracted tarball")


# ---------------------------------------------------------------------------------------- ImageFolder

def _load_imagefolder_cached(root: Path, split: str, cache_dir: str, expect=None):
    """Decode an ImageFolder split once; the cache key covers the root path and every file's size/mtime.
    ``expect(labels, classes)``, if given, checks the listing before anything is decoded."""
    folder, listing = list_split(root, split)
    if expect is not None:
        expect(listing.targets, listing.classes)
    key = files_key([DECODER, folder.resolve()], listing.samples)
    return _decode_cached(folder.parent, split, Path(cache_dir) / "decoded" / f"imagefolder-{key}-{split}.pt",
                          listing=listing)


def _decode_cached(root: Path, split: str, cache: Path, listing=None, expect=None):
    """Decoded ``(images, labels, classes, content_hash)`` of ``root/<split>``, from ``cache`` if present;
    ``expect(labels, classes)`` checks a fresh listing before decoding."""
    cached = read_decoded(cache)
    if cached is not None:
        return cached
    if listing is None:
        _, listing = list_split(root, split)
        if expect is not None:
            expect(listing.targets, listing.classes)
    files = [p for p, _ in listing.samples]
    images = decode_images(files, desc=f"decoding {root.name}/{split}")
    labels = torch.as_tensor(listing.targets, dtype=torch.int64)
    digest = content_hash(images, labels)
    write_decoded(cache, images, labels, listing.classes, digest)
    return images, labels, list(listing.classes), digest
