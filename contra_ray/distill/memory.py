"""Memory planner for the student unroll: picks ``distill.unroll_memory`` (full | constant | auto).

Before any work, differentiable student steps (Eq. 1 with ``create_graph``) are run on the real shapes
(network, image size, dtype, students unrolled at once) but on a SLICE of the synthetic mini-batch, and
what their graphs keep alive is MEASURED, not guessed:

* CPU: the bytes of the distinct storages autograd saves for backward, counted with
  :func:`torch.autograd.graph.saved_tensors_hooks` (the double-backward graph of ``create_graph``
  included), times :data:`CPU_OVERHEAD` (peak RSS per held step was 1.06-1.15x the saved bytes for
  ConvNet-3 in ``benchmarks/unroll_memory.py``: allocator rounding, buffers not saved). The transient of
  walking one step backwards is taken as one more step's graph.
* CUDA: ``torch.cuda.memory_allocated`` growth while the step's graph is alive, and
  ``torch.cuda.max_memory_allocated`` during one vector-Jacobian product through it.

The probe is bounded (:func:`probe_step_memory`): a step's graph is affine in the batch size b (per-sample
activations of the forward and of the ``create_graph`` backward, plus per-parameter tensors), so one step
at b0 = :data:`PROBE_BATCH` rows and one at 2·b0 give G(b) = G(2b0) + (b - 2b0)·(G(2b0) - G(b0))/b0, and
likewise W(b). A mini-batch of at most 2·b0 rows is measured directly. The probe therefore holds at most
the graph of a 2·b0-row step (cifar100_ipc10, b = 1000: ~0.1 GiB instead of the ~4.5 GiB of one real
step), never more than either mode needs; on CPU the extrapolated G equals the direct measurement to
<0.1% on the presets (``tests/test_memory.py``).

With G = one step's graph, W = peak of one step's graph plus its backward (CPU: 2G), P parameters,
S students at once, b bytes per number and F the fixed tensors (synthetic set and its gradient, labels,
expert start/target, θ̂_N and the adjoint):

    full     ≈ N·G + (W - G) + F           (graph of all N steps, freed step by step during backward)
    constant ≈ W + (N+1)·S·P·b + F         (one step's graph + the stored θ̂_0..θ̂_N)

``auto`` picks full when it fits (it does less arithmetic), else constant; a configuration that fits in
neither is refused with a :class:`~contra_ray.config.ConfigError` naming ``distill.unroll_memory`` with
both numbers. Available memory: CUDA free + this process's cached-but-unused blocks
(``torch.cuda.mem_get_info``); CPU the smaller of ``MemAvailable`` (/proc/meminfo) and the cgroup's
limit minus usage (v2 ``memory.max``, v1 ``memory.limit_in_bytes``); or injected (``available_bytes``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from contra_ray.augment import DSA
from contra_ray.config import Config, ConfigError
from contra_ray.data.prepare import PreparedData
from contra_ray.distill.matching import Augment, Forward, step_gradient
from contra_ray.models import build_model, flat_params, functional_forward

__all__ = ["UNROLL_MEMORY_CHOICES", "PROBE_BATCH", "StepMemory", "MemoryPlan", "measure_step_memory",
           "probe_step_memory", "available_memory_bytes", "estimate_unroll_bytes", "plan_unroll_memory"]

UNROLL_MEMORY_CHOICES = ("auto", "full", "constant")
CPU_OVERHEAD = 1.1  # peak RSS / saved-tensor bytes of one held step (CPU, measured; see module docstring)
GIB = 2**30
PROBE_BATCH = 8  # rows of the smaller probe step (the larger has twice as many); see probe_step_memory


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """What one differentiable student step costs, measured on the real shapes.

    Attributes:
        graph_bytes: G, bytes kept alive by one step's graph (what the full unroll holds N times;
            on CPU the saved-tensor bytes times :data:`CPU_OVERHEAD`).
        walk_bytes: W, peak bytes of one step's graph plus a vector-Jacobian product through it.
        method: ``"saved_tensors_hooks"`` (CPU) or ``"cuda_allocator"``.
        measured_batches: the mini-batch sizes actually run: ``(b,)`` when measured at the run's batch,
            ``(b0, 2*b0)`` when extrapolated linearly to it (:func:`probe_step_memory`).
    """

    graph_bytes: int
    walk_bytes: int
    method: str
    measured_batches: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """The planner's decision.

    Attributes:
        mode: ``"full"`` or ``"constant"``, what to pass as ``unroll_memory``.
        estimate_bytes: estimated peak bytes per worker, ``{"full": ..., "constant": ...}``.
        available_bytes: memory available to this worker.
        step: the measured one-step costs the estimates are built from.
        syn_steps, students: N and the number of students unrolled at once.
    """

    mode: str
    estimate_bytes: dict[str, int]
    available_bytes: int
    step: StepMemory
    syn_steps: int
    students: int

    def describe(self) -> str:
        """One line for logs, e.g. ``unroll_memory=constant: full 22.3 GiB, constant 0.9 GiB, available 20.1 GiB``."""
        est = ", ".join(f"{m} {b / GIB:.2f} GiB" for m, b in self.estimate_bytes.items())
        how = self.step.method
        if len(self.step.measured_batches) > 1:
            how += " on batches " + " and ".join(map(str, self.step.measured_batches)) + ", scaled linearly"
        return (f"unroll_memory={self.mode}: estimated peak {est}; available {self.available_bytes / GIB:.2f} GiB "
                f"(one step's graph {self.step.graph_bytes / 2**20:.1f} MiB by {how}, "
                f"N={self.syn_steps}, {self.students} student(s) at once)")


def measure_step_memory(forward: Forward, theta: torch.Tensor, x: torch.Tensor, label_logits: torch.Tensor,
                        augment: Augment | None = None, students: int = 1, aug_seed: int = 0) -> StepMemory:
    """Run one student step with ``create_graph`` (Eq. 1) on real shapes and measure its memory.

    Args:
        forward: ``(theta [P], x [b,C,H,W]) -> logits``.
        theta: ``[P]`` parameters (e.g. an expert's); copied ``students`` times for a batched unroll.
        x: one synthetic mini-batch ``[b,C,H,W]`` (dtype and device of the run).
        label_logits: ``[b, C]``.
        augment: the run's augmentation ``(x, seed) -> x``, or None.
        students: students unrolled at once (1 for sequential execution).
    """
    theta = theta.detach().to(x).clone()
    theta = (theta if students == 1 else theta.expand(students, -1).clone()).requires_grad_(True)
    x = x.detach().clone().requires_grad_(True)
    lab = label_logits.detach().to(x).clone().requires_grad_(True)
    lr = torch.tensor(0.01, dtype=x.dtype, device=x.device, requires_grad=True)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        g = step_gradient(forward, theta, x if augment is None else augment(x, aug_seed),
                          torch.softmax(lab, dim=1), create_graph=True)
        return g, theta - lr * g  # θ̂_1 holds the step's graph, as in the full unroll

    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        base = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        g, theta1 = step()
        torch.cuda.synchronize(x.device)
        graph = torch.cuda.memory_allocated(x.device) - base
        torch.autograd.grad((theta1 * torch.randn_like(theta1)).sum(), (theta, x, lab, lr))
        torch.cuda.synchronize(x.device)
        walk = torch.cuda.max_memory_allocated(x.device) - base
        return StepMemory(int(graph), int(max(walk, graph)), "cuda_allocator", (x.shape[0],))
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    graph = CPU_OVERHEAD * sum(storages.values())
    return StepMemory(int(graph), int(2 * graph), "saved_tensors_hooks", (x.shape[0],))


def probe_step_memory(forward: Forward, theta: torch.Tensor, images: torch.Tensor, label_logits: torch.Tensor,
                      batch_syn: int, augment: Augment | None = None, students: int = 1,
                      probe_batch: int = PROBE_BATCH) -> StepMemory:
    """One step's memory at mini-batch ``batch_syn``, measured on at most ``2 * probe_batch`` rows.

    ``batch_syn <= 2 * probe_batch``: :func:`measure_step_memory` on the first ``batch_syn`` rows. Else it
    is measured on the first b0 = ``probe_batch`` and 2·b0 rows and G and W are extrapolated linearly in
    the batch size to ``batch_syn`` (a step's graph is per-sample activations plus per-parameter tensors,
    so affine in b; the slope is clamped at 0). The probe's own peak is that of a 2·b0-row step.

    Args:
        forward, theta, augment, students: as for :func:`measure_step_memory`.
        images: the synthetic set ``[n,C,H,W]``, or at least its first ``min(batch_syn, 2*probe_batch)`` rows.
        label_logits: ``[n, classes]`` (at least as many rows as ``images``).
        batch_syn: b, the run's mini-batch size (rows per student step).
        probe_batch: b0 >= 1.

    Returns:
        :class:`StepMemory` in bytes at ``batch_syn`` rows (``measured_batches`` says what was run).

    Raises:
        ValueError: ``batch_syn`` or ``probe_batch`` below 1, or ``images`` with too few rows.
    """
    if batch_syn < 1 or probe_batch < 1:
        raise ValueError(f"batch_syn={batch_syn}, probe_batch={probe_batch}: both must be >= 1")
    rows = min(batch_syn, 2 * probe_batch)
    if images.shape[0] < rows or label_logits.shape[0] < rows:
        raise ValueError(f"images {tuple(images.shape)}, label_logits {tuple(label_logits.shape)}: the probe needs "
                         f"{rows} rows")
    if batch_syn <= 2 * probe_batch:
        return measure_step_memory(forward, theta, images[:batch_syn], label_logits[:batch_syn], augment, students)
    b0, b1 = probe_batch, 2 * probe_batch
    small, large = (measure_step_memory(forward, theta, images[:b], label_logits[:b], augment, students)
                    for b in (b0, b1))

    def at_batch(v0: int, v1: int) -> int:
        return int(round(v1 + max(0.0, (v1 - v0) / (b1 - b0)) * (batch_syn - b1)))

    graph = at_batch(small.graph_bytes, large.graph_bytes)
    walk = at_batch(small.walk_bytes, large.walk_bytes)
    return StepMemory(graph, max(walk, graph), large.method, (b0, b1))


def available_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Bytes this process can still allocate on ``device`` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    limits = []
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit != "max" and int(limit) < 2**60:  # "max" / a huge number: no limit
            limits.append(int(limit) - usage)
    if not limits:
        raise RuntimeError("cannot read available memory (/proc/meminfo, cgroup); pass available_bytes")
    return max(0, min(limits))


def estimate_unroll_bytes(step: StepMemory, syn_steps: int, students: int, num_params: int, itemsize: int,
                          fixed_bytes: int) -> dict[str, int]:
    """Estimated peak bytes per mode from a measured step (formulas in the module docstring)."""
    full = syn_steps * step.graph_bytes + (step.walk_bytes - step.graph_bytes) + fixed_bytes
    constant = step.walk_bytes + (syn_steps + 1) * students * num_params * itemsize + fixed_bytes
    return {"full": int(full), "constant": int(constant)}


def plan_unroll_memory(forward: Forward, theta: torch.Tensor, images: torch.Tensor, label_logits: torch.Tensor,
                       batch_syn: int, syn_steps: int, students: int = 1, augment: Augment | None = None,
                       requested: str = "auto", available_bytes: int | None = None,
                       headroom: float = 0.9, probe_batch: int = PROBE_BATCH) -> MemoryPlan:
    """Probe one step (:func:`probe_step_memory`), estimate both modes and choose (``auto``) or check
    (``full``/``constant``) one.

    Args:
        forward, theta, augment: the run's network ``(theta, x) -> logits``, a ``[P]`` parameter vector
            and augmentation.
        images, label_logits: the synthetic set ``[n,C,H,W]`` and its label logits ``[n, C]`` (dtype
            and device of the run); at most the first ``min(batch_syn, 2*probe_batch)`` rows are run.
        batch_syn, syn_steps: b and N.
        students: students unrolled at once by one worker (1 sequential; the worker's share batched).
        requested: ``distill.unroll_memory``, one of :data:`UNROLL_MEMORY_CHOICES`.
        available_bytes: inject the available memory (tests, or a budget); default measured.
        headroom: a mode fits when its estimate is at most ``headroom`` x available.
        probe_batch: b0 of :func:`probe_step_memory`.

    Raises:
        ConfigError: ``requested`` unknown, or the requested mode (``auto``: both) does not fit; the
            message names ``distill.unroll_memory`` and gives estimate and available memory in GiB.
    """
    _check_requested(requested)
    step = probe_step_memory(forward, theta, images, label_logits, batch_syn, augment, students, probe_batch)
    return _decide(step, images.numel() + label_logits.numel(), theta.numel(), images.element_size(), images.device,
                   syn_steps, students, requested, available_bytes, headroom)


def _check_requested(requested: str) -> None:
    if requested not in UNROLL_MEMORY_CHOICES:
        raise ConfigError(f"distill.unroll_memory={requested!r}: must be one of {', '.join(UNROLL_MEMORY_CHOICES)}")


def _decide(step: StepMemory, set_numel: int, num_params: int, itemsize: int, device: torch.device, syn_steps: int,
            students: int, requested: str, available_bytes: int | None, headroom: float) -> MemoryPlan:
    """Estimates from ``step`` and the choice; ``set_numel`` = numbers in the synthetic images + label logits."""
    fixed = 2 * set_numel * itemsize + 4 * students * num_params * itemsize
    estimate = estimate_unroll_bytes(step, syn_steps, students, num_params, itemsize, fixed)
    available = available_memory_bytes(device) if available_bytes is None else int(available_bytes)
    fits = {m: b <= headroom * available for m, b in estimate.items()}
    if requested == "auto":
        mode = "full" if fits["full"] else "constant"
    else:
        mode = requested
    if not fits[mode]:
        gib = {m: f"{b / GIB:.2f} GiB" for m, b in estimate.items()}
        raise ConfigError(
            f"distill.unroll_memory={requested!r}: the {mode} unroll needs an estimated {gib[mode]} per worker "
            f"(full {gib['full']}, constant {gib['constant']}), but {available / GIB:.2f} GiB is available "
            f"(fits up to {headroom:.0%}); reduce distill.syn_steps or distill.batch_syn, or spread the students "
            "over more workers")
    return MemoryPlan(mode, estimate, available, step, syn_steps, students)


def students_per_worker(cfg, workers: int = 1) -> int:
    """Students one worker unrolls at once: 1 (sequential), else its share of the active ones (batched):
    ``ceil(A / workers)`` with A = K, plus 1 when the sampled segment has weight β > 0 (or K = 0)."""
    d = cfg.distill
    if d.student_execution != "batched":
        return 1
    active = d.K + (1 if (d.K == 0 or d.beta > 0) else 0)
    return max(1, -(-active // max(1, workers)))


def plan_for_config(cfg, spec, workers: int = 1, device: str | None = None,
                    available_bytes: int | None = None, probe_batch: int = PROBE_BATCH) -> MemoryPlan:
    """The plan of a run before its data or experts exist: a freshly initialized network and random
    synthetic images of the run's shapes (``[IPC·classes, C, H, W]``, dtype ``distill.dtype``), with DSA
    if ``distill.dsa``. What one step keeps alive depends on shapes only, so this equals the plan the
    :class:`~contra_ray.distill.distiller.Distiller` makes later with the real tensors. Only the rows the
    probe runs (at most ``2 * probe_batch``) are allocated; the rest of the set is counted from its shape.

    Raises:
        ConfigError: see :func:`plan_unroll_memory`.
    """
    d = cfg.distill
    _check_requested(d.unroll_memory)
    dev = torch.device(device or cfg.device)
    dtype = torch.float64 if d.dtype == "float64" else torch.float32
    model = build_model(spec).to(dev, dtype)
    n = d.ipc * spec.num_classes
    batch_syn = d.batch_syn or n
    rows = min(batch_syn, 2 * probe_batch)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(rows, spec.channels, spec.image_size, spec.image_size, generator=g, dtype=dtype).to(dev)
    labels = torch.zeros(rows, spec.num_classes, dtype=dtype, device=dev)
    dsa = DSA()
    augment = (lambda x, seed: dsa(x, seed=seed)) if d.dsa else None
    theta = flat_params(model).to(dev, dtype)
    students = students_per_worker(cfg, workers)
    step = probe_step_memory(lambda t, x: functional_forward(model, t, x), theta, images, labels, batch_syn, augment,
                             students, probe_batch)
    set_numel = n * (spec.channels * spec.image_size**2 + spec.num_classes)
    return _decide(step, set_numel, theta.numel(), images.element_size(), dev, d.syn_steps, students,
                   d.unroll_memory, available_bytes, 0.9)


def check_memory(cfg: Config, data: PreparedData, workers: int = 1):
    """Before experts or distillation: plan the student unroll for this run's shapes (a bounded probe,
    :func:`contra_ray.distill.memory.plan_for_config`) and print the plan; returns the
    :class:`~contra_ray.distill.memory.MemoryPlan`.

    Raises:
        ConfigError: the unroll fits in no allowed mode (estimate and available memory in the message).
    """
    from contra_ray.distill.memory import plan_for_config

    plan = plan_for_config(cfg, data.spec, workers=workers)
    print(f"memory: {plan.describe()}", flush=True)
    return plan
