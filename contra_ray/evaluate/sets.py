"""Sets × models: evaluating several sets (a distilled set, the random-real baseline) on several networks with
one recipe (:func:`evaluate_sets`, used by the pipeline, the evaluate CLI and Tune trials), which test data an
artifact is valid for, and the printed result tables.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from contra_ray.augment import dsa_if
from contra_ray.config import EvalConfig
from contra_ray.distill.artifact import ArtifactMismatchError, DistilledSet
from contra_ray.evaluate.remote import evaluate_runs
from contra_ray.evaluate.training import evaluation_seeds, summarize
from contra_ray.models import ModelSpec

#: how each method (:data:`contra_ray.tracking.METHODS`) is printed in result tables
METHOD_LABELS = {"contra": "ConTra", "mtt": "MTT", "random_real": "random real"}


@dataclasses.dataclass
class EvalSet:
    """One set to evaluate.

    Attributes:
        method: ``"contra"``, ``"mtt"`` or ``"random_real"`` (:data:`contra_ray.tracking.METHODS`).
        images: float32 ``[n, C, H, W]`` in the model's input space.
        targets: int64 ``[n]`` hard labels or float32 ``[n, num_classes]`` soft targets.
        lr: the step size its networks train with unless the recipe sets ``eval.lr`` (the learned syn_lr
            for a distilled set, ``experts.lr`` for real images).
    """

    method: str
    images: torch.Tensor
    targets: torch.Tensor
    lr: float

    @property
    def metric(self) -> str:
        """The MLflow metric its accuracy is logged as: ``random_real_acc`` or ``final_acc``."""
        return "random_real_acc" if self.method == "random_real" else "final_acc"


def evaluate_sets(sets: Sequence[EvalSet], models: Sequence[str], base_spec: ModelSpec, ecfg: EvalConfig,
                  test_x: torch.Tensor, test_y: torch.Tensor, *, ipc: int, device: str = "cpu", threads: int = 0,
                  use_ray: bool = True) -> tuple[list[dict], dict[tuple[str, str], list[float]]]:
    """Train ``ecfg.runs`` fresh networks of every model on every set and test them (paper App. D protocol,
    :func:`contra_ray.evaluate.training.train_and_test`; seeds :func:`evaluation_seeds` of ``ecfg.seed``,
    the same for every set and model; DSA when ``ecfg.dsa``).

    Args:
        models: network names (``base_spec.for_network(name)``: the data geometry of ``base_spec``).
        test_x, test_y: float32 ``[N, C, H, W]`` test images in the model's input space, int64 ``[N]`` labels.
        ipc: images per class, for the rows.
        device, threads, use_ray: as :func:`contra_ray.evaluate.remote.evaluate_runs`.

    Returns:
        ``(rows, accs)``: one row per (set, model), sets outer, as :func:`format_table` prints them
        (``method, model, norm, ipc, runs, mean, std``; mean and std in percent), and the accuracies in
        [0, 1] of every run, keyed ``(method, model)``.

    Raises:
        ValueError: as :func:`contra_ray.evaluate.remote.evaluate_runs` (GPU requests the cluster cannot meet).
    """
    seeds = evaluation_seeds(ecfg.seed, ecfg.runs)
    augment = dsa_if(ecfg.dsa)
    rows, accs = [], {}
    for s in sets:
        for model in models:
            spec = base_spec.for_network(model)
            a = evaluate_runs(s.images, s.targets, ecfg.lr or s.lr, spec, ecfg, test_x, test_y, seeds,
                              augment=augment, device=device, threads=threads, use_ray=use_ray)
            mean, std = summarize(a)
            rows.append({"method": s.method, "model": model, "norm": spec.norm, "ipc": ipc, "runs": len(a),
                         "mean": mean, "std": std})
            accs[(s.method, model)] = a
    return rows, accs


def summary_by_metric(rows: Sequence[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """``{metric: {model: (mean, std)}}`` of :func:`evaluate_sets`' rows, ``metric`` as :attr:`EvalSet.metric`
    (the input of :func:`contra_ray.tracking.accuracy_metrics`)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for r in rows:
        metric = "random_real_acc" if r["method"] == "random_real" else "final_acc"
        out.setdefault(metric, {})[r["model"]] = (r["mean"], r["std"])
    return out


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


def format_table(rows: Sequence[dict]) -> str:
    """Plain-text table with columns method, model, IPC, runs, ``mean ± std`` (percent, 2 decimals).

    Each row is a dict with keys ``method, model, ipc, runs, mean, std``; methods print as
    :data:`METHOD_LABELS` says (``contra`` as ``ConTra``).
    """
    head = ["method", "model", "IPC", "runs", "acc (%)"]
    body = [[METHOD_LABELS.get(r["method"], str(r["method"])), str(r["model"]), str(r["ipc"]), str(r["runs"]),
             f"{r['mean']:.2f} ± {r['std']:.2f}"] for r in rows]
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
    return "\n".join(lines)


def format_cross_architecture(rows: Sequence[dict]) -> str:
    """The rows as the field's cross-architecture table (paper Table 2, MTT/DATM Table 3): one line per
    method, one column per evaluation network headed ``model (norm)``, cells ``mean ± std`` (percent).

    Each row is a dict with keys ``method, model, norm, mean, std`` (as :func:`evaluate_sets` builds them).
    """
    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    norm = {r["model"]: r.get("norm", "?") for r in rows}
    cell = {(r["method"], r["model"]): f"{r['mean']:.2f} ± {r['std']:.2f}" for r in rows}
    head = ["method"] + [f"{m} ({norm[m]})" for m in models]
    body = [[METHOD_LABELS.get(meth, meth)] + [cell.get((meth, m), "-") for m in models] for meth in methods]
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body])
