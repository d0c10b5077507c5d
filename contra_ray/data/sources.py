"""Real image data: loading, class-balanced subsets, and the preprocessing every stage shares.

* :func:`load_split` returns an :class:`ImageSet` (uint8 images, int64 labels, class names, a dataset id
  and a content hash) for ``cifar10`` / ``cifar100`` (torchvision format), ``cifar10-jpeg`` (the tarball
  of real CIFAR-10 JPEGs, verified against ``SHA256SUMS`` once and extracted into the cache) and any
  ``imagefolder`` tree; ``tiny-imagenet`` (the published folder layout) and ``imagenet`` (an ImageFolder
  tree, resized to ``data.resolution``) come from :mod:`contra_ray.data.imagenet`, streamed from an
  on-disk cache when ``data.in_memory`` is false (:mod:`contra_ray.data.disk_images`). Decoded images are
  cached in ``cfg.cache_dir`` so the JPEGs are decoded once.
* :class:`Preprocessor` / :func:`fit_preprocessor`: ``/255``, per-channel normalisation and ZCA
  whitening (kornia ``ZCAWhitening``, as in the MTT / DATM reference ``utils.get_dataset``), plus the
  inverse used to display synthetic images. It is saved with every artifact (``state_dict``) and
  identified by :meth:`Preprocessor.fingerprint`.
* :func:`real_images_per_class` picks ``ipc`` random real images per class (baselines, initialisation).

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

from contra_ray.common.cli import cli_error

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

from contra_ray.data.disk_images import DiskImages, PreprocessedImages
from contra_ray.data.image_files import _names, _split_dir, check_split_classes, decode_images, list_image_folder
from contra_ray.common.fileio import atomic_write, sha256_file
from contra_ray.common.seeds import derive_seed
from contra_ray.config import DataConfig

__all__ = [
    "ImageSet",
    "load_split",
    "Preprocessor",
    "fit_preprocessor",
    "real_images_per_class",
    "content_hash",
    "decode_images",
    "check_split_classes",
    "shared_dir",
    "SPLITS",
]

SPLITS = ("train", "test")
REPO_ROOT = Path(__file__).resolve().parents[2]
_MARKER = ".contra_ray_extracted.json"
_CHUNK = 4096  # images per chunk when normalising / whitening
_DECODER = "rgb8v2"  # in every decoded-cache name: bump when decoding changes (v2: always RGB, modes checked)


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
            not a tar archive, truncated or corrupt (names ``data.root`` and the file).
        FileNotFoundError: data not found (names the path and the ``data.root`` / ``data.download`` fix).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    class_names = None
    dataset_id = f"{cfg.dataset}/{split}"
    if cfg.dataset in ("tiny-imagenet", "imagenet"):
        from contra_ray.data.imagenet import effective_resolution, load_imagenet_split

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
    if root is not None and root.is_dir() and (root / "train").is_dir():  # an already extracted copy
        return _load_imagefolder_cached(root, split, cfg.cache_dir)
    tarball = root if root is not None else shared_dir() / "datasets" / "cifar10-jpeg.tar.gz"
    if tarball.is_dir():
        tarball = tarball / "cifar10-jpeg.tar.gz"
    if not tarball.is_file():
        raise FileNotFoundError(f"data.root={cfg.root!r}: CIFAR-10 JPEG tarball not found at {tarball}; pass "
                                f"data.root=<path to cifar10-jpeg.tar.gz> (or set CONTRA_RAY_SHARED)")
    name = tarball.name.split(".")[0]

    def cache_for(sha: str) -> Path:
        return Path(cfg.cache_dir) / "decoded" / f"{name}-{sha[:16]}-{_DECODER}-{split}.pt"

    marker = _read_marker(Path(cfg.cache_dir) / name)
    if marker and _same_stat(marker, tarball):  # verified before: no hashing, no listing
        cached = _read_decoded(cache_for(marker["sha256"]))
        if cached is not None:
            return cached
    folder, sha = _extract_tarball(tarball, Path(cfg.cache_dir))
    return _decode_cached(_imagefolder_root(folder), split, cache_for(sha))


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
            if e.errno is not None:  # disk full, permissions: not the archive's fault
                raise
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


def _imagefolder_root(folder: Path) -> Path:
    """``folder`` itself if it holds ``train/``, else its single subdirectory that does."""
    if (folder / "train").is_dir():
        return folder
    subs = [p for p in folder.iterdir() if p.is_dir() and (p / "train").is_dir()]
    if len(subs) == 1:
        return subs[0]
    raise FileNotFoundError(f"{folder}: no train/ folder in the extracted tarball")


# ---------------------------------------------------------------------------------------- ImageFolder

def _load_imagefolder_cached(root: Path, split: str, cache_dir: str):
    """Decode an ImageFolder split once; the cache key covers the root path and every file's size/mtime."""
    folder = _split_dir(root, split)
    check_split_classes(root)
    listing = list_image_folder(folder)
    h = hashlib.sha256(f"{_DECODER}\0{folder.resolve()}".encode())
    for path, label in listing.samples:
        st = os.stat(path)
        h.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    key = f"imagefolder-{h.hexdigest()[:16]}-{split}.pt"
    return _decode_cached(folder.parent, split, Path(cache_dir) / "decoded" / key, listing=listing)


