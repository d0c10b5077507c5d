"""Distillation on a Ray Train worker group: ``python -m contra_ray.distill --num-workers W [--use-gpu]``.

The Ray edge of the one loop (:func:`contra_ray.distill.loop.run_loop`): every worker holds a replica of the
synthetic state (a :class:`~contra_ray.distill.distiller.Distiller`) and runs the same loop with
:class:`~contra_ray.distill.loop.AllReduceSync` as its gradient synchronisation (worker ``w`` of ``W`` unrolls the
active students ``active[w::W]``; one all-reduce, gloo on CPU and NCCL on GPU, sums ∂L/∂(images, label
logits, syn_lr); every replica takes the same step) and :class:`RayTrainCheckpoints` as its checkpointer
(the :mod:`contra_ray.distill.checkpoint` format handed to ``ray.train.report``). The result does not depend on
``W`` beyond floating-point summation order (tests: W = 1 and W = 2 agree to 1e-10 relative in float64).

A worker-group restart (``FailureConfig(max_failures)``) and a re-run of the same command (same
``name``, storage ``<output_dir>/ray_train``) both continue from the newest valid checkpoint,
bit-identically on CPU; a changed field that alters the result is refused by name.

Driver (:func:`run_distributed`): prepares the data (fills the on-disk cache the workers read), trains
missing experts, opens the MLflow run, fits :func:`make_trainer`'s ``TorchTrainer``, then logs the
artifact and curves. Rank 0 logs per-iteration metrics to that MLflow run (through the relay) and writes
``<run_dir>/distilled.safetensors``. On a multi-node cluster ``output_dir`` (and ``experts.store``) is a URI
(``s3://…``, ``gs://…``: Ray Train's ``storage_path`` and the published store and set,
:mod:`contra_ray.common.storage`) or a folder every node mounts; the data reach the workers through Ray's
object store (a streamed set as handles that fill each node's ``data.cache_dir`` from ``data.shared_cache``,
:mod:`contra_ray.data.imagenet`); only the driver's node writes
to MLflow (rank 0 logs through the driver's :mod:`contra_ray.tracking_relay`).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from contra_ray.augment import dsa_if
from contra_ray.common import storage
from contra_ray.common.cli import cli_error
from contra_ray.common.raycluster import check_locations_on_nodes, ensure_ray
from contra_ray.config import Config, ConfigError, config_from_dict
from contra_ray.data.prepare import PreparedData, prepare_data, streamed_locations
from contra_ray.distill.artifact import DistilledSet
from contra_ray.distill.checkpoint import (
    CheckpointError,
    newest_valid,
    read_checkpoint,
    read_manifest,
    write_checkpoint,
)
from contra_ray.distill.distiller import DistillationDiverged, Distiller, init_pool
from contra_ray.distill.loop import AllReduceSync, run_loop, worker_share
from contra_ray.distill.memory import check_memory
from contra_ray.experts.remote import ensure_experts
from contra_ray.experts.store import ExpertStore, ExpertStoreError
from contra_ray.plots import log_set_visuals
from contra_ray.tracking import RunLogger, init_tracking
from contra_ray.tracking_relay import start_relay

__all__ = ["CheckpointError", "FaultInjection", "PreparedSetup", "ClusterSetup", "DistributedRun",
           "RayTrainCheckpoints",
           "worker_share", "write_checkpoint", "read_checkpoint", "train_loop_per_worker", "make_trainer",
           "fit_distributed", "run_distributed"]

DEFAULT_MAX_FAILURES = 3

Setup = Callable[[Config, bool], tuple[PreparedData, Any]]  # (cfg, with_test) -> (data, expert store)


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
        return self.data, ExpertStore.open(self.store_path)


@dataclasses.dataclass
class ClusterSetup:
    """The default setup of :func:`run_distributed`: the data the driver prepared, from Ray's object store
    (``data_ref``; ``None``: prepared again on the worker), and the expert
    store fetched from its location into this node's mirror (once per node, under a lock)."""

    data_ref: Any = None

    def __call__(self, cfg: Config, with_test: bool) -> tuple[PreparedData, Any]:
        return _default_setup(cfg, with_test, self.data_ref)


