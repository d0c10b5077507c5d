"""Distillation on a Ray Train worker group: ``python -m contra_ray.distill --num-workers W [--use-gpu]``.

Every worker holds a replica of the synthetic state (a :class:`~contra_ray.distill.Distiller`). Iteration
``it`` runs on all workers at once (Algorithm 1, lines 4-19, split over workers):

1. every worker builds the same plan, a pure function of (seed, it) (:meth:`Distiller.plan`);
2. worker ``w`` of ``W`` unrolls its share of the students, round-robin over those with a non-zero
   Eq. 8 weight: ``active[w::W]`` (:func:`worker_share`), and backpropagates their weighted losses;
3. the gradients w.r.t. images, soft labels and syn_lr are summed over workers with one
   ``torch.distributed.all_reduce`` (gloo on CPU, nccl on GPU), the per-student losses with another;
4. every replica takes the same optimizer step (:meth:`Distiller.apply_update`), so replicas stay equal.

The Eq. 8 gradient is a sum over students, so the result does not depend on ``W`` beyond floating-point
summation order (tests: W = 1 and W = 2 agree to 1e-10 relative in float64).

Checkpoints: every ``distill.checkpoint_every`` iterations and at the end, rank 0 writes the whole
Distiller state and the metric history into a directory (:func:`write_checkpoint`: files under temporary
names then renamed, a ``manifest.json`` with sizes and sha256 written last) and hands it to
``ray.train.report``. On start every worker loads ``ray.train.get_checkpoint()`` (validated by
:func:`read_checkpoint`), so a worker-group restart (``FailureConfig(max_failures)``) and a re-run of
the same command (same ``name``, storage ``<output_dir>/ray_train``) both continue where the last
checkpoint left off, bit-identically on CPU.

Driver (:func:`run_distributed`): prepares the data (fills the on-disk cache the workers read), trains
missing experts, opens the MLflow run, fits the :class:`~ray.train.torch.TorchTrainer`, then logs the
artifact and curves. Rank 0 logs per-iteration metrics to that MLflow run and writes
``<run_dir>/distilled.safetensors``. On a multi-node cluster ``output_dir``, the data cache and the
tracking store must be on storage every node sees (NFS, EFS, a ReadWriteMany volume).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from .fileio import sha256_file
from .raycluster import ensure_ray
from .config import Config, ConfigError, config_from_dict
from .distill import Distiller, DistillationDiverged, PreparedData, prepare_data
from .matching import SegmentPlan

__all__ = ["CheckpointError", "FaultInjection", "PreparedSetup", "DistributedRun", "worker_share",
           "allreduce_step", "write_checkpoint", "read_checkpoint", "train_loop_per_worker", "fit_distributed",
           "run_distributed"]

CHECKPOINT_FORMAT = "contra_ray.distill_checkpoint/1"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"  # written last: a directory without a valid manifest is not a checkpoint
DEFAULT_MAX_FAILURES = 3
# Fields that may change between a checkpoint and a resumed run (loop length, logging, locations).
_RESUMABLE_CHANGES = {"distill": {"iterations", "checkpoint_every", "eval_every", "eval_runs_periodic"},
                      "data": {"cache_dir", "root", "download"}}

Setup = Callable[[Config, bool], tuple[PreparedData, Any]]  # (cfg, with_test) -> (data, expert store)


class CheckpointError(RuntimeError):
    """A checkpoint directory is incomplete or corrupt (torn write, wrong size or sha256); names the path."""


# ---------------------------------------------------------------------------------------------- one iteration

def worker_share(plan: SegmentPlan, rank: int, world_size: int) -> list[int]:
    """Student indices worker ``rank`` computes: round-robin over the students with non-zero weight.

    With A active students, workers get ``ceil(A/W)`` or ``floor(A/W)`` each (lower ranks take the
    remainder); every active student is computed by exactly one worker, so the summed gradient is the
    whole Eq. 8 gradient. Workers beyond A get none and contribute zeros.
    """
    active = [k for k, st in enumerate(plan.students) if st.weight != 0.0]
    return active[rank::world_size]


def allreduce_step(distiller: Distiller, plan: SegmentPlan, rank: int, world_size: int) -> dict[int, float]:
    """Gradients of this worker's share, summed over all workers into every replica's ``.grad``.

    Returns:
        ``{student index: unweighted Eq. 2 loss}`` for every active student (all workers' losses).
    """
    local = distiller.compute_gradients(plan, students=worker_share(plan, rank, world_size))
    if world_size == 1:
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


def _assert_replicas_agree(distiller: Distiller, world_size: int) -> None:
    """Cheap consistency check (at checkpoints): every replica holds the same images, labels and syn_lr.

    Raises:
        RuntimeError: the replicas differ (a non-deterministic kernel or a bug); names the values.
    """
    if world_size == 1:
        return
    import torch.distributed as dist

    with torch.no_grad():
        probe = torch.stack([distiller.images.double().sum(), distiller.label_logits.double().sum(),
                             distiller.syn_lr.double()])
    lo, hi = probe.clone(), probe.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"replicas of the synthetic set diverged: per-worker (sum images, sum labels, syn_lr) "
                           f"range from {lo.tolist()} to {hi.tolist()}")


# ---------------------------------------------------------------------------------------------- checkpoints

def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_checkpoint(directory: str | os.PathLike, state: dict, run_token: str) -> None:
    """Write ``state`` (``torch.save``-able) into ``directory`` as ``state.pt`` plus ``manifest.json``.

    Each file is written under a temporary name and renamed; the manifest (format, run token, iteration,
    size and sha256 of ``state.pt``) comes last, so a directory copied before it was complete never
    validates.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _write_atomic(d / STATE_FILE, lambda p: torch.save(state, p))
    manifest = {"format": CHECKPOINT_FORMAT, "run_token": run_token,
                "iteration": int(state["distiller"]["iteration"]),
                "files": {STATE_FILE: {"size": (d / STATE_FILE).stat().st_size, "sha256": sha256_file(d / STATE_FILE)}}}
    _write_atomic(d / MANIFEST_FILE, lambda p: p.write_text(json.dumps(manifest, indent=2, sort_keys=True)))


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
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"checkpoint {directory}: format={fmt!r}, expected {CHECKPOINT_FORMAT!r}")
    return manifest