def _read_decoded(path: Path):
    if not path.is_file():
        return None
    d = torch.load(path, weights_only=True)
    return d["images"], d["labels"], list(d["classes"]), d["content_hash"]


def _decode_cached(root: Path, split: str, cache: Path, listing=None):
    """Decoded ``(images, labels, classes, content_hash)`` of ``root/<split>``, from ``cache`` if present."""
    cached = _read_decoded(cache)
    if cached is not None:
        return cached
    if listing is None:
        check_split_classes(root)
        listing = list_image_folder(_split_dir(root, split))
    files = [p for p, _ in listing.samples]
    images = decode_images(files, desc=f"decoding {root.name}/{split}")
    labels = torch.as_tensor(listing.targets, dtype=torch.int64)
    digest = content_hash(images, labels)
    atomic_write(cache, lambda tmp: torch.save({"images": images, "labels": labels,
                                                "classes": list(listing.classes), "content_hash": digest}, tmp))
    return images, labels, list(listing.classes), digest


# ---------------------------------------------------------------------------------------- preprocessing

@dataclasses.dataclass
class Preprocessor:
    """uint8 images -> network input, and back for display (paper App. D: ZCA as in MTT / DATM).

    Forward: ``x = images / 255``; ``x = (x - mean) / std`` per channel; if ``zca``,
    ``x = (flatten(x) - zca_mean) @ zca_matrix`` (kornia ``ZCAWhitening`` convention,
    ``zca_matrix = U (S + eps)^-1/2 U^T`` of the train covariance).

    Attributes:
        mean, std: float32 ``[C]`` (in units of ``images / 255``).
        zca: whether ZCA whitening is applied.
        zca_eps: the eigenvalue shrinkage ``eps`` of the fit.
        zca_mean: float32 ``[1, C*H*W]`` (kornia ``mean_vector``) or ``None``.
        zca_matrix: float32 ``[D, D]``, ``D = C*H*W`` (kornia ``transform_matrix``) or ``None``.
        zca_inverse: float32 ``[D, D]`` (kornia ``transform_inv``) or ``None``.
    """

    mean: torch.Tensor
    std: torch.Tensor
    zca: bool = False
    zca_eps: float = 0.1
    zca_mean: torch.Tensor | None = None
    zca_matrix: torch.Tensor | None = None
    zca_inverse: torch.Tensor | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, C, H, W]`` -> float32 ``[N, C, H, W]`` on the same device (processed in chunks).

        A streamed :class:`DiskImages` gives a lazy :class:`~contra_ray.data.disk_images.PreprocessedImages`
        (rows are read and preprocessed when indexed), never the whole float32 tensor.

        Raises:
            TypeError: ``images`` is not uint8 (float input would be scaled twice).
            ValueError: shape does not match the fitted channels / ZCA dimension.
        """
        if isinstance(images, DiskImages):
            self._check_shape(images)
            return PreprocessedImages(images, self)
        if images.dtype != torch.uint8:
            raise TypeError(f"Preprocessor expects uint8 images, got {images.dtype}")
        self._check_shape(images)
        dev = images.device
        mean, std = self.mean.to(dev).view(1, -1, 1, 1), self.std.to(dev).view(1, -1, 1, 1)
        zm, zt = (self.zca_mean.to(dev), self.zca_matrix.to(dev)) if self.zca else (None, None)
        out = torch.empty(images.shape, dtype=torch.float32, device=dev)
        for s in range(0, len(images), _CHUNK):
            x = (images[s:s + _CHUNK].float() / 255.0 - mean) / std
            if self.zca:
                x = ((x.flatten(1) - zm) @ zt).view_as(x)
            out[s:s + _CHUNK] = x
        return out

    def to_display(self, x: torch.Tensor) -> torch.Tensor:
        """Network-space float ``[N, C, H, W]`` -> float ``[N, C, H, W]`` in [0, 1] (same dtype and device).

        Inverse ZCA (``x @ zca_inverse + zca_mean``), un-normalise, clamp to [0, 1]; for image grids.
        """
        self._check_shape(x)
        x = x.detach()
        dev, dt = x.device, x.dtype
        mean, std = self.mean.to(dev, dt).view(1, -1, 1, 1), self.std.to(dev, dt).view(1, -1, 1, 1)
        out = torch.empty_like(x)
        for s in range(0, len(x), _CHUNK):
            y = x[s:s + _CHUNK]
            if self.zca:
                y = (y.flatten(1) @ self._inverse().to(dev, dt) + self.zca_mean.to(dev, dt)).view_as(y)
            out[s:s + _CHUNK] = (y * std + mean).clamp(0.0, 1.0)
        return out

    def _inverse(self) -> torch.Tensor:
        """The inverse ZCA matrix: kept from the fit, else computed once (in float64) from zca_matrix;
        it is not stored in state_dict, which halves every artifact that carries the statistics."""
        if self.zca_inverse is None:
            self.zca_inverse = torch.linalg.inv(self.zca_matrix.double()).float()
        return self.zca_inverse

    def _check_shape(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != len(self.mean):
            raise ValueError(f"expected images [N, {len(self.mean)}, H, W], got {tuple(x.shape)}")
        if self.zca and int(np.prod(x.shape[1:])) != self.zca_matrix.shape[0]:
            raise ValueError(f"ZCA was fitted on images of {self.zca_matrix.shape[0]} values, got "
                             f"{tuple(x.shape[1:])}")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-compatible): mean, std, zca (uint8 0/1), zca_eps (float64 scalar)
        and, with ZCA, zca_mean, zca_matrix (the inverse is recomputed on load when needed)."""
        d = {"mean": self.mean.float().contiguous(), "std": self.std.float().contiguous(),
             "zca": torch.tensor(int(self.zca), dtype=torch.uint8),
             "zca_eps": torch.tensor(float(self.zca_eps), dtype=torch.float64)}
        if self.zca:
            d.update(zca_mean=self.zca_mean.contiguous(), zca_matrix=self.zca_matrix.contiguous())
        return d

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "Preprocessor":
        """Inverse of :meth:`state_dict`.

        Raises:
            KeyError: a required entry is missing (names it).
        """
        for key in ("mean", "std", "zca", "zca_eps"):
            if key not in d:
                raise KeyError(f"preprocessor state has no {key!r} entry")
        zca = bool(int(d["zca"]))
        if zca:
            for key in ("zca_mean", "zca_matrix"):
                if key not in d:
                    raise KeyError(f"preprocessor state has zca=1 but no {key!r} entry")
        return cls(mean=d["mean"].float(), std=d["std"].float(), zca=zca, zca_eps=float(d["zca_eps"]),
                   zca_mean=d.get("zca_mean") if zca else None, zca_matrix=d.get("zca_matrix") if zca else None,
                   zca_inverse=d.get("zca_inverse") if zca else None)

    def fingerprint(self) -> str:
        """First 16 hex digits of sha256 over the state dict (keys sorted, dtype, shape and bytes)."""
        h = hashlib.sha256()
        for key, t in sorted(self.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]


