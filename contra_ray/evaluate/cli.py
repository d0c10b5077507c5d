"""``python -m contra_ray.evaluate --artifact PATH``: fresh networks trained on a saved distilled set
(:class:`~contra_ray.distill.artifact.DistilledSet`) with its recipe, test top-1 accuracy mean ± std per
network (:func:`contra_ray.evaluate.sets.evaluate_sets`), optionally beside the random-real baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from contra_ray import data
from contra_ray.common.argtypes import positive_float, positive_int
from contra_ray.common.cli import cli_entry, cli_error, interrupted
from contra_ray.common.seeds import derive_seed
from contra_ray.config import Config, ConfigError, config_from_dict
from contra_ray.data.imagenet import share_streamed
from contra_ray.distill.artifact import ArtifactError, ArtifactMismatchError, DistilledSet
from contra_ray.evaluate.sets import (
    EvalSet,
    check_artifact_matches,
    evaluate_sets,
    format_cross_architecture,
    format_table,
    summary_by_metric,
    test_meta_for,
)
from contra_ray.evaluate.training import random_real_set
from contra_ray.models import MODEL_NAMES
from contra_ray.plots import log_results
from contra_ray.tracking import RunLogger, accuracy_metrics, check_destinations, main_model

__all__ = ["build_parser", "config_for_artifact", "main", "run_artifact_cli", "test_data_for_artifact"]


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
    p.add_argument("--protocol", choices=["default", "dd-ranking"], default="default",
                   help="default: the set with its recipe (paper App. D / MTT); dd-ranking: DD-Ranking's fair "
                        "protocol (Acc of the set and of random real images with hard and with the set's own "
                        "labels, with and without DSA, beside the experts' full-data accuracy; HLR, IOR, LRS, "
                        "ARS) on the set's network; needs the expert store the set was distilled from")
    p.add_argument("--data-root", default=None,
                   help="dataset location overriding the artifact config's data.root (default: the config's)")
    p.add_argument("--cache-dir", default=None,
                   help="cache directory overriding data.cache_dir (default: the config's)")
    p.add_argument("--experts", default=None,
                   help="with --protocol dd-ranking: the expert store the set was distilled from, a path or a URI, "
                        "overriding the artifact config's experts.store (default: the config's, <output_dir>/"
                        "<name>/experts, relative to this folder when the run's output_dir was)")
    p.add_argument("--device", type=_device, default=None,
                   help="cpu, cuda or cuda:<i> (default: the config's device if CUDA is available, else cpu)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI; logs even if the set was distilled with --no-tracking "
                        "(default: the config's, sqlite:///<output_dir>/mlflow.db, if its tracking is on)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (default: log)")
    p.add_argument("--note", default=None, help="description of the MLflow run (tag mlflow.note.content)")
    p.add_argument("--inline", action="store_true",
                   help="run sequentially in this process instead of as Ray tasks (default: Ray)")
    p.add_argument("--seed", type=int, default=None,
                   help="evaluation seed: run r is seeded derive_seed(seed, 'eval', r), the baseline's images "
                        "derive_seed(seed, 'baseline') (default: the recipe's eval.seed)")
    return p


def run_artifact_cli(parser: argparse.ArgumentParser, argv: list[str] | None, run):
    """Parse ``argv``, load ``--artifact`` and return ``run(args, artifact)``: the prologue of the command lines
    that read a distilled set (evaluate, nas). A missing or corrupt artifact is an argparse usage error; an
    artifact that does not fit the data, a bad config or missing data is one ``error:`` line; both exit 2."""
    args = parser.parse_args(argv)
    try:
        art = DistilledSet.load(args.artifact)
    except ArtifactError as e:
        parser.error(f"--artifact: {e}")
    try:
        return run(args, art)
    except ArtifactError as e:
        parser.error(f"--artifact: {e}")
    except (ArtifactMismatchError, ConfigError, FileNotFoundError) as e:
        raise SystemExit(cli_error(e)) from None


def config_for_artifact(art: DistilledSet, args: argparse.Namespace) -> Config:
    """The artifact's own config and evaluation recipe (unvalidated), with the command line's ``--data-root``,
    ``--cache-dir``, ``--experts`` (``experts.store``), ``--tracking-uri`` (which turns tracking on, also for a
    set whose config has it off) and ``--no-tracking``.

    Raises:
        ConfigError: the artifact's meta has no config.
    """
    if "config" not in art.meta:
        raise ConfigError(f"{args.artifact}: artifact meta has no 'config' (cannot rebuild the data config)")
    cfg = config_from_dict({**art.meta["config"], "eval": art.meta["eval"]}, validate=False)
    if args.data_root is not None:
        cfg.data.root = args.data_root
    if args.cache_dir is not None:
        cfg.data.cache_dir = args.cache_dir
    if getattr(args, "experts", None) is not None:
        cfg.experts.store = args.experts
    if args.tracking_uri:  # an explicit store logs, also for a set distilled with --no-tracking
        cfg.tracking.uri, cfg.tracking.enabled = args.tracking_uri, True
    cfg.tracking.enabled = cfg.tracking.enabled and not args.no_tracking
    return cfg


def test_data_for_artifact(art: DistilledSet, cfg: Config, path: str) -> tuple[data.Preprocessor, data.ImageSet]:
    """The artifact's preprocessor and the real test split of ``cfg.data``, checked to fit each other.

    A streamed test split is published to :meth:`Config.data_cache_location` when there is one, so evaluation
    tasks on other nodes read it through their own cache (:func:`contra_ray.data.imagenet.share_streamed`).

    Raises:
        ArtifactError: the artifact's preprocessor state is invalid.
        ArtifactMismatchError: the test data differ from what the artifact was made for (names both).
        FileNotFoundError: the data set is missing.
        StorageError: the data cache location is not writable.
    """
    try:
        pre = data.Preprocessor.from_state_dict(art.preprocessor)
    except (KeyError, ValueError, TypeError) as e:
        raise ArtifactError(f"{path}: invalid preprocessor state ({e})") from None
    test = data.load_split(cfg.data, "test")
    location = cfg.data_cache_location()
    if location is not None:  # streamed: Ray tasks on other nodes
        share_streamed([test], location)
    try:
        check_artifact_matches(art, test_meta_for(test, pre))
    except ArtifactMismatchError as e:
        where = cfg.data.root or cfg.data.dataset
        raise ArtifactMismatchError(f"{path} does not fit the test data of {where}: {e}") from None
    return pre, test


INTERRUPTED = ("interrupted: evaluate keeps no partial results; rerunning the same command trains and evaluates "
               "every run again (the decoded data stay cached)")


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point; returns ``{(method, model): [accs]}`` (with ``--protocol dd-ranking``:
    ``{accuracy key: [accs]}``, ``real_hard`` and the per-run scores, fractions; :mod:`.fair`).

    Exits with status 2 and a one-line error (no traceback), as ``contra_ray.distill`` does for invalid
    input: bad flags or a missing/corrupt artifact (preprocessor state included) as an argparse usage
    error; a preprocessing/config mismatch, an unreachable tracking store, a ``data.cache_dir`` that cannot
    be written or missing data as ``error: ...``. A failure of the machine during the work (disk full) is one
    ``error: <path>: <cause>`` line, status 1; Ctrl-C one line (:data:`INTERRUPTED`), status 130.
    """
    try:
        return run_artifact_cli(build_parser(), argv, _run_cli)
    except KeyboardInterrupt:
        raise SystemExit(interrupted(INTERRUPTED)) from None


