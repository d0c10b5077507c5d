"""Segment-correlation analysis (paper §4.2, Eq. 7, Fig. 2/3) and the live forgetting monitor.

A reference expert trajectory τ_o is held out of distillation. While the synthetic set is distilled by
matching one fixed epoch i (sequentially, or with the K concurrent segments of Eq. 8 kept), the
Eq. 2 matching loss of every epoch j of τ_o is measured after each of Z iterations; r_ij (Eq. 7) is the
Pearson correlation of the series L_i and L_j. :class:`ForgettingMonitor` measures the same losses
during a normal run (``distill.monitor_every``).

Plain PyTorch / NumPy: distillers come in through a factory, so nothing here reads a config file, starts
Ray or talks to MLflow (that is :mod:`contra_ray.analyze`).

Shapes: ``I`` matched epochs (heatmap rows), ``Z`` distillation iterations, ``J`` monitored epochs of τ_o
(heatmap columns).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch

from contra_ray.config import Config, ConfigError
from contra_ray.common.fileio import atomic_write
from contra_ray.distill.matching import matching_loss, minibatch_sequence, unroll
from contra_ray.models import functional_forward

__all__ = ["MODES", "reference_expert_id", "segment_loss_eval", "ForgettingMonitor", "mode_config",
           "correlation_losses", "pearson_matrix", "triangle_summary", "save_correlation_csv",
           "save_correlation_heatmap", "HEATMAP_SIZE_PX"]

MODES = ("sequential", "concurrent")
HEATMAP_FIGSIZE, HEATMAP_DPI = (6.4, 5.6), 100
HEATMAP_SIZE_PX = (560, 640)  # (height, width) of the heatmap PNG


def reference_expert_id(store, requested: int | None = None) -> int:
    """The held-out reference trajectory τ_o: ``requested``, or the highest expert id in the store.

    Raises:
        ConfigError: ``requested`` is not in the store, or the store has fewer than 2 experts (τ_o must
            leave at least one trajectory to distill from).
    """
    ids = list(store.expert_ids)
    if len(ids) < 2:
        raise ConfigError(f"distill.reference_expert: the expert store has {len(ids)} expert(s) {ids}; holding "
                          "one out as τ_o needs at least 2 (raise experts.num_experts)")
    if requested is None:
        return max(ids)
    if requested not in ids:
        raise ConfigError(f"distill.reference_expert={requested}: not in the expert store (saved: {ids})")
    return int(requested)


def segment_loss_eval(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], theta0: torch.Tensor,
                      target: torch.Tensor, images: torch.Tensor, targets: torch.Tensor, syn_lr: float,
                      batches: Sequence[torch.Tensor], augment: Callable | None = None,
                      aug_seeds: Sequence[int] | None = None) -> float:
    """Eq. 2 loss of one segment after the Eq. 1 student unroll, forward only.

    The same N SGD steps as :func:`contra_ray.distill.matching.unroll`, but each inner gradient is taken with
    ``create_graph=False`` on detached synthetic data, so no graph to the synthetic set is built and
    memory stays that of one step. Returns ||θ̂_N - θ*_M||² / ||θ*_0 - θ*_M||² as a float.

    Args:
        forward: ``(theta [P], x [b,C,H,W]) -> logits [b,C]``.
        theta0, target: θ*_{t,0} and θ*_{t,M}, ``[P]``.
        images: synthetic images ``[n,C,H,W]``; targets: ``[n,C]`` distributions; syn_lr: α.
        batches, augment, aug_seeds: the fixed evaluation plan (index tensors and per-step DSA seeds).
    """
    theta_n = unroll(forward, theta0, images, targets, syn_lr, batches, augment, aug_seeds, differentiable=False)
    return float(matching_loss(theta_n, theta0, target))


class ForgettingMonitor:
    """Eq. 2 matching loss of fixed epochs of the held-out trajectory τ_o for a distiller's current set.

    The parameters θ*_j and θ*_{j+M} of τ_o are read from the store once, here; nothing else touches τ_o.
    Every call uses the same evaluation plan (mini-batches and DSA seeds drawn once from ``seed``), so
    the measurement noise is shared across iterations and a change in the loss is a change of the set.
    Calls read the distiller's images, soft labels and syn_lr and change nothing (no ``.grad`` either).

    Args:
        store: the expert store; reference_id: τ_o; epochs: segment starts j to measure;
        expert_epochs: M; seed: seed of the evaluation plan.

    Raises:
        ConfigError: no epochs, or an epoch whose segment j + M lies beyond the store's saved epochs.
    """

    def __init__(self, store, reference_id: int, epochs: Sequence[int], expert_epochs: int, seed: int = 0):
        self.reference_id = int(reference_id)
        self.epochs = [int(j) for j in epochs]
        self.expert_epochs = int(expert_epochs)
        self.seed = int(seed)
        if not self.epochs:
            raise ConfigError("distill.monitor_epochs=[]: no epochs of τ_o to monitor")
        bad = [j for j in self.epochs if not 0 <= j <= store.epochs - self.expert_epochs]
        if bad:
            raise ConfigError(f"distill.monitor_epochs={self.epochs}: epochs {bad} have no segment of M="
                              f"{self.expert_epochs} epochs in τ_o (the store saves epochs 0..{store.epochs}, so "
                              f"starts must be in 0..{store.epochs - self.expert_epochs})")
        needed = sorted(set(self.epochs) | {j + self.expert_epochs for j in self.epochs})
        self._params = {e: store.params(self.reference_id, e) for e in needed}
        self._plan: tuple[tuple[torch.Tensor, ...], tuple[int, ...]] | None = None
        self._cast: dict[int, torch.Tensor] = {}

    def _evaluation_plan(self, n_syn: int, batch_syn: int, steps: int):
        if self._plan is None:
            gen = torch.Generator().manual_seed(self.seed)
            batches = tuple(minibatch_sequence(n_syn, batch_syn, steps, gen))
            seeds = tuple(int(s) for s in torch.randint(0, 2**62, (steps,), generator=gen))
            self._plan = (batches, seeds)
        return self._plan

    def _theta(self, epoch: int, like: torch.Tensor) -> torch.Tensor:
        if epoch not in self._cast or self._cast[epoch].dtype != like.dtype:
            self._cast[epoch] = self._params[epoch].to(like.device, like.dtype)
        return self._cast[epoch]

    def losses(self, distiller: Any) -> list[float]:
        """Eq. 2 loss of each monitored epoch (in ``self.epochs`` order) for ``distiller``'s current set.

        Uses ``distiller.model``, ``images``, ``targets()``, ``syn_lr``, ``augment``, ``n_syn``,
        ``batch_syn`` and ``d`` (``syn_steps``, ``dsa``).
        """
        d = distiller.d
        batches, seeds = self._evaluation_plan(distiller.n_syn, distiller.batch_syn, d.syn_steps)
        augment = None
        if distiller.augment is not None and d.dsa:
            augment = lambda x, seed: distiller.augment(x, seed=seed)  # noqa: E731
        images, targets = distiller.images.detach(), distiller.targets()
        syn_lr = float(distiller.syn_lr.detach())
        forward = lambda theta, x: functional_forward(distiller.model, theta, x)  # noqa: E731
        return [segment_loss_eval(forward, self._theta(j, images), self._theta(j + self.expert_epochs, images),
                                  images, targets, syn_lr, batches, augment, seeds)
                for j in self.epochs]

    def __call__(self, distiller: Any) -> dict[str, float]:
        """``{"monitor_loss_epoch_<j>": Eq. 2 loss}`` for each monitored epoch j (MLflow metric names)."""
        return {f"monitor_loss_epoch_{j}": v for j, v in zip(self.epochs, self.losses(distiller))}


def mode_config(cfg: Config, mode: str) -> Config:
    """The config one heatmap row is distilled with (a validated copy; ``cfg`` is not changed).

    ``sequential``: K = 0, β = 1 (plain MTT, only the fixed epoch is matched). ``concurrent``: the
    config's K concurrent segments and β (Eq. 8), the sampled segment replaced by the fixed epoch.

    Raises:
        ConfigError: unknown mode; concurrent mode with K = 0, or with β = 0 (the fixed epoch would have
            zero weight in Eq. 8 and every row would run the same distillation).
    """
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r}: must be one of {', '.join(MODES)}")
    out = copy.deepcopy(cfg)
    d = out.distill
    if mode == "sequential":
        d.K, d.beta = 0, 1.0
    elif d.K == 0:
        raise ConfigError("distill.K=0: concurrent mode needs K >= 1 concurrent segments (Eq. 8)")
    elif d.beta == 0.0:
        raise ConfigError("distill.beta=0.0: in concurrent mode the matched epoch is the sampled segment, "
                          "whose Eq. 8 weight is β; with β = 0 every row would distill identically. "
                          "Set e.g. --set distill.beta=0.2")
    return out.validate()


def correlation_losses(make_distiller: Callable[[int], Any], monitor: ForgettingMonitor,
                       matched_epochs: Sequence[int], Z: int,
                       progress: Callable[[int, int, list[float]], None] | None = None) -> np.ndarray:
    """The §4.2 experiment: for each matched epoch i, a fresh distiller matching only i (``make_distiller(i)``,
    the same initial set every time) runs Z iterations; after each, ``monitor`` measures every epoch of τ_o.

    Returns:
        float64 ``[I, Z, J]``: ``losses[a, z, b]`` is the Eq. 2 loss of epoch ``monitor.epochs[b]`` of τ_o
        after iteration z + 1 of the run that matches ``matched_epochs[a]``.
    """
    if Z < 2:
        raise ConfigError(f"Z={Z}: a Pearson correlation needs at least 2 iterations")
    out = np.empty((len(matched_epochs), Z, len(monitor.epochs)), dtype=np.float64)
    for a, i in enumerate(matched_epochs):
        distiller = make_distiller(int(i))
        for z in range(Z):
            distiller.step()
            out[a, z] = monitor.losses(distiller)
            if progress is not None:
                progress(int(i), z + 1, out[a, z].tolist())
    return out


def pearson_matrix(losses: np.ndarray, matched_columns: Sequence[int] | None = None) -> np.ndarray:
    """Eq. 7: r_ij = Pearson correlation over z = 1..Z of L_{i,z} (matched epoch i) and L_{j,z}.

        r_ij = Σ_z (L_iz - L̄_i)(L_jz - L̄_j) / (sqrt(Σ_z (L_iz - L̄_i)²) sqrt(Σ_z (L_jz - L̄_j)²))

    Args:
        losses: ``[I, Z, J]``, the losses of every epoch j of τ_o during the run that matches row i.
        matched_columns: for each row, the column holding the matched epoch's own loss L_i (default:
            row a -> column a, i.e. rows and columns are the same epochs).
    Returns:
        float64 ``[I, J]``. An entry is NaN when either series is constant (zero variance: the
        correlation is undefined), e.g. a loss that did not move over the Z iterations.
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 3:
        raise ValueError(f"losses has shape {losses.shape}; expected [I, Z, J]")
    I, Z, J = losses.shape
    cols = list(range(I)) if matched_columns is None else [int(c) for c in matched_columns]
    if len(cols) != I or not all(0 <= c < J for c in cols):
        raise ValueError(f"matched_columns={cols}: need one column index in [0, {J}) per row ({I} rows)")
    centred = losses - losses.mean(axis=1, keepdims=True)  # [I, Z, J]
    own = centred[np.arange(I), :, cols]  # [I, Z]: L_i - L̄_i
    num = np.einsum("iz,izj->ij", own, centred)
    den = np.sqrt((own ** 2).sum(axis=1))[:, None] * np.sqrt((centred ** 2).sum(axis=1))
    r = np.full((I, J), np.nan)
    ok = den > 0
    r[ok] = np.clip(num[ok] / den[ok], -1.0, 1.0)
    return r


