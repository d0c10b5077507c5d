"""Expert trajectories: training (one process or many Ray tasks) and the on-disk expert store.

An *expert* is a network trained on the real (preprocessed) training set; its *trajectory* is the flat
parameter vector (:func:`contra_ray.models.flat_params`, float32 ``[P]``) at initialization and after every
epoch, ``[epochs + 1, P]`` (paper Sec. 3; MTT ``buffer.py``). Distillation samples segments
``(θ*_t, θ*_{t+M})`` of these trajectories (paper Eq. 1, 8).

Pieces, from the inside out:

* **Sample order** (:class:`SampleOrder`): which training samples an epoch visits, in which order.
  :class:`ShuffledOrder` is the usual reshuffle; :class:`CurriculumOrder` is the easy-to-hard curriculum of
  paper App. B with pacing ``h(e)`` (Eq. 12), ranked by :func:`difficulty_from_first_correct`.
* **Batch loader** (:class:`BatchLoader`): turns an epoch's indices into ``(x, y)`` batches.
  :class:`TensorBatchLoader` serves in-memory tensors; a faster loader (FFCV) plugs in at the same seam.
* :func:`train_expert`: plain PyTorch, one expert, deterministic for a given seed.
* :class:`ExpertStore`: one directory of ``expert_XXXX.safetensors`` files, an ``index.parquet``, the
  store-level ``store.json`` and the ``preprocessor.safetensors`` (ZCA statistics travel with the experts).
  Parameters are read lazily, one epoch row at a time.
* :func:`train_experts`: many experts in parallel as Ray tasks, written to the store as each finishes;
  resumable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save as safetensors_bytes

from .fileio import sha256_file
from .config import Config, ExpertConfig
from .models import ModelSpec, build_model, flat_params, load_flat_params

__all__ = [
    "SampleOrder",
    "ShuffledOrder",
    "CurriculumOrder",
    "difficulty_from_first_correct",
    "first_correct_epoch",
    "BatchLoader",
    "TensorBatchLoader",
    "EpochStats",
    "train_expert",
    "ExpertStoreError",
    "ExpertStore",
    "make_store_meta",
    "train_experts",
]

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

# ---------------------------------------------------------------------------------------------- sample order


@runtime_checkable
class SampleOrder(Protocol):
    """Which training samples an epoch visits, in visiting order (paper App. B)."""

    def epoch_indices(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        """Indices into the train set, int64 ``[n_e]``, for epoch ``epoch`` (0-based).

        ``generator`` (CPU) is the only source of randomness, so a seeded generator gives a reproducible
        order; it is advanced, so consecutive epochs differ.
        """
        ...


class ShuffledOrder:
    """All ``n`` training indices, reshuffled every epoch (``torch.randperm``; MTT's ``shuffle=True``).

    Raises:
        ValueError: ``n < 1``.
    """

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"ShuffledOrder needs at least one sample, got n={n}")
        self.n = int(n)

    def epoch_indices(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        """A random permutation of ``0..n-1``, int64 ``[n]``."""
        return torch.randperm(self.n, generator=generator)


class CurriculumOrder:
    """Easy-to-hard curriculum (paper App. B, Eq. 12).

    Epoch ``e`` (0-based) visits the ``ceil(h(e) * N)`` easiest samples, shuffled, with the linear pacing
    function ``h(e) = min(1, λ + (1 - λ) e / γ)``: a fraction ``λ`` of the data at epoch 0, all of it from
    epoch ``γ`` on.

    Args:
        difficulty_rank: int64 ``[N]``, a permutation of ``0..N-1``; ``difficulty_rank[i]`` is the rank of
            sample ``i`` (0 = easiest), e.g. from :func:`difficulty_from_first_correct`.
        lam: λ, initial fraction of the training set, in (0, 1] (``experts.curriculum_lambda``).
        gamma: γ >= 1, epoch from which the whole set is used (``experts.curriculum_gamma``).

    Raises:
        ValueError: ``difficulty_rank`` is not a permutation of ``0..N-1``, or ``lam``/``gamma`` out of range.
    """

    def __init__(self, difficulty_rank: torch.Tensor, lam: float, gamma: int):
        rank = torch.as_tensor(difficulty_rank).long().flatten()
        n = rank.numel()
        if n < 1 or not torch.equal(torch.sort(rank).values, torch.arange(n)):
            raise ValueError(f"difficulty_rank must be a permutation of 0..N-1 (N={n})")
        if not 0 < lam <= 1:
            raise ValueError(f"experts.curriculum_lambda={lam!r}: λ must be in (0, 1]")
        if gamma < 1:
            raise ValueError(f"experts.curriculum_gamma={gamma!r}: γ must be >= 1")
        self.lam, self.gamma, self.n = float(lam), int(gamma), n
        self.easiest_first = torch.argsort(rank)  # sample indices sorted from easiest to hardest

    def pacing(self, epoch: int) -> float:
        """h(e), the fraction of the ordered train set used in epoch ``epoch`` (Eq. 12)."""
        return min(1.0, self.lam + (1.0 - self.lam) * epoch / self.gamma)

    def size(self, epoch: int) -> int:
        """``ceil(h(e) * N)``, the number of samples visited in epoch ``epoch`` (rounded to 1e-6 first, so
        float error in ``h`` cannot add a sample)."""
        return min(self.n, max(1, math.ceil(round(self.pacing(epoch) * self.n, 6))))

    def epoch_indices(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        """The ``size(epoch)`` easiest sample indices in random order, int64 ``[size(epoch)]``."""
        chosen = self.easiest_first[: self.size(epoch)]
        return chosen[torch.randperm(chosen.numel(), generator=generator)]


def difficulty_from_first_correct(first_correct_epoch: torch.Tensor) -> torch.Tensor:
    """Difficulty rank of each sample from the epoch it was first classified correctly (paper App. B).

    Samples classified correctly earlier are easier; ties are broken by sample index (lower = easier).

    Args:
        first_correct_epoch: int ``[N]``, per sample the first epoch at which the model classified it
            correctly; samples never classified correctly must carry a value larger than any epoch (as
            :func:`first_correct_epoch` does).

    Returns:
        int64 ``[N]``, a permutation of ``0..N-1``: ``rank[i]`` = difficulty rank of sample ``i``, 0 = easiest.

    Raises:
        ValueError: not one-dimensional, or negative entries.
    """
    fc = torch.as_tensor(first_correct_epoch).long()
    if fc.dim() != 1:
        raise ValueError(f"first_correct_epoch must be 1-D [N], got shape {tuple(fc.shape)}")
    if fc.numel() and int(fc.min()) < 0:
        raise ValueError(f"first_correct_epoch has a negative entry ({int(fc.min())}); mark never-correct "
                         "samples with a value larger than any epoch instead")
    order = torch.sort(fc, stable=True).indices  # stable: ties keep index order
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return rank


@torch.no_grad()
def first_correct_epoch(spec: ModelSpec, trajectory: Iterable[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                        device: str | torch.device = "cpu", batch_size: int = 1000) -> torch.Tensor:
    """Per sample, the first trajectory row whose network classifies it correctly (input to App. B ranking).

    Args:
        spec: the expert's model.
        trajectory: flat parameter vectors float32 ``[P]`` in epoch order (rows of a trajectory, or
            ``store.params(i, e) for e in range(store.epochs + 1)``).
        x: float32 ``[N, C, H, W]`` preprocessed train images; y: int64 ``[N]`` labels.
        device: where to evaluate; batch_size: evaluation batch size.

    Returns:
        int64 ``[N]``: the row index ``e`` of the first correct prediction; ``len(trajectory)`` for samples
        never classified correctly.
    """
    model = build_model(spec).to(device).eval()
    first = torch.full((len(y),), -1, dtype=torch.long)
    rows = 0
    for e, flat in enumerate(trajectory):
        load_flat_params(model, flat.to(device))
        correct = _predict(model, x, device, batch_size).eq(y.cpu())
        first[(first < 0) & correct] = e
        rows = e + 1
    first[first < 0] = rows
    return first


# ---------------------------------------------------------------------------------------------- batch loader


@runtime_checkable
class BatchLoader(Protocol):
    """Turns an epoch's sample indices into training batches (the seam for faster loaders, e.g. FFCV)."""

    def __len__(self) -> int:
        """N, the number of training samples the indices refer to."""
        ...

    def batches(self, indices: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x float32 [B, C, H, W], y int64 [B])`` on the training device, visiting ``indices``
        (int64 ``[n]``) in order; the last batch may be smaller."""
        ...


class TensorBatchLoader:
    """:class:`BatchLoader` over in-memory tensors, moved to ``device`` once.

    Args:
        x: float32 ``[N, C, H, W]`` preprocessed images; y: int64 ``[N]`` labels.
        batch_size: samples per batch (last batch of an epoch may be smaller, as MTT's ``DataLoader``).
        device: training device.

    Raises:
        ValueError: ``x`` and ``y`` lengths differ, or ``batch_size < 1``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: str | torch.device = "cpu"):
        if len(x) != len(y):
            raise ValueError(f"train images and labels differ in length: {len(x)} vs {len(y)}")
        if batch_size < 1:
            raise ValueError(f"experts.batch_size={batch_size}: must be >= 1")
        self.x, self.y = x.to(device), y.to(device=device, dtype=torch.long)
        self.batch_size = int(batch_size)

    def __len__(self) -> int:
        """N, the number of training samples."""
        return len(self.x)

    def batches(self, indices: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = indices.to(self.x.device)
        for chunk in indices.split(self.batch_size):
            yield self.x[chunk], self.y[chunk]


# ---------------------------------------------------------------------------------------------- training


@dataclasses.dataclass
class EpochStats:
    """What :func:`train_expert` reports to ``progress`` after each epoch.

    ``epoch`` is 1-based (the trajectory row just written); losses are mean cross-entropy in nats over the
    epoch's batches; accuracies are fractions in [0, 1]; ``test_acc`` is NaN on epochs without evaluation.
    """

    expert_id: int
    epoch: int
    epochs: int
    train_loss: float
    train_acc: float
    test_acc: float
    seconds: float

    def line(self) -> str:
        """One human-readable progress line (what each Ray task prints per epoch)."""
        test = "   -  " if math.isnan(self.test_acc) else f"{self.test_acc:.4f}"
        return (f"expert {self.expert_id:04d} epoch {self.epoch:>3}/{self.epochs} loss {self.train_loss:.4f} "
                f"train_acc {self.train_acc:.4f} test_acc {test} ({self.seconds:.1f}s)")


@torch.no_grad()
def _predict(model: torch.nn.Module, x: torch.Tensor, device, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([model(xb.to(device)).argmax(1).cpu() for xb in x.split(batch_size)]) if len(x) else \
        torch.empty(0, dtype=torch.long)


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device) -> float:
    was_training = model.training
    model.eval()
    acc = _predict(model, x, device, 1000).eq(y.cpu()).float().mean().item() if len(y) else float("nan")
    model.train(was_training)
    return acc


def train_expert(expert_id: int, seed: int, train_x: torch.Tensor | None, train_y: torch.Tensor | None,
                 test_x: torch.Tensor, test_y: torch.Tensor, spec: ModelSpec, cfg: ExpertConfig,
                 order: SampleOrder | None = None, augment: Augment | None = None,
                 device: str | torch.device = "cpu", threads: int = 0,
                 progress: Callable[[EpochStats], None] | None = None,
                 loader: BatchLoader | None = None) -> tuple[torch.Tensor, list[float]]:
    """Train one expert on real data and record its parameter trajectory (paper Sec. 3; MTT ``buffer.py``).

    ``torch.manual_seed(seed)`` then :func:`build_model` (so row 0 is reproducible), SGD with
    ``cfg.lr``/``cfg.momentum``/``cfg.weight_decay``, mean cross-entropy, batches of ``cfg.batch_size`` in
    the order given by ``order``; if ``cfg.dsa`` and ``augment`` is given, every real batch goes through
    ``augment(x, generator)`` (differentiable siamese augmentation, e.g. ``contra_ray.augment.DSA()``).
    Sample order and augmentation draw from their own generators seeded from ``seed``, so the result is
    deterministic for a given seed on CPU.

    Args:
        expert_id: only used in progress reports.
        seed: RNG seed of this expert.
        train_x: float32 ``[N, C, H, W]``, already preprocessed (ZCA etc.); train_y: int64 ``[N]``.
            May be ``None`` when ``loader`` is given.
        test_x: float32 ``[N_test, C, H, W]`` preprocessed; test_y: int64 ``[N_test]``.
        spec: the network to train.
        cfg: the ``experts`` config section (lr, momentum, weight_decay, batch_size, epochs, dsa, eval_every).
        order: sample order; ``None`` = :class:`ShuffledOrder` over all N samples.
        augment: ``(x float32 [B,C,H,W], generator) -> x`` applied to each training batch if ``cfg.dsa``.
            The generator lives on ``device``.
        device: training device, e.g. ``"cpu"`` or ``"cuda"``.
        threads: ``torch.set_num_threads`` for this process if > 0 (process-wide).
        progress: called with an :class:`EpochStats` after every epoch.
        loader: batch source; ``None`` = :class:`TensorBatchLoader` over ``train_x``/``train_y``.

    Returns:
        ``(trajectory, test_acc)``: trajectory float32 ``[cfg.epochs + 1, P]`` on CPU (row 0 =
        initialization, row e = after epoch e); ``test_acc`` list of ``cfg.epochs`` floats in [0, 1],
        evaluated (batches of 1000, ``no_grad``, ``eval()`` mode) every ``cfg.eval_every`` epochs and always
        after the last, NaN on the others.

    Raises:
        ValueError: unknown model (from :func:`build_model`), mismatched data lengths, ``cfg.epochs < 1``.
    """
    if cfg.epochs < 1:
        raise ValueError(f"experts.epochs={cfg.epochs}: must be >= 1")
    if threads > 0:
        torch.set_num_threads(threads)
    if loader is None:
        if train_x is None or train_y is None:
            raise ValueError("train_expert needs train_x and train_y, or a loader")
        loader = TensorBatchLoader(train_x, train_y, cfg.batch_size, device)
    if order is None:
        order = ShuffledOrder(len(loader))

    torch.manual_seed(seed)
    model = build_model(spec).to(device)
    seeds = torch.randint(0, 2**62, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
    order_gen = torch.Generator().manual_seed(seeds[0])
    aug_gen = torch.Generator(device=device).manual_seed(seeds[1])
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    use_aug = bool(cfg.dsa) and augment is not None

    trajectory = [flat_params(model).float().cpu()]
    test_acc: list[float] = []
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for xb, yb in loader.batches(order.epoch_indices(epoch, order_gen)):
            if use_aug:
                xb = augment(xb, aug_gen)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(yb)
            correct += logits.detach().argmax(1).eq(yb).sum()
            seen += len(yb)
        trajectory.append(flat_params(model).float().cpu())
        done = epoch + 1
        evaluate = done == cfg.epochs or (cfg.eval_every > 0 and done % cfg.eval_every == 0)
        test_acc.append(_accuracy(model, test_x, test_y, device) if evaluate else float("nan"))
        if progress is not None:
            progress(EpochStats(expert_id, done, cfg.epochs, (loss_sum / max(seen, 1)).item(),
                                correct.item() / max(seen, 1), test_acc[-1], time.perf_counter() - t0))
    return torch.stack(trajectory), test_acc


# ---------------------------------------------------------------------------------------------- expert store

STORE_FORMAT = "contra_ray.expert_store/1"
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


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def make_store_meta(data: Any, preprocessor: Any) -> dict:
    """Store-level meta describing the data side of an expert store.

    Args:
        data: a ``contra_ray.data.ImageSet`` (uses ``dataset_id``, ``content_hash``, ``classes``).
        preprocessor: its ``contra_ray.data.Preprocessor`` (``zca``, ``zca_eps``, ``fingerprint()``).

    Returns:
        dict with ``dataset_id``, ``content_hash``, ``classes``, ``zca``, ``zca_eps``,
        ``preprocessor_fingerprint``; :func:`train_experts` adds ``model_spec``, ``epochs`` and the recipe.
    """
    return {"dataset_id": str(data.dataset_id), "content_hash": str(data.content_hash),
            "classes": [str(c) for c in data.classes], "zca": bool(preprocessor.zca),
            "zca_eps": float(preprocessor.zca_eps), "preprocessor_fingerprint": str(preprocessor.fingerprint())}


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
        _atomic_write(path / "preprocessor.safetensors", safetensors_bytes(state))
        store = cls(path, meta, {})
        store._write_index()
        # store.json last: its presence marks a complete store
        _atomic_write(path / "store.json", json.dumps(meta, indent=2, sort_keys=True).encode())
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
        _atomic_write(self.path / "index.parquet", sink.getvalue().to_pybytes())

    def file(self, expert_id: int) -> Path:
        """Path of the safetensors file of ``expert_id`` (whether or not it exists)."""
        return self.path / f"expert_{int(expert_id):04d}.safetensors"

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
        _atomic_write(self.file(expert_id), data)
        self._rows[expert_id] = row
        self._write_index()

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


# ---------------------------------------------------------------------------------------------- Ray fan-out

_RECIPE_FIELDS = ("lr", "momentum", "weight_decay", "batch_size", "dsa", "curriculum", "curriculum_lambda",
                  "curriculum_gamma")


def _recipe(cfg: ExpertConfig) -> dict:
    return {f: getattr(cfg, f) for f in _RECIPE_FIELDS}


def _refuse_incompatible(store: ExpertStore, wanted: dict) -> None:
    """Raise if an existing store's meta differs from what this run would write (resume safety)."""
    have = store.meta
    if "model_spec" in have and "model_spec" in wanted:  # stores written before ModelSpec gained fields
        have["model_spec"] = ModelSpec.from_dict(have["model_spec"]).to_dict()
        wanted = {**wanted, "model_spec": ModelSpec.from_dict(wanted["model_spec"]).to_dict()}
    names = {"model_spec": "model", "epochs": "experts.epochs", "dataset_id": "dataset_id",
             "content_hash": "content_hash", "zca": "data.zca", "zca_eps": "data.zca_eps",
             "preprocessor_fingerprint": "preprocessor fingerprint", "classes": "classes"}
    for key, field in names.items():
        if key in have and key in wanted and have[key] != wanted[key]:
            built = "for" if key in ("model_spec", "dataset_id", "classes") else "with"
            raise store._mismatch(field, have[key], wanted[key], built=built)
    for key, value in wanted.get("recipe", {}).items():
        if key in have.get("recipe", {}) and have["recipe"][key] != value:
            raise store._mismatch(f"experts.{key}", have["recipe"][key], value, built="with")


def _expert_task(expert_id: int, seed: int, data: tuple, spec: ModelSpec, cfg: ExpertConfig,
                 order: SampleOrder | None, augment_factory: Callable[[], Augment] | None, device: str,
                 threads: int) -> tuple[int, torch.Tensor, list[float]]:
    """Body of one Ray task: train one expert, print one line per epoch (forwarded to the driver)."""
    train_x, train_y, test_x, test_y = data
    augment = augment_factory() if (augment_factory is not None and cfg.dsa) else None
    traj, acc = train_expert(expert_id, seed, train_x, train_y, test_x, test_y, spec, cfg, order=order,
                             augment=augment, device=device, threads=threads,
                             progress=lambda s: print(s.line(), flush=True))
    return expert_id, traj, acc


def train_experts(cfg: Config, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                  test_y: torch.Tensor, spec: ModelSpec, store_meta: dict, preprocessor_state: dict[str, torch.Tensor],
                  augment_factory: Callable[[], Augment] | None = None,
                  order_factory: Callable[[int], SampleOrder] | None = None) -> ExpertStore:
    """Train ``cfg.experts.num_experts`` experts in parallel as Ray tasks into ``cfg.expert_store()``.

    Each expert ``i`` (ids ``0..num_experts-1``) is :func:`train_expert` with seed ``cfg.experts.seed + i``
    in a task with ``num_cpus=cfg.experts.cpus_per_expert``, ``num_gpus=cfg.experts.gpus_per_expert`` and
    ``max(1, int(num_cpus))`` torch threads, on ``cfg.device``. The data go through the object store once
    (one ``ray.put``). The driver saves each expert as soon as its task finishes (``ray.wait``), so a crash
    loses only the running experts; a rerun skips experts already saved whose checksum verifies (corrupt
    ones are retrained). Progress: a tqdm bar over experts in the driver, one line per epoch per task.

    Ray is started only if not initialized (``RAY_ADDRESS`` respected; locally
    ``ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True)``) and is left running.

    Args:
        cfg: validated config; uses ``experts.*``, ``device`` and ``expert_store()``.
        train_x: float32 ``[N, C, H, W]`` preprocessed; train_y: int64 ``[N]``; test_x/test_y likewise.
        spec: the expert network (``cfg.model_spec(...)``).
        store_meta: data-side meta, see :func:`make_store_meta`; ``model_spec``, ``epochs`` and ``recipe``
            (the ``experts`` training fields) are filled in here.
        preprocessor_state: ``Preprocessor.state_dict()``, saved with a new store.
        augment_factory: zero-argument callable returning the augmentation, called inside each task; if
            ``None`` and ``cfg.experts.dsa``, ``contra_ray.augment.DSA`` is used.
        order_factory: ``expert_id -> SampleOrder`` called in the driver (``None`` = :class:`ShuffledOrder`).
            Required when ``cfg.experts.curriculum`` (e.g. ``lambda i: CurriculumOrder(rank, λ, γ)``).

    Returns:
        The opened :class:`ExpertStore` with all experts.

    Raises:
        ExpertStoreError: the store exists with different model/data/epochs/recipe (names field and values).
        ValueError: ``experts.curriculum`` without ``order_factory``; a CUDA device with
            ``experts.gpus_per_expert=0``; more CPUs per expert than the local Ray cluster has.
        RuntimeError: some expert tasks failed (the others are saved first); chained to the first error.
    """
    import ray
    from tqdm.auto import tqdm

    x = cfg.experts
    if x.curriculum and order_factory is None:
        raise ValueError("experts.curriculum=True needs order_factory (expert_id -> CurriculumOrder built from "
                         "difficulty ranks, see difficulty_from_first_correct)")
    if str(cfg.device).startswith("cuda") and x.gpus_per_expert <= 0:
        raise ValueError(f"experts.gpus_per_expert={x.gpus_per_expert}: device={cfg.device!r} needs a GPU per "
                         "task (Ray hides GPUs from tasks that request none)")
    if x.dsa and augment_factory is None:
        from .augment import DSA  # noqa: PLC0415 - optional dependency of this path only

        augment_factory = DSA

    meta = dict(store_meta)
    meta.update(model_spec=spec.to_dict(), epochs=int(x.epochs), recipe=_recipe(x))
    path = cfg.expert_store()
    if (path / "store.json").exists():
        store = ExpertStore.open(path)
        _refuse_incompatible(store, json.loads(json.dumps(meta)))
    else:
        store = ExpertStore.create(path, meta, preprocessor_state)

    todo = []
    for i in range(x.num_experts):
        if i in store.expert_ids:
            if store.is_valid(i):
                continue
            warnings.warn(f"expert store {path}: expert {i} fails its checksum; retraining it")
        todo.append(i)
    if not todo:
        return store

    from .raycluster import ensure_ray

    started = ensure_ray()
    cpus = ray.cluster_resources().get("CPU", 0.0)
    if x.cpus_per_expert > cpus:
        msg = f"experts.cpus_per_expert={x.cpus_per_expert}: the Ray cluster has only {cpus} CPUs"
        if started:
            raise ValueError(msg)
        warnings.warn(msg + "; tasks wait for the autoscaler")
    threads = max(1, int(x.cpus_per_expert))
    task = ray.remote(_expert_task).options(num_cpus=x.cpus_per_expert, num_gpus=x.gpus_per_expert,
                                            max_retries=0)
    data_ref = ray.put((train_x.contiguous(), train_y.long(), test_x.contiguous(), test_y.long()))
    pending = {task.remote(i, x.seed + i, data_ref, spec, x, order_factory(i) if order_factory else None,
                           augment_factory, cfg.device, threads): i for i in todo}
    failures: list[tuple[int, BaseException]] = []
    bar = tqdm(total=x.num_experts, initial=x.num_experts - len(todo), desc="experts", unit="expert")
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            expert_id = pending.pop(ready[0])
            try:
                _, traj, acc = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - keep saving the others, report at the end
                failures.append((expert_id, e))
                bar.write(f"expert {expert_id:04d} failed: {type(e).__name__}: {e}")
                continue
            store.add(expert_id, x.seed + expert_id, traj, acc)
            bar.update(1)
            bar.set_postfix(last=expert_id, test_acc=f"{acc[-1]:.4f}")
    finally:
        for ref in pending:
            ray.cancel(ref)
        bar.close()
    if failures:
        raise RuntimeError(f"{len(failures)} expert task(s) failed (ids {[i for i, _ in failures]}); the others "
                           f"are saved in {path}; rerun to retry") from failures[0][1]
    return store
