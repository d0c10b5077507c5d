"""Neural architecture search with a distilled set as proxy (paper App. E.3, Table 7; DC, Zhao et al. 2021).

Every ConvNet of a search space is trained twice from scratch with the evaluation loop
(:func:`contra_ray.evaluate.train_and_test`): on the distilled set (the proxy) and on real training
images. Two numbers judge the proxy (Table 7):

* the real accuracy of the architecture the proxy selects (:func:`select_best`: highest proxy accuracy);
* Spearman's rank correlation between proxy and real accuracy over the top-k architectures *by real
  accuracy* (:func:`top_k_correlation`; the paper uses the top 10, DC the top 5 %, FTD the top 5/10/20).

Search space (:data:`SPACES`): ``dc720`` is DC's / the paper's 720 ConvNets, depth {1, 2, 3, 4} x width
{32, 64, 128, 256} x activation {sigmoid, relu, leakyrelu} x normalization {none, batchnorm, layernorm,
instancenorm, groupnorm} x pooling {none, maxpooling, avgpooling} (the MTT/DC ``ConvNet`` options);
``small`` (the default, 16 networks) is a CPU-sized corner of it.

Protocol details that are ours: the proxy accuracy is measured on a validation split held out from the
training set (``--val-per-class`` images per class, never used for training), so selection never sees
the test set; the real accuracy (the ground truth) is test accuracy after training on the remaining
training images (all, or ``--real-per-class`` of them). With ``--val-per-class 0`` the proxy is scored
on the test set too (quicker, but the selection then looks at test data).

``python -m contra_ray.nas --artifact runs/x/distilled.safetensors [--space small] [--top-k 10]`` prints
the ranked table and the two metrics and logs them to MLflow (:class:`contra_ray.tracking.RunLogger`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from contra_ray import data
from contra_ray.augment import dsa_if
from contra_ray.common.argtypes import non_negative_int, positive_float, positive_int
from contra_ray.common.cli import check_folder, cli_entry, interrupted
from contra_ray.common.raycluster import ensure_ray
from contra_ray.config import ConfigError, check_device
from contra_ray.evaluate.cli import config_for_artifact, run_artifact_cli, test_data_for_artifact
from contra_ray.evaluate.training import train_and_test
from contra_ray.models import ModelSpec
from contra_ray.tracking import RunLogger, check_destinations

__all__ = [
    "SPACES",
    "architectures",
    "spearman",
    "select_best",
    "top_k_indices",
    "space_size",
    "check_top_k",
    "top_k_correlation",
    "split_per_class",
    "score_architectures",
    "NasResult",
    "summarize_search",
    "arch_name",
    "format_table",
    "write_csv",
    "build_parser",
    "main",
]

SPACES: dict[str, dict[str, tuple]] = {
    "dc720": {"depth": (1, 2, 3, 4), "width": (32, 64, 128, 256), "activation": ("sigmoid", "relu", "leakyrelu"),
              "norm": ("none", "batchnorm", "layernorm", "instancenorm", "groupnorm"),
              "pooling": ("none", "maxpooling", "avgpooling")},
    "small": {"depth": (2, 3), "width": (32,), "activation": ("relu", "sigmoid"), "norm": ("instancenorm", "none"),
              "pooling": ("avgpooling", "maxpooling")},
}


def architectures(space: Mapping[str, Sequence], base: ModelSpec) -> list[ModelSpec]:
    """Every ConvNet of ``space`` (keys depth, width, activation, norm, pooling), in ``itertools.product``
    order, for ``base``'s classes, image size and channels.

    Raises:
        ValueError: a missing or unknown key, or an option :class:`ModelSpec` refuses.
    """
    keys = ("depth", "width", "activation", "norm", "pooling")
    if set(space) != set(keys):
        raise ValueError(f"search space keys {sorted(space)}: expected {list(keys)}")
    return [ModelSpec("convnet", base.num_classes, base.image_size, base.channels, width=w, depth=d, norm=n,
                      activation=a, pooling=p)
            for d, w, a, n, p in itertools.product(*(space[k] for k in keys))]


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x`` (ascending), ties sharing the mean of their ranks (``scipy.stats.rankdata``)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: the Pearson correlation of the average ranks of ``a`` and ``b``.

    Same value as ``scipy.stats.spearmanr(a, b).statistic`` (ties get average ranks); ``nan`` when
    either input is constant.

    Raises:
        ValueError: different lengths or fewer than 2 values.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"spearman needs two 1-d sequences of the same length >= 2, got {x.shape} and {y.shape}")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def select_best(proxy_accs: Sequence[float]) -> int:
    """Index of the architecture the proxy selects: highest proxy accuracy, the first one on ties.

    Raises:
        ValueError: empty input.
    """
    if len(proxy_accs) == 0:
        raise ValueError("select_best: no architectures")
    return int(np.argmax(np.asarray(proxy_accs, dtype=np.float64)))


def top_k_indices(real_accs: Sequence[float], k: int) -> list[int]:
    """Indices of the ``k`` architectures with the highest real accuracy (best first; ties by index)."""
    order = sorted(range(len(real_accs)), key=lambda i: (-float(real_accs[i]), i))
    return order[:k]


def top_k_correlation(proxy_accs: Sequence[float], real_accs: Sequence[float], k: int) -> float:
    """Spearman correlation of proxy and real accuracy over the top ``k`` architectures by real accuracy.

    The top-k set is chosen by real (whole-data) accuracy, ties by index, as the paper's "top 10 models"
    and DC's "top 5 %"; ``k`` larger than the number of architectures uses all of them.

    Raises:
        ValueError: lengths differ or ``min(k, n) < 2``.
    """
    if len(proxy_accs) != len(real_accs):
        raise ValueError(f"{len(proxy_accs)} proxy accuracies but {len(real_accs)} real ones")
    if min(k, len(real_accs)) < 2:
        raise ValueError(f"top_k_correlation: k={k} with {len(real_accs)} architectures; need at least 2")
    idx = top_k_indices(real_accs, k)
    return spearman([proxy_accs[i] for i in idx], [real_accs[i] for i in idx])


def split_per_class(labels: torch.Tensor, num_classes: int, val_per_class: int, train_per_class: int | None,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint validation and training indices, chosen per class with one ``randperm`` per class.

    Per class ``c`` (in order), a permutation of its members from a generator seeded with ``seed``: the
    first ``val_per_class`` are validation, the next ``train_per_class`` (all the rest if ``None``) training.

    Returns:
        ``(val_idx, train_idx)``, int64 CPU tensors, each grouped by class.

    Raises:
        ValueError: a class has fewer than ``val_per_class + train_per_class`` (or ``val_per_class + 1``) images.
    """
    g = torch.Generator().manual_seed(seed)
    labels = labels.detach().cpu()
    val, train = [], []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        need = val_per_class + (train_per_class if train_per_class is not None else 1)
        if len(members) < need:
            raise ValueError(f"class {c} has {len(members)} images; val_per_class={val_per_class} and "
                             f"train_per_class={train_per_class} need {need}")
        perm = members[torch.randperm(len(members), generator=g)]
        val.append(perm[:val_per_class])
        end = None if train_per_class is None else val_per_class + train_per_class
        train.append(perm[val_per_class:end])
    return torch.cat(val), torch.cat(train)


