"""The one distillation checkpoint format, its validation, and the config check on resume.

A checkpoint is a directory: ``state.pt`` (``torch.save`` of ``{"distiller": Distiller.state_dict(),
"history": {...}, "config": Config.to_dict()}``) and ``manifest.json`` (format, run token, iteration,
the config, size and sha256 of ``state.pt``), written last, so a directory copied or killed before it
was complete never validates. Every file goes through :func:`contra_ray.common.fileio.atomic_write`.

The same directories are used in one process (:class:`LocalCheckpoints`: ``<run dir>/checkpoints/
iter_XXXXXXXX/``, the newest ``keep`` kept) and on Ray Train workers (handed to ``ray.train.report``, kept
by Ray under ``<output_dir>/ray_train/<name>/``). Resuming takes the newest checkpoint that validates; a
newer one that does not is reported in one line and skipped. A checkpoint made with another value of a
field that changes the result (:func:`resume_mismatches`) is refused, naming the fields.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable

import torch

from contra_ray.common import storage
from contra_ray.common.fileio import atomic_write, sha256_file
from contra_ray.config import Config, ConfigError

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "write_checkpoint", "read_manifest", "read_checkpoint",
           "resume_mismatches", "check_resumable", "newest_valid", "checkpoint_dirs", "LocalCheckpoints"]

CHECKPOINT_FORMAT = "contra_ray.distill_checkpoint/2"
_READABLE_FORMATS = ("contra_ray.distill_checkpoint/1", CHECKPOINT_FORMAT)
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"  # written last: a directory without a valid manifest is not a checkpoint

# Fields that may change between a checkpoint and the run resuming it: loop length, logging, locations,
# resources, and the memory/execution strategy (same gradients). Every other field of these sections
# changes the result, so a checkpoint made with another value is refused.
RESUMABLE_CHANGES = {
    "data": {"cache_dir", "shared_cache", "root", "download"},
    "experts": {"store", "ffcv_dir", "cpus_per_expert", "gpus_per_expert", "eval_every"},
    "distill": {"iterations", "checkpoint_every", "eval_every", "eval_runs_periodic", "unroll_memory",
                "student_execution"},
}
CHECKED_SECTIONS = ("data", "model", "experts", "distill")


class CheckpointError(RuntimeError):
    """A checkpoint directory is incomplete or corrupt (torn write, wrong size or sha256); names the path."""


def write_checkpoint(directory: str | os.PathLike, state: dict, run_token: str = "") -> None:
    """Write ``state`` into ``directory`` as ``state.pt`` plus ``manifest.json`` (written last).

    Args:
        directory: created if missing.
        state: ``{"distiller": Distiller.state_dict(), "history": {...}, "config": Config.to_dict()}``.
        run_token: identifies the run that wrote it (Ray Train: tells a worker-group restart of this fit
            from an earlier fit's checkpoint).
    """
    d = Path(directory)
    atomic_write(d / STATE_FILE, lambda p: torch.save(state, p))
    manifest = {"format": CHECKPOINT_FORMAT, "run_token": run_token,
                "iteration": int(state["distiller"]["iteration"]), "config": state.get("config"),
                "files": {STATE_FILE: {"size": (d / STATE_FILE).stat().st_size,
                                       "sha256": sha256_file(d / STATE_FILE)}}}
    atomic_write(d / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(directory: str | os.PathLike) -> dict:
    """The checkpoint's manifest.

    Raises:
        CheckpointError: missing, unreadable, or of another format.
    """
    path = Path(directory) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {directory}: no {MANIFEST_FILE} (torn, or not a contra_ray "
                              "checkpoint)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {directory}: {MANIFEST_FILE} is unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in _READABLE_FORMATS:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"checkpoint {directory}: format={fmt!r}, expected {CHECKPOINT_FORMAT!r}")
    return manifest


def _verify_files(d: Path, manifest: dict) -> None:
    if STATE_FILE not in manifest.get("files", {}):
        raise CheckpointError(f"checkpoint {d}: the manifest lists no {STATE_FILE}")
    for name, want in manifest["files"].items():
        f = d / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {d}: {name} is missing")
        size = f.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"checkpoint {d}: {name} has {size} bytes, the manifest says {want['size']}")
        if sha256_file(f) != want["sha256"]:
            raise CheckpointError(f"checkpoint {d}: {name} fails its sha256 check")


def read_checkpoint(directory: str | os.PathLike) -> dict:
    """Validate a checkpoint directory against its manifest, then load its state (on CPU).

    Returns:
        ``{"distiller": Distiller.state_dict(), "history": {...}, "config": {...}}``.

    Raises:
        CheckpointError: no valid manifest, a listed file missing, or its size / sha256 differs.
    """
    d = Path(directory)
    _verify_files(d, read_manifest(d))
    return torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)


def resume_mismatches(saved: dict, now: dict, *, where: str = "the checkpoint",
                      sections: tuple[str, ...] = CHECKED_SECTIONS,
                      may_change: dict[str, set[str]] | None = None) -> list[str]:
    """``section.field`` entries (with both values) whose value differs between a saved config and this
    run's, over ``sections`` (default :data:`CHECKED_SECTIONS`) less ``may_change`` (default
    :data:`RESUMABLE_CHANGES`).

    Args:
        saved, now: ``Config.to_dict()`` style dicts (the saved one from a checkpoint, a finished set's
            meta, or a sweep's trials); a field ``saved`` lacks (it predates the field) is not a change.
        where: how the entries name the saved side (``"distill.beta=0.2 in the checkpoint, 0.5 now"``).
    """
    allowed = RESUMABLE_CHANGES if may_change is None else may_change
    out = []
    for section in sections:
        for key, value in now.get(section, {}).items():
            if key in allowed.get(section, set()):
                continue
            old = saved.get(section, {}).get(key, value)
            if old != value:
                out.append(f"{section}.{key}={old!r} in {where}, {value!r} now")
    return out


def check_resumable(saved_config: dict | None, cfg: Config, where: str | os.PathLike,
                    iteration: int | None = None) -> None:
    """Refuse to continue a checkpoint made with a config that gives another result.

    Raises:
        ConfigError: naming every changed field with both values (and a checkpoint ``iteration`` beyond
            ``distill.iterations``), the checkpoint, and the two ways out.
    """
    diff = resume_mismatches(saved_config or {}, cfg.to_dict())
    if iteration is not None and iteration > cfg.distill.iterations:
        diff.append(f"the checkpoint is at iteration {iteration}, beyond distill.iterations={cfg.distill.iterations}")
    if diff:
        raise ConfigError(f"cannot resume run {cfg.name!r} from checkpoint {where}: " + "; ".join(diff) +
                          " (run with --no-resume to start over, or use another --name)")


def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """Directories directly under ``root`` that hold a ``manifest.json``, newest (highest iteration) first;
    unreadable manifests sort last. ``[]`` if ``root`` does not exist."""
    root = Path(root)
    if not root.is_dir():
        return []

    def key(d: Path) -> tuple[int, str]:
        try:
            return (int(read_manifest(d)["iteration"]), d.name)
        except (CheckpointError, KeyError, ValueError, TypeError):
            return (-1, d.name)

    return sorted((d for d in root.iterdir() if d.is_dir() and (d / MANIFEST_FILE).exists()), key=key,
                  reverse=True)


def newest_valid(candidates: Iterable[Path], log=print) -> tuple[Path, dict] | None:
    """The first candidate (newest first) that validates, as ``(path, state)``; each one that does not is
    reported with ``log`` in one line and skipped. ``None`` if none validates."""
    for d in candidates:
        try:
            return d, read_checkpoint(d)
        except CheckpointError as e:
            log(f"[checkpoint] skipping {d}: {e}; falling back to an older checkpoint")
    return None


class LocalCheckpoints:
    """Checkpoints of an in-process run: ``<root>/iter_XXXXXXXX/`` (the format above), newest ``keep`` kept.

    Each checkpoint is written into a temporary sibling directory and renamed into place, so ``root``
    only ever holds complete directories (and a torn manifest still fails validation). With ``location``
    (a URI, :mod:`contra_ray.common.storage`), ``root`` is its node-local mirror: every checkpoint is published
    there as soon as it is written (``manifest.json`` last) and older ones are deleted there too; ``load``
    fetches the published ones first, so a run resumes on any node.
    """

    def __init__(self, root: str | os.PathLike, keep: int = 2, location: str | None = None):
        self.root = Path(root)
        self.keep = max(1, keep)
        self.location = location if location is not None and storage.is_uri(location) else None

    def load(self, log=print) -> dict | None:
        """The newest valid checkpoint's state, or ``None`` (see :func:`newest_valid`)."""
        if self.location is not None:
            storage.pull(self.location, self.root)
        found = newest_valid(checkpoint_dirs(self.root), log)
        if found is None:
            return None
        path, state = found
        state["path"] = str(path)
        return state

    def save(self, state: dict, iteration: int, metrics: dict | None = None) -> Path:
        final = self.root / f"iter_{iteration:08d}"
        tmp = self.root / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
        write_checkpoint(tmp, state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if self.location is not None:
            storage.push(final, storage.join(self.location, final.name), last=[MANIFEST_FILE])
        for old in checkpoint_dirs(self.root)[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)
            if self.location is not None:
                storage.delete(storage.join(self.location, old.name))
        return final

    def clear(self) -> int:
        """Remove every checkpoint (``--no-resume``); returns how many there were."""
        if self.location is not None:
            storage.pull(self.location, self.root)
        dirs = checkpoint_dirs(self.root)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
            if self.location is not None:
                storage.delete(storage.join(self.location, d.name))
        return len(dirs)
