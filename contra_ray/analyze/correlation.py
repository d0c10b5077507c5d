"""Segment-correlation analysis (paper §4.2, Eq. 7, Fig. 2/3) and the live forgetting monitor.

A reference expert trajectory τ_o is held out of distillation. While the synthetic set is distilled by
matching one fixed epoch i (sequentially, or with the K concurrent segments of Eq. 8 kept), the
Eq. 2 matching loss of every epoch j of τ_o is measured after each of Z iterations; r_ij (Eq. 7) is the
Pearson correlation of the series L_i and L_j. :class:`ForgettingMonitor` measures the same losses
during a normal run (``distill.monitor_every``).

Plain PyTorch / NumPy: distillers come in through a factory, so nothing here reads a config file, starts
Ray or talks to MLflow (that is :mod:`contra_ray.analyze.cli`). The monitor itself runs inside distillation:
:mod:`contra_ray.distill.monitor`; the reference expert is :func:`contra_ray.experts.store.reference_expert_id`.

Shapes: ``I`` matched epochs (heatmap rows), ``Z`` distillation iterations, ``J`` monitored epochs of τ_o
(heatmap columns).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable, Sequence

import numpy as np

from contra_ray.common.fileio import atomic_write
from contra_ray.config import Config, ConfigError
from contra_ray.distill.monitor import ForgettingMonitor, segment_loss_eval
from contra_ray.experts.store import reference_expert_id

__all__ = ["MODES", "reference_expert_id", "segment_loss_eval", "ForgettingMonitor", "mode_config",
           "correlation_losses", "pearson_matrix", "triangle_summary", "save_correlation_csv",
           "save_correlation_heatmap", "HEATMAP_SIZE_PX"]

MODES = ("sequential", "concurrent")
HEATMAP_FIGSIZE, HEATMAP_DPI = (6.4, 5.6), 100
HEATMAP_SIZE_PX = (560, 640)  # (height, width) of the heatmap PNG








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
    I, Z, J = losses.shape  # noqa: E741 - the paper's symbols (rows, iterations, columns)
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