def _score(train: tuple, lr: float, spec: ModelSpec, ecfg, test: tuple, seed: int, augment, device: str,
           threads: int) -> float:

    return train_and_test(train[0], train[1], lr, spec, ecfg, test[0], test[1], seed, augment, device, threads)


def score_architectures(specs: Sequence[ModelSpec], images: torch.Tensor, targets: torch.Tensor, lr: float,
                        ecfg, test_x: torch.Tensor, test_y: torch.Tensor, seed: int = 0, augment=None,
                        device: str = "cpu", threads: int = 0, use_ray: bool = False) -> list[float]:
    """Accuracy in [0, 1] of each architecture trained on ``(images, targets)`` and tested on ``test_x``.

    One :func:`contra_ray.evaluate.train_and_test` per spec with the same ``seed`` and recipe ``ecfg``;
    sequential in this process, or one Ray task per spec (``num_cpus=ecfg.cpus_per_run``,
    ``num_gpus=ecfg.gpus_per_run``, the data put in the object store once) with ``use_ray``.
    """
    if not use_ray:
        return [_score((images, targets), lr, s, ecfg, (test_x, test_y), seed, augment, device, threads)
                for s in specs]
    import ray


    ensure_ray()
    task = ray.remote(_score).options(num_cpus=ecfg.cpus_per_run, num_gpus=ecfg.gpus_per_run)
    train_ref = ray.put((images.detach().cpu(), targets.detach().cpu()))
    test_ref = ray.put((test_x.detach().cpu(), test_y.detach().cpu()))
    run_device = "cuda" if ecfg.gpus_per_run > 0 else "cpu"
    refs = [task.remote(train_ref, lr, s, ecfg, test_ref, seed, augment, run_device, max(1, int(ecfg.cpus_per_run)))
            for s in specs]
    return [float(a) for a in ray.get(refs)]