def _run_cli(args: argparse.Namespace, art: DistilledSet) -> dict:
    if args.experts is not None and (args.protocol != "dd-ranking" or not args.experts.strip()):
        raise ConfigError(f"--experts={args.experts!r}: " + ("give the expert store's folder or URI"
                          if args.protocol == "dd-ranking" else "only --protocol dd-ranking reads an expert store"))
    cfg = config_for_artifact(art, args)
    if args.seed is not None:
        cfg.eval.seed = args.seed
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
    cfg.validate()
    check_destinations(None, cfg.tracking_uri() if cfg.tracking.enabled else None, cache_dir=cfg.data.cache_dir)

    if args.protocol == "dd-ranking":
        return _run_fair(args, art, cfg)
    pre, test = test_data_for_artifact(art, cfg, args.artifact)
    test_x = pre(test.images)
    method = art.meta.get("method", "contra")
    sets = [EvalSet(method, art.images, art.targets(), art.syn_lr)]
    if args.baseline == "random-real":
        train = data.load_split(cfg.data, "train")
        bx, by = random_real_set(pre(train.images), train.labels, art.ipc, art.num_classes,
                                 derive_seed(ecfg.seed, "baseline"))
        sets.append(EvalSet("random_real", bx, by, cfg.experts.lr))

    name = f"eval-{Path(args.artifact).stem}"
    tag_method = method if method in ("contra", "mtt") else None  # None: from the config's K
    with RunLogger(cfg, name, enabled=cfg.tracking.enabled, method=tag_method, note=args.note) as log:
        log.log_params({"eval_cli.seed": ecfg.seed, "eval_cli.baseline": args.baseline, "eval_cli.syn_lr": art.syn_lr})
        log.set_tags({"path.artifact": str(Path(args.artifact).resolve())})
        print(f"evaluate: training {len(sets)} set(s) x {len(ecfg.models)} model(s) x {ecfg.runs} run(s) of "
              f"{ecfg.epochs} epochs on {device}", flush=True)
        rows, results = evaluate_sets(sets, ecfg.models, art.model_spec(), ecfg, test_x, test.labels, ipc=art.ipc,
                                      device=device, threads=cfg.threads, use_ray=not args.inline)
        summary = summary_by_metric(rows)
        main = main_model(cfg)
        log.log_metrics({k: v for metric, per_model in summary.items()
                         for k, v in accuracy_metrics(per_model, main, metric).items()},
                        step=int(art.meta.get("iteration", 0)))
        log.log_dict({"rows": rows, "accs": {f"{m}/{model}": a for (m, model), a in results.items()}},
                     "eval_results.json")
        log_results(rows, log, f"{name}: IPC {art.ipc}, {ecfg.runs} run(s) x {ecfg.epochs} epochs")
        table = format_table(rows)
        print(table)
        if len(ecfg.models) > 1:  # the cross-architecture row of paper Table 2
            print(f"\ncross-architecture (IPC {art.ipc}, {ecfg.runs} runs x {ecfg.epochs} epochs per network)\n"
                  + format_cross_architecture(rows))
    return results


