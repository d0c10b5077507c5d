"""Evaluation of a distilled set: train fresh networks on it, report test top-1 accuracy.

Protocol (paper App. D, following MTT ``evaluate_synset`` / DATM): a randomly initialized network is
trained on the synthetic set with SGD (momentum 0.9, weight decay 5e-4, batch 256) at the learned step
size α for ``eval.epochs`` epochs, with DSA augmentation on every batch and the learning rate multiplied
by 0.1 at ``epochs // 2``; the loss is the soft-label cross-entropy on ``softmax(label_logits)`` (DATM).
The mean and (population) standard deviation of the top-1 test accuracy over ``eval.runs`` seeds is
reported, as MTT/DATM do with ``np.mean`` / ``np.std``.

The training function is plain PyTorch; :func:`evaluate_runs` fans the runs out as Ray tasks, and
``python -m contra_ray.evaluate --artifact PATH`` evaluates a saved :class:`~contra_ray.artifact.DistilledSet`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .artifact import ArtifactError, ArtifactMismatchError, DistilledSet
from .argtypes import positive_float, positive_int
from .config import ConfigError, EvalConfig
from .models import MODEL_NAMES, ModelSpec, build_model
from .seeds import derive_seed

__all__ = [
    "ArtifactMismatchError",
    "lr_schedule",
    "evaluation_seeds",
    "train_and_test",
    "evaluate_runs",
    "ensure_ray",
    "random_real_set",
    "check_artifact_matches",
    "test_meta_for",
    "summarize",
    "format_table",
    "format_cross_architecture",
    "main",
]

Augment = Callable[..., torch.Tensor]  # DSA()(x, generator=torch.Generator) -> augmented x
EpochHook = Callable[[int, float, float], None]  # (epoch, lr used in that epoch, mean train loss)


def lr_schedule(lr: float, epochs: int) -> list[float]:
    """Learning rate of each of ``epochs`` epochs: ``lr`` before ``epochs // 2``, ``lr * 0.1`` from it on.

    MTT ``evaluate_synset`` decays once, by 0.1, half way (it trains ``Epoch + 1`` epochs and decays
    after epoch ``Epoch // 2 + 1``; we train exactly ``epochs`` and decay at the start of epoch
    ``epochs // 2``). With ``epochs == 1`` there is no decay.
    """
    half = epochs // 2
    return [lr * 0.1 if 0 < half <= e else lr for e in range(epochs)]


def evaluation_seeds(seed: int, runs: int) -> list[int]:
    """The seeds of ``runs`` evaluation networks: ``derive_seed(seed, "eval", r)`` for r = 0..runs-1.

    Their own role (:mod:`contra_ray.seeds`), so an evaluation network never starts from the
    initialization of an expert (role ``expert``) the synthetic set was matched against.
    """
    return [derive_seed(seed, "eval", r) for r in range(runs)]


def train_and_test(images: torch.Tensor, targets: torch.Tensor, lr: float, spec: ModelSpec, ecfg: EvalConfig,
                   test_x: torch.Tensor, test_y: torch.Tensor, seed: int, augment: Augment | None = None,
                   device: str = "cpu", threads: int = 0, on_epoch: EpochHook | None = None) -> float:
    """Train a fresh ``build_model(spec)`` on ``(images, targets)``; return its top-1 test accuracy.

    Source: MTT ``utils.evaluate_synset`` / ``epoch`` (SGD momentum 0.9, wd 5e-4, DSA on every batch,
    one 0.1 decay half way, see :func:`lr_schedule`) with DATM's soft-label cross-entropy
    ``-(targets * log_softmax(logits)).sum(1).mean()``. Shuffling uses the global RNG after
    ``torch.manual_seed(seed)``; DSA uses a private generator on ``device`` seeded with ``seed``.

    Args:
        images: float ``[n, C, H, W]`` training images in the preprocessed space.
        targets: float ``[n, num_classes]`` target distributions (soft labels or one-hot), rows sum to 1.
        lr: initial SGD learning rate (the learned α of a distilled set).
        spec: the network to build.
        ecfg: recipe: ``epochs``, ``batch_size``, ``momentum``, ``weight_decay``, ``dsa``, ``test_batch_size``.
        test_x: float ``[N, C, H, W]`` test images, preprocessed the same way as ``images``.
        test_y: int64 ``[N]`` test labels.
        seed: seeds ``torch.manual_seed`` (initialization, shuffling) and the augmentation generator.
        augment: DSA callable ``augment(x, generator=g)``, applied to every training batch if ``ecfg.dsa``.
        device: torch device to train on.
        threads: torch intra-op threads for this call (0 = leave as is); restored afterwards.
        on_epoch: optional hook called after each epoch with ``(epoch, lr, mean train loss)``.

    Returns:
        Top-1 accuracy on the test set, a float in [0, 1].

    Raises:
        ValueError: ``images`` and ``targets`` disagree in length, or the test set is empty.
    """
    if images.shape[0] != targets.shape[0]:
        raise ValueError(f"images has {images.shape[0]} rows but targets has {targets.shape[0]}")
    if test_x.shape[0] == 0:
        raise ValueError("test set is empty")
    old_threads = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        dev = torch.device(device)
        net = build_model(spec).to(dev)
        x_all = images.detach().to(dev, torch.float32)
        t_all = targets.detach().to(dev, torch.float32)
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
        n, bs = x_all.shape[0], max(1, ecfg.batch_size)
        schedule = lr_schedule(lr, ecfg.epochs)
        opt = None
        net.train()
        for ep, ep_lr in enumerate(schedule):
            if opt is None or ep_lr != schedule[ep - 1]:
                # MTT re-creates the optimizer at the decay (momentum buffers restart)
                opt = torch.optim.SGD(net.parameters(), lr=ep_lr, momentum=ecfg.momentum,
                                      weight_decay=ecfg.weight_decay)
            perm = torch.randperm(n).to(dev)
            total = 0.0
            for i in range(0, n, bs):
                idx = perm[i:i + bs]
                x = x_all[idx]
                if ecfg.dsa and augment is not None:
                    x = augment(x, generator=gen)
                loss = -(t_all[idx] * F.log_softmax(net(x), dim=1)).sum(1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.numel()
            if on_epoch is not None:
                on_epoch(ep, ep_lr, total / n)
        net.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, test_x.shape[0], max(1, ecfg.test_batch_size)):
                xb = test_x[i:i + ecfg.test_batch_size].to(dev, torch.float32)
                yb = test_y[i:i + ecfg.test_batch_size].to(dev)
                correct += int((net(xb).argmax(1) == yb).sum())
        return correct / test_x.shape[0]
    finally:
        torch.set_num_threads(old_threads)


def _remote_train_and_test(train: tuple, lr: float, spec: ModelSpec, ecfg: EvalConfig, test: tuple, seed: int,
                           augment: Augment | None, device: str, threads: int) -> float:
    return train_and_test(train[0], train[1], lr, spec, ecfg, test[0], test[1], seed, augment, device, threads)


from .raycluster import ensure_ray  # noqa: E402  (re-exported)


def evaluate_runs(images: torch.Tensor, targets: torch.Tensor, lr: float, spec: ModelSpec, ecfg: EvalConfig,
                  test_x: torch.Tensor, test_y: torch.Tensor, seeds: Sequence[int], augment: Augment | None = None,
                  device: str = "cpu", threads: int = 0, use_ray: bool = True) -> list[float]:
    """One :func:`train_and_test` per seed; accuracies in [0, 1], in the order of ``seeds``.

    With ``use_ray`` each run is a Ray task with ``num_cpus=ecfg.cpus_per_run``,
    ``num_gpus=ecfg.gpus_per_run`` and ``max(1, int(num_cpus))`` torch threads; the train and test
    tensors are put in the object store once. The task trains on ``"cuda"`` if ``gpus_per_run > 0``
    (Ray assigns the GPU), else on ``"cpu"``. Without Ray the runs are sequential in this process on
    ``device`` with ``threads`` threads (quick periodic evaluations during distillation).

    Args: as :func:`train_and_test`; ``seeds`` one per run.

    Raises:
        ValueError: ``device`` is CUDA but ``ecfg.gpus_per_run == 0`` with Ray (tasks would get no GPU),
            or the Ray cluster has fewer GPUs than one run asks for (the task would wait forever).
    """
    if not use_ray:
        return [train_and_test(images, targets, lr, spec, ecfg, test_x, test_y, s, augment, device, threads)
                for s in seeds]
    if str(device).startswith("cuda") and ecfg.gpus_per_run <= 0:
        raise ValueError(f"device={device!r} but eval.gpus_per_run={ecfg.gpus_per_run}: Ray tasks would get "
                         "no GPU; set eval.gpus_per_run > 0 (e.g. 0.25) or run inline (use_ray=False)")
    import ray

    ensure_ray()
    if ecfg.gpus_per_run > 0 and ray.cluster_resources().get("GPU", 0) < ecfg.gpus_per_run:
        raise ValueError(f"eval.gpus_per_run={ecfg.gpus_per_run} but the Ray cluster has "
                         f"{ray.cluster_resources().get('GPU', 0)} GPUs")
    task = ray.remote(_remote_train_and_test).options(
        num_cpus=ecfg.cpus_per_run, num_gpus=ecfg.gpus_per_run,
        scheduling_strategy="DEFAULT")  # outside a Tune trial's placement group, which has no room for them
    train_ref = ray.put((images.detach().cpu(), targets.detach().cpu()))
    test_ref = ray.put((test_x.cpu(), test_y.cpu()))
    run_device = "cuda" if ecfg.gpus_per_run > 0 else "cpu"
    n_threads = max(1, int(ecfg.cpus_per_run))
    refs = [task.remote(train_ref, lr, spec, ecfg, test_ref, s, augment, run_device, n_threads) for s in seeds]
    return [float(a) for a in ray.get(refs)]


def random_real_set(train_images: torch.Tensor, train_labels: torch.Tensor, ipc: int, num_classes: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The random-real baseline: ``ipc`` real images per class drawn without replacement.

    Selection by :func:`contra_ray.data.real_images_per_class` (MTT/DATM ``get_images``: one
    ``randperm`` per class, classes in order) with a CPU generator seeded with ``seed``.

    Args:
        train_images: float ``[N, C, H, W]`` preprocessed train images.
        train_labels: int64 ``[N]`` labels in ``[0, num_classes)``.
        ipc: images per class.
        num_classes: number of classes C.
        seed: selection seed (a private ``torch.Generator``; global RNG untouched).

    Returns:
        ``(images [ipc*C, C, H, W], targets float32 one-hot [ipc*C, num_classes])``, grouped by class
        (class 0 first).

    Raises:
        ValueError: ``ipc < 1`` or some class has fewer than ``ipc`` images.
    """
    from .data import real_images_per_class

    sel = real_images_per_class(train_images, train_labels, ipc, torch.Generator().manual_seed(seed), num_classes)
    return train_images[sel].clone(), F.one_hot(train_labels[sel].long(), num_classes).float()


_MATCH_FIELDS = ("zca", "preprocessor_fingerprint", "image_size", "channels", "num_classes", "classes")


def test_meta_for(test_set: Any, preprocessor: Any) -> dict:
    """What :func:`check_artifact_matches` compares, from a data ``ImageSet`` and a ``Preprocessor``.

    Uses ``test_set.images`` (uint8 ``[N, C, H, W]``), ``test_set.classes``, ``preprocessor.zca`` and
    ``preprocessor.fingerprint()``.
    """
    return {"zca": bool(preprocessor.zca), "preprocessor_fingerprint": preprocessor.fingerprint(),
            "image_size": int(test_set.images.shape[-1]), "channels": int(test_set.images.shape[1]),
            "num_classes": len(test_set.classes), "classes": list(test_set.classes)}


def check_artifact_matches(artifact: DistilledSet, test_meta: dict) -> None:
    """Check that ``artifact`` was made with the preprocessing and geometry of the data it is tested on.

    Compares ``zca``, ``preprocessor_fingerprint``, ``image_size``, ``channels``, ``num_classes`` and
    ``classes`` for every one of those keys present in ``test_meta`` (see :func:`test_meta_for`), and
    the artifact's own tensors against its meta (image size, channels, label count).

    Raises:
        ArtifactMismatchError: naming the first differing field with the artifact's and the test value
            (also when the artifact's meta lacks a field the test side has).
    """
    meta = artifact.meta
    own = {"image_size": int(artifact.images.shape[-1]), "channels": int(artifact.images.shape[1]),
           "num_classes": artifact.num_classes}
    for field, value in own.items():
        if field in meta and meta[field] != value:
            raise ArtifactMismatchError(f"{field}: artifact meta says {meta[field]!r} but its tensors have {value!r}")
    for field in _MATCH_FIELDS:
        if field not in test_meta:
            continue
        ours = meta.get(field, own.get(field, "<missing>"))
        theirs = test_meta[field]
        if field == "classes":
            ours, theirs = list(ours) if ours != "<missing>" else ours, list(theirs)
        if ours != theirs:
            raise ArtifactMismatchError(f"{field}: artifact has {ours!r} but the test data has {theirs!r}")


def summarize(accs: Sequence[float]) -> tuple[float, float]:
    """``(mean, std)`` in percent of accuracies in [0, 1]; std is the population std (``np.std``, as MTT/DATM).

    Raises:
        ValueError: ``accs`` is empty.
    """
    if len(accs) == 0:
        raise ValueError("summarize: no accuracies")
    pct = np.asarray(accs, dtype=np.float64) * 100.0
    return float(pct.mean()), float(pct.std())


def format_table(rows: Sequence[dict]) -> str:
    """Plain-text table with columns method, model, IPC, runs, ``mean ± std`` (percent, 2 decimals).

    Each row is a dict with keys ``method, model, ipc, runs, mean, std``.
    """
    head = ["method", "model", "IPC", "runs", "acc (%)"]
    body = [[str(r["method"]), str(r["model"]), str(r["ipc"]), str(r["runs"]),
             f"{r['mean']:.2f} ± {r['std']:.2f}"] for r in rows]
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
    return "\n".join(lines)


# ---------------------------------------------------------------------- command line

def format_cross_architecture(rows: Sequence[dict]) -> str:
    """The rows as the field's cross-architecture table (paper Table 2, MTT/DATM Table 3): one line per
    method, one column per evaluation network headed ``model (norm)``, cells ``mean ± std`` (percent).

    Each row is a dict with keys ``method, model, norm, mean, std`` (as :func:`_run_cli` builds them).
    """
    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    norm = {r["model"]: r.get("norm", "?") for r in rows}
    cell = {(r["method"], r["model"]): f"{r['mean']:.2f} ± {r['std']:.2f}" for r in rows}
    head = ["method"] + [f"{m} ({norm[m]})" for m in models]
    body = [[meth] + [cell.get((meth, m), "-") for m in models] for meth in methods]
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body])


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
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _run_cli(args: argparse.Namespace, art: DistilledSet) -> dict:
    from . import data
    from .config import config_from_dict
    from .tracking import RunLogger, accuracy_metrics, main_model

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
    from .tracking import check_destinations  # tracking store reachable: before loading data
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
        from .augment import DSA
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


if __name__ == "__main__":
    # run from the importable module, so Ray workers resolve contra_ray.evaluate functions by name
    from contra_ray.evaluate import main as _main

    _main()