def read_checkpoint(directory: str | os.PathLike) -> dict:
    """Validate a checkpoint directory against its manifest, then load its state (on CPU).

    Returns:
        ``{"distiller": Distiller.state_dict(), "history": {...}, "config": {...}}``.

    Raises:
        CheckpointError: no valid manifest, a listed file missing, or its size / sha256 differs.
    """
    d = Path(directory)
    manifest = read_manifest(d)
    for name, want in manifest.get("files", {}).items():
        f = d / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {d}: {name} is missing")
        size = f.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"checkpoint {d}: {name} has {size} bytes, the manifest says {want['size']}")
        if sha256_file(f) != want["sha256"]:
            raise CheckpointError(f"checkpoint {d}: {name} fails its sha256 check")
    if STATE_FILE not in manifest.get("files", {}):
        raise CheckpointError(f"checkpoint {d}: the manifest lists no {STATE_FILE}")
    return torch.load(d / STATE_FILE, map_location="cpu", weights_only=False)


def _resume_mismatches(saved: dict, now: dict) -> list[str]:
    """``section.field`` entries whose value differs between a checkpoint's config and this run's."""
    out = []
    for section in ("data", "model", "distill"):
        for key, value in now[section].items():
            if key in _RESUMABLE_CHANGES.get(section, set()):
                continue
            old = saved.get(section, {}).get(key)
            if old != value:
                out.append(f"{section}.{key}={old!r} in the checkpoint, {value!r} now")
    return out


# ---------------------------------------------------------------------------------------------- worker side

@dataclasses.dataclass(frozen=True)
class FaultInjection:
    """Test hook: worker ``rank`` kills its own process (SIGKILL) at the start of ``iteration``, once.

    ``marker`` is a file created just before the kill; while it exists the fault does not fire again,
    so the restarted worker group runs through. Before the kill it waits until the controller has
    committed the checkpoints already reported: the controller polls reports, so a worker dying within
    that polling window loses the newest checkpoint and the restart begins from the one before.
    """

    iteration: int
    marker: str
    rank: int = 0

    def maybe_fire(self, iteration: int, rank: int) -> None:
        if iteration == self.iteration and rank == self.rank and not os.path.exists(self.marker):
            import ray.train

            ray.train.get_all_reported_checkpoints(
                consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120)
            Path(self.marker).write_text(f"killed rank {rank} at iteration {iteration}\n")
            os.kill(os.getpid(), signal.SIGKILL)


@dataclasses.dataclass
class PreparedSetup:
    """A setup that hands every worker data already in memory and opens an expert store by path
    (tests, notebooks); the default setup is :func:`prepare_data` + ``ExpertStore.open(cfg.expert_store())``."""

    data: PreparedData
    store_path: str

    def __call__(self, cfg: Config, with_test: bool) -> tuple[PreparedData, Any]:
        from .experts import ExpertStore

        return self.data, ExpertStore.open(self.store_path)