def _default_setup(cfg: Config, with_test: bool, data_ref: Any = None) -> tuple[PreparedData, Any]:
    """The prepared data (from the object store, else through the on-disk cache the driver filled) and the
    (checked) expert store, fetched from its location when that is a URI."""
    if data_ref is not None:
        import ray

        data = ray.get(data_ref)
    else:
        data = prepare_data(cfg, with_test=with_test)
    with storage.pulled(cfg.expert_store_location(), "the expert store") as path:
        store = ExpertStore.open(path)
    d = cfg.distill
    store.check_compatible(data.spec, data.train.dataset_id, cfg.data.zca, d.max_start_epoch + d.expert_epochs,
                           data.preprocessor.fingerprint())
    return data, store


class _MetricSink:
    """Rank 0's per-iteration metrics into the driver's MLflow run through the driver's
    :class:`~contra_ray.tracking_relay.TrackingRelay` (no relay or ``None`` run id: no-op; nothing here opens
    the store), under the names of :data:`contra_ray.tracking.METRICS` (``loss/start_<t>`` keeps its ``/``, as
    in one process). Steps a restarted worker group replays are dropped by the relay."""

    def __init__(self, relay: Any, run_id: str | None):
        self.relay, self.run_id = relay, run_id if relay is not None else None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is not None:
            self.relay.log_metrics(self.run_id, metrics, step)


class RayTrainCheckpoints:
    """The loop's checkpointer on a Ray Train worker (the :mod:`contra_ray.distill.checkpoint` format).

    ``save``: every rank calls ``ray.train.report`` (a barrier); rank 0 attaches a directory written by
    :func:`~contra_ray.distill.checkpoint.write_checkpoint`. ``load``: ``ray.train.get_checkpoint()`` (a
    worker-group restart, or a re-run with the same ``name`` and ``storage_path``); if it fails its
    manifest, that is reported in one line and the newest valid one among
    ``ray.train.get_all_reported_checkpoints()`` is taken. With ``resume`` false only checkpoints of this
    very fit (same run token: a worker-group restart) are loaded.
    """

    def __init__(self, rank: int, run_token: str, resume: bool, summary: Callable[[], dict]):
        self.rank, self.run_token, self.resume, self.summary = rank, run_token, resume, summary

    def _candidates(self) -> list:
        import ray.train

        latest = ray.train.get_checkpoint()
        if latest is None:
            return []
        out = [latest]
        try:
            reported = ray.train.get_all_reported_checkpoints(timeout_s=30)
            older = sorted(reported, key=lambda r: int(r.metrics.get("iteration", -1)), reverse=True)
            out += [r.checkpoint for r in older if r.checkpoint.path != latest.path]
        except Exception:  # noqa: BLE001 - an older Ray without the API: only the latest is known
            pass
        return out

    def load(self) -> dict | None:
        say = (lambda line: print(line, flush=True)) if self.rank == 0 else (lambda line: None)
        for ckpt in self._candidates():
            with ckpt.as_directory() as path:
                if not self.resume:
                    try:
                        token = read_manifest(path).get("run_token")
                    except CheckpointError:
                        token = None
                    if token != self.run_token:
                        say(f"[distill] resume disabled: ignoring checkpoint {ckpt.path} of an earlier run")
                        return None
                found = newest_valid([Path(path)], log=say)
            if found is not None:
                state = found[1]
                state["path"] = ckpt.path
                return state
        return None

    def save(self, state: dict, iteration: int, metrics: dict) -> None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="contra_ckpt_") as tmp:
            checkpoint = None
            if self.rank == 0:
                write_checkpoint(tmp, state, self.run_token)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, **self.summary(), "iteration": iteration}, checkpoint=checkpoint)


