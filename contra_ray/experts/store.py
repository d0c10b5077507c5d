"""The expert store: one directory of expert trajectories, read lazily, checked before use.

Layout: ``expert_XXXX.safetensors`` (``"trajectory"`` float32 ``[epochs + 1, P]``, row 0 =
initialization), ``index.parquet`` (one row per expert: id, seed, test accuracy per epoch, model spec,
dataset id and hash, ZCA, sha256), ``store.json`` (store-level meta: model spec, epochs, data identity,
training recipe) and ``preprocessor.safetensors`` (the ZCA statistics travel with the experts). Every
file is written with :func:`contra_ray.common.fileio.atomic_write`. Plain PyTorch/pyarrow, no Ray.

While an expert trains, its finished epochs live in ``expert_XXXX.partial/`` (:class:`PartialExpert`):
``row_EEEE.pt`` (the flat parameters after epoch E, float32 ``[P]``; row 0 = initialization) and
``state.pt`` (everything else needed to continue bit-identically: model and optimizer state, the RNG
states, test accuracies, the number of finished epochs). A killed or retried training task resumes from
there; :meth:`ExpertStore.add` removes the folder once the finished expert is saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from contra_ray.common.fileio import atomic_write, sha256_file
from contra_ray.config import ConfigError
from contra_ray.models import ModelSpec

__all__ = ["STORE_FORMAT", "PARTIAL_FORMAT", "ExpertStoreError", "ExpertStore", "PartialExpert", "reference_expert_id"]

STORE_FORMAT = "contra_ray.expert_store/1"  # a file format name: unchanged when the module moved
PARTIAL_FORMAT = "contra_ray.expert_partial/1"
REQUIRED_META = ("model_spec", "epochs", "dataset_id", "content_hash", "zca", "zca_eps",
                 "preprocessor_fingerprint", "classes")
_INDEX_SCHEMA = pa.schema([
    ("expert_id", pa.int64()), ("seed", pa.int64()), ("epochs", pa.int64()), ("num_params", pa.int64()),
    ("test_acc", pa.list_(pa.float64())), ("model_spec", pa.string()), ("dataset_id", pa.string()),
    ("content_hash", pa.string()), ("zca", pa.bool_()), ("zca_eps", pa.float64()),
    ("preprocessor_fingerprint", pa.string()), ("sha256", pa.string()), ("file", pa.string()),
])


class ExpertStoreError(ValueError):
    """The expert store is missing, corrupt, or does not fit the configuration; the message names the store
    path, the field and the values."""


class ExpertStore:
    """A directory of expert trajectories (see module docstring for the layout).

    Files:
        ``store.json``: store-level meta (``model_spec`` dict, ``epochs``, ``dataset_id``, ``content_hash``,
        ``zca``, ``zca_eps``, ``preprocessor_fingerprint``, ``classes``, optionally the training ``recipe``).
        ``preprocessor.safetensors``: ``Preprocessor.state_dict()`` (ZCA statistics).
        ``expert_XXXX.safetensors``: key ``"trajectory"`` float32 ``[epochs + 1, P]``; header metadata
        repeats the expert's index row (strings).
        ``index.parquet``: one row per expert (columns of ``_INDEX_SCHEMA``), rewritten atomically on add.

    Only one process (the driver) should write to a store. Open with :meth:`open`, make with :meth:`create`.
    """

    def __init__(self, path: str | os.PathLike, meta: dict, rows: dict[int, dict]):
        self.path = Path(path)
        self._meta = meta
        self._rows = rows

    # ------------------------------------------------------------------ creation / opening
    @classmethod
    def create(cls, path: str | os.PathLike, meta: dict, preprocessor_state: dict[str, torch.Tensor]) -> "ExpertStore":
        """Make a new, empty store at ``path`` (the directory may exist but must not hold a store).

        Args:
            meta: must contain :data:`REQUIRED_META` keys (``model_spec`` as a dict or :class:`ModelSpec`);
                extra JSON-serializable keys are kept.
            preprocessor_state: ``Preprocessor.state_dict()``, tensors saved to ``preprocessor.safetensors``.

        Raises:
            ExpertStoreError: a store already exists at ``path``, or required meta keys are missing.
        """
        path = Path(path)
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise ExpertStoreError(f"expert store {path}: meta is missing {', '.join(missing)}")
        if (path / "store.json").exists():
            raise ExpertStoreError(f"expert store {path} already exists; open it with ExpertStore.open")
        meta = dict(meta)
        if isinstance(meta["model_spec"], ModelSpec):
            meta["model_spec"] = meta["model_spec"].to_dict()
        meta["model_spec"] = ModelSpec.from_dict(meta["model_spec"]).to_dict()  # depth resolved
        meta["epochs"] = int(meta["epochs"])
        meta["format"] = STORE_FORMAT
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in preprocessor_state.items()}
        atomic_write(path / "preprocessor.safetensors", safetensors_bytes(state))
        store = cls(path, meta, {})
        store._write_index()
        # store.json last: its presence marks a complete store
        atomic_write(path / "store.json", json.dumps(meta, indent=2, sort_keys=True).encode())
        return store

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ExpertStore":
        """Open an existing store.

        Raises:
            ExpertStoreError: ``path`` is not a directory, or ``store.json`` / ``index.parquet`` is missing
                or unreadable (the message names the path).
        """
        path = Path(path)
        if not path.is_dir():
            raise ExpertStoreError(f"expert store {path} does not exist (train experts first, or set experts.store)")
        for name in ("store.json", "index.parquet"):
            if not (path / name).exists():
                raise ExpertStoreError(f"expert store {path} has no {name}: not an expert store, or its "
                                       "creation was interrupted")
        try:
            meta = json.loads((path / "store.json").read_text())
            table = pq.read_table(path / "index.parquet")
        except Exception as e:  # noqa: BLE001 - any parse error is a corrupt store
            raise ExpertStoreError(f"expert store {path}: cannot read store.json/index.parquet ({e})") from e
        rows = {int(r["expert_id"]): r for r in table.to_pylist()}
        return cls(path, meta, rows)

    # ------------------------------------------------------------------ properties
    @property
    def meta(self) -> dict:
        """Store-level meta (a copy of ``store.json``)."""
        return json.loads(json.dumps(self._meta))

    @property
    def epochs(self) -> int:
        """Saved epochs per expert; trajectories have ``epochs + 1`` rows."""
        return int(self._meta["epochs"])

    @property
    def model_spec(self) -> ModelSpec:
        """The network every expert in the store was trained with."""
        return ModelSpec.from_dict(self._meta["model_spec"])

    @property
    def expert_ids(self) -> list[int]:
        """Ids of the saved experts, ascending."""
        return sorted(self._rows)

    @property
    def index(self):
        """``index.parquet`` as a pandas DataFrame (one row per expert, sorted by ``expert_id``)."""
        return self._table().to_pandas()

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"ExpertStore({str(self.path)!r}, experts={len(self)}, epochs={self.epochs})"

    # ------------------------------------------------------------------ writing
    def _table(self) -> pa.Table:
        return pa.Table.from_pylist([self._rows[i] for i in self.expert_ids], schema=_INDEX_SCHEMA)

    def _write_index(self) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(self._table(), sink)
        atomic_write(self.path / "index.parquet", sink.getvalue().to_pybytes())

    def file(self, expert_id: int) -> Path:
        """Path of the safetensors file of ``expert_id`` (whether or not it exists)."""
        return self.path / f"expert_{int(expert_id):04d}.safetensors"

    def partial_dir(self, expert_id: int) -> Path:
        """Folder of ``expert_id``'s finished epochs while it trains (see :class:`PartialExpert`)."""
        return partial_dir(self.path, expert_id)

    def add(self, expert_id: int, seed: int, trajectory: torch.Tensor, test_acc: list[float]) -> None:
        """Save one expert (file first, atomically; then the index, atomically). Replaces an existing entry.

        Args:
            trajectory: float ``[epochs + 1, P]`` (stored as float32).
            test_acc: ``epochs`` floats in [0, 1] or NaN.

        Raises:
            ExpertStoreError: wrong trajectory shape, ``P`` differing from the experts already stored, or
                wrong ``test_acc`` length.
        """
        expert_id = int(expert_id)
        traj = trajectory.detach().to("cpu", torch.float32).contiguous()
        if traj.dim() != 2 or traj.shape[0] != self.epochs + 1:
            raise ExpertStoreError(f"expert store {self.path}: expert {expert_id} trajectory has shape "
                                   f"{tuple(traj.shape)}, expected [epochs + 1 = {self.epochs + 1}, P]")
        other = next((r["num_params"] for i, r in self._rows.items() if i != expert_id), None)
        if other is not None and traj.shape[1] != other:
            raise ExpertStoreError(f"expert store {self.path}: expert {expert_id} has P={traj.shape[1]} "
                                   f"parameters, the stored experts have P={other}")
        if len(test_acc) != self.epochs:
            raise ExpertStoreError(f"expert store {self.path}: expert {expert_id} has {len(test_acc)} test "
                                   f"accuracies, expected one per epoch ({self.epochs})")
        m = self._meta
        row = {"expert_id": expert_id, "seed": int(seed), "epochs": self.epochs, "num_params": int(traj.shape[1]),
               "test_acc": [float(a) for a in test_acc], "model_spec": json.dumps(m["model_spec"], sort_keys=True),
               "dataset_id": str(m["dataset_id"]), "content_hash": str(m["content_hash"]), "zca": bool(m["zca"]),
               "zca_eps": float(m["zca_eps"]), "preprocessor_fingerprint": str(m["preprocessor_fingerprint"]),
               "file": self.file(expert_id).name}
        header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in row.items()}
        header["format"] = STORE_FORMAT
        data = safetensors_bytes({"trajectory": traj}, metadata=header)
        row["sha256"] = hashlib.sha256(data).hexdigest()
        atomic_write(self.file(expert_id), data)
        self._rows[expert_id] = row
        self._write_index()
        shutil.rmtree(self.partial_dir(expert_id), ignore_errors=True)  # the finished expert supersedes it

    # ------------------------------------------------------------------ reading
    def _row(self, expert_id: int) -> dict:
        row = self._rows.get(int(expert_id))
        if row is None:
            raise ExpertStoreError(f"expert store {self.path} has no expert_id={expert_id} "
                                   f"(saved: {self.expert_ids})")
        return row

    def _check_epoch(self, what: str, epoch: int) -> None:
        if not 0 <= epoch <= self.epochs:
            raise ExpertStoreError(f"expert store {self.path}: {what}={epoch} is outside the saved epochs "
                                   f"0..{self.epochs}")

    def params(self, expert_id: int, epoch: int) -> torch.Tensor:
        """Flat parameters float32 ``[P]`` of expert ``expert_id`` after epoch ``epoch`` (0 = initialization).

        Lazy: reads one row through ``safe_open(...).get_slice("trajectory")`` (memory-mapped), never the
        whole file.

        Raises:
            ExpertStoreError: unknown ``expert_id``, ``epoch`` outside ``0..epochs``, or missing file.
        """
        path = self.path / self._row(expert_id)["file"]
        self._check_epoch("epoch", epoch)
        if not path.exists():
            raise ExpertStoreError(f"expert store {self.path}: file {path.name} of expert_id={expert_id} is missing")
        with safe_open(str(path), framework="pt") as f:
            return f.get_slice("trajectory")[int(epoch)].clone()

    def segment(self, expert_id: int, start: int, M: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(θ*_start, θ*_{start+M})``, each float32 ``[P]``: the expert segment matched in paper Eq. 1/8.

        Raises:
            ExpertStoreError: unknown expert, ``M < 1``, or ``start``/``start + M`` outside ``0..epochs``.
        """
        if M < 1:
            raise ExpertStoreError(f"expert store {self.path}: segment length M={M} must be >= 1")
        self._check_epoch("start", start)
        self._check_epoch("start + M", start + M)
        return self.params(expert_id, start), self.params(expert_id, start + M)

    def trajectory(self, expert_id: int) -> torch.Tensor:
        """The whole trajectory float32 ``[epochs + 1, P]`` (loads the file; prefer :meth:`params`)."""
        path = self.path / self._row(expert_id)["file"]
        return load_file(str(path))["trajectory"].clone()  # clone: safetensors may map the file

    def verify(self, expert_id: int) -> None:
        """Check the expert's file against the sha256 in the index.

        Raises:
            ExpertStoreError: unknown expert, missing file, or checksum mismatch (names file and both hashes).
        """
        row = self._row(expert_id)
        path = self.path / row["file"]
        if not path.exists():
            raise ExpertStoreError(f"expert store {self.path}: file {row['file']} of expert_id={expert_id} is missing")
        digest = sha256_file(path)
        if digest != row["sha256"]:
            raise ExpertStoreError(f"expert store {self.path}: checksum mismatch for {row['file']} "
                                   f"(index sha256={row['sha256']}, file sha256={digest}); the file is corrupt")

    def is_valid(self, expert_id: int) -> bool:
        """True if the expert is in the index and its file passes :meth:`verify`."""
        try:
            self.verify(expert_id)
            return True
        except ExpertStoreError:
            return False

    def preprocessor_state(self) -> dict[str, torch.Tensor]:
        """The ``Preprocessor.state_dict()`` saved with the store (for ``Preprocessor.from_state_dict``).

        Raises:
            ExpertStoreError: ``preprocessor.safetensors`` is missing.
        """
        path = self.path / "preprocessor.safetensors"
        if not path.exists():
            raise ExpertStoreError(f"expert store {self.path} has no preprocessor.safetensors")
        return {k: v.clone() for k, v in load_file(str(path)).items()}  # own memory, not a file mapping

    # ------------------------------------------------------------------ compatibility
    def _mismatch(self, field: str, stored: Any, asked: Any, built: str = "for") -> ExpertStoreError:
        return ExpertStoreError(f"expert store {self.path} was built {built} {field}={stored!r}, "
                                f"config asks for {asked!r}")

    def check_compatible(self, spec: ModelSpec, dataset_id: str | None, zca: bool, needed_epochs: int,
                         preprocessor_fingerprint: str | None = None,
                         needed_by: str = "distill.max_start_epoch + distill.expert_epochs") -> None:
        """Refuse to use the store for a run whose model, data or epoch range does not match.

        Checks, in order: ``model.name``, ``model.width``, ``depth``, ``norm``, ``activation`` and
        ``pooling`` (ConvNet only; the other networks ignore width and depth and fix the rest by name),
        ``model.num_classes``/``image_size``/``channels``, ``dataset_id`` (skipped if
        ``None``), ``data.zca``, the preprocessor fingerprint (skipped if ``None``), and that the store
        has at least ``needed_epochs`` saved epochs (``T+ + M``, paper Eq. 8).

        Raises:
            ExpertStoreError: the first mismatch, e.g. ``expert store /x was built for model.name='resnet18',
                config asks for 'convnet'`` or ``distill.max_start_epoch + distill.expert_epochs = 10 needs 10
                saved epochs, store has 8``.
        """
        have, want = self.model_spec.to_dict(), spec.to_dict()
        fields = ["name"] + (["width", "depth", "norm", "activation", "pooling"] if want["name"] == "convnet"
                             else []) + ["num_classes", "image_size", "channels"]
        for f in fields:
            if have.get(f) != want.get(f):
                raise self._mismatch(f"model.{f}", have.get(f), want.get(f))
        if dataset_id is not None and self._meta["dataset_id"] != dataset_id:
            raise self._mismatch("dataset_id", self._meta["dataset_id"], dataset_id)
        if bool(self._meta["zca"]) != bool(zca):
            raise self._mismatch("data.zca", bool(self._meta["zca"]), bool(zca))
        if preprocessor_fingerprint is not None and self._meta["preprocessor_fingerprint"] != preprocessor_fingerprint:
            raise self._mismatch("preprocessor fingerprint", self._meta["preprocessor_fingerprint"],
                                 preprocessor_fingerprint, built="with")
        if needed_epochs > self.epochs:
            raise ExpertStoreError(f"expert store {self.path}: {needed_by} = {needed_epochs} needs "
                                   f"{needed_epochs} saved epochs, store has {self.epochs}")


# ---------------------------------------------------------------------------------------- partial experts

def partial_dir(store_path: str | os.PathLike, expert_id: int) -> Path:
    """``<store>/expert_XXXX.partial``: where :class:`PartialExpert` keeps an unfinished expert's epochs."""
    return Path(store_path) / f"expert_{int(expert_id):04d}.partial"


class PartialExpert:
    """The finished epochs of one expert that is still training, so a killed task resumes (format
    :data:`PARTIAL_FORMAT`).

    Files in ``folder`` (each written with :func:`atomic_write`; a row before the state that counts it,
    so ``state.pt`` never points at a missing row):

    * ``row_EEEE.pt``: flat parameters float32 ``[P]`` after epoch ``E`` (``row_0000.pt`` = initialization);
    * ``state.pt``: ``{"format", "identity", "epoch" (finished epochs), "test_acc" (one per finished
      epoch), "model" (state_dict), "optimizer" (state_dict, holds the momentum buffers), "rng"
      (``{name: ByteTensor}``: the sample-order and augmentation generators, torch's global CPU RNG and,
      on CUDA, the device's global RNG)}``.

    ``identity`` (expert id, seed, model spec, recipe, number of training samples, sample order) must
    equal the resuming task's: a folder left by another configuration is ignored with a warning, never
    resumed from. Only the task training the expert writes its folder.

    Args:
        folder: the folder (``ExpertStore.partial_dir(i)``); created on the first write.
        identity: JSON-serializable dict describing what is being trained.
    """

    def __init__(self, folder: str | os.PathLike, identity: dict):
        self.folder = Path(folder)
        self.identity = json.loads(json.dumps(identity, sort_keys=True))

    def _row(self, epoch: int) -> Path:
        return self.folder / f"row_{int(epoch):04d}.pt"

    def write_init(self, row: torch.Tensor) -> None:
        """Save the initialization (row 0); called before the first epoch of a fresh start."""
        atomic_write(self._row(0), lambda tmp: torch.save(row.detach().to("cpu", torch.float32).clone(), tmp))

    def write_epoch(self, epoch: int, row: torch.Tensor, test_acc: list[float], model: dict, optimizer: dict,
                    rng: dict[str, torch.Tensor]) -> None:
        """Save finished epoch ``epoch`` (1-based): its row, then the state that counts it."""
        atomic_write(self._row(epoch), lambda tmp: torch.save(row.detach().to("cpu", torch.float32).clone(), tmp))
        state = {"format": PARTIAL_FORMAT, "identity": json.dumps(self.identity, sort_keys=True),
                 "epoch": int(epoch), "test_acc": [float(a) for a in test_acc], "model": model,
                 "optimizer": optimizer, "rng": rng}
        atomic_write(self.folder / "state.pt", lambda tmp: torch.save(state, tmp))

    def read(self) -> dict | None:
        """The saved state plus ``"trajectory"`` float32 ``[epoch + 1, P]``, or ``None`` when there is
        nothing to resume from (no folder, no ``state.pt``; another identity, an unreadable file or a
        missing row are reported with a warning naming the folder)."""
        path = self.folder / "state.pt"
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("format") != PARTIAL_FORMAT:
                raise ValueError(f"format {state.get('format')!r}, expected {PARTIAL_FORMAT!r}")
            if json.loads(state["identity"]) != self.identity:
                warnings.warn(f"partial expert {self.folder} was saved for {state['identity']}, this task trains "
                              f"{json.dumps(self.identity, sort_keys=True)}; starting from epoch 0", stacklevel=2)
                return None
            rows = [torch.load(self._row(e), map_location="cpu", weights_only=True) for e in range(state["epoch"] + 1)]
        except Exception as e:  # noqa: BLE001 - a torn or foreign file: retrain rather than fail
            warnings.warn(f"partial expert {self.folder} cannot be resumed ({type(e).__name__}: {e}); "
                          "starting from epoch 0", stacklevel=2)
            return None
        state["trajectory"] = torch.stack(rows)
        return state

    def clear(self) -> None:
        """Remove the folder (nothing to resume)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def reference_expert_id(store, requested: int | None = None) -> int:
    """The held-out reference trajectory τ_o: ``requested``, or the highest expert id in the store.

    Raises:
        ConfigError: ``requested`` is not in the store, or the store has fewer than 2 experts (τ_o must
            leave at least one trajectory to distill from).
    """
    ids = list(store.expert_ids)
    if len(ids) < 2:
        raise ConfigError(f"distill.reference_expert: the expert store has {len(ids)} expert(s) {ids}; holding "
                          "one out as τ_o needs at least 2 (raise experts.num_experts)")
    if requested is None:
        return max(ids)
    if requested not in ids:
        raise ConfigError(f"distill.reference_expert={requested}: not in the expert store (saved: {ids})")
    return int(requested)
