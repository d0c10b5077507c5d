"""The one distillation loop, for one process, a Tune trial and every Ray Train worker.

``run_loop`` runs iterations ``distiller.iteration .. distill.iterations - 1`` of Algorithm 1. What
differs between a laptop and W workers is passed in, nanoGPT-style, never a second copy of the loop:

* ``sync`` — the gradient synchronisation. :class:`LocalSync` (one process: every student here, nothing
  to reduce) or :class:`AllReduceSync` (W workers: worker w unrolls the active students ``active[w::W]``,
  then one ``torch.distributed.all_reduce`` sums ∂L/∂(images, label logits, syn_lr), another the
  per-student losses, so every replica takes the same optimizer step).
* ``checkpoints`` — where the state goes every ``distill.checkpoint_every`` iterations and at the end,
  and where a resumed run finds it: :class:`contra_ray.distill.checkpoint.LocalCheckpoints` or the Ray Train
  checkpointer of :mod:`contra_ray.distill.remote` (both the :mod:`contra_ray.distill.checkpoint` format). A
  checkpoint made with a config that gives another result is refused by name.
* ``logger`` — where metrics go (an MLflow run on rank 0; ``None`` elsewhere).

Periodic evaluation (``distill.eval_every``) and the forgetting monitor run on rank 0 only; the other
ranks wait for it in the next all-reduce. Per iteration the metrics are ``loss`` (Eq. 8), ``loss/sampled``,
``loss/start_<t>`` (Eq. 2 per segment), ``syn_lr``; and ``eval_acc`` (%) when evaluated. Plain PyTorch:
no Ray, no MLflow here.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Protocol

import torch

from contra_ray.augment import dsa_if
from contra_ray.common import storage
from contra_ray.common.seeds import derive_seed
from contra_ray.config import Config
from contra_ray.data.prepare import PreparedData
from contra_ray.distill.artifact import DistilledSet
from contra_ray.distill.checkpoint import LocalCheckpoints, check_resumable
from contra_ray.distill.distiller import Distiller, init_pool
from contra_ray.distill.matching import SegmentPlan
from contra_ray.distill.monitor import ForgettingMonitor
from contra_ray.evaluate.training import train_and_test
from contra_ray.experts.store import ExpertStore, reference_expert_id


class MetricLogger(Protocol):
    """Where rank 0's metrics go (:class:`contra_ray.tracking.RunLogger`, a Tune trial's logger, a test list)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


#: ``monitor(distiller) -> metrics`` every ``distill.monitor_every`` iterations on rank 0
#: (:class:`contra_ray.distill.monitor.ForgettingMonitor`)
Monitor = Callable[[Distiller], dict[str, float]]

__all__ = ["GradientSync", "LocalSync", "AllReduceSync", "worker_share", "Checkpointer", "LoopResult",
           "run_loop", "periodic_accuracy"]


# ---------------------------------------------------------------------------------------------- gradient sync

def worker_share(plan: SegmentPlan, rank: int, world_size: int) -> list[int]:
    """Student indices worker ``rank`` computes: round-robin over the students with non-zero weight.

    With A active students, workers get ``ceil(A/W)`` or ``floor(A/W)`` each (lower ranks take the
    remainder); every active student is computed by exactly one worker, so the summed gradient is the
    whole Eq. 8 gradient. Workers beyond A get none and contribute zeros.
    """
    active = [k for k, st in enumerate(plan.students) if st.weight != 0.0]
    return active[rank::world_size]


class GradientSync(Protocol):
    """How the workers of one iteration split the students and combine their gradients."""

    rank: int
    world_size: int

    def share(self, plan: SegmentPlan) -> list[int] | None:
        """Students this worker unrolls (``None``: all)."""

    def reduce(self, distiller: Distiller, plan: SegmentPlan, local: dict[int, float]) -> dict[int, float]:
        """Combine ``.grad`` of the synthetic tensors over workers in place; return every active
        student's loss."""

    def assert_replicas_agree(self, distiller: Distiller) -> None:
        """Raise if the replicas of the synthetic set differ."""


