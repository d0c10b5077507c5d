"""Differentiable Siamese Augmentation (DSA), replayable.

Follows the DSA / MTT reference ``ParamDiffAug`` + ``DiffAugment`` (MTT ``utils.py``, adapted from
VICO-UoE/DatasetCondensation) with strategy ``color_crop_cutout_flip_scale_rotate`` and ``aug_mode='S'``:
each call picks ONE family at random for the whole batch and draws its parameters per sample (or one
draw for the whole batch with ``siamese=True``, the reference's ``batchmode``). Paper Eq. 1: the student
steps see ``A(b)``, a differentiable augmentation of the synthetic mini-batch.

Families and reference constants:

* ``color``: brightness ``x + (r - 0.5) * 1.0``; saturation ``(x - m) * (2.0 r) + m`` with ``m`` the
  channel mean; contrast ``(x - m) * (r + 0.5) + m`` with ``m`` the mean over C, H, W. No clamping, so
  normalised / ZCA images are not corrupted (kornia's colour ops clamp to [0, 1]).
* ``crop``: integer translation by up to ``int(0.125 * size + 0.5)`` pixels per axis, zero fill.
* ``cutout``: zero a ``int(0.5 * size + 0.5)`` square centred at a random pixel (may overhang the border).
* ``flip``: horizontal flip with probability 0.5.
* ``scale``: per-axis sampling-grid scale in ``[1/1.2, 1.2]`` (values > 1 shrink the content).
* ``rotate``: angle uniform in ``[-15, 15)`` degrees.

``scale`` and ``rotate`` warp with :func:`kornia.geometry.transform.warp_affine` (bilinear, zero padding,
``align_corners=True``); the matrix is built so that the warp equals the reference's
``F.affine_grid(theta, align_corners=True)`` + ``F.grid_sample``.

Replay: :meth:`DSA.sample` draws everything a call needs into an :class:`AugParams`, and
:meth:`DSA.apply` is a pure function of ``(x, params)``, so a step's augmentation can be replayed exactly
(e.g. when walking an unroll backwards). All draws are made in float64 on the generator's device, so a
seed gives the same augmentation in float32 and float64.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
from kornia.geometry.transform import warp_affine

from contra_ray.config import AUG_FAMILIES

__all__ = ["AugParams", "DSA", "AUG_FAMILIES", "dsa_if"]

# ParamDiffAug constants (MTT utils.py)
PROB_FLIP = 0.5
RATIO_SCALE = 1.2
RATIO_ROTATE = 15.0  # degrees
RATIO_CROP_PAD = 0.125
RATIO_CUTOUT = 0.5
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5

# tensors each family's AugParams holds (all have leading dimension n)
_PARAM_KEYS = {
    "color": ("brightness", "saturation", "contrast"),
    "crop": ("shift_u",),
    "cutout": ("centre_u",),
    "flip": ("flip",),
    "scale": ("scale",),
    "rotate": ("angle",),
}


@dataclasses.dataclass
class AugParams:
    """Everything needed to replay one DSA call on a batch of ``n`` images.

    Attributes:
        family: one of ``AUG_FAMILIES``.
        tensors: per-family tensors, each with leading dimension ``n``:

            * color: ``brightness`` ``[n]`` additive offset in [-0.5, 0.5); ``saturation`` ``[n]`` factor in
              [0, 2); ``contrast`` ``[n]`` factor in [0.5, 1.5) (dtype of :meth:`DSA.sample`).
            * crop: ``shift_u`` float64 ``[n, 2]`` uniforms in [0, 1) for (rows, cols); the pixel shift is
              ``floor(u * (2s + 1)) - s`` with ``s = int(0.125 * size + 0.5)``, so params are size-free.
            * cutout: ``centre_u`` float64 ``[n, 2]``; centre ``floor(u * (size + 1 - side % 2))`` (as DSA).
            * flip: ``flip`` bool ``[n]``.
            * scale: ``scale`` ``[n, 2]`` grid scale (sx, sy) in [1/1.2, 1.2).
            * rotate: ``angle`` ``[n]`` radians in [-15, 15) degrees.
    """

    family: str
    tensors: dict[str, torch.Tensor]

    @property
    def n(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    def to(self, device: torch.device | str) -> "AugParams":
        return AugParams(self.family, {k: v.to(device) for k, v in self.tensors.items()})


class DSA:
    """Differentiable Siamese Augmentation, mode 'S' (one random family per call, per-sample parameters).

    Args:
        families: the strategy, e.g. ``AUG_FAMILIES`` = color, crop, cutout, flip, scale, rotate.
        siamese: one parameter draw shared by every sample of the batch (DSA ``batchmode``).

    Raises:
        ValueError: an unknown family (named) or an empty list.
    """

    def __init__(self, families: Sequence[str] = AUG_FAMILIES, siamese: bool = False):
        if isinstance(families, str):
            families = [f for f in families.split("_") if f]
        families = tuple(families)
        if not families:
            raise ValueError("DSA needs at least one augmentation family")
        for f in families:
            if f not in _PARAM_KEYS:
                raise ValueError(f"unknown augmentation family {f!r}; known: {', '.join(AUG_FAMILIES)}")
        self.families = families
        self.siamese = bool(siamese)

    @property
    def strategy(self) -> str:
        """DSA strategy string, e.g. ``"color_crop_cutout_flip_scale_rotate"``."""
        return "_".join(self.families)

    def __repr__(self) -> str:
        return f"DSA(strategy={self.strategy!r}, siamese={self.siamese})"

    # ------------------------------------------------------------------------------ sampling
    def sample(self, n: int, generator: torch.Generator, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> AugParams:
        """Draw the family and parameters of one call for ``n`` samples.

        Draws, in order, the family index (``torch.randint``) then the family's uniforms, all in float64
        with ``generator`` on its own device; results are moved to ``device`` (default the generator's).

        Args:
            n: batch size (>= 1).
            generator: the only source of randomness; the same state gives the same params.
            device: where the params live.
            dtype: floating dtype of the continuous params (color, scale, rotate).

        Raises:
            ValueError: ``n < 1``.
        """
        if n < 1:
            raise ValueError(f"n={n}: must be >= 1")
        gdev = generator.device
        fam = self.families[int(torch.randint(len(self.families), (1,), generator=generator, device=gdev))]
        m = 1 if self.siamese else n

        def u(*shape: int) -> torch.Tensor:
            return torch.rand(m, *shape, generator=generator, device=gdev, dtype=torch.float64)

        if fam == "color":
            t = {"brightness": (u() - 0.5) * BRIGHTNESS, "saturation": u() * SATURATION,
                 "contrast": u() + CONTRAST}
        elif fam == "crop":
            t = {"shift_u": u(2)}
        elif fam == "cutout":
            t = {"centre_u": u(2)}
        elif fam == "flip":
            t = {"flip": u() < PROB_FLIP}
        elif fam == "scale":
            t = {"scale": u(2) * (RATIO_SCALE - 1.0 / RATIO_SCALE) + 1.0 / RATIO_SCALE}
        else:  # rotate
            t = {"angle": (u() - 0.5) * 2 * RATIO_ROTATE / 180 * math.pi}
        device = gdev if device is None else device
        out = {}
        for k, v in t.items():
            if v.is_floating_point() and k not in ("shift_u", "centre_u"):
                v = v.to(dtype)
            out[k] = v.expand(n, *v.shape[1:]).contiguous().to(device)
        return AugParams(fam, out)

    # ------------------------------------------------------------------------------ applying
    def apply(self, x: torch.Tensor, params: AugParams) -> torch.Tensor:
        """Apply ``params`` to ``x``: a pure, deterministic function, differentiable w.r.t. ``x``.

        Args:
            x: float ``[n, C, H, W]`` (any floating dtype, any device; params are moved to it).
            params: from :meth:`sample` with the same ``n``.

        Returns:
            ``[n, C, H, W]``, same dtype and device as ``x``.

        Raises:
            ValueError: ``x`` not 4-D, batch size differs from ``params.n``, unknown or incomplete params,
                or a spatial size < 2 for scale / rotate.
        """
        if x.dim() != 4:
            raise ValueError(f"expected x [n, C, H, W], got {tuple(x.shape)}")
        keys = _PARAM_KEYS.get(params.family)
        if keys is None:
            raise ValueError(f"unknown augmentation family {params.family!r} in AugParams")
        missing = [k for k in keys if k not in params.tensors]
        if missing:
            raise ValueError(f"AugParams for {params.family!r} lack {', '.join(missing)}")
        if params.n != x.shape[0]:
            raise ValueError(f"AugParams drawn for {params.n} samples, x has {x.shape[0]}")
        p = {k: params.tensors[k].to(x.device) for k in keys}
        return getattr(self, f"_{params.family}")(x, p).contiguous()

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None,
                 seed: int | None = None) -> torch.Tensor:
        """Sample and apply: ``apply(x, sample(len(x), generator, x.device, x.dtype))``.

        Args:
            x: float ``[n, C, H, W]``.
            generator: randomness source; or
            seed: build ``torch.Generator().manual_seed(seed)`` (CPU). With neither, a CPU generator is
                seeded from torch's global RNG (so ``torch.manual_seed`` makes calls reproducible).

        Raises:
            ValueError: both ``generator`` and ``seed`` given; see :meth:`apply`.
        """
        if generator is not None and seed is not None:
            raise ValueError("pass generator or seed, not both")
        if generator is None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator().manual_seed(seed)
        return self.apply(x, self.sample(x.shape[0], generator, device=x.device, dtype=x.dtype))

    def siamese_pair(self, x_a: torch.Tensor, x_b: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One parameter draw applied to two batches (DSA's siamese augmentation of real and synthetic).

        Raises:
            ValueError: batch size or spatial size of ``x_a`` and ``x_b`` differ.
        """
        if x_a.shape[0] != x_b.shape[0] or x_a.shape[2:] != x_b.shape[2:]:
            raise ValueError(f"siamese_pair needs same-size batches, got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
        params = self.sample(x_a.shape[0], generator, device=x_a.device, dtype=x_a.dtype)
        return self.apply(x_a, params), self.apply(x_b, params)

    # ------------------------------------------------------------------------------ families
    @staticmethod
    def _color(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        def col(t: torch.Tensor) -> torch.Tensor:
            return t.to(x.dtype).view(-1, 1, 1, 1)

        x = x + col(p["brightness"])  # rand_brightness
        m = x.mean(dim=1, keepdim=True)
        x = (x - m) * col(p["saturation"]) + m  # rand_saturation
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - m) * col(p["contrast"]) + m  # rand_contrast

    @staticmethod
    def _crop(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        n, _, h, w = x.shape
        sh, sw = int(h * RATIO_CROP_PAD + 0.5), int(w * RATIO_CROP_PAD + 0.5)
        u = p["shift_u"]
        dy = torch.floor(u[:, 0] * (2 * sh + 1)).long() - sh
        dx = torch.floor(u[:, 1] * (2 * sw + 1)).long() - sw
        xp = torch.nn.functional.pad(x, (sw, sw, sh, sh))  # zero fill
        rows = torch.arange(h, device=x.device).view(1, h) + dy.view(n, 1) + sh  # out[r, c] = x[r + dy, c + dx]
        cols = torch.arange(w, device=x.device).view(1, w) + dx.view(n, 1) + sw
        b = torch.arange(n, device=x.device).view(n, 1, 1)
        return xp[b, :, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)  # [n, h, w, C] -> NCHW

    @staticmethod
    def _cutout(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        n, _, h, w = x.shape
        ch, cw = int(h * RATIO_CUTOUT + 0.5), int(w * RATIO_CUTOUT + 0.5)
        u = p["centre_u"]
        oy = torch.floor(u[:, 0] * (h + 1 - ch % 2)).long().view(n, 1)
        ox = torch.floor(u[:, 1] * (w + 1 - cw % 2)).long().view(n, 1)
        r = torch.arange(h, device=x.device).view(1, h)
        c = torch.arange(w, device=x.device).view(1, w)
        in_r = (r >= oy - ch // 2) & (r < oy - ch // 2 + ch)  # [n, h]
        in_c = (c >= ox - cw // 2) & (c < ox - cw // 2 + cw)  # [n, w]
        keep = ~(in_r.view(n, h, 1) & in_c.view(n, 1, w))
        return x * keep.to(x.dtype).unsqueeze(1)

    @staticmethod
    def _flip(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.where(p["flip"].bool().view(-1, 1, 1, 1), x.flip(3), x)

    @staticmethod
    def _scale(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        s = p["scale"].to(torch.float64)
        zero = torch.zeros_like(s[:, 0])
        theta = torch.stack([torch.stack([s[:, 0], zero], -1), torch.stack([zero, s[:, 1]], -1)], -2)
        return _warp_like_affine_grid(x, theta)

    @staticmethod
    def _rotate(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        a = p["angle"].to(torch.float64)
        cos, sin = torch.cos(a), torch.sin(a)
        theta = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        return _warp_like_affine_grid(x, theta)


def _warp_like_affine_grid(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``grid_sample(x, affine_grid(theta, align_corners=True))`` (zero padding) via kornia ``warp_affine``.

    ``theta`` is float64 ``[n, 2, 2]`` mapping normalised output (x, y) to normalised input coordinates, as
    in DSA ``rand_scale`` / ``rand_rotate``. In pixels (``align_corners=True``: ``p = c + d * p_norm`` with
    ``c = d = ((W-1)/2, (H-1)/2)``) the input point is ``c + D theta D^-1 (q - c)``; kornia takes the
    forward (src -> dst) matrix, i.e. its inverse ``c + D theta^-1 D^-1 (p - c)``.
    """
    n, _, h, w = x.shape
    if h < 2 or w < 2:
        raise ValueError(f"scale/rotate need images of at least 2x2 pixels, got {h}x{w}")
    dev = x.device
    theta = theta.to(dev)
    d = torch.tensor([(w - 1) / 2.0, (h - 1) / 2.0], dtype=torch.float64, device=dev)
    a, b, c_, e = theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1]
    det = a * e - b * c_
    inv = torch.stack([torch.stack([e, -b], -1), torch.stack([-c_, a], -1)], -2) / det.view(n, 1, 1)
    lin = d.view(1, 2, 1) * inv / d.view(1, 1, 2)  # D theta^-1 D^-1
    trans = d.view(1, 2) - (lin @ d.view(2, 1)).view(n, 2)  # c - L c (c = d)
    m = torch.cat([lin, trans.unsqueeze(-1)], dim=-1).to(x.dtype)
    return warp_affine(x, m, dsize=(h, w), mode="bilinear", padding_mode="zeros", align_corners=True)


def dsa_if(enabled: bool) -> DSA | None:
    """``DSA()`` (every family, per-sample parameters) when a config's ``dsa`` flag is on, else ``None``
    (no augmentation): the ``augment`` argument of expert training, the distiller and evaluation."""
    return DSA() if enabled else None