def triangle_summary(r: np.ndarray, row_epochs: Sequence[int], col_epochs: Sequence[int]) -> dict:
    """Mean r and fraction of negative entries below the diagonal (j < i: matching a later epoch, effect
    on an earlier one) and above it (j > i), by epoch value; NaN entries are left out and counted."""
    r = np.asarray(r, dtype=np.float64)
    i = np.asarray(row_epochs)[:, None]
    j = np.asarray(col_epochs)[None, :]
    out: dict = {}
    for name, mask in (("lower", j < i), ("upper", j > i), ("diagonal", j == i)):
        vals = r[mask]
        finite = vals[np.isfinite(vals)]
        out[name] = {"entries": int(vals.size), "nan": int(vals.size - finite.size),
                     "mean_r": float(finite.mean()) if finite.size else float("nan"),
                     "frac_negative": float((finite < 0).mean()) if finite.size else float("nan")}
    return out


def save_correlation_csv(r: np.ndarray, row_epochs: Sequence[int], col_epochs: Sequence[int],
                         path: str | os.PathLike) -> None:
    """CSV with header ``matched_epoch,<j0>,<j1>,...``; one row per matched epoch i; NaN written as ``nan``."""
    lines = ["matched_epoch," + ",".join(str(j) for j in col_epochs)]
    for i, row in zip(row_epochs, np.asarray(r)):
        lines.append(f"{i}," + ",".join(f"{v:.6f}" for v in row))

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")

    atomic_write(path, lambda tmp: write(str(tmp)))


