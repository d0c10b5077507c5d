"""The core of ConTra: student unrolls (Eq. 1), the normalized matching loss (Eq. 2) and the
concurrent loss (Eq. 8), with each iteration's plan a pure function of (run seed, iteration).

Plain PyTorch, no Ray: a plan says which expert, which segment starts, which mini-batch indices and
which augmentation seeds an iteration uses, so any number of workers can compute any subset of the
students of one iteration and agree without messages (Algorithm 1, lines 4-17). The constant-memory
unroll replays each step from the same plan (same mini-batch, same augmentation seed).

Two switches of :func:`accumulate_matching_gradients`, both giving the same gradients:

* ``unroll_memory``: ``"full"`` keeps the graph of all N steps (memory ~ N steps); ``"constant"`` keeps
  only θ̂_0..θ̂_N and walks the steps backwards with one vector-Jacobian product each (memory ~ one
  step + (N+1) P numbers; :func:`constant_memory_gradients`, docs/constant_memory.md).
* ``student_execution``: ``"sequential"`` unrolls one student after another; ``"batched"`` unrolls the
  students of a call together, parameters stacked ``[S, P]`` and the forward ``torch.func.vmap``-ed
  over them, one wide call per step (they share the mini-batch and its augmentation, Algorithm 1).

Shapes: ``P`` = number of network parameters, ``n`` = synthetic images (IPC x C), ``b`` = synthetic
batch size, ``N`` = syn_steps, ``M`` = expert_epochs, ``S`` = students unrolled together.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from contra_ray.common.seeds import derive_seed

__all__ = [
    "Student",
    "SegmentPlan",
    "make_plan",
    "minibatch_sequence",
    "UNROLL_MEMORY_MODES",
    "STUDENT_EXECUTIONS",
    "step_gradient",
    "unroll",
    "student_trajectory",
    "matching_loss",
    "constant_memory_gradients",
    "soft_cross_entropy",
    "accumulate_matching_gradients",
]

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (flat params [P], x [b,C,H,W]) -> logits
Augment = Callable[[torch.Tensor, int], torch.Tensor]  # (x, seed) -> augmented x (differentiable)
SegmentSource = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]  # (start, M) -> (θ*_t,0, θ*_t,M)

UNROLL_MEMORY_MODES = ("full", "constant")  # "auto" is resolved before, by contra_ray.distill.memory
STUDENT_EXECUTIONS = ("sequential", "batched")


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
    rng = np.random.default_rng(derive_seed(seed, "plan", iteration))  # the "plan" stream (contra_ray.common.seeds)
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


def step_gradient(forward: Forward, theta: torch.Tensor, x: torch.Tensor, targets: torch.Tensor,
                  create_graph: bool) -> torch.Tensor:
    """g = ∇_θ ℓ(x; θ), the gradient of one student step of Eq. 1 (ℓ the soft-label cross-entropy).

    ``theta`` ``[P]``: one student. ``theta`` ``[S, P]``: S students on the same (already augmented) batch
    ``x`` ``[b,C,H,W]``, the forward ``torch.func.vmap``-ed over the rows of ``theta`` (one wide call);
    ∇ of Σ_s ℓ_s w.r.t. the stack is each student's own gradient, since ℓ_s depends on row s only.
    ``targets``: ``[b, C]``. Returns a tensor shaped like ``theta`` (a graph with ``create_graph``).
    """
    if theta.dim() == 1:
        ce = soft_cross_entropy(forward(theta, x), targets)
    else:
        logits = torch.func.vmap(forward, in_dims=(0, None))(theta, x)  # [S, b, C]
        ce = -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean(dim=-1).sum()
    (grad,) = torch.autograd.grad(ce, theta, create_graph=create_graph)
    return grad


def _minibatch(images: torch.Tensor, idx: torch.Tensor, augment: Augment | None,
               aug_seeds: Sequence[int] | None, n: int) -> torch.Tensor:
    """A(b_n): step ``n``'s mini-batch, augmented with step ``n``'s seed (replays exactly)."""
    x = images[idx]
    return x if augment is None else augment(x, aug_seeds[n])


def unroll(forward: Forward, theta0: torch.Tensor, images: torch.Tensor, targets: torch.Tensor,
           syn_lr: torch.Tensor, batches: Sequence[torch.Tensor], augment: Augment | None = None,
           aug_seeds: Sequence[int] | None = None, differentiable: bool = True) -> torch.Tensor:
    """Student trajectory of Eq. 1: N SGD steps from ``theta0`` on mini-batches of the synthetic set.

    θ̂_{n+1} = θ̂_n - α ∇_θ ℓ(A(b_n); θ̂_n), θ̂_0 = θ*_{t,0}, with ℓ the soft-label cross-entropy.

    Args:
        forward: ``(theta [P], x [b,C,H,W]) -> logits [b,C]``.
        theta0: expert parameters at the segment start, ``[P]``, or ``[S, P]`` for S students unrolled
            together on the same mini-batches (:func:`step_gradient`); not modified.
        images: synthetic images ``[n,C,H,W]`` (requires grad to learn them).
        targets: per-image target distributions ``[n,C]`` (softmax of learnable soft labels).
        syn_lr: scalar tensor α (requires grad to learn it).
        batches: N index tensors into ``images``.
        augment, aug_seeds: DSA applied to each batch with that step's seed (replayable).
        differentiable: False gives the same steps without the outer graph (each inner gradient
            with ``create_graph=False`` on detached data): memory of one step, for monitoring.
    Returns:
        θ̂_N, shaped like ``theta0``, differentiable w.r.t. images, targets and syn_lr (graph of all N steps) unless
        ``differentiable`` is False (then detached).
    """
    if not differentiable:
        images, targets = images.detach(), targets.detach()
        syn_lr = syn_lr.detach() if isinstance(syn_lr, torch.Tensor) else syn_lr
    theta = theta0.detach().clone().requires_grad_(True)
    for n, idx in enumerate(batches):
        x = _minibatch(images, idx, augment, aug_seeds, n)
        grad = step_gradient(forward, theta, x, targets[idx], create_graph=differentiable)
        theta = theta - syn_lr * grad
        if not differentiable:
            theta = theta.detach().requires_grad_(True)
    return theta if differentiable else theta.detach()


def student_trajectory(forward: Forward, theta0: torch.Tensor, images: torch.Tensor, targets: torch.Tensor,
                       syn_lr: torch.Tensor, batches: Sequence[torch.Tensor], augment: Augment | None = None,
                       aug_seeds: Sequence[int] | None = None) -> torch.Tensor:
    """θ̂_0..θ̂_N of Eq. 1 as plain numbers: ``[N+1, P]`` (or ``[N+1, S, P]`` for ``theta0`` ``[S, P]``).

    The same steps as :func:`unroll`, each gradient taken without graph on detached data, so memory is
    one step's plus the (N+1) stored parameter vectors (the checkpoints of the constant-memory walk).
    """
    images, targets = images.detach(), targets.detach()
    lr = syn_lr.detach() if isinstance(syn_lr, torch.Tensor) else syn_lr
    thetas = theta0.new_empty((len(batches) + 1, *theta0.shape))
    thetas[0] = theta0.detach()
    for n, idx in enumerate(batches):
        theta = thetas[n].clone().requires_grad_(True)
        grad = step_gradient(forward, theta, _minibatch(images, idx, augment, aug_seeds, n), targets[idx],
                             create_graph=False)
        thetas[n + 1] = thetas[n] - lr * grad
    return thetas


def matching_loss(theta_n: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Normalized parameter matching loss, Eq. 2: ||θ̂_{t,N} - θ*_{t,M}||² / ||θ*_{t,0} - θ*_{t,M}||².

    All arguments ``[P]`` (returns a scalar) or ``[S, P]`` (returns ``[S]``, one loss per student).
    Raises ZeroDivisionError-free: a zero denominator gives inf.
    """
    return (theta_n - target).pow(2).sum(-1) / (start - target).pow(2).sum(-1)