def fit_preprocessor(train: ImageSet, cfg: DataConfig, *, zca_on_normalized: bool = False) -> Preprocessor:
    """Fit the preprocessing on the train set (cached in ``cfg.cache_dir/preprocessors``).

    * Without ZCA: per-channel mean and std (population, float64 accumulation) of ``images / 255``.
    * With ZCA (default, reference behaviour): ``mean = 0, std = 1`` and kornia
      ``ZCAWhitening(eps=cfg.zca_eps, compute_inv=True)`` fitted on the whole ``images / 255`` train set,
      or with ``cfg.zca_samples`` on that many train images drawn without replacement by a generator
      seeded ``derive_seed(cfg.subset_seed, "zca_sample")`` (kept in index order; required for a streamed
      set, whose ``images / 255`` would not fit in memory).
      This is what the MTT and DATM reference ``utils.get_dataset`` do: with ``--zca`` their transform is
      ``ToTensor()`` only (no ``Normalize``) and ZCA (eps 0.1) is fitted on the full train set. With
      ``zca_on_normalized=True`` the mean/std normalisation is fitted and applied first and ZCA is fitted
      on the normalised images instead (not the reference: eps=0.1 then shrinks ~16x less).

    The result is cached (safetensors, atomic write) under a key of ``train.content_hash``, zca, eps and
    the normalisation mode; a cache hit is returned without refitting.

    Args:
        train: the train :class:`ImageSet` (uint8 ``[N, C, H, W]``).
        cfg: data config (``zca``, ``zca_eps``, ``cache_dir``).
        zca_on_normalized: see above.

    Raises:
        ValueError: fewer than 2 training images; ZCA on a streamed set without ``data.zca_samples``.
    """
    from safetensors.torch import load_file, save_file

    if len(train) < 2:
        raise ValueError(f"fit_preprocessor needs at least 2 training images, got {len(train)}")
    mode = "norm" if (zca_on_normalized or not cfg.zca) else "raw"
    sample = cfg.zca_samples if (cfg.zca and cfg.zca_samples is not None and cfg.zca_samples < len(train)) else None
    if cfg.zca and sample is None and isinstance(train.images, DiskImages):
        raise ValueError(f"data.zca=true with data.zca_samples={cfg.zca_samples}: {train.dataset_id} is streamed "
                         f"({len(train)} images); fit ZCA on a sample (e.g. data.zca_samples=20000)")
    tag = f"-sample{sample}-seed{cfg.subset_seed}" if sample is not None else ""
    key = f"{train.content_hash}-zca{int(cfg.zca)}-eps{cfg.zca_eps!r}-{mode}{tag}.safetensors"
    path = Path(cfg.cache_dir) / "preprocessors" / key
    if path.is_file():
        return Preprocessor.from_state_dict(load_file(str(path)))

    c = train.channels
    if mode == "norm":
        s1 = torch.zeros(c, dtype=torch.float64)
        s2 = torch.zeros(c, dtype=torch.float64)
        # a streamed set in chunks of ~4M values (32 MB of float64), not 4096 images (400 MB at 64 px)
        step = max(1, min(_CHUNK, (1 << 22) // max(1, int(np.prod(train.images.shape[1:]))))) \
            if isinstance(train.images, DiskImages) else _CHUNK
        for s in range(0, len(train), step):
            x = train.images[s:s + step].to(torch.float64) / 255.0
            s1 += x.sum(dim=(0, 2, 3))
            s2 += (x * x).sum(dim=(0, 2, 3))
        count = len(train) * train.images.shape[2] * train.images.shape[3]
        mean = s1 / count
        std = (s2 / count - mean**2).clamp_min(1e-12).sqrt()
        mean, std = mean.float(), std.float()
    else:
        mean, std = torch.zeros(c), torch.ones(c)
    pre = Preprocessor(mean=mean, std=std, zca=False, zca_eps=cfg.zca_eps)
    if cfg.zca:
        import kornia

        zca = kornia.enhance.ZCAWhitening(eps=float(cfg.zca_eps), compute_inv=True)
        if sample is not None:
            gen = torch.Generator().manual_seed(derive_seed(cfg.subset_seed, "zca_sample"))
            idx = torch.randperm(len(train), generator=gen)[:sample].sort().values
            zca.fit(pre(train.images[idx]))
        else:
            zca.fit(pre(train.images))
        pre = dataclasses.replace(pre, zca=True, zca_mean=zca.mean_vector.detach().float().contiguous(),
                                  zca_matrix=zca.transform_matrix.detach().float().contiguous(),
                                  zca_inverse=zca.transform_inv.detach().float().contiguous())
    atomic_write(path, lambda tmp: save_file(pre.state_dict(), str(tmp)))
    return pre


# ---------------------------------------------------------------------------------------- selection

def real_images_per_class(images_float: torch.Tensor, labels: torch.Tensor, ipc: int,
                          generator: torch.Generator, num_classes: int | None = None) -> torch.Tensor:
    """Indices of ``ipc`` random real images per class, class order 0..C-1 (``ipc`` each).

    For each class ``c`` in turn, draws ``torch.randperm(count_c, generator=generator)`` and keeps the
    first ``ipc`` members (MTT / DATM ``get_images(c, n)``).

    Args:
        images_float: ``[N, C, H, W]`` images (any dtype; only its length is checked).
        labels: int64 ``[N]``.
        ipc: images per class (>= 1).
        generator: CPU generator; the result depends only on its state and on ``labels``.
        num_classes: C; default ``labels.max() + 1``.

    Returns:
        int64 ``[ipc * C]`` indices into ``images_float``, on the CPU.

    Raises:
        ValueError: ``ipc < 1``, length mismatch, or a class with fewer than ``ipc`` images.
    """
    if ipc < 1:
        raise ValueError(f"ipc={ipc}: must be >= 1")
    if len(images_float) != len(labels):
        raise ValueError(f"{len(images_float)} images but {len(labels)} labels")
    labels = labels.detach().cpu()
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    out = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        if len(members) < ipc:
            raise ValueError(f"ipc={ipc}: class {c} has only {len(members)} images")
        out.append(members[torch.randperm(len(members), generator=generator)[:ipc]])
    return torch.cat(out)


# ---------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    """``python -m contra_ray.data prepare ...``: write FFCV ``.beton`` files of a data set (see
    :func:`contra_ray.data.ffcv_beton.write_beton`), each with its dataset id and content hash in a JSON beside it."""
    import argparse
    import sys
    import time

    from contra_ray.config import DATASETS, ConfigError, config_from_dict, default_cache_dir

    p = argparse.ArgumentParser(prog="python -m contra_ray.data", description="data utilities")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("prepare", help="write FFCV .beton files (+ dataset id and content hash in a JSON) for "
                                       "experts.loader=ffcv")
    q.add_argument("--dataset", required=True, choices=DATASETS, help="data.dataset")
    q.add_argument("--root", default=None, help="data.root (dataset folder, tarball or ImageFolder root)")
    q.add_argument("--resolution", type=int, default=None,
                   help="data.resolution (tiny-imagenet / imagenet; default: native, 64 for imagenet)")
    q.add_argument("--mode", choices=("raw", "jpeg"), default="raw", help="raw: exact pixels; jpeg: lossy, smaller")
    q.add_argument("--out", required=True, help="folder for the .beton files (experts.ffcv_dir)")
    q.add_argument("--splits", default="train", help="comma-separated splits (train, test); default train")
    q.add_argument("--cache-dir", default=default_cache_dir(), help="data.cache_dir (decoded images)")
    q.add_argument("--train-per-class", type=int, default=None, help="data.train_per_class (class-balanced subset)")
    q.add_argument("--subset-seed", type=int, default=0, help="data.subset_seed")
    q.add_argument("--workers", type=int, default=1, help="FFCV writer processes")
    args = p.parse_args(argv)
    try:
        cfg = config_from_dict({"data": {"dataset": args.dataset, "root": args.root, "resolution": args.resolution,
                                         "cache_dir": args.cache_dir, "train_per_class": args.train_per_class,
                                         "subset_seed": args.subset_seed}}).data
        from contra_ray.data.ffcv_beton import write_beton

        print(f"{'split':<6} {'images':>9} {'content hash':<17} {'seconds':>8}  file")
        for split in [s for s in args.splits.split(",") if s]:
            t0 = time.time()
            data = load_split(cfg, split)
            path = write_beton(data, args.out, args.mode, num_workers=args.workers)
            print(f"{split:<6} {len(data):>9} {data.content_hash:<17} {time.time() - t0:>8.1f}  {path}", flush=True)
    except (ConfigError, FileNotFoundError, ValueError, ImportError, TimeoutError) as e:
        return cli_error(e)
    return 0