class LocalSync:
    """One process: every student here, nothing to reduce."""

    rank, world_size = 0, 1

    def share(self, plan: SegmentPlan) -> list[int] | None:
        return None

    def reduce(self, distiller: Distiller, plan: SegmentPlan, local: dict[int, float]) -> dict[int, float]:
        return local

    def assert_replicas_agree(self, distiller: Distiller) -> None:
        return None


class AllReduceSync:
    """W workers of an initialized ``torch.distributed`` process group (gloo on CPU, NCCL on GPU).

    The Eq. 8 gradient is a sum over students, so summing the workers' partial gradients gives the
    whole gradient; the result differs from W = 1 only in floating-point summation order.
    """

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def share(self, plan: SegmentPlan) -> list[int] | None:
        return worker_share(plan, self.rank, self.world_size)

    def reduce(self, distiller: Distiller, plan: SegmentPlan, local: dict[int, float]) -> dict[int, float]:
        if self.world_size == 1:
            return local
        import torch.distributed as dist

        grads = distiller.grad_tensors()
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for images, labels and syn_lr
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        # Each loss is computed on exactly one worker and 0.0 elsewhere, so the float64 sum is exact.
        losses = torch.zeros(len(plan.students), dtype=torch.float64, device=flat.device)
        for k, v in local.items():
            losses[k] = v
        dist.all_reduce(losses, op=dist.ReduceOp.SUM)
        active = [k for k, st in enumerate(plan.students) if st.weight != 0.0]
        return {k: float(losses[k]) for k in active}

    def assert_replicas_agree(self, distiller: Distiller) -> None:
        """Cheap consistency check (at checkpoints): every replica holds the same images, labels, syn_lr.

        Raises:
            RuntimeError: the replicas differ (a non-deterministic kernel or a bug); names the values.
        """
        if self.world_size == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            probe = torch.stack([distiller.images.double().sum(), distiller.label_logits.double().sum(),
                                 distiller.syn_lr.double()])
        lo, hi = probe.clone(), probe.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError(f"replicas of the synthetic set diverged: per-worker (sum images, sum labels, "
                               f"syn_lr) range from {lo.tolist()} to {hi.tolist()}")


# ---------------------------------------------------------------------------------------------- the loop

class Checkpointer(Protocol):
    """Where a run's checkpoints live (:class:`contra_ray.distill.checkpoint.LocalCheckpoints`, Ray Train's)."""

    def load(self) -> dict | None:
        """The newest valid checkpoint's state (``distiller``, ``history``, ``config``, ``path``) or None."""

    def save(self, state: dict, iteration: int, metrics: dict) -> Any:
        """Store ``state``; called on every rank (Ray Train: a barrier; rank 0 attaches the files)."""


@dataclasses.dataclass
class LoopResult:
    """What :func:`run_loop` returns: metric history ``{name: [value per iteration]}`` (``eval_acc``:
    one per evaluation), the iteration this call started at, the checkpoint it resumed from (or None),
    and the mean seconds per iteration after the first."""

    history: dict[str, list[float]]
    start_iteration: int
    resumed_from: str | None
    s_per_iter: float


def periodic_accuracy(cfg: Config, distiller: Distiller, data, done: int) -> float:
    """Mean test accuracy (%) of ``distill.eval_runs_periodic`` fresh networks trained on the current set
    (``cfg.eval`` recipe; networks seeded ``derive_seed(distill.seed, "periodic_eval", done, r)``)."""

    runs = cfg.distill.eval_runs_periodic
    accs = [train_and_test(distiller.images.detach().float(), distiller.targets().float(),
                           float(distiller.syn_lr.detach()), data.spec, cfg.eval, data.test_x, data.test.labels,
                           seed=derive_seed(cfg.distill.seed, "periodic_eval", done, r),
                           augment=dsa_if(cfg.eval.dsa), device=str(distiller.device))
            for r in range(runs)]
    return 100 * sum(accs) / len(accs)