def _default_setup(cfg: Config, with_test: bool) -> tuple[PreparedData, Any]:
    """Load the data through the on-disk cache the driver filled and open the (checked) expert store."""
    from .experts import ExpertStore

    data = prepare_data(cfg, with_test=with_test)
    store = ExpertStore.open(cfg.expert_store())
    d = cfg.distill
    store.check_compatible(data.spec, data.train.dataset_id, cfg.data.zca, d.max_start_epoch + d.expert_epochs,
                           data.preprocessor.fingerprint())
    return data, store


class _MetricSink:
    """Rank 0's per-iteration metrics into the driver's MLflow run (``None`` run id: no-op)."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.run_id = run_id
        if run_id is not None:
            from .tracking import tracking_client

            self.client = tracking_client(uri)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k.replace("/", "_"), float(v), ts, int(step)) for k, v in metrics.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, metrics=items[i:i + 100])


def _load_start_state(cfg: Config, distiller: Distiller, resume: bool, run_token: str,
                      rank: int) -> tuple[dict, int | None]:
    """Load ``ray.train.get_checkpoint()`` into ``distiller``; returns (history, iteration loaded or None).

    With ``resume`` false only checkpoints of this very fit (same run token: a worker-group restart) are
    loaded; older ones are ignored.

    Raises:
        CheckpointError: the checkpoint is torn or corrupt.
        ConfigError: the checkpoint was made with a different data/model/distill config.
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return {}, None
    with ckpt.as_directory() as path:
        if not resume:
            try:
                token = read_manifest(path).get("run_token")
            except CheckpointError:
                token = None
            if token != run_token:
                if rank == 0:
                    print(f"[distill] resume disabled: ignoring checkpoint {path} of an earlier run", flush=True)
                return {}, None
        state = read_checkpoint(path)
    diff = _resume_mismatches(state.get("config", {}), cfg.to_dict())
    if diff:
        raise ConfigError(f"cannot resume {cfg.name!r} from its checkpoint: " + "; ".join(diff) +
                          " (run with --no-resume or another --name)")
    distiller.load_state_dict(state["distiller"])
    if rank == 0:
        print(f"[distill] resumed from checkpoint at iteration {distiller.iteration}", flush=True)
    return state["history"], distiller.iteration


def _evaluate(cfg: Config, distiller: Distiller, data: PreparedData, done: int) -> float:
    """Mean test accuracy (%) of ``eval_runs_periodic`` networks trained on the current synthetic set."""
    from .augment import DSA
    from .evaluate import train_and_test

    runs = cfg.distill.eval_runs_periodic
    accs = [train_and_test(distiller.images.detach().float(), distiller.targets().float(),
                           float(distiller.syn_lr.detach()), data.spec, cfg.eval, data.test_x, data.test.labels,
                           seed=10_000 + done + r, augment=DSA() if cfg.eval.dsa else None,
                           device=str(distiller.device))
            for r in range(runs)]
    return 100 * sum(accs) / len(accs)


