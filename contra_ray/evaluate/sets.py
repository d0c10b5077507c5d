"""Evaluation tables: which test data an artifact is valid for, and the printed result tables.
"""

from __future__ import annotations
from typing import Any, Sequence
from contra_ray.distill.artifact import ArtifactMismatchError, DistilledSet


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
