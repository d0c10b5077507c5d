"""Evaluation of a distilled set: train fresh networks on it, report test top-1 accuracy.

Protocol (paper App. D, following MTT ``evaluate_synset`` / DATM): a randomly initialized network is
trained on the synthetic set with SGD (momentum 0.9, weight decay 5e-4, batch 256) at the learned step
size α for ``eval.epochs`` epochs, with DSA augmentation on every batch and the learning rate multiplied
by 0.1 at ``epochs // 2``; the loss is the soft-label cross-entropy on ``softmax(label_logits)`` (DATM).
The mean and (population) standard deviation of the top-1 test accuracy over ``eval.runs`` seeds is
reported, as MTT/DATM do with ``np.mean`` / ``np.std``.

The training function is plain PyTorch; :func:`evaluate_runs` fans the runs out as Ray tasks, and
``python -m contra_ray.evaluate --artifact PATH`` evaluates a saved :class:`~contra_ray.distill.artifact.DistilledSet`.
"""

from __future__ import annotations

from contra_ray.common.cli import cli_error
from contra_ray.evaluate.training import evaluation_seeds, random_real_set, summarize
from contra_ray.evaluate.remote import evaluate_runs
from contra_ray.evaluate.sets import check_artifact_matches, format_cross_architecture, format_table, test_meta_for

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from contra_ray.distill.artifact import ArtifactError, ArtifactMismatchError, DistilledSet
from contra_ray.common.argtypes import positive_float, positive_int
from contra_ray.config import ConfigError, EvalConfig
from contra_ray.models import MODEL_NAMES, ModelSpec, build_model
from contra_ray.common.seeds import derive_seed

__all__ = ["ArtifactMismatchError", "evaluation_seeds", "evaluate_runs", "ensure_ray", "random_real_set", "check_artifact_matches", "test_meta_for", "summarize", "format_table", "format_cross_architecture", "main"]



from contra_ray.common.raycluster import ensure_ray


# ---------------------------------------------------------------------- command line


def _spec_for(name: str, base: ModelSpec) -> ModelSpec:
    return base.for_network(name)


