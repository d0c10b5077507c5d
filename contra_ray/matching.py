"""The core of ConTra: student unrolls (Eq. 1), the normalized matching loss (Eq. 2) and the
concurrent loss (Eq. 8), with each iteration's plan a pure function of (run seed, iteration).

Plain PyTorch, no Ray: a plan says which expert, which segment starts, which mini-batch indices and
which augmentation seeds an iteration uses, so any number of workers can compute any subset of the
students of one iteration and agree without messages (Algorithm 1, lines 4-17). A later constant-memory
unroll can replay each step from the same plan.

Shapes: ``P`` = number of network parameters, ``n`` = synthetic images (IPC x C), ``b`` = synthetic
batch size, ``N`` = syn_steps, ``M`` = expert_epochs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .seeds import derive_seed

__all__ = [
    "Student",
    "SegmentPlan",
    "make_plan",
    "minibatch_sequence",
    "unroll",
    "matching_loss",
    "soft_cross_entropy",
    "accumulate_matching_gradients",
]

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (flat params [P], x [b,C,H,W]) -> logits
Augment = Callable[[torch.Tensor, int], torch.Tensor]  # (x, seed) -> augmented x (differentiable)
SegmentSource = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]  # (start, M) -> (θ*_t,0, θ*_t,M)


@dataclasses.dataclass(frozen=True)
class Student:
    """One segment to match: start epoch, weight in Eq. 8, and its role ('sampled' or 'concurrent')."""

    start: int
    weight: float
    role: str


@dataclasses.dataclass(frozen=True)
class SegmentPlan:
    """Everything one distillation iteration draws at random, as plain data.

    Attributes:
        iteration: the iteration this plan belongs to.
        expert_id: the expert trajectory τ* sampled for this iteration (Algorithm 1, line 4).
        students: the sampled segment first, then the K concurrent ones (Eq. 8 weights).
        batches: N index tensors (int64 ``[b]``) into the synthetic set, shared by all students
            (Algorithm 1, line 12).
        aug_seeds: N integer seeds, one per student step, for the DSA parameters of that step.
    """

    iteration: int
    expert_id: int
    students: tuple[Student, ...]
    batches: tuple[torch.Tensor, ...]
    aug_seeds: tuple[int, ...]

    @property
    def sampled_start(self) -> int:
        return self.students[0].start

    @property
    def concurrent_starts(self) -> list[int]:
        return [s.start for s in self.students[1:]]


def minibatch_sequence(n: int, b: int, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``steps`` index batches of size ``b`` over ``n`` synthetic images, epoch-wise without replacement
    (a fresh random permutation is cut into chunks whenever the previous one is used up; MTT
    ``distill.py``). Returns int64 ``[b]`` tensors; the last chunk of a permutation may be shorter.

    Raises:
        ValueError: ``b`` not in [1, n].
    """
    if not 1 <= b <= n:
        raise ValueError(f"distill.batch_syn={b}: must be in [1, {n}] (the synthetic set size)")
    out: list[torch.Tensor] = []
    chunks: list[torch.Tensor] = []
    while len(out) < steps:
        if not chunks:
            chunks = list(torch.randperm(n, generator=generator).split(b))
        out.append(chunks.pop(0))
    return out