def train_loop_per_worker(config: dict) -> dict:
    """Body of every Ray Train worker: the one loop (:func:`contra_ray.distill.loop.run_loop`) with
    :class:`~contra_ray.distill.loop.AllReduceSync` and :class:`RayTrainCheckpoints`. Returns a summary (rank 0's
    becomes ``Result.return_value``): ``iteration``, ``start_iteration`` (where this attempt began),
    ``world_size``, ``s_per_iter`` (mean over this attempt's iterations after the first) and ``error``
    (``"DistillationDiverged: ..."`` or ``None``).

    ``config`` keys: ``cfg`` (``Config.to_dict()``), ``use_gpu``, ``threads``, ``resume``, ``run_token``,
    ``setup`` (a :data:`Setup` or ``None`` for the default), ``fault`` (:class:`FaultInjection` or
    ``None``), ``tracking_relay`` (the driver's :class:`~contra_ray.tracking_relay.TrackingRelay`) and
    ``tracking_run_id`` (rank 0 logs metrics to that run through the relay; ``None``: no MLflow).
    """
    import ray.train
    import ray.train.torch


    cfg = config_from_dict(config["cfg"])
    d = cfg.distill
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    setup: Setup = config["setup"] or _default_setup
    fault: FaultInjection | None = config["fault"]

    data, store = setup(cfg, rank == 0 and d.eval_every > 0)
    distiller = Distiller(cfg, store, data.spec, *init_pool(cfg, data),
                          augment=dsa_if(d.dsa), device=str(device), workers=world)
    if rank == 0 and distiller.memory_plan.mode != config.get("announced_mode"):  # the driver printed its plan
        print(f"[distill] memory: {distiller.memory_plan.describe()}", flush=True)
    progress = {"start": distiller.iteration, "s_per_iter": float("nan")}

    def summary(**extra) -> dict:
        return {"iteration": distiller.iteration, "start_iteration": progress["start"], "world_size": world,
                "s_per_iter": progress["s_per_iter"], **extra}

    checkpoints = RayTrainCheckpoints(rank, config["run_token"], config["resume"], summary)
    logger = _MetricSink(config["tracking_relay"], config["tracking_run_id"] if rank == 0 else None)
    try:
        result = run_loop(distiller, cfg, data if rank == 0 else None, sync=AllReduceSync(rank, world),
                          checkpoints=checkpoints, logger=logger, resume=True, progress="lines",
                          before_iteration=(lambda it: fault.maybe_fire(it, rank)) if fault else None)
    except DistillationDiverged as e:
        # Deterministic and identical on every replica (same losses, gradients and state): every rank
        # stops at the same iteration; raising would make Ray retry a run that diverges again.
        if rank == 0:
            print(f"[distill] {type(e).__name__}: {e}", flush=True)
        return summary(error=f"{type(e).__name__}: {e}")
    progress.update(start=result.start_iteration, s_per_iter=result.s_per_iter)
    if rank == 0:
        distiller.to_artifact(data.preprocessor, data.train).save(cfg.run_dir() / "distilled.safetensors")
        if storage.is_uri(cfg.output_dir):  # this node's mirror -> the run's location, read by the driver
            storage.push(cfg.run_dir(), cfg.run_location(), files=["distilled.safetensors"])
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
    if not storage.is_uri(cfg.output_dir):
        cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    cfg.data.cache_dir = str(Path(cfg.data.cache_dir).expanduser().resolve())
    if cfg.data.shared_cache and not storage.is_uri(cfg.data.shared_cache):
        cfg.data.shared_cache = str(Path(cfg.data.shared_cache).expanduser().resolve())
    if cfg.data.root and "://" not in cfg.data.root:
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    if cfg.experts.store and not storage.is_uri(cfg.experts.store):
        cfg.experts.store = str(Path(cfg.experts.store).expanduser().resolve())
    return cfg