def train_loop_per_worker(config: dict) -> dict:
    """Body of every Ray Train worker (see the module docstring); returns a summary (rank 0's becomes
    ``Result.return_value``): ``iteration``, ``start_iteration`` (where this attempt began),
    ``world_size``, ``s_per_iter`` (mean over this attempt's iterations after the first) and ``error``
    (``"DistillationDiverged: ..."`` or ``None``).

    ``config`` keys: ``cfg`` (``Config.to_dict()``), ``use_gpu``, ``threads``, ``resume``, ``run_token``,
    ``setup`` (a :data:`Setup` or ``None`` for the default), ``fault`` (:class:`FaultInjection` or
    ``None``), ``tracking_uri`` and ``tracking_run_id`` (rank 0 logs metrics there; ``None``: no MLflow).
    """
    import ray.train
    import ray.train.torch

    from .augment import DSA

    cfg = config_from_dict(config["cfg"])
    d = cfg.distill
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    setup: Setup = config["setup"] or _default_setup
    fault: FaultInjection | None = config["fault"]

    data, store = setup(cfg, rank == 0 and d.eval_every > 0)
    distiller = Distiller(cfg, store, data.spec, data.train_x, data.train.labels,
                          augment=DSA() if d.dsa else None, device=str(device))
    history, loaded_at = _load_start_state(cfg, distiller, config["resume"], config["run_token"], rank)
    start = distiller.iteration
    sink = _MetricSink(config["tracking_uri"], config["tracking_run_id"] if rank == 0 else None)
    every = max(1, d.iterations // 10)
    times: list[float] = []
    m: dict[str, float] = {}

    def summary(**extra) -> dict:
        return {"iteration": distiller.iteration, "start_iteration": start, "world_size": world,
                "s_per_iter": sum(times[1:]) / len(times[1:]) if len(times) > 1 else float("nan"), **extra}

    def report_checkpoint(metrics: dict) -> None:
        """All ranks report (it is a barrier); rank 0 attaches the checkpoint."""
        _assert_replicas_agree(distiller, world)
        with tempfile.TemporaryDirectory(prefix="contra_ckpt_") as tmp:
            checkpoint = None
            if rank == 0:
                write_checkpoint(tmp, {"distiller": distiller.state_dict(), "history": history,
                                       "config": cfg.to_dict()}, config["run_token"])
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, **summary()}, checkpoint=checkpoint)

    try:
        while distiller.iteration < d.iterations:
            it = distiller.iteration
            if fault is not None:
                fault.maybe_fire(it, rank)
            t0 = time.perf_counter()
            plan = distiller.plan(it)
            losses = allreduce_step(distiller, plan, rank, world)
            distiller.apply_update(it, losses)  # the same step on every replica
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            m = distiller.metrics(plan, losses)
            for k, v in m.items():
                history.setdefault(k, []).append(v)
            sink.log(m, step=it)
            done = distiller.iteration
            if rank == 0 and (done % every == 0 or done == d.iterations):
                print(f"[distill] iteration {done}/{d.iterations}  loss {m['loss']:.4f}  syn_lr {m['syn_lr']:.5f}  "
                      f"{times[-1]:.2f} s/it  ({world} worker(s))", flush=True)
            if d.eval_every and done % d.eval_every == 0 and done < d.iterations and rank == 0:
                acc = _evaluate(cfg, distiller, data, done)  # the others wait in the next all_reduce
                history.setdefault("eval_acc", []).append(acc)
                sink.log({"eval_acc": acc}, step=done)
                print(f"[distill] iteration {done}: eval accuracy {acc:.2f}% ({d.eval_runs_periodic} run(s))",
                      flush=True)
            if d.checkpoint_every and done % d.checkpoint_every == 0 and done < d.iterations:
                report_checkpoint(m)
    except DistillationDiverged as e:
        # Deterministic and identical on every replica (same losses, gradients and state): every rank
        # stops at the same iteration; raising would make Ray retry a run that diverges again.
        if rank == 0:
            print(f"[distill] {type(e).__name__}: {e}", flush=True)
        return summary(error=f"{type(e).__name__}: {e}")
    if rank == 0:
        distiller.to_artifact(data).save(cfg.run_dir() / "distilled.safetensors")
    if loaded_at != d.iterations:  # the final state (not yet reported unless resumed at the very end)
        report_checkpoint(m)
    return summary(error=None)


# ---------------------------------------------------------------------------------------------- driver side

@dataclasses.dataclass
class DistributedRun:
    """What :func:`fit_distributed` returns.

    Attributes:
        result: the ``ray.train.Result``.
        state: the final ``Distiller.state_dict()`` (from the last checkpoint; ``None`` if there is none).
        history: metric history ``{name: [value per iteration]}``.
        summary: rank 0's summary (``iteration``, ``start_iteration``, ``world_size``, ``s_per_iter``, ``error``).
        artifact: path of ``distilled.safetensors``.
        error: ``"DistillationDiverged: ..."`` if the run diverged, else ``None``.
    """

    result: Any
    state: dict | None
    history: dict[str, list[float]]
    summary: dict
    artifact: Path
    error: str | None


def _with_absolute_paths(cfg: Config) -> Config:
    """A copy whose paths do not depend on the working directory (Ray workers run elsewhere)."""
    cfg = config_from_dict(cfg.to_dict())
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    cfg.data.cache_dir = str(Path(cfg.data.cache_dir).expanduser().resolve())
    if cfg.data.root and "://" not in cfg.data.root:
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    if cfg.experts.store:
        cfg.experts.store = str(Path(cfg.experts.store).expanduser().resolve())
    return cfg