@dataclasses.dataclass
class NasResult:
    """Outcome of one search (accuracies in percent).

    Attributes:
        specs: the architectures, in search-space order.
        proxy_acc: accuracy of each when trained on the proxy (distilled set).
        real_acc: test accuracy of each when trained on real images.
        best: index chosen by :func:`select_best` on ``proxy_acc``.
        top_k: k of the correlation.
        correlation: :func:`top_k_correlation` (``nan`` if undefined).
    """

    specs: list[ModelSpec]
    proxy_acc: list[float]
    real_acc: list[float]
    best: int
    top_k: int
    correlation: float

    @property
    def best_real_acc(self) -> float:
        """Real accuracy of the proxy-selected architecture (Table 7's "Accuracy")."""
        return self.real_acc[self.best]

    @property
    def oracle_real_acc(self) -> float:
        """Highest real accuracy in the space (what a perfect proxy would select)."""
        return max(self.real_acc)


def summarize_search(specs: Sequence[ModelSpec], proxy_acc: Sequence[float], real_acc: Sequence[float],
                     top_k: int) -> NasResult:
    """:class:`NasResult` from the two accuracy lists (``top_k`` clipped to the number of architectures)."""
    k = min(top_k, len(specs))
    corr = top_k_correlation(proxy_acc, real_acc, k) if k >= 2 else float("nan")
    return NasResult(list(specs), [float(a) for a in proxy_acc], [float(a) for a in real_acc],
                     select_best(proxy_acc), k, corr)


def arch_name(spec: ModelSpec) -> str:
    """Short DC-style name, e.g. ``"D3 W128 relu instancenorm avgpooling"``."""
    return f"D{spec.resolved_depth()} W{spec.width} {spec.activation} {spec.norm} {spec.pooling}"


def format_table(result: NasResult, show: int | None = None) -> str:
    """Architectures ranked by real accuracy (``show`` rows, all if ``None``), then the two metrics.

    Columns: real rank, architecture, real acc, proxy acc, proxy rank; ``*`` marks the proxy's choice and
    ``k`` the rows inside the top-k set of the correlation.
    """
    n = len(result.specs)
    by_real = top_k_indices(result.real_acc, n)
    proxy_rank = {i: r for r, i in enumerate(top_k_indices(result.proxy_acc, n), 1)}
    top = set(by_real[:result.top_k])
    head = ["real rank", "architecture", "real acc (%)", "proxy acc (%)", "proxy rank", ""]
    body = []
    for r, i in enumerate(by_real[:show] if show else by_real, 1):
        mark = ("*" if i == result.best else "") + ("k" if i in top else "")
        body.append([str(r), arch_name(result.specs[i]), f"{result.real_acc[i]:.2f}", f"{result.proxy_acc[i]:.2f}",
                     str(proxy_rank[i]), mark])
    widths = [max(len(row[c]) for row in [head] + body) for c in range(len(head))]
    fmt = lambda row: "  ".join(x.ljust(w) if c == 1 else x.rjust(w)  # noqa: E731
                                for c, (x, w) in enumerate(zip(row, widths))).rstrip()
    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(b) for b in body]
    if show and n > show:
        lines.append(f"... {n - show} more (all rows in the CSV)")
    lines.append(f"(* = the proxy's choice, k = in the top {result.top_k} by real accuracy)")
    lines.append(f"proxy-selected architecture: {arch_name(result.specs[result.best])}, real accuracy "
                 f"{result.best_real_acc:.2f}% (best in space {result.oracle_real_acc:.2f}%)")
    lines.append(f"Spearman correlation, top {result.top_k} by real accuracy: {result.correlation:.3f}")
    return "\n".join(lines)


