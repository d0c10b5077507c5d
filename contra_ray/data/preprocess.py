"""The preprocessing every stage shares, and the real images picked per class.

* :class:`Preprocessor` / :func:`fit_preprocessor`: ``/255``, per-channel normalisation and ZCA
  whitening (kornia ``ZCAWhitening``, as in the MTT / DATM reference ``utils.get_dataset``), plus the
  inverse used to display synthetic images. It is saved with every artifact (``state_dict``) and
  identified by :meth:`Preprocessor.fingerprint`.
* :func:`real_images_per_class` picks ``ipc`` random real images per class (baselines, initialisation).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from contra_ray.common.fileio import atomic_write
from contra_ray.common.seeds import derive_seed
from contra_ray.config import DataConfig
from contra_ray.data.disk_images import DiskImages, PreprocessedImages
from contra_ray.data.sources import ImageSet

__all__ = ["Preprocessor", "fit_preprocessor", "real_images_per_class"]

_CHUNK = 4096  # images per chunk when normalising / whitening


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
            raise TypeError(f"Preprocessor expects uint8 images, got {images.dtype} (float images in [0, 1]: "
                            "use from_unit)")
        return self._forward(images, lambda chunk: chunk.float() / 255.0)

    def from_unit(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] (``uint8 / 255``, what torchvision's ``ToTensor`` gives) ``[N, C, H, W]`` ->
        float32 ``[N, C, H, W]``: the same transform as :meth:`__call__` without the ``/ 255``.

        Raises:
            TypeError: ``images`` is not a floating-point tensor.
            ValueError: shape does not match the fitted channels / ZCA dimension.
        """
        if not images.is_floating_point():
            raise TypeError(f"from_unit expects float images in [0, 1], got {images.dtype} (uint8: call the "
                            "preprocessor itself)")
        return self._forward(images, lambda chunk: chunk.float())

    def _forward(self, images: torch.Tensor, to_unit) -> torch.Tensor:
        """Normalise (and whiten) ``to_unit(chunk)`` chunk by chunk into a new float32 tensor."""
        self._check_shape(images)
        dev = images.device
        mean, std = self.mean.to(dev).view(1, -1, 1, 1), self.std.to(dev).view(1, -1, 1, 1)
        zm, zt = (self.zca_mean.to(dev), self.zca_matrix.to(dev)) if self.zca else (None, None)
        out = torch.empty(images.shape, dtype=torch.float32, device=dev)
        for s in range(0, len(images), _CHUNK):
            x = (to_unit(images[s:s + _CHUNK]) - mean) / std
            if self.zca:
                x = ((x.flatten(1) - zm) @ zt).view_as(x)
            out[s:s + _CHUNK] = x
        return out

    def to_display(self, x: torch.Tensor) -> torch.Tensor:
        """Network-space float ``[N, C, H, W]`` -> float ``[N, C, H, W]`` in [0, 1] (same dtype and device).

        :meth:`to_pixels` clamped to [0, 1]; for image grids and 8-bit export.
        """
        return self.to_pixels(x).clamp_(0.0, 1.0)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of the forward transform: network-space float ``[N, C, H, W]`` -> float ``[N, C, H, W]``
        in units of ``uint8 / 255`` (same dtype and device), NOT clamped (a distilled pixel may leave [0, 1]).

        Inverse ZCA (``x @ zca_inverse + zca_mean``, kornia ``ZCAWhitening.inverse_transform``), then
        ``x * std + mean``. The inverse exists whenever the forward transform does: ``std > 0`` and
        ``zca_matrix = U (S + eps)^-1/2 U^T`` has eigenvalues ``(S + eps)^-1/2 > 0``; it is computed once in
        float64 from ``zca_matrix`` when not kept from the fit (:meth:`_inverse`), and its condition number is
        ``sqrt((S_max + eps) / (S_min + eps)) <= sqrt(S_max / eps + 1)``: 23.5 for CIFAR-10 (full train set,
        ``eps = 0.1``), where the float32 round trip ``to_pixels(self(u8)) * 255`` of the 10,000 test images
        is within 3.1e-4 of ``u8`` (mean 1.4e-5, inverse recomputed from the state dict as an artifact
        carries it), so rounding gives back every 8-bit value exactly (tests/test_api.py checks the same
        on a ZCA fitted to smooth random images).
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
            out[s:s + _CHUNK] = y * std + mean
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
        import kornia  # ~0.7 s to import: only when fitting ZCA

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

