"""The distilled set as one self-describing file.

A :class:`DistilledSet` carries everything needed to use it correctly without remembering how it was
made: the synthetic images in the *preprocessed* space (normalized, ZCA-whitened when ``zca``), the
learned labels (DATM soft labels: ``softmax(label_logits)``) and student step size ``α``, the
preprocessor state that maps real images into that space, the model spec, dataset identity and hashes,
and the evaluation recipe (paper App. D; MTT/DATM protocol).

On disk it is ONE safetensors file: the tensors (``images``, ``label_logits``, ``hard_labels`` and the
preprocessor state under ``preprocessor/<key>``) plus a JSON document in the safetensors header
(key ``contra_ray``) holding ``format``, ``syn_lr``, ``soft`` and ``meta``. Writes are atomic
(:func:`contra_ray.common.fileio.atomic_write`), so a reader never sees a half-written artifact.

This module is the only writer and reader of the format. Format 2 (current) requires the meta keys
:data:`REQUIRED_META`, which :func:`build_meta` fills and :meth:`DistilledSet.save` checks before
writing. Format 1 files (contra_ray 0.1: the distiller wrote ``model_spec``/``eval_recipe``) are read
with those keys renamed and the derivable ones (geometry, IPC) filled from the tensors and config; a
file that still lacks a required key is refused with the list of what is missing.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from contra_ray.common import storage
from contra_ray.common.fileio import atomic_write
from contra_ray.models import ModelSpec

__all__ = ["ArtifactError", "ArtifactMismatchError", "DistilledSet", "FORMAT", "FORMAT_VERSION", "REQUIRED_META",
           "build_meta", "read_meta"]

FORMAT_VERSION = 2
FORMAT = f"contra_ray.distilled/{FORMAT_VERSION}"
_READABLE = {"contra_ray.distilled/1": 1, FORMAT: FORMAT_VERSION}
REQUIRED_META = ("model", "eval", "config", "classes", "num_classes", "image_size", "channels", "ipc", "zca",
                 "preprocessor_fingerprint", "dataset_id", "method", "iteration")
_HEADER_KEY = "contra_ray"
_PRE = "preprocessor/"
_CORE = ("images", "label_logits", "hard_labels")


class ArtifactError(Exception):
    """A distilled-set file is missing, unreadable, corrupt or malformed; the message names the path."""


class ArtifactMismatchError(ValueError):
    """A distilled set does not match the data it is used with; the message names the field and both values."""


def _fetch(uri: str) -> Path:
    """The node-local copy of the set at ``uri`` (fetched if missing or changed). Raises: ArtifactError."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    try:
        storage.check_location("--artifact", uri)
        if not storage.exists(uri):
            raise ArtifactError(f"distilled set {uri}: no such file")
        storage.pull(parent, storage.local_mirror(parent), files=[name])
    except storage.StorageError as e:
        raise ArtifactError(f"distilled set {uri}: {e}") from None
    return storage.local_mirror(parent) / name