def make_trainer(cfg: Config, num_workers: int, use_gpu: bool = False, resume: bool = True, *,
                 setup: Setup | None = None, max_failures: int = DEFAULT_MAX_FAILURES,
                 fault: FaultInjection | None = None, tracking_run_id: str | None = None,
                 callbacks: list | None = None, num_to_keep: int = 2, announced_mode: str | None = None,
                 relay: Any = None):
    """The :class:`~ray.train.torch.TorchTrainer` of a distributed distillation (used by the distill CLI,
    :func:`fit_distributed` and Tune trials).

    Args:
        cfg: validated config; ``cfg.name`` and ``<cfg.output_dir>/ray_train`` name the Ray Train run, so
            a re-run with the same ones resumes from its latest valid checkpoint (unless ``resume`` is false).
        num_workers: W, Ray Train workers; each takes ``max(1, cfg.threads)`` CPUs (and one GPU with
            ``use_gpu``) and runs that many torch threads.
        setup: ``(cfg, with_test) -> (PreparedData, expert store)`` run in every worker (default: data
            through the cache, store from ``cfg.expert_store()``).
        max_failures: worker-group restarts from the latest checkpoint before the run fails.
        fault: test hook, see :class:`FaultInjection`.
        tracking_run_id: MLflow run that rank 0 logs per-iteration metrics to, through ``relay``.
        relay: the driver's :class:`~contra_ray.tracking_relay.TrackingRelay` (a Tune trial passes its
            sweep's); ``None`` with a ``tracking_run_id``: one is started here, on the caller's node, which
            must then be the driver's (:func:`~contra_ray.tracking_relay.start_relay`).
        callbacks: Ray Train callbacks (Tune's report callback).
        num_to_keep: checkpoints Ray keeps (2: a torn newest one leaves one to fall back to).
        announced_mode: the unroll mode the driver's :func:`contra_ray.distill.memory.check_memory` printed;
            rank 0 prints its own plan only if it differs (``None``: always).

    Raises:
        ConfigError: ``num_workers < 1``.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if num_workers < 1:
        raise ConfigError(f"--num-workers={num_workers}: must be >= 1")
    cfg = _with_absolute_paths(cfg)
    if tracking_run_id is not None and relay is None:
        relay = start_relay(cfg.tracking_uri())
    threads = max(1, cfg.threads)
    storage_path, storage_filesystem = storage.ray_storage(storage.join(cfg.output_dir, "ray_train"))
    loop_config = {"cfg": cfg.to_dict(), "use_gpu": use_gpu, "threads": threads, "resume": resume,
                   "run_token": uuid.uuid4().hex, "setup": setup, "fault": fault,
                   "tracking_relay": relay, "tracking_run_id": tracking_run_id,
                   "announced_mode": announced_mode}
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": threads}),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
            callbacks=callbacks or None,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=num_to_keep)))


def fit_distributed(cfg: Config, num_workers: int, use_gpu: bool = False, resume: bool = True,
                    setup: Setup | None = None, max_failures: int = DEFAULT_MAX_FAILURES,
                    fault: FaultInjection | None = None, tracking_run_id: str | None = None,
                    announced_mode: str | None = None, relay: Any = None) -> DistributedRun:
    """Fit :func:`make_trainer`'s trainer (experts must exist; see :func:`run_distributed`; ``announced_mode``,
    ``relay``: see :func:`make_trainer`).

    Raises:
        ray.train.TrainingFailedError: the workers failed more than ``max_failures`` times.
    """
    ensure_ray()
    trainer = make_trainer(cfg, num_workers, use_gpu, resume, setup=setup, max_failures=max_failures,
                           fault=fault, tracking_run_id=tracking_run_id, announced_mode=announced_mode,
                           relay=relay)
    result = trainer.fit()
    state, history = None, {}
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as path:
            saved = read_checkpoint(path)
        state, history = saved["distiller"], saved["history"]
    summary = dict(result.return_value or {})
    cfg = _with_absolute_paths(cfg)
    if storage.is_uri(cfg.output_dir) and summary.get("error") is None:  # rank 0 published it; fetch it here
        storage.pull(cfg.run_location(), cfg.run_dir(), files=["distilled.safetensors"])
    return DistributedRun(result, state, history, summary, cfg.run_dir() / "distilled.safetensors",
                          summary.get("error"))


def run_distributed(cfg: Config, num_workers: int, use_gpu: bool = False, resume: bool = True,
                    max_failures: int = DEFAULT_MAX_FAILURES, train_missing: bool = True,
                    note: str | None = None) -> int:
    """The ``--num-workers W`` path of ``python -m contra_ray.distill``; returns the exit code.

    Prepares the data, trains missing experts (Ray tasks), opens an MLflow run, runs
    :func:`fit_distributed`, then logs the artifact, its image grid and the curves (as
    ``distill.main`` does). Exit codes: 0 done, 1 the workers failed or the run diverged, 2 invalid
    config / data / expert store.
    """
    from ray.train import TrainingFailedError

    if num_workers < 1:
        return cli_error(f"--num-workers={num_workers}: must be >= 1")
    if str(cfg.device).startswith("cuda") and not use_gpu:
        return cli_error(f"device={cfg.device!r} with --num-workers needs --use-gpu (Ray hides GPUs from workers "
              "that request none)")
    cfg = _with_absolute_paths(cfg)
    import ray

    ensure_ray()
    need, cpus = num_workers * max(1, cfg.threads), ray.cluster_resources().get("CPU", 0.0)
    if need > cpus:
        msg = (f"--num-workers={num_workers} with threads={max(1, cfg.threads)} needs {need} CPUs, the Ray cluster "
               f"has {cpus:g}")
        if not os.environ.get("RAY_ADDRESS"):  # a private local instance cannot grow: the workers would wait forever
            return cli_error(f"{msg}; use fewer workers or threads")
        print(f"warning: {msg}; waiting for the autoscaler", file=sys.stderr)
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if use_gpu and num_workers > gpus:
        msg = f"--use-gpu with --num-workers={num_workers} needs {num_workers} GPUs, the Ray cluster has {gpus:g}"
        if not os.environ.get("RAY_ADDRESS"):
            return cli_error(f"{msg}; use fewer workers, or drop --use-gpu to train on CPUs")
        print(f"warning: {msg}; waiting for the autoscaler", file=sys.stderr)
    try:
        # every node must reach the locations the workers read and write (a node-local folder fails here, not
        # later); the data reach the workers through Ray's object store (a streamed set as handles that fill
        # each node's data.cache_dir from data.shared_cache, or read a shared data.cache_dir)
        store_location = cfg.expert_store_location()
        shared = {"output_dir": cfg.output_dir,
                  "experts.store": store_location if storage.is_uri(store_location) else cfg.expert_store().parent,
                  **streamed_locations(cfg)}
        check_locations_on_nodes(shared)
        data = prepare_data(cfg)
        plan = check_memory(cfg, data, workers=num_workers)
        trained: list[tuple] = []  # (expert_id, seed, test_acc): child runs of the distill run below
        ensure_experts(cfg, data, train_missing=train_missing, on_trained=lambda *e: trained.append(e))
        setup = ClusterSetup(ray.put(data))
    except (ConfigError, ExpertStoreError, FileNotFoundError, ValueError) as e:
        return cli_error(e)
    relay = None
    if cfg.tracking.enabled:
        init_tracking(cfg.tracking_uri(), cfg.tracking.experiment)
        relay = start_relay(cfg.tracking_uri(), cfg.tracking.experiment)  # rank 0 logs through it
    try:
        with RunLogger(cfg, f"{cfg.name}-distill", enabled=cfg.tracking.enabled, note=note) as logger:
            for expert in trained:
                logger.log_expert(*expert)
            try:
                run = fit_distributed(cfg, num_workers, use_gpu, resume, setup=setup, max_failures=max_failures,
                                      tracking_run_id=logger.run_id, announced_mode=plan.mode, relay=relay)
            except TrainingFailedError as e:
                raise _RunFailed(f"distributed distillation failed ({max_failures} restart(s) allowed): {e}") from e
            finally:
                if relay is not None:
                    relay.close()
            if run.error is not None:
                raise _RunFailed(run.error)  # the MLflow run ends FAILED
            artifact = DistilledSet.load(run.artifact)
            logger.log_artifact(str(run.artifact))
            log_set_visuals(cfg, artifact, run.history, data.preprocessor, logger)
    except _RunFailed as e:
        return cli_error(e, 1)
    where = storage.join(cfg.run_location(), run.artifact.name)
    print(f"distilled set: {where}  (syn_lr {artifact.syn_lr:.5f}, {num_workers} worker(s), "
          f"{run.summary.get('s_per_iter', float('nan')):.3f} s/iteration)")
    return 0


class _RunFailed(Exception):
    """The worker group failed or the run diverged (message for the user)."""