def _run_fair(args: argparse.Namespace, art: DistilledSet, cfg: Config) -> dict:
    """``--protocol dd-ranking`` (:mod:`contra_ray.evaluate.fair`); returns ``{accuracy key: [accs]}`` plus
    ``real_hard`` and the per-run scores."""
    from contra_ray.evaluate.fair import (
        ACCURACIES,
        fair_metrics,
        format_fair_table,
        open_teacher_store,
        run_fair_protocol,
    )

    model = art.model_spec().name
    if args.models and args.models != [model]:
        raise ConfigError(f"--models={','.join(args.models)}: --protocol dd-ranking compares with Acc(real, hard), "
                          f"the experts' accuracy, which exists for the set's network only (--models {model})")
    store = open_teacher_store(art, cfg)  # before any data is loaded: a missing store fails at once
    pre, test = test_data_for_artifact(art, cfg, args.artifact)
    train = data.load_split(cfg.data, "train")
    ecfg = cfg.eval
    name = f"eval-ddranking-{Path(args.artifact).stem}"
    method = art.meta.get("method", "contra")
    with RunLogger(cfg, name, enabled=cfg.tracking.enabled, method=method if method in ("contra", "mtt") else None,
                   note=args.note) as log:
        log.log_params({"eval_cli.seed": ecfg.seed, "eval_cli.protocol": args.protocol,
                        "eval_cli.syn_lr": art.syn_lr})
        log.set_tags({"path.artifact": str(Path(args.artifact).resolve()), "path.expert_store": str(store.path)})
        print(f"evaluate: dd-ranking protocol, {len(ACCURACIES)} accuracies x {ecfg.runs} run(s) of "
              f"{ecfg.epochs} epochs of {model} on {cfg.device}", flush=True)
        r = run_fair_protocol(art, cfg, store, train, pre, pre(test.images), test.labels, model=model,
                              device=cfg.device, threads=cfg.threads, use_ray=not args.inline)
        log.log_metrics(fair_metrics(r), step=int(art.meta.get("iteration", 0)))
        log.log_dict({"accs": r.accs, "real_hard": r.real_hard, "scores": dataclasses.asdict(r.scores),
                      "teacher": r.teacher, "store": r.store}, "ddranking_results.json")
        print(format_fair_table(r), flush=True)
    return {**r.accs, "real_hard": r.real_hard, **dataclasses.asdict(r.scores)}