def constant_memory_gradients(forward: Forward, start: torch.Tensor, target: torch.Tensor,
                              weight: float | torch.Tensor, images: torch.Tensor, label_logits: torch.Tensor,
                              syn_lr: torch.Tensor, batches: Sequence[torch.Tensor],
                              augment: Augment | None = None,
                              aug_seeds: Sequence[int] | None = None) -> torch.Tensor:
    """Accumulate the exact gradient of ``weight · L`` (Eq. 2 after the N steps of Eq. 1) into ``.grad`` of
    ``images``, ``label_logits`` and ``syn_lr``, in memory of one step + (N+1) parameter vectors.

    Forward: θ̂_0..θ̂_N without graph (:func:`student_trajectory`). Backward, with the adjoint
    a_n = ∂L/∂θ̂_n, a_N from Eq. 2, and θ̂_{n+1} = θ̂_n - α g_n (Eq. 1), for n = N-1..0:
    recompute g_n = ∇_θ ℓ(A(x[b_n]); θ̂_n) with graph (same batch, same augmentation seed), then ONE
    vector-Jacobian product of s_n = ⟨-α a_{n+1}, g_n⟩ (α, a_{n+1} constants) w.r.t. (θ̂_n, x[b_n],
    label_logits[b_n]) gives ∂L/∂x[b_n] and ∂L/∂label_logits[b_n] of this step and -α H_n a_{n+1}, so
    a_n = a_{n+1} - α H_n a_{n+1}; and ∂L/∂α += -⟨a_{n+1}, g_n⟩. This is the full-unroll gradient,
    cross-step terms included (docs/constant_memory.md), at about one extra forward+backward per step.

    Args:
        start, target: θ*_{t,0} and θ*_{t,M}, ``[P]``, or ``[S, P]`` for S students unrolled together.
        weight: the student's Eq. 8 weight (float), or ``[S]`` weights.
        images, label_logits, syn_lr: the learnable tensors (``.grad`` accumulates where they require grad).
        Others as :func:`unroll`; ``augment`` must be a pure function of ``(x, seed)``.
    Returns:
        The unweighted Eq. 2 loss, a scalar or ``[S]`` (detached).
    """
    with torch.no_grad():
        targets = torch.softmax(label_logits, dim=1)
    thetas = student_trajectory(forward, start, images, targets, syn_lr, batches, augment, aug_seeds)
    loss = matching_loss(thetas[-1], start, target)
    if isinstance(weight, torch.Tensor):
        weight = weight.to(start).reshape(*start.shape[:-1], 1)
    a = weight * 2 * (thetas[-1] - target) / (start - target).pow(2).sum(-1, keepdim=True)  # a_N, Eq. 2
    alpha = torch.as_tensor(syn_lr, dtype=images.dtype, device=images.device).detach()
    d_images, d_labels, d_lr = torch.zeros_like(images), torch.zeros_like(label_logits), torch.zeros_like(alpha)
    for n in reversed(range(len(batches))):
        idx = batches[n]
        theta = thetas[n].clone().requires_grad_(True)
        x, lab = images[idx].detach().requires_grad_(True), label_logits[idx].detach().requires_grad_(True)
        g = step_gradient(forward, theta, x if augment is None else augment(x, aug_seeds[n]),
                          torch.softmax(lab, dim=1), create_graph=True)  # g_n, replayed (Eq. 1)
        h_a, d_x, d_lab = torch.autograd.grad((-alpha * a * g).sum(), (theta, x, lab))  # one VJP of s_n
        d_images.index_add_(0, idx, d_x)
        d_labels.index_add_(0, idx, d_lab)
        d_lr -= (a * g.detach()).sum()  # ∂θ̂_{n+1}/∂α = -g_n
        a = a + h_a  # a_n = a_{n+1} - α H_n a_{n+1}
    for t, d in ((images, d_images), (label_logits, d_labels), (syn_lr, d_lr)):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.grad = d if t.grad is None else t.grad + d
    return loss.detach()