def _model_list(s: str) -> list[str]:
    names = [n.strip() for n in s.split(",") if n.strip()]
    bad = [n for n in names if n not in MODEL_NAMES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown model(s) {bad or s!r}; known: {', '.join(MODEL_NAMES)}")
    return names


def _device(s: str) -> str:
    if s in ("cpu", "cuda") or (s.startswith("cuda:") and s[5:].isdigit()):
        return s
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:<index>, got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m contra_ray.evaluate`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m contra_ray.evaluate",
        description="Train fresh networks on a distilled set and report test top-1 accuracy "
                    "(mean ± std over runs; paper App. D / MTT protocol).")
    p.add_argument("--artifact", required=True, help="distilled-set file (.safetensors) written by contra_ray")
    p.add_argument("--models", type=_model_list, default=None,
                   help=f"comma-separated evaluation models from {', '.join(MODEL_NAMES)} "
                        "(default: the artifact's eval recipe, e.g. convnet)")
    p.add_argument("--runs", type=positive_int, default=None,
                   help="training runs per model (default: the artifact's eval recipe, e.g. 5)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="training epochs per run (default: the artifact's eval recipe, e.g. 300)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="evaluation learning rate (default: eval.lr of the recipe, else the learned syn_lr; "
                        "the random-real baseline uses eval.lr, else experts.lr)")
    p.add_argument("--baseline", choices=["none", "random-real"], default="none",
                   help="also evaluate ipc random real images per class (hard labels) (default: none)")
    p.add_argument("--data-root", default=None,
                   help="dataset location overriding the artifact config's data.root (default: the config's)")
    p.add_argument("--cache-dir", default=None,
                   help="cache directory overriding data.cache_dir (default: the config's)")
    p.add_argument("--device", type=_device, default=None,
                   help="cpu, cuda or cuda:<i> (default: the config's device if CUDA is available, else cpu)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: the config's, sqlite:///<output_dir>/mlflow.db)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (default: log)")
    p.add_argument("--note", default=None, help="description of the MLflow run (tag mlflow.note.content)")
    p.add_argument("--inline", action="store_true",
                   help="run sequentially in this process instead of as Ray tasks (default: Ray)")
    p.add_argument("--seed", type=int, default=None,
                   help="evaluation seed: run r is seeded derive_seed(seed, 'eval', r), the baseline's images "
                        "derive_seed(seed, 'baseline') (default: the recipe's eval.seed)")
    return p


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point; returns ``{(method, model): [accs]}``.

    Exits with status 2 and a one-line error (no traceback), as ``contra_ray.distill`` does for invalid
    input: bad flags or a missing/corrupt artifact (preprocessor state included) as an argparse usage
    error; a preprocessing/config mismatch, an unreachable tracking store or missing data as ``error: ...``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        art = DistilledSet.load(args.artifact)
    except ArtifactError as e:
        parser.error(f"--artifact: {e}")
    try:
        return _run_cli(args, art)
    except ArtifactError as e:
        parser.error(f"--artifact: {e}")
    except (ArtifactMismatchError, ConfigError, FileNotFoundError) as e:
        raise SystemExit(cli_error(e)) from None


def _run_cli(args: argparse.Namespace, art: DistilledSet) -> dict:
    from contra_ray import data
    from contra_ray.config import config_from_dict
    from contra_ray.tracking import RunLogger, accuracy_metrics, main_model

    if "config" not in art.meta:
        raise ConfigError(f"{args.artifact}: artifact meta has no 'config' (cannot rebuild the data config)")
    cfgd = dict(art.meta["config"])
    cfgd["eval"] = art.meta["eval"]
    cfg = config_from_dict(cfgd, validate=False)
    if args.seed is not None:
        cfg.eval.seed = args.seed
    if args.data_root is not None:
        cfg.data.root = args.data_root
    if args.cache_dir is not None:
        cfg.data.cache_dir = args.cache_dir
    ecfg = cfg.eval
    ecfg.models = args.models or ecfg.models
    ecfg.runs = args.runs or ecfg.runs
    ecfg.epochs = args.epochs or ecfg.epochs
    ecfg.lr = args.lr or ecfg.lr
    device = args.device or (cfg.device if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not torch.cuda.is_available():
        raise ConfigError(f"--device={device!r}: CUDA is not available on this machine")
    cfg.device = device
    if device == "cpu":
        ecfg.gpus_per_run = 0.0
    elif ecfg.gpus_per_run <= 0:
        ecfg.gpus_per_run = 1.0  # a CPU recipe evaluated on a GPU: one GPU per run
    if args.tracking_uri:
        cfg.tracking.uri = args.tracking_uri
    cfg.tracking.enabled = cfg.tracking.enabled and not args.no_tracking
    cfg.validate()
    from contra_ray.tracking import check_destinations
    check_destinations(None, cfg.tracking_uri() if cfg.tracking.enabled else None)

    try:
        pre = data.Preprocessor.from_state_dict(art.preprocessor)
    except (KeyError, ValueError, TypeError) as e:
        raise ArtifactError(f"{args.artifact}: invalid preprocessor state ({e})") from None
    test = data.load_split(cfg.data, "test")
    try:
        check_artifact_matches(art, test_meta_for(test, pre))
    except ArtifactMismatchError as e:
        where = cfg.data.root or cfg.data.dataset
        raise ArtifactMismatchError(f"{args.artifact} does not fit the test data of {where}: {e}") from None
    test_x = pre(test.images)
    augment = None
    if ecfg.dsa:
        from contra_ray.augment import DSA
        augment = DSA()
    base = art.model_spec()
    seeds = evaluation_seeds(ecfg.seed, ecfg.runs)
    sets = [("contra" if art.meta.get("method", "contra") == "contra" else art.meta["method"],
             art.images, art.targets(), ecfg.lr or art.syn_lr)]
    if args.baseline == "random-real":
        train = data.load_split(cfg.data, "train")
        bx, by = random_real_set(pre(train.images), train.labels, art.ipc, art.num_classes,
                                 derive_seed(ecfg.seed, "baseline"))
        sets.append(("random_real", bx, by, ecfg.lr or cfg.experts.lr))

    results: dict = {}
    rows = []
    name = f"eval-{Path(args.artifact).stem}"
    summary: dict[str, dict] = {}  # metric name -> model -> (mean, std)
    set_method = sets[0][0] if sets[0][0] in ("contra", "mtt") else None  # tag (None: from the config's K)
    with RunLogger(cfg, name, enabled=cfg.tracking.enabled, method=set_method, note=args.note) as log:
        log.log_params({"eval_cli.seed": ecfg.seed, "eval_cli.baseline": args.baseline, "eval_cli.syn_lr": art.syn_lr})
        log.set_tags({"path.artifact": str(Path(args.artifact).resolve())})
        for method, x, t, lr in sets:
            for model in ecfg.models:
                spec = _spec_for(model, base)
                accs = evaluate_runs(x, t, lr, spec, ecfg, test_x, test.labels, seeds,
                                     augment=augment, device=device, threads=cfg.threads, use_ray=not args.inline)
                mean, std = summarize(accs)
                results[(method, model)] = accs
                rows.append({"method": method, "model": model, "norm": spec.norm, "ipc": art.ipc,
                             "runs": len(accs), "mean": mean, "std": std})
                metric = "random_real_acc" if method == "random_real" else "final_acc"
                summary.setdefault(metric, {})[model] = (mean, std)
        main = main_model(cfg)
        log.log_metrics({k: v for metric, per_model in summary.items()
                         for k, v in accuracy_metrics(per_model, main, metric).items()},
                        step=int(art.meta.get("iteration", 0)))
        log.log_dict({"rows": rows, "accs": {f"{m}/{model}": a for (m, model), a in results.items()}},
                     "eval_results.json")
        table = format_table(rows)
        print(table)
        if len(ecfg.models) > 1:  # the cross-architecture row of paper Table 2
            print(f"\ncross-architecture (IPC {art.ipc}, {ecfg.runs} runs x {ecfg.epochs} epochs per network)\n"
                  + format_cross_architecture(rows))
    return results