def write_csv(result: NasResult, path: str | os.PathLike) -> Path:
    """All architectures with both accuracies as CSV, written atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["depth", "width", "activation", "norm", "pooling", "proxy_acc", "real_acc", "selected"])
        for i, s in enumerate(result.specs):
            w.writerow([s.resolved_depth(), s.width, s.activation, s.norm, s.pooling,
                        f"{result.proxy_acc[i]:.4f}", f"{result.real_acc[i]:.4f}", int(i == result.best)])
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m contra_ray.nas",
        description="Rank the ConvNets of a search space by training each on a distilled set (proxy) and on "
                    "real images; report the proxy-selected architecture's real accuracy and the Spearman "
                    "correlation of the top-k (paper Table 7, DC's NAS protocol).")
    p.add_argument("--artifact", required=True, help="distilled-set file (.safetensors), the proxy")
    p.add_argument("--space", choices=sorted(SPACES), default="small",
                   help="search space: dc720 = the paper's 720 ConvNets, small = 16 of them for a CPU "
                        "(default: small)")
    p.add_argument("--top-k", type=positive_int, default=10,
                   help="Spearman correlation over the k best architectures by real accuracy, 2 <= k <= the "
                        "space's size (default: 10, the paper's; DC used the top 5%%)")
    p.add_argument("--epochs", type=positive_int, default=100,
                   help="training epochs on the distilled set (default: 100, the paper's)")
    p.add_argument("--real-epochs", type=positive_int, default=20,
                   help="training epochs on the real images (default: 20)")
    p.add_argument("--real-per-class", type=positive_int, default=None,
                   help="real training images per class (default: all training images not held out)")
    p.add_argument("--val-per-class", type=non_negative_int, default=100,
                   help="training images per class held out to score the proxy; 0 scores it on the test set "
                        "(default: 100)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate on the distilled set (default: eval.lr of its recipe, else its learned "
                        "syn_lr)")
    p.add_argument("--real-lr", type=float, default=None,
                   help="learning rate on real images (default: the recipe's experts.lr)")
    p.add_argument("--seed", type=int, default=0, help="network initialization and data split seed (default: 0)")
    p.add_argument("--data-root", default=None, help="dataset location overriding the artifact config's data.root")
    p.add_argument("--cache-dir", default=None, help="cache directory overriding data.cache_dir")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--show", type=positive_int, default=20, help="table rows to print (default: 20)")
    p.add_argument("--out", default=None,
                   help="directory for nas.csv (default: runs/nas-<artifact stem>-<space>)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the config's)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (default: log)")
    p.add_argument("--ray", action="store_true", help="train the architectures as Ray tasks (default: in process)")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> NasResult:
    """Command-line entry point; returns the :class:`NasResult`.

    Exits with status 2 and a one-line error for invalid input (bad flags, a missing or corrupt artifact,
    an artifact that does not fit the data, a bad config, an ``--out`` or ``data.cache_dir`` that cannot be
    written), as the other command lines do; 1 with one ``error: <path>: <cause>`` line for a failure of the
    machine during the work (disk full); 130 with one line on Ctrl-C.
    """
    try:
        return run_artifact_cli(build_parser(), argv, _run_cli)
    except KeyboardInterrupt:
        raise SystemExit(interrupted("interrupted: nas.csv is written only after every architecture is trained; "
                                     "rerunning the same command trains them all again")) from None


def space_size(space: Mapping[str, Sequence]) -> int:
    """How many ConvNets :func:`architectures` gives for ``space`` (the product of its option counts)."""
    return math.prod(len(v) for v in space.values())


def check_top_k(top_k: int, space: str) -> None:
    """Refuse a ``--top-k`` the search space cannot fill (before any data or training).

    Raises:
        ConfigError: ``top_k`` above the number of architectures of ``space``, or below 2 (Spearman's
            correlation over fewer than 2 architectures is undefined); names the flag, the value and the size.
    """
    n = space_size(SPACES[space])
    if top_k > n:
        raise ConfigError(f"--top-k={top_k}: the {space!r} search space has {n} architectures; use --top-k <= {n}"
                          + (" or --space dc720" if space != "dc720" else ""))
    if top_k < 2:
        raise ConfigError(f"--top-k={top_k}: the Spearman correlation needs at least 2 architectures "
                          f"(the {space!r} space has {n})")


def _run_cli(args: argparse.Namespace, art) -> NasResult:
    check_top_k(args.top_k, args.space)
    cfg = config_for_artifact(art, args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    check_device(device, field="--device")
    out = Path(args.out or f"runs/nas-{Path(args.artifact).stem}-{args.space}")
    check_folder(str(out), "--out")  # before any training: the table is written after all of it
    check_destinations(None, cfg.tracking_uri() if cfg.tracking.enabled else None, cache_dir=cfg.data.cache_dir)
    ecfg = dataclasses.replace(cfg.eval, gpus_per_run=cfg.eval.gpus_per_run if device != "cpu" else 0.0)

    pre, test = test_data_for_artifact(art, cfg, args.artifact)
    train = data.load_split(cfg.data, "train")
    try:
        val_idx, real_idx = split_per_class(train.labels, train.num_classes, args.val_per_class,
                                            args.real_per_class, args.seed)
    except ValueError as e:
        raise ConfigError(f"--val-per-class/--real-per-class: {e}") from None
    test_x = pre(test.images)
    proxy_x, proxy_y = (pre(train.images[val_idx]), train.labels[val_idx]) if len(val_idx) else (test_x, test.labels)
    real_x = pre(train.images[real_idx])
    real_t = torch.nn.functional.one_hot(train.labels[real_idx], train.num_classes).float()
    augment = dsa_if(ecfg.dsa)

    specs = architectures(SPACES[args.space], art.model_spec())
    lr = args.lr or ecfg.lr or art.syn_lr
    real_lr = args.real_lr or cfg.experts.lr
    print(f"NAS over {len(specs)} ConvNets ({args.space}): proxy = {len(art.images)} distilled images, "
          f"{args.epochs} epochs, lr {lr:.4g}; real = {len(real_idx)} images, {args.real_epochs} epochs, "
          f"lr {real_lr:.4g}; proxy scored on {'validation' if len(val_idx) else 'test'} images", flush=True)
    common = dict(seed=args.seed, augment=augment, device=device, threads=cfg.threads, use_ray=args.ray)
    proxy = score_architectures(specs, art.images, art.targets(), lr, dataclasses.replace(ecfg, epochs=args.epochs),
                                proxy_x, proxy_y, **common)
    real = score_architectures(specs, real_x, real_t, real_lr, dataclasses.replace(ecfg, epochs=args.real_epochs),
                               test_x, test.labels, **common)
    result = summarize_search(specs, [100 * a for a in proxy], [100 * a for a in real], args.top_k)
    print(format_table(result, args.show))

    table = write_csv(result, out / "nas.csv")
    with RunLogger(cfg, f"nas-{Path(args.artifact).stem}", enabled=cfg.tracking.enabled) as log:
        log.log_params({"nas.artifact": str(Path(args.artifact).resolve()), "nas.space": args.space,
                        "nas.architectures": len(specs), "nas.top_k": result.top_k, "nas.epochs": args.epochs,
                        "nas.real_epochs": args.real_epochs, "nas.real_images": len(real_idx),
                        "nas.val_per_class": args.val_per_class, "nas.lr": lr, "nas.real_lr": real_lr,
                        "nas.seed": args.seed})
        log.log_metrics({"nas.best_selected_real_acc": result.best_real_acc,
                         "nas.oracle_real_acc": result.oracle_real_acc,
                         f"nas.spearman_top{result.top_k}": result.correlation})
        log.log_artifact(table)
    return result


if __name__ == "__main__":
    from contra_ray.nas import main as _main

    _main()