@dataclasses.dataclass
class DistilledSet:
    """A distilled (synthetic) data set with everything needed to train on it correctly.

    Attributes:
        images: float32 ``[n, C, H, W]`` in the preprocessed space (normalized, ZCA-whitened if
            ``meta["zca"]``); not displayable as is (use ``Preprocessor.to_display``).
        label_logits: float32 ``[n, num_classes]``; with ``soft`` the training targets are
            ``softmax(label_logits)`` (DATM learned soft labels).
        hard_labels: int64 ``[n]``, the class each image was initialized from (targets when not ``soft``).
        syn_lr: learned student step size α (the evaluation learning rate in MTT/DATM).
        soft: whether training targets are the soft labels (else one-hot of ``hard_labels``).
        preprocessor: ``Preprocessor.state_dict()`` of the preprocessor fitted on the train split.
        meta: JSON-serializable description; see :func:`build_meta` for the keys. Tuples come back as
            lists after a save/load round trip.
    """

    images: torch.Tensor
    label_logits: torch.Tensor
    hard_labels: torch.Tensor
    syn_lr: float
    soft: bool
    preprocessor: dict[str, torch.Tensor]
    meta: dict = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------ derived values
    @property
    def num_classes(self) -> int:
        return int(self.label_logits.shape[1])

    @property
    def ipc(self) -> int:
        """Images per class (``meta["ipc"]`` if present, else ``n // num_classes``)."""
        return int(self.meta.get("ipc", self.images.shape[0] // max(self.num_classes, 1)))

    def model_spec(self):
        """The :class:`~contra_ray.models.ModelSpec` the set was distilled with (``meta["model"]``).

        Raises:
            ArtifactError: ``meta`` has no ``model`` entry.
        """

        if "model" not in self.meta:
            raise ArtifactError("distilled set meta has no 'model' entry (model spec)")
        return ModelSpec.from_dict(self.meta["model"])

    def targets(self) -> torch.Tensor:
        """Training targets, float32 ``[n, num_classes]``, rows summing to 1.

        ``softmax(label_logits)`` when ``soft`` (DATM), else ``one_hot(hard_labels)``.
        """
        if self.soft:
            return F.softmax(self.label_logits.detach().float(), dim=1)
        return F.one_hot(self.hard_labels.long(), self.num_classes).float()

    def validate(self) -> "DistilledSet":
        """Check shapes and dtypes; returns ``self``.

        Raises:
            ValueError: wrong rank, dtype or mismatched lengths (the message names the field and shape).
        """
        x, y, h = self.images, self.label_logits, self.hard_labels
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"images: expected float [n, C, H, W], got {x.dtype} {tuple(x.shape)}")
        if y.dim() != 2 or not y.is_floating_point() or y.shape[0] != x.shape[0]:
            raise ValueError(f"label_logits: expected float [n={x.shape[0]}, num_classes], "
                             f"got {y.dtype} {tuple(y.shape)}")
        if h.dim() != 1 or h.dtype != torch.int64 or h.shape[0] != x.shape[0]:
            raise ValueError(f"hard_labels: expected int64 [n={x.shape[0]}], got {h.dtype} {tuple(h.shape)}")
        if h.numel() and (int(h.min()) < 0 or int(h.max()) >= y.shape[1]):
            raise ValueError(f"hard_labels: values must be in [0, {y.shape[1]}), "
                             f"got [{int(h.min())}, {int(h.max())}]")
        for k, v in self.preprocessor.items():
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"preprocessor[{k!r}]: expected a tensor, got {type(v).__name__}")
        return self

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the set to ONE safetensors file at ``path`` atomically (tmp file + ``os.replace``).

        Creates the parent directory. A failure at any point leaves no file at ``path`` (or the previous
        one intact) and no temporary file behind.

        Raises:
            ValueError: invalid tensors (see :meth:`validate`), ``meta`` lacking a key of
                :data:`REQUIRED_META` (named), or ``meta`` not JSON-serializable.
        """
        self.validate()
        missing = [k for k in REQUIRED_META if k not in self.meta]
        if missing:
            raise ValueError(f"distilled set meta lacks {missing} "
                             "(build it with contra_ray.distill.artifact.build_meta)")
        path = Path(path)
        tensors = {k: _plain(getattr(self, k)) for k in _CORE}
        tensors.update({_PRE + k: _plain(v) for k, v in self.preprocessor.items()})
        try:
            header = json.dumps({"format": FORMAT, "syn_lr": float(self.syn_lr), "soft": bool(self.soft),
                                 "meta": self.meta})
        except (TypeError, ValueError) as e:
            raise ValueError(f"meta is not JSON-serializable: {e}") from None
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={_HEADER_KEY: header}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DistilledSet":
        """Read a set written by :meth:`save` (tensors on CPU); format 1 files are upgraded (module docstring).

        Raises:
            ArtifactError: the file is missing, unreadable, not a safetensors file, lacks the contra_ray
                header or tensors, holds invalid tensors, or lacks required meta (named, with the file's
                format version); the message names ``path``.

        ``path`` may be a URI (``s3://bucket/runs/run/distilled.safetensors``): the file is fetched into this
        node's mirror of it first (:mod:`contra_ray.common.storage`).
        """
        if storage.is_uri(path):
            path = _fetch(str(path))
        path = Path(path)
        if path.is_dir():
            hint = path / "distilled.safetensors"
            raise ArtifactError(f"distilled set {path}: is a directory, expected a .safetensors file"
                                + (f" (e.g. {hint})" if hint.is_file() else ""))
        if not path.is_file():
            raise ArtifactError(f"distilled set {path}: no such file")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                doc = _header(f)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            missing = [k for k in _CORE if k not in tensors]
            if missing:
                raise ValueError(f"missing tensors {missing}")
            out = cls(images=tensors["images"], label_logits=tensors["label_logits"],
                      hard_labels=tensors["hard_labels"], syn_lr=float(doc["syn_lr"]), soft=bool(doc["soft"]),
                      preprocessor={k[len(_PRE):]: v for k, v in tensors.items() if k.startswith(_PRE)},
                      meta=doc.get("meta") or {})
            out.validate()
        except ArtifactError:
            raise
        except Exception as e:  # safetensors raises its own error types, json/Key/ValueError, OSError
            raise ArtifactError(f"distilled set {path}: corrupt or not a contra_ray artifact "
                                f"({type(e).__name__}: {e})") from None
        version = _READABLE[doc["format"]]
        if version < FORMAT_VERSION:
            out.meta = _upgrade_meta(out, version)
        missing = [k for k in REQUIRED_META if k not in out.meta]
        if missing:
            older = ", written by an older contra_ray" if version < FORMAT_VERSION else ""
            raise ArtifactError(f"distilled set {path} (format {version}{older}) lacks meta {missing}; "
                                "re-export it from its run (python -m contra_ray.distill with the same --name "
                                "resumes from its checkpoint and rewrites it)")
        return out


def _header(f) -> dict:
    """The contra_ray header of an open safetensors file (``safe_open``), checked to be a readable format.

    Raises:
        ValueError: no contra_ray entry, or a format this version cannot read.
    """
    header = (f.metadata() or {}).get(_HEADER_KEY)
    if header is None:
        raise ValueError(f"no '{_HEADER_KEY}' entry in the safetensors header")
    doc = json.loads(header)
    if doc.get("format") not in _READABLE:
        raise ValueError(f"format {doc.get('format')!r}, expected one of {sorted(_READABLE)}")
    return doc


def read_meta(path: str | os.PathLike) -> dict:
    """The ``meta`` of the set at ``path`` as written (format 1 keys not upgraded), from the safetensors header
    only: no tensor is read, so this is cheap for a set of any size.

    Raises:
        ArtifactError: the file is missing, not a safetensors file, or lacks the contra_ray header (names ``path``).
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"distilled set {path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            doc = _header(f)
    except Exception as e:  # safetensors raises its own error types, json/ValueError, OSError
        raise ArtifactError(f"distilled set {path}: corrupt or not a contra_ray artifact "
                            f"({type(e).__name__}: {e})") from None
    return doc.get("meta") or {}


def _upgrade_meta(art: "DistilledSet", version: int) -> dict:
    """Format 1 meta -> format 2 keys: renamed ones, and what the tensors and the config determine."""
    meta = dict(art.meta)
    if version == 1:
        for old, new in (("model_spec", "model"), ("eval_recipe", "eval")):
            if new not in meta and old in meta:
                meta[new] = meta.pop(old)
        meta.setdefault("num_classes", art.num_classes)
        meta.setdefault("image_size", int(art.images.shape[-1]))
        meta.setdefault("channels", int(art.images.shape[1]))
        ipc = meta.get("config", {}).get("distill", {}).get("ipc")
        if ipc is not None:
            meta.setdefault("ipc", int(ipc))
    return meta


def _plain(t: torch.Tensor) -> torch.Tensor:
    # safetensors needs contiguous CPU tensors that share no storage
    return t.detach().cpu().contiguous().clone()


def build_meta(cfg: Any, spec: Any, preprocessor: Any, train_set: Any, *, iteration: int,
               method: str = "contra", extra: dict | None = None) -> dict:
    """The ``meta`` dict of a :class:`DistilledSet`, with the keys evaluation checks.

    Args:
        cfg: the validated :class:`~contra_ray.config.Config` of the run.
        spec: :class:`~contra_ray.models.ModelSpec` the set was distilled with.
        preprocessor: fitted ``data.Preprocessor`` (uses ``.zca`` and ``.fingerprint()``).
        train_set: the train ``data.ImageSet`` (uses ``images`` uint8 ``[N, C, H, W]``, ``classes``,
            ``dataset_id``, ``content_hash``).
        iteration: distillation iteration the set comes from.
        method: ``"contra"`` or ``"random_real"``.
        extra: more JSON-serializable entries (override the defaults).

    Returns:
        dict with keys ``model, dataset_id, train_content_hash, classes, num_classes, image_size,
        channels, ipc, zca, zca_eps, preprocessor_fingerprint, eval, config, iteration, method, created``
        (``created``: UTC ISO-8601 time).
    """
    cfgd = cfg.to_dict()
    meta = {
        "model": spec.to_dict(),
        "dataset_id": getattr(train_set, "dataset_id", None),
        "train_content_hash": getattr(train_set, "content_hash", None),
        "classes": list(train_set.classes),
        "class_names": list(getattr(train_set, "names", None) or train_set.classes),
        "num_classes": len(train_set.classes),
        "image_size": int(train_set.images.shape[-1]),
        "channels": int(train_set.images.shape[1]),
        "ipc": int(cfg.distill.ipc),
        "zca": bool(preprocessor.zca),
        "zca_eps": float(cfg.data.zca_eps),
        "preprocessor_fingerprint": preprocessor.fingerprint(),
        "eval": cfgd["eval"],
        "config": cfgd,
        "iteration": int(iteration),
        "method": method,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(extra or {})
    return meta