def make_plan(seed: int, iteration: int, expert_ids: Sequence[int], n_syn: int, batch_syn: int,
              syn_steps: int, beta: float, K: int, R: int, min_start: int, max_start: int,
              fixed_start: int | None = None) -> SegmentPlan:
    """The plan of iteration ``iteration`` of a run seeded ``seed``: a pure function of its arguments.

    The sampled start lies in [T-, T+) (``min_start``, ``max_start``; MTT samples
    ``randint(0, max_start_epoch)``); concurrent starts are T- + iR, i = 0..K-1 (Eq. 8). Weights: β for
    the sampled segment, (1 - β)/K for each concurrent one; with K = 0 the sampled weight is 1 (MTT).
    ``fixed_start`` replaces the sampled start (the §4.2 correlation analysis matches one fixed epoch);
    everything else, batches and augmentation seeds included, is drawn exactly as without it.
    """
    rng = np.random.default_rng(derive_seed(seed, "plan", iteration))  # the "plan" stream (contra_ray.seeds)
    expert_id = int(expert_ids[int(rng.integers(len(expert_ids)))])
    sampled = int(rng.integers(min_start, max_start))
    if fixed_start is not None:
        sampled = int(fixed_start)
    students = [Student(sampled, 1.0 if K == 0 else float(beta), "sampled")]
    students += [Student(min_start + i * R, (1.0 - beta) / K, "concurrent") for i in range(K)]
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    batches = minibatch_sequence(n_syn, batch_syn, syn_steps, gen)
    aug_seeds = tuple(int(s) for s in rng.integers(0, 2**62, size=syn_steps))
    return SegmentPlan(iteration, expert_id, tuple(students), tuple(batches), aug_seeds)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -Σ_c targets_c log softmax(logits)_c; ``logits``, ``targets``: ``[b, C]``."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def unroll(forward: Forward, theta0: torch.Tensor, images: torch.Tensor, targets: torch.Tensor,
           syn_lr: torch.Tensor, batches: Sequence[torch.Tensor], augment: Augment | None = None,
           aug_seeds: Sequence[int] | None = None, differentiable: bool = True) -> torch.Tensor:
    """Student trajectory of Eq. 1: N SGD steps from ``theta0`` on mini-batches of the synthetic set.

    θ̂_{n+1} = θ̂_n - α ∇_θ ℓ(A(b_n); θ̂_n), θ̂_0 = θ*_{t,0}, with ℓ the soft-label cross-entropy.

    Args:
        forward: ``(theta [P], x [b,C,H,W]) -> logits [b,C]``.
        theta0: expert parameters at the segment start, ``[P]`` (not modified).
        images: synthetic images ``[n,C,H,W]`` (requires grad to learn them).
        targets: per-image target distributions ``[n,C]`` (softmax of learnable soft labels).
        syn_lr: scalar tensor α (requires grad to learn it).
        batches: N index tensors into ``images``.
        augment, aug_seeds: DSA applied to each batch with that step's seed (replayable).
        differentiable: False gives the same steps without the outer graph (each inner gradient
            with ``create_graph=False`` on detached data): memory of one step, for monitoring.
    Returns:
        θ̂_N, ``[P]``, differentiable w.r.t. images, targets and syn_lr (graph of all N steps) unless
        ``differentiable`` is False (then detached).
    """
    if not differentiable:
        images, targets = images.detach(), targets.detach()
        syn_lr = syn_lr.detach() if isinstance(syn_lr, torch.Tensor) else syn_lr
    theta = theta0.detach().clone().requires_grad_(True)
    for n, idx in enumerate(batches):
        x = images[idx]
        if augment is not None:
            x = augment(x, aug_seeds[n])
        ce = soft_cross_entropy(forward(theta, x), targets[idx])
        (grad,) = torch.autograd.grad(ce, theta, create_graph=differentiable)
        theta = theta - syn_lr * grad
        if not differentiable:
            theta = theta.detach().requires_grad_(True)
    return theta if differentiable else theta.detach()


def matching_loss(theta_n: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Normalized parameter matching loss, Eq. 2: ||θ̂_{t,N} - θ*_{t,M}||² / ||θ*_{t,0} - θ*_{t,M}||².

    All arguments ``[P]``; returns a scalar. Raises ZeroDivisionError-free: a zero denominator gives inf.
    """
    return (theta_n - target).pow(2).sum() / (start - target).pow(2).sum()


def accumulate_matching_gradients(plan: SegmentPlan, segment: SegmentSource, forward: Forward,
                                  images: torch.Tensor, label_logits: torch.Tensor, syn_lr: torch.Tensor,
                                  expert_epochs: int, augment: Augment | None = None,
                                  students: Sequence[int] | None = None,
                                  skip_zero_weight: bool = True) -> dict[int, float]:
    """Backpropagate the concurrent loss of Eq. 8, one student at a time, into ``.grad`` of
    ``images``, ``label_logits`` and ``syn_lr`` (gradients accumulate; zero them before).

    L = β L_sampled + Σ_i (1-β)/K L_{T- + iR}. Each student's weighted term is backpropagated on its
    own right after its unroll, so peak memory is that of one N-step unroll, not K+1. The gradient is
    the same as that of the summed loss (linearity of differentiation).

    Args:
        plan: this iteration's :class:`SegmentPlan`.
        segment: ``(start, M) -> (θ*_{start}, θ*_{start+M})`` for the plan's expert, float ``[P]`` each.
        students: indices into ``plan.students`` to compute (a worker's share); default all.
        skip_zero_weight: do not unroll students whose weight is 0 (e.g. the sampled one at β = 0).
    Returns:
        ``{student index: unweighted Eq. 2 loss}`` for the students computed.
    """
    losses: dict[int, float] = {}
    chosen = range(len(plan.students)) if students is None else students
    for k in chosen:
        st = plan.students[k]
        if skip_zero_weight and st.weight == 0.0:
            continue
        start_params, target_params = segment(st.start, expert_epochs)
        start_params = start_params.to(images.dtype)
        target_params = target_params.to(images.dtype)
        targets = torch.softmax(label_logits, dim=1)  # rebuilt per student: each backward frees its graph
        theta_n = unroll(forward, start_params, images, targets, syn_lr, plan.batches, augment, plan.aug_seeds)
        loss = matching_loss(theta_n, start_params, target_params)
        (st.weight * loss).backward()
        losses[k] = float(loss.detach())
    return losses
