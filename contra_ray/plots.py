"""Figures: the class-row image grid of a synthetic set (``torchvision.utils.make_grid``, class names by
matplotlib) and the training curves (matplotlib, Agg), next to the artifact and in MLflow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torchvision.utils import make_grid

from contra_ray.common.fileio import atomic_write
from contra_ray.config import Config
from contra_ray.data.prepare import class_names


def log_set_visuals(cfg: Config, artifact, history: dict, preprocessor, logger, eval_every: int | None = None) -> None:
    """``distilled_grid.png`` (one row per class, class names, images upscaled to >= 64 px) and
    ``distill_curves.png`` (matching losses, syn_lr and, when evaluated, eval_acc on separate axes) next to
    the artifact, and in MLflow.

    Args:
        history: the loop's metric history (``loss``, ``loss/...``, ``syn_lr`` per iteration; ``eval_acc``
            every ``eval_every`` iterations).
        eval_every: period of ``history["eval_acc"]`` (default ``cfg.distill.eval_every``; a Tune trial
            passes its proxy period).
    """
    grid = cfg.run_dir() / "distilled_grid.png"
    classes = list(artifact.meta.get("classes") or [])
    names = artifact.meta.get("class_names") or (class_names(cfg, classes) if classes else None)
    save_image_grid(preprocessor.to_display(artifact.images), artifact.hard_labels, names, grid,
                    title=f"{cfg.name}: IPC {artifact.ipc}, iteration {artifact.meta.get('iteration', '?')}")
    every = eval_every if eval_every is not None else cfg.distill.eval_every
    accs = history.get("eval_acc", [])
    panels = {"matching loss": {k: v for k, v in history.items() if k == "loss" or k.startswith("loss/")},
              "syn_lr": {"syn_lr": history.get("syn_lr", [])},
              "eval_acc (%)": {"eval_acc": ([every * (i + 1) for i in range(len(accs))], accs)} if every else {}}
    curves = cfg.run_dir() / "distill_curves.png"
    save_curves(panels, curves, title=f"{cfg.name}: K={cfg.distill.K}, β={cfg.distill.beta}")
    logger.log_artifact(str(grid))
    logger.log_artifact(str(curves))


def _agg_figure(width_px: int, height_px: int, dpi: int = 100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Any, path: str | os.PathLike) -> None:
    fmt = Path(path).suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(str(tmp), format=fmt, dpi=fig.dpi))


def save_image_grid(images: torch.Tensor, labels: torch.Tensor, class_names: list[str] | None,
                    path: str | os.PathLike, *, min_px: int = 64, max_per_class: int = 10,
                    title: str | None = None) -> dict:
    """Write a distilled set as a picture: one row per class, the class name at the row's start.

    Every image is upscaled by the integer factor ``ceil(min_px / H)`` with nearest-neighbour (no
    smoothing: each synthetic pixel stays a visible block), so a 32 px CIFAR image is shown at 64 px.
    Row ``c`` holds the first ``max_per_class`` images with ``labels == c`` (a title says when more were
    left out). Drawn with matplotlib's Agg canvas (``figimage``: pixels copied 1:1, no resampling) and
    written atomically. The cells are laid out by ``torchvision.utils.make_grid`` (4 px white padding).

    Args:
        images: float ``[n, C, H, W]`` display images in [0, 1] (clamped), C = 1 or 3.
        labels: int ``[n]`` class of each image (``hard_labels``: the class it was initialized from).
        class_names: name of each class (``None``: ``class 0``, ``class 1``, ...); one row per entry.
        path: output file (``.png`` recommended).

    Returns:
        ``{"rows", "cols", "cell_px", "size": (width, height), "image_box": (left, top, width, height)}``
        in pixels of the written picture.
    """
    x = images.detach().float().cpu().clamp(0, 1)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images: expected [n, 1 or 3, H, W], got {tuple(x.shape)}")
    labels = labels.detach().cpu().long()
    n_cls = len(class_names) if class_names is not None else int(labels.max()) + 1 if len(labels) else 0
    names = list(class_names) if class_names is not None else [f"class {c}" for c in range(n_cls)]
    per_class = [torch.nonzero(labels == c).flatten().tolist() for c in range(n_cls)]
    cols = max(1, min(max_per_class, max((len(i) for i in per_class), default=1)))
    h, w = x.shape[2], x.shape[3]
    scale = max(1, -(-min_px // min(h, w)))
    ch, cw, pad = h * scale, w * scale, 4
    cells = torch.ones(n_cls * cols, 3, ch, cw)  # a class with fewer images leaves white cells
    for r, idx in enumerate(per_class):
        for c, i in enumerate(idx[:cols]):
            img = x[i].repeat(3, 1, 1) if x.shape[1] == 1 else x[i]
            cells[r * cols + c] = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    grid = make_grid(cells, nrow=cols, padding=pad, pad_value=1.0)  # [3, rows*(ch+pad)+pad, cols*(cw+pad)+pad]
    canvas = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    more = max((len(i) for i in per_class), default=0) > cols
    head = title or "distilled set"
    head += f" ({cols} of {max(len(i) for i in per_class)} per class shown)" if more else ""
    label_w = 12 + 8 * max((len(s) for s in names), default=4)
    title_h = 28
    width = max(label_w + canvas.shape[1], 7 * len(head) + 16)  # wide enough for the title
    height = title_h + canvas.shape[0]
    fig = _agg_figure(width, height)
    fig.patch.set_facecolor("white")
    fig.figimage(canvas, xo=label_w, yo=0, origin="upper")
    for r, name in enumerate(names):
        y = height - (title_h + pad + r * (ch + pad) + ch / 2)
        fig.text((label_w - 6) / width, y / height, name, ha="right", va="center", fontsize=10)
    fig.text(0.5, 1 - (title_h / 2) / height, head, ha="center", va="center", fontsize=10)
    _save_figure(fig, path)
    return {"rows": n_cls, "cols": cols, "cell_px": (ch, cw), "size": (width, height),
            "image_box": (label_w, title_h, canvas.shape[1], canvas.shape[0])}


def save_curves(panels: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, title: str,
                xlabel: str = "iteration") -> int:
    """One subplot per panel (stacked, shared x axis), so quantities of different scale (the matching
    loss ~1, syn_lr ~0.01, accuracy ~50 %) each get their own y axis; saved atomically.

    Args:
        panels: ``{panel y label: {series name: values or (steps, values)}}``; plain values are drawn at
            steps 0, 1, 2, ...; empty panels are left out.
        title: figure title; xlabel: label of the shared x axis.

    Returns:
        The number of subplots (axes) drawn.

    Uses matplotlib's Agg canvas directly (no pyplot global state, safe in worker threads).
    """
    from matplotlib.ticker import MaxNLocator

    drawn = {k: v for k, v in panels.items() if v and any(len(_xy(s)[1]) for s in v.values())}
    n = max(1, len(drawn))
    fig = _agg_figure(700, 80 + 200 * n)
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    for ax, (ylabel, series) in zip(axes, drawn.items()):
        for name, s in series.items():
            xs, ys = _xy(s)
            ax.plot(xs, ys, label=name, marker="o" if len(ys) < 30 else None, markersize=3)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(series) > 1:
            ax.legend(fontsize=7)
    axes[-1].set_xlabel(xlabel)
    fig.suptitle(title)
    fig.tight_layout()
    _save_figure(fig, path)
    return len(drawn)


def _xy(series: Any) -> tuple[list, list]:
    if isinstance(series, tuple) and len(series) == 2:
        return list(series[0]), list(series[1])
    return list(range(len(series))), list(series)


def results_markdown(rows: list[dict], title: str) -> str:
    """Markdown table of final accuracies: a ``# title`` line, then one row per (method, model) with
    method (its :data:`contra_ray.evaluate.sets.METHOD_LABELS` name), model, IPC, runs, mean and std (%,
    2 decimals). ``rows``: :func:`contra_ray.evaluate.sets.evaluate_sets`'s (keys ``method, model, ipc, runs,
    mean, std``)."""
    from contra_ray.evaluate.sets import METHOD_LABELS

    lines = [f"# {title}", "", "| method | model | IPC | runs | acc (%) | std (%) |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {METHOD_LABELS.get(r['method'], r['method'])} | {r['model']} | {r['ipc']} | {r['runs']} | "
              f"{r['mean']:.2f} | {r['std']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def save_accuracy_bars(rows: list[dict], path: str | os.PathLike, title: str) -> dict[tuple[str, str], float]:
    """Grouped bar chart of final accuracies (one group per model, one bar per method, e.g. random real
    beside the distilled set; error bars = std over runs; the mean printed on each bar), saved atomically.

    Args:
        rows: as :func:`results_markdown` (accuracies in %).

    Returns:
        ``{(method, model): bar height}`` as drawn.
    """
    from contra_ray.evaluate.sets import METHOD_LABELS

    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["model"]): r for r in rows}
    width = 0.8 / max(1, len(methods))
    fig = _agg_figure(max(480, 120 + 110 * len(models) * len(methods)), 420)
    ax = fig.subplots()
    drawn: dict[tuple[str, str], float] = {}
    for j, method in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i, m in enumerate(models) if (method, m) in by]
        got = [by[(method, m)] for m in models if (method, m) in by]
        bars = ax.bar(xs, [r["mean"] for r in got], width, yerr=[r["std"] for r in got], capsize=3,
                      label=METHOD_LABELS.get(method, method))
        ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=8)
        drawn.update({(method, r["model"]): float(b.get_height()) for r, b in zip(got, bars)})
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, min(100.0, 1.15 * max([r["mean"] + r["std"] for r in rows], default=1.0)) or 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save_figure(fig, path)
    return drawn


def log_results(rows: list[dict], logger, title: str, folder: str | os.PathLike | None = None) -> None:
    """``results.md`` (:func:`results_markdown`) and ``results.png`` (:func:`save_accuracy_bars`) written to
    ``folder`` (``None``: a temporary folder, removed after) and logged as artifacts of ``logger``'s run, so a
    run's final accuracies read as a table and a chart instead of single points on the metric charts; with
    neither a folder nor a run (tracking disabled) nothing is written."""
    import tempfile

    if folder is None and getattr(logger, "run_id", None) is None:
        return

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(folder) if folder is not None else Path(tmp)
        table = atomic_write(out / "results.md", results_markdown(rows, title))
        chart = out / "results.png"
        save_accuracy_bars(rows, chart, title)
        logger.log_artifact(str(table))
        logger.log_artifact(str(chart))