def fit_distributed(cfg: Config, num_workers: int, use_gpu: bool = False, resume: bool = True,
                    setup: Setup | None = None, max_failures: int = DEFAULT_MAX_FAILURES,
                    fault: FaultInjection | None = None, tracking_run_id: str | None = None) -> DistributedRun:
    """Run the :class:`~ray.train.torch.TorchTrainer` (experts must exist; see :func:`run_distributed`).

    Args:
        cfg: validated config; ``cfg.name`` and ``<cfg.output_dir>/ray_train`` name the Ray Train run, so
            a re-run with the same ones resumes from its latest checkpoint (unless ``resume`` is false).
        num_workers: W, Ray Train workers; each takes ``max(1, cfg.threads)`` CPUs (and one GPU with
            ``use_gpu``) and runs that many torch threads.
        setup: ``(cfg, with_test) -> (PreparedData, expert store)`` run in every worker (default: data
            through the cache, store from ``cfg.expert_store()``).
        max_failures: worker-group restarts from the latest checkpoint before the run fails.
        fault: test hook, see :class:`FaultInjection`.
        tracking_run_id: MLflow run that rank 0 logs per-iteration metrics to.

    Raises:
        ray.train.TrainingFailedError: the workers failed more than ``max_failures`` times.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if num_workers < 1:
        raise ConfigError(f"--num-workers={num_workers}: must be >= 1")
    cfg = _with_absolute_paths(cfg)
    ensure_ray()
    threads = max(1, cfg.threads)
    loop_config = {"cfg": cfg.to_dict(), "use_gpu": use_gpu, "threads": threads, "resume": resume,
                   "run_token": uuid.uuid4().hex, "setup": setup, "fault": fault,
                   "tracking_uri": cfg.tracking_uri(), "tracking_run_id": tracking_run_id}
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": threads}),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=str(Path(cfg.output_dir) / "ray_train"),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
    result = trainer.fit()
    state, history = None, {}
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as path:
            saved = read_checkpoint(path)
        state, history = saved["distiller"], saved["history"]
    summary = dict(result.return_value or {})
    return DistributedRun(result, state, history, summary, cfg.run_dir() / "distilled.safetensors",
                          summary.get("error"))


def run_distributed(cfg: Config, num_workers: int, use_gpu: bool = False, resume: bool = True,
                    max_failures: int = DEFAULT_MAX_FAILURES) -> int:
    """The ``--num-workers W`` path of ``python -m contra_ray.distill``; returns the exit code.

    Prepares the data, trains missing experts (Ray tasks), opens an MLflow run, runs
    :func:`fit_distributed`, then logs the artifact, its image grid and the curves (as
    ``distill.main`` does). Exit codes: 0 done, 1 the workers failed or the run diverged, 2 invalid
    config / data / expert store.
    """
    from ray.train import TrainingFailedError

    from .artifact import DistilledSet
    from .distill import ensure_experts, log_set_visuals
    from .experts import ExpertStoreError
    from .tracking import RunLogger, init_tracking

    if num_workers < 1:
        print(f"error: --num-workers={num_workers}: must be >= 1", file=sys.stderr)
        return 2
    if str(cfg.device).startswith("cuda") and not use_gpu:
        print(f"error: device={cfg.device!r} with --num-workers needs --use-gpu (Ray hides GPUs from workers "
              "that request none)", file=sys.stderr)
        return 2
    cfg = _with_absolute_paths(cfg)
    try:
        data = prepare_data(cfg)  # fills the cache the workers read
        ensure_experts(cfg, data, train_missing=True)
    except (ConfigError, ExpertStoreError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.tracking.enabled:
        init_tracking(cfg.tracking_uri(), cfg.tracking.experiment)
    try:
        with RunLogger(cfg, f"{cfg.name}-distill", enabled=cfg.tracking.enabled) as logger:
            try:
                run = fit_distributed(cfg, num_workers, use_gpu, resume, max_failures=max_failures,
                                      tracking_run_id=logger.run_id)
            except TrainingFailedError as e:
                raise _RunFailed(f"distributed distillation failed ({max_failures} restart(s) allowed): {e}") from e
            if run.error is not None:
                raise _RunFailed(run.error)  # the MLflow run ends FAILED
            artifact = DistilledSet.load(run.artifact)
            logger.log_artifact(str(run.artifact))
            log_set_visuals(cfg, artifact, run.history, data.preprocessor, logger)
    except _RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"distilled set: {run.artifact}  (syn_lr {artifact.syn_lr:.5f}, {num_workers} worker(s), "
          f"{run.summary.get('s_per_iter', float('nan')):.3f} s/iteration)")
    return 0


class _RunFailed(Exception):
    """The worker group failed or the run diverged (message for the user)."""