class _Progress:
    """A tqdm bar (interactive) or a line every tenth of the run (Ray Train workers' logs)."""

    def __init__(self, mode: str | None, total: int, initial: int, world: int):
        self.mode, self.total, self.world = mode, total, world
        self.every = max(1, total // 10)
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="distill", dynamic_ncols=True)

    def update(self, done: int, m: dict, seconds: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", syn_lr=f"{m['syn_lr']:.5f}")
            self.bar.update(1)
        elif self.mode == "lines" and (done % self.every == 0 or done == self.total):
            print(f"[distill] iteration {done}/{self.total}  loss {m['loss']:.4f}  syn_lr {m['syn_lr']:.5f}  "
                  f"{seconds:.2f} s/it  ({self.world} worker(s))", flush=True)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        elif self.mode is not None:
            print(f"[distill] {line}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_loop(distiller: Distiller, cfg: Config, data: PreparedData | None = None, *, sync: GradientSync | None = None,
             checkpoints: Checkpointer | None = None, logger: MetricLogger | None = None,
             monitor: Monitor | None = None, resume: bool = True,
             progress: str | None = "bar", before_iteration: Callable[[int], None] | None = None) -> LoopResult:
    """Run the distillation iterations that remain (see the module docstring).

    Args:
        distiller: the synthetic state; advanced in place.
        cfg: the validated config of the run (``cfg.distill`` drives the loop).
        data: :class:`contra_ray.data.PreparedData` with the test split, for periodic evaluation on
            rank 0 (``None`` or without test split: no periodic evaluation).
        sync: gradient synchronisation (default :class:`LocalSync`).
        checkpoints: where checkpoints go (``None``: none). With ``resume`` the newest valid one is
            loaded first.
        logger: ``log_metrics(metrics, step)`` (rank 0's MLflow run), or ``None``.
        monitor: ``monitor(distiller) -> metrics``, every ``distill.monitor_every`` iterations (rank 0).
        progress: ``"bar"`` (tqdm), ``"lines"`` or ``None``; only rank 0 shows it.
        before_iteration: called with the iteration index before each one (test hook: fault injection).

    Returns:
        :class:`LoopResult`.

    Raises:
        ConfigError: the checkpoint was made with a config that gives another result (names the fields).
        DistillationDiverged: non-finite loss or gradient, or syn_lr <= 0 (every rank raises it at the
            same iteration: the replicas hold the same state).
    """
    sync = sync or LocalSync()
    d = cfg.distill
    chief = sync.rank == 0
    history: dict[str, list[float]] = {}
    resumed_from, loaded_at = None, None
    if checkpoints is not None and resume:
        state = checkpoints.load()
        if state is not None:
            check_resumable(state.get("config"), cfg, state.get("path", "(checkpoint)"),
                            int(state["distiller"]["iteration"]))
            distiller.load_state_dict(state["distiller"])
            history, loaded_at = state["history"], distiller.iteration
            resumed_from = state.get("path", "checkpoint")
            if chief and progress is not None:
                print(f"resumed from {resumed_from} at iteration {distiller.iteration}", flush=True)
    start = distiller.iteration
    evaluate = chief and d.eval_every > 0 and data is not None and getattr(data, "test_x", None) is not None
    bar = _Progress(progress if chief else None, d.iterations, start, sync.world_size)
    times: list[float] = []
    m: dict[str, float] = {}

    def save(metrics: dict) -> None:
        sync.assert_replicas_agree(distiller)
        checkpoints.save({"distiller": distiller.state_dict(), "history": history, "config": cfg.to_dict()},
                         distiller.iteration, metrics)

    try:
        while distiller.iteration < d.iterations:
            it = distiller.iteration
            if before_iteration is not None:
                before_iteration(it)
            t0 = time.perf_counter()
            plan = distiller.plan(it)
            local = distiller.compute_gradients(plan, students=sync.share(plan))
            losses = sync.reduce(distiller, plan, local)
            distiller.apply_update(it, losses)  # the same step on every replica
            if distiller.device.type == "cuda":
                torch.cuda.synchronize(distiller.device)
            times.append(time.perf_counter() - t0)
            m = distiller.metrics(plan, losses)
            for k, v in m.items():
                history.setdefault(k, []).append(v)
            if logger is not None:
                logger.log_metrics(m, step=it)  # names of contra_ray.tracking.METRICS
            done = distiller.iteration
            bar.update(done, m, times[-1])
            if monitor is not None and chief and d.monitor_every and done % d.monitor_every == 0:
                mon = monitor(distiller)
                for k, v in mon.items():
                    history.setdefault(k, []).append(v)
                if logger is not None:
                    logger.log_metrics(mon, step=done)
            if evaluate and done % d.eval_every == 0 and done < d.iterations:
                acc = periodic_accuracy(cfg, distiller, data, done)
                history.setdefault("eval_acc", []).append(acc)
                bar.write(f"iteration {done}: eval accuracy {acc:.2f}% ({d.eval_runs_periodic} run(s))")
                if logger is not None:
                    logger.log_metrics({"eval_acc": acc}, step=done)
            if checkpoints is not None and d.checkpoint_every and done % d.checkpoint_every == 0 \
                    and done < d.iterations:
                save(m)
        if checkpoints is not None and loaded_at != d.iterations:
            save(m)  # the final state
    finally:
        bar.close()
    s_per_iter = sum(times[1:]) / len(times[1:]) if len(times) > 1 else float("nan")
    return LoopResult(history, start, resumed_from, s_per_iter)


# ---------------------------------------------------------------------------------------------- one process

def run_distillation(cfg: Config, data: PreparedData, store: ExpertStore, logger: MetricLogger | None = None,
                     resume: bool = True, progress: str | None = "bar",
                     announced_mode: str | None = None) -> tuple[DistilledSet, dict[str, list[float]]]:
    """Distill in this process: build the :class:`Distiller` (DSA, forgetting monitor if
    ``distill.monitor_every``), run :func:`run_loop` with :class:`LocalSync` and, if
    ``distill.checkpoint_every``, :class:`~contra_ray.distill.checkpoint.LocalCheckpoints` in
    ``<run dir>/checkpoints``.

    Args:
        cfg: validated config; data: :class:`contra_ray.data.PreparedData`; store: the expert store
            (checked compatible); logger: ``log_metrics(metrics, step)`` or None.
        resume: continue from the newest valid checkpoint; False removes the run's checkpoints first.
        announced_mode: the unroll mode :func:`contra_ray.distill.memory.check_memory` printed for this run
            (its returned plan's ``mode``); the Distiller's own plan is then printed only if it chose another
            mode, so a run prints its ``memory:`` line once. ``None``: print it (with ``progress``).

    Returns:
        (the :class:`contra_ray.distill.artifact.DistilledSet`, metric history ``{name: [values]}``).

    Raises:
        ConfigError: the checkpoint was made with another config (names the fields).
        DistillationDiverged: see :func:`run_loop`.
    """
    d = cfg.distill
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    monitor, expert_ids = None, None
    if d.monitor_every:  # hold τ_o out of distillation; only the monitor reads it

        ref = reference_expert_id(store, d.reference_expert)
        expert_ids = [i for i in store.expert_ids if i != ref]
        epochs = d.monitor_epochs or list(range(d.min_start_epoch, d.max_start_epoch + 1))
        monitor = ForgettingMonitor(store, ref, epochs, d.expert_epochs, seed=derive_seed(d.seed, "monitor"))
    distiller = Distiller(cfg, store, data.spec, *init_pool(cfg, data),
                          augment=dsa_if(d.dsa), expert_ids=expert_ids, device=cfg.device)
    line = distiller.init_report.line(data.train.names, d.ipc)
    if progress is not None:
        if distiller.memory_plan.mode != announced_mode:
            print(f"memory: {distiller.memory_plan.describe()}", flush=True)
        if line:
            print(line, flush=True)
    checkpoints = None
    if d.checkpoint_every:
        checkpoints = LocalCheckpoints(cfg.run_dir() / "checkpoints",
                                       location=storage.join(cfg.run_location(), "checkpoints"))
        if not resume:
            n = checkpoints.clear()
            if n and progress is not None:
                print(f"--no-resume: removed {n} earlier checkpoint(s) in {checkpoints.root}", flush=True)
    result = run_loop(distiller, cfg, data, checkpoints=checkpoints, logger=logger, monitor=monitor,
                      resume=resume, progress=progress)
    return distiller.to_artifact(data.preprocessor, data.train), result.history