def save_correlation_heatmap(r: np.ndarray, row_epochs: Sequence[int], col_epochs: Sequence[int],
                             path: str | os.PathLike, title: str) -> None:
    """Fig. 2-style heatmap: matched epoch i on rows, epoch j of τ_o on columns, 'RdBu_r' from -1 to 1
    centred on 0, a colorbar, NaN cells grey, values written in the cells when there are at most 12 rows.
    The PNG is :data:`HEATMAP_SIZE_PX` (height, width) pixels; written atomically (Agg canvas, no pyplot)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    r = np.asarray(r, dtype=np.float64)
    fig = Figure(figsize=HEATMAP_FIGSIZE, dpi=HEATMAP_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["RdBu_r"].with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(r), cmap=cmap, vmin=-1.0, vmax=1.0, aspect="auto",
                   interpolation="nearest")
    ax.set_xticks(range(len(col_epochs)), [str(j) for j in col_epochs])
    ax.set_yticks(range(len(row_epochs)), [str(i) for i in row_epochs])
    ax.set_xlabel("epoch j of τ_o (loss monitored)")
    ax.set_ylabel("matched epoch i")
    ax.set_title(title, fontsize=9)
    if len(row_epochs) <= 12 and len(col_epochs) <= 12:
        for a in range(r.shape[0]):
            for b in range(r.shape[1]):
                if np.isfinite(r[a, b]):
                    ax.text(b, a, f"{r[a, b]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(r[a, b]) > 0.6 else "black")
    fig.colorbar(im, ax=ax, label="Pearson r (Eq. 7)")
    atomic_write(path, lambda tmp: fig.savefig(str(tmp), format="png", dpi=HEATMAP_DPI))
