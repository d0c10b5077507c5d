"""Expert trajectories: training one expert, plain PyTorch (sample order, batch loading, curriculum).

An *expert* is a network trained on the real (preprocessed) training set; its *trajectory* is the flat
parameter vector (:func:`contra_ray.models.flat_params`, float32 ``[P]``) at initialization and after every
epoch, ``[epochs + 1, P]`` (paper Sec. 3; MTT ``buffer.py``). Distillation samples segments
``(θ*_t, θ*_{t+M})`` of these trajectories (paper Eq. 1, 8).

Pieces, from the inside out:

* **Sample order** (:class:`SampleOrder`): which training samples an epoch visits, in which order.
  :class:`ShuffledOrder` is the usual reshuffle; :class:`CurriculumOrder` is the easy-to-hard curriculum of
  paper App. B with pacing ``h(e)`` (Eq. 12), ranked by :func:`difficulty_from_first_correct`.
* **Batch loader** (:class:`BatchLoader`): turns an epoch's indices into ``(x, y)`` batches.
  :class:`TensorBatchLoader` serves in-memory tensors, :class:`StreamingBatchLoader` a lazy on-disk view
  (ImageNet-scale sets); the FFCV loader (:class:`contra_ray.data.ffcv_beton.FFCVBatchLoader`) plugs in at the
  same seam.
* :func:`train_expert`: plain PyTorch, one expert, deterministic for a given seed, resumable after
  every finished epoch (``resume_dir``, :class:`contra_ray.experts.store.PartialExpert`).

Plain PyTorch, no Ray. The files are :mod:`contra_ray.experts.store`'s; many experts in parallel as Ray
tasks is :func:`contra_ray.experts.remote.train_experts`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from contra_ray.config import ExpertConfig
from contra_ray.data.loaders import BatchLoader, StreamingBatchLoader, TensorBatchLoader
from contra_ray.experts.curriculum import CurriculumOrder, SampleOrder, ShuffledOrder
from contra_ray.experts.store import PartialExpert
from contra_ray.models import ModelSpec, build_model, flat_params, load_flat_params

__all__ = ["EpochStats", "first_correct_epoch", "train_expert"]

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

# ---------------------------------------------------------------------------------------------- sample order


# ---------------------------------------------------------------------------------------------- batch loader


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


def _order_identity(order) -> dict:
    """What the resume check compares about a sample order (kind, size, curriculum parameters and ranks)."""
    if isinstance(order, CurriculumOrder):
        digest = hashlib.sha256(order.easiest_first.numpy().tobytes()).hexdigest()[:16]
        return {"kind": "curriculum", "n": order.n, "lambda": order.lam, "gamma": order.gamma, "ranks": digest}
    if isinstance(order, ShuffledOrder):
        return {"kind": "shuffled", "n": order.n}
    return {"kind": type(order).__qualname__}


def _rng_states(order_gen: torch.Generator, aug_gen: torch.Generator, device: torch.device) -> dict:
    rng = {"order": order_gen.get_state(), "augment": aug_gen.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _set_rng_states(rng: dict, order_gen: torch.Generator, aug_gen: torch.Generator, device: torch.device) -> None:
    order_gen.set_state(rng["order"])
    aug_gen.set_state(rng["augment"])
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


def train_expert(expert_id: int, seed: int, train_x: torch.Tensor | None, train_y: torch.Tensor | None,
                 test_x: torch.Tensor, test_y: torch.Tensor, spec: ModelSpec, cfg: ExpertConfig,
                 order: SampleOrder | None = None, augment: Augment | None = None,
                 device: str | torch.device = "cpu", threads: int = 0,
                 progress: Callable[[EpochStats], None] | None = None,
                 loader: BatchLoader | None = None,
                 resume_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, list[float]]:
    """Train one expert on real data and record its parameter trajectory (paper Sec. 3; MTT ``buffer.py``).

    ``torch.manual_seed(seed)`` then :func:`build_model` (so row 0 is reproducible), SGD with
    ``cfg.lr``/``cfg.momentum``/``cfg.weight_decay``, mean cross-entropy, batches of ``cfg.batch_size`` in
    the order given by ``order``; if ``cfg.dsa`` and ``augment`` is given, every real batch goes through
    ``augment(x, generator)`` (differentiable siamese augmentation, e.g. ``contra_ray.augment.DSA()``).
    Sample order and augmentation draw from their own generators seeded from ``seed``, so the result is
    deterministic for a given seed on CPU.

    With ``resume_dir`` every finished epoch is saved there (:class:`contra_ray.experts.store.PartialExpert`:
    parameters so far, optimizer momentum, the RNG states of the order and augmentation generators and of
    torch's global RNG, test accuracies) *before* ``progress`` hears of it, and a call that finds a saved
    state of the same expert (same id, seed, model, recipe, sample count and order) continues after its
    last saved epoch: the trajectory is ``torch.equal`` to an uninterrupted run's (on CPU). The folder is
    left in place (the caller removes it once the expert is stored, :meth:`ExpertStore.add` does).

    Args:
        expert_id: only used in progress reports and the resume identity.
        seed: RNG seed of this expert.
        train_x: float32 ``[N, C, H, W]``, already preprocessed (ZCA etc.), or a lazy
            :class:`contra_ray.data.PreprocessedImages` view (streamed from disk batch by batch);
            train_y: int64 ``[N]``. May be ``None`` when ``loader`` is given.
        test_x: float32 ``[N_test, C, H, W]`` preprocessed (or a lazy view); test_y: int64 ``[N_test]``.
        spec: the network to train.
        cfg: the ``experts`` config section (lr, momentum, weight_decay, batch_size, epochs, dsa, eval_every).
        order: sample order; ``None`` = :class:`ShuffledOrder` over all N samples.
        augment: ``(x float32 [B,C,H,W], generator) -> x`` applied to each training batch if ``cfg.dsa``.
            The generator lives on ``device``.
        device: training device, e.g. ``"cpu"`` or ``"cuda"``.
        threads: ``torch.set_num_threads`` for this process if > 0 (process-wide).
        progress: called with an :class:`EpochStats` after every epoch (after it is saved to ``resume_dir``).
        loader: batch source; ``None`` = :class:`TensorBatchLoader` over ``train_x``/``train_y``
            (:class:`StreamingBatchLoader` when ``train_x`` is a lazy view).
        resume_dir: folder of this expert's finished epochs (``ExpertStore.partial_dir(expert_id)``), or
            ``None`` (nothing saved, nothing resumed).

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
        loader = (TensorBatchLoader(train_x, train_y, cfg.batch_size, device) if isinstance(train_x, torch.Tensor)
                  else StreamingBatchLoader(train_x, train_y, cfg.batch_size, device))
    if order is None:
        order = ShuffledOrder(len(loader))
    device = torch.device(device)

    torch.manual_seed(seed)
    model = build_model(spec).to(device)
    seeds = torch.randint(0, 2**62, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
    order_gen = torch.Generator().manual_seed(seeds[0])
    aug_gen = torch.Generator(device=device).manual_seed(seeds[1])
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    use_aug = bool(cfg.dsa) and augment is not None

    trajectory = [flat_params(model).float().cpu()]
    test_acc: list[float] = []
    partial = None
    if resume_dir is not None:
        identity = {"expert_id": int(expert_id), "seed": int(seed), "model_spec": spec.to_dict(),
                    "recipe": {f: getattr(cfg, f) for f in ("lr", "momentum", "weight_decay", "batch_size", "dsa")},
                    "augment": use_aug, "samples": len(loader), "order": _order_identity(order),
                    "pixels": loader.identity() if hasattr(loader, "identity") else "memory"}
        partial = PartialExpert(resume_dir, identity)
        saved = partial.read()
        if saved is not None:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            _set_rng_states(saved["rng"], order_gen, aug_gen, device)
            trajectory = list(saved["trajectory"][: cfg.epochs + 1])
            test_acc = list(saved["test_acc"][: cfg.epochs])
            print(f"expert {expert_id:04d}: resuming after epoch {saved['epoch']}/{cfg.epochs} from {resume_dir}",
                  flush=True)
        else:
            partial.write_init(trajectory[0])
    for epoch in range(len(test_acc), cfg.epochs):
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
        if partial is not None:  # saved before anyone hears of the epoch: a kill after this loses nothing
            partial.write_epoch(done, trajectory[-1], test_acc, model.state_dict(), opt.state_dict(),
                                _rng_states(order_gen, aug_gen, device))
        if progress is not None:
            progress(EpochStats(expert_id, done, cfg.epochs, (loss_sum / max(seen, 1)).item(),
                                correct.item() / max(seen, 1), test_acc[-1], time.perf_counter() - t0))
    return torch.stack(trajectory), test_acc


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