def accumulate_matching_gradients(plan: SegmentPlan, segment: SegmentSource, forward: Forward,
                                  images: torch.Tensor, label_logits: torch.Tensor, syn_lr: torch.Tensor,
                                  expert_epochs: int, augment: Augment | None = None,
                                  students: Sequence[int] | None = None, skip_zero_weight: bool = True,
                                  unroll_memory: str = "full",
                                  student_execution: str = "sequential") -> dict[int, float]:
    """Backpropagate the concurrent loss of Eq. 8 into ``.grad`` of ``images``, ``label_logits`` and
    ``syn_lr`` (gradients accumulate; zero them before).

    L = β L_sampled + Σ_i (1-β)/K L_{T- + iR}. Students are unrolled in groups: one at a time
    (``"sequential"``: peak memory of one unroll, not K+1) or all chosen ones together (``"batched"``,
    parameters ``[S, P]``, one vmapped call per step); each group's weighted loss is backpropagated right
    after its unroll. The gradient is that of the summed loss (linearity of differentiation).

    Args:
        plan: this iteration's :class:`SegmentPlan`.
        segment: ``(start, M) -> (θ*_{start}, θ*_{start+M})`` for the plan's expert, float ``[P]`` each.
        students: indices into ``plan.students`` to compute (a worker's share); default all.
        skip_zero_weight: do not unroll students whose weight is 0 (e.g. the sampled one at β = 0).
        unroll_memory: ``"full"`` (graph of N steps) or ``"constant"`` (:func:`constant_memory_gradients`);
            ``"auto"`` is resolved beforehand by :func:`contra_ray.distill.memory.plan_unroll_memory`.
        student_execution: ``"sequential"`` or ``"batched"``.
    Returns:
        ``{student index: unweighted Eq. 2 loss}`` for the students computed.

    Raises:
        ValueError: an unknown ``unroll_memory`` or ``student_execution`` (named with its value).
    """
    if unroll_memory not in UNROLL_MEMORY_MODES:
        raise ValueError(f"distill.unroll_memory={unroll_memory!r}: must be one of {', '.join(UNROLL_MEMORY_MODES)} "
                         "here ('auto' is resolved by contra_ray.distill.memory.plan_unroll_memory)")
    if student_execution not in STUDENT_EXECUTIONS:
        raise ValueError(f"distill.student_execution={student_execution!r}: must be one of "
                         f"{', '.join(STUDENT_EXECUTIONS)}")
    chosen = [k for k in (range(len(plan.students)) if students is None else students)
              if not (skip_zero_weight and plan.students[k].weight == 0.0)]
    groups = [[k] for k in chosen] if student_execution == "sequential" else [chosen] if chosen else []
    losses: dict[int, float] = {}
    for group in groups:
        start, target, weight = _student_group(plan, group, segment, expert_epochs, images.dtype,
                                               batched=student_execution == "batched")
        if unroll_memory == "full":  # graph of all N steps (Eq. 1), backpropagated through Eq. 2
            targets = torch.softmax(label_logits, dim=1)  # rebuilt per group: each backward frees its graph
            theta_n = unroll(forward, start, images, targets, syn_lr, plan.batches, augment, plan.aug_seeds)
            loss = matching_loss(theta_n, start, target)
            (weight * loss).sum().backward()  # Eq. 8 term(s)
        else:  # θ̂_0..θ̂_N without graph, then the adjoint walk n = N-1..0 (docs/constant_memory.md)
            loss = constant_memory_gradients(forward, start, target, weight, images, label_logits, syn_lr,
                                             plan.batches, augment, plan.aug_seeds)
        losses.update(zip(group, loss.detach().reshape(-1).tolist()))
    return losses


def _student_group(plan: SegmentPlan, group: Sequence[int], segment: SegmentSource, expert_epochs: int,
                   dtype: torch.dtype, batched: bool) -> tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]:
    """(θ*_{t,0}, θ*_{t,M}, Eq. 8 weight) of the students in ``group``: ``[P]``, ``[P]``, float for one
    sequential student; ``[S, P]``, ``[S, P]``, ``[S]`` when batched."""
    pairs = [segment(plan.students[k].start, expert_epochs) for k in group]
    if not batched:
        (start, target), = pairs
        return start.to(dtype), target.to(dtype), plan.students[group[0]].weight
    start = torch.stack([p[0] for p in pairs]).to(dtype)
    target = torch.stack([p[1] for p in pairs]).to(dtype)
    weight = torch.tensor([plan.students[k].weight for k in group], dtype=dtype, device=start.device)
    return start, target, weight
