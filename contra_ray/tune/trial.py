"""The trial side of a sweep: what runs inside one Ray Tune trial (:func:`run_trial`): distillation in the
trial process or through Ray Train (:mod:`contra_ray.distill.remote`), proxy accuracies reported to Tune for
ASHA, the final evaluation and the trial's MLflow child run. Design: docs/SWEEPS.md.

Tune pickles :func:`run_trial` by reference: it must stay a function of this importable module.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from typing import Any

import torch

from contra_ray.common import storage
from contra_ray.config import Config, ConfigError, EvalConfig, config_from_dict
from contra_ray.data import PreparedData
from contra_ray.data.prepare import prepare_data
from contra_ray.distill.artifact import DistilledSet
from contra_ray.distill.checkpoint import read_checkpoint
from contra_ray.distill.distiller import DistillationDiverged
from contra_ray.distill.loop import run_distillation
from contra_ray.distill.remote import ClusterSetup, make_trainer
from contra_ray.evaluate.sets import EvalSet, evaluate_sets
from contra_ray.evaluate.training import summarize
from contra_ray.experts.remote import ensure_experts
from contra_ray.plots import log_set_visuals
from contra_ray.tracking import RunLogger, accuracy_metrics
from contra_ray.tune.space import SweepError, SweepSpec, TrialPoint, materialize, point_of_values, trial_name

__all__ = ["SweepContext", "run_trial", "resolve_trial", "trial_index"]


@dataclasses.dataclass
class SweepContext:
    """What every trial needs (put in the object store once by ``tune.with_parameters``).

    ``points``: the driver's validated trials (``search.algorithm: grid`` runs exactly these); ``spec``,
    ``base`` (the nested overrides after the file's), ``run_dir`` (the sweep's location, a path or a URI) and
    ``store`` build the config of a trial Tune sampled itself (``random``); ``strict``: such a trial with an
    invalid configuration fails instead of ending as ``INVALID``; ``data_refs``: the data the driver prepared
    once, per expert store, in Ray's object store (a trial on any node reads them instead of decoding);
    ``relay``: the driver's :class:`~contra_ray.tracking_relay.TrackingRelay`, through which the trial (and its
    Ray Train rank 0) logs to MLflow (``None``: the trial opens the store itself).
    """

    points: list[TrialPoint]
    proxy: dict
    workers_per_trial: int
    use_gpu: bool
    threads: int
    parent_run_id: str | None
    tracking: bool
    note: str | None = None
    spec: SweepSpec | None = None
    base: dict = dataclasses.field(default_factory=dict)
    run_dir: str = ""
    store: str = ""
    strict: bool = False
    data_refs: dict = dataclasses.field(default_factory=dict)  # expert store -> ObjectRef of its PreparedData
    relay: Any = None


def trial_index(trial_id: str) -> int:
    """Tune's trial id ``"4b3f0_00003"`` -> 3: the order in which the search algorithm created the trial
    (kept by ``Tuner.restore``)."""
    return int(str(trial_id).rsplit("_", 1)[-1])


def resolve_trial(values: dict, index: int, ctx: SweepContext) -> tuple[TrialPoint, str | None]:
    """The trial Tune created with ``config["searched"] = values``: its :class:`TrialPoint` (name, searched
    values, full config with its run directory and expert store) and why its configuration is invalid
    (``None``: valid).

    ``grid``: the driver's point with these values (validated before the sweep). ``random``: built like the
    driver's points (:func:`contra_ray.tune.space.materialize`), named by ``index`` (Tune's trial index,
    :func:`trial_index`), validated with ``Config.validate``.

    Raises:
        SweepError: (grid) no point has these values; ConfigError: unknown field or wrong type.
    """
    if ctx.spec is None or ctx.spec.algorithm == "grid":
        for p in ctx.points:
            if p.values == values:
                return p, None
        raise SweepError(f"trial values {values!r} are none of the sweep's {len(ctx.points)} trials")
    cfg, searched = materialize(ctx.spec, ctx.base, point_of_values(ctx.spec, values))
    name = trial_name(index, searched)
    cfg.output_dir, cfg.name, cfg.experts.store = ctx.run_dir, name, ctx.store
    try:
        cfg.validate()
        reason = None
    except (ConfigError, ValueError) as e:
        reason = str(e)
    return TrialPoint(index, name, searched, cfg.to_dict(), values), reason


class _TrialLogger:
    """``run_distillation``'s logger: forwards to the MLflow child run and reports each proxy evaluation
    (``eval_acc``) to Tune with the loss of that iteration."""

    def __init__(self, logger):
        self.logger, self.last = logger, {}

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        from ray import tune

        self.logger.log_metrics(metrics, step)
        if "loss" in metrics:
            self.last = metrics
        if "eval_acc" in metrics:
            tune.report({"iteration": step, "proxy_acc": float(metrics["eval_acc"]),
                         "loss": float(self.last.get("loss", math.nan)),
                         "syn_lr": float(self.last.get("syn_lr", math.nan))})


def _proxy_callback(iterations: int, eval_every: int):
    """A Ray Train callback forwarding rank 0's reports to Tune as ``proxy_acc`` results.

    The proxy accuracy is taken from the report's ``eval_acc`` when :mod:`contra_ray.distill.remote` puts it
    there, otherwise from the history in the attached checkpoint (the trial sets ``checkpoint_every`` to
    the proxy period, so each evaluation is followed by a checkpoint at the same iteration). The report
    at the last iteration is not forwarded: ASHA stops a trial at ``max_t`` and the trial still has to
    run its final evaluation.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class ProxyReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            m = dict(metrics[0])
            it = int(m.get("iteration", 0))
            if it >= iterations or "error" in m:
                return
            acc = m.get("eval_acc")
            if acc is None and checkpoint is not None and it % eval_every == 0:
                with checkpoint.as_directory() as path:
                    accs = read_checkpoint(path)["history"].get("eval_acc", [])
                acc = accs[-1] if len(accs) >= it // eval_every else None
            if acc is None:
                return
            self._training_actor_item_queue.put({"iteration": it, "proxy_acc": float(acc),
                                                 "loss": float(m.get("loss", math.nan)),
                                                 "syn_lr": float(m.get("syn_lr", math.nan))})

    return ProxyReportCallback()


def _distill_with_ray_train(cfg: Config, ctx: SweepContext, run_id: str | None):
    """Fit a TorchTrainer over ``ctx.workers_per_trial`` workers; returns (artifact, history).

    Raises:
        DistillationDiverged: the workers reported a diverged run.
    """
    callback = _proxy_callback(cfg.distill.iterations, cfg.distill.eval_every)
    trainer = make_trainer(cfg, ctx.workers_per_trial, ctx.use_gpu, resume=False, callbacks=[callback],
                           setup=ClusterSetup(ctx.data_refs.get(cfg.experts.store)),
                           tracking_run_id=run_id, num_to_keep=1, relay=ctx.relay)
    result = trainer.fit()
    if (result.metrics or {}).get("error"):
        raise DistillationDiverged(result.metrics["error"])
    history: dict = {}
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as path:
            history = read_checkpoint(path)["history"]
    return DistilledSet.load(storage.join(cfg.run_location(), "distilled.safetensors")), history


def final_accuracies(artifact: DistilledSet, data: PreparedData, ecfg: EvalConfig, device: str, threads: int,
                     as_tasks: bool) -> list[float]:
    """Test accuracies of ``ecfg.runs`` networks of the distillation model trained on the distilled set
    (:func:`contra_ray.evaluate.sets.evaluate_sets`).

    ``as_tasks`` (W >= 1): one Ray task per run with ``ecfg.cpus_per_run`` / ``ecfg.gpus_per_run`` (on a GPU
    only if it asks for one), scheduled outside the trial's placement group (which holds only the Train
    driver's 0.01 CPU; Tune would otherwise capture the tasks into it). Else sequentially in the trial
    process on ``device``, on its own CPUs / GPU.
    """
    if as_tasks:
        device = "cuda" if ecfg.gpus_per_run > 0 else "cpu"
    method = artifact.meta.get("method", "contra")
    _, accs = evaluate_sets([EvalSet(method, artifact.images, artifact.targets(), artifact.syn_lr)], [data.spec.name],
                            data.spec, ecfg, data.test_x, data.test.labels, ipc=artifact.ipc, device=device,
                            threads=threads, use_ray=as_tasks)
    return accs[(method, data.spec.name)]


def run_trial(config: dict, ctx: SweepContext) -> None:
    """One trial (a Tune function trainable and, with W >= 1, the Ray Train driver)."""
    from ray import tune

    point, invalid = resolve_trial(config["searched"], trial_index(tune.get_context().get_trial_id()), ctx)
    if invalid is not None:  # only a trial Tune sampled itself (search.algorithm: random)
        if ctx.strict:
            raise ConfigError(f"trial {point.name}: invalid combination: {invalid}")
        tune.report({"iteration": 0, "invalid": invalid})
        return
    cfg = config_from_dict(point.config)  # logged as is; its eval recipe is the final evaluation's
    final_eval = cfg.eval
    run_cfg = copy.deepcopy(cfg)  # what the loop runs with: proxy evaluations every proxy.eval_every
    run_cfg.eval.epochs, run_cfg.eval.runs = ctx.proxy["epochs"], ctx.proxy["runs"]
    run_cfg.distill.eval_every, run_cfg.distill.eval_runs_periodic = ctx.proxy["eval_every"], ctx.proxy["runs"]
    if ctx.workers_per_trial:
        run_cfg.distill.checkpoint_every = ctx.proxy["eval_every"]  # see _proxy_callback
    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    t0 = time.time()
    if cfg.experts.store in ctx.data_refs:
        import ray

        data = ray.get(ctx.data_refs[cfg.experts.store])
    else:
        data = prepare_data(cfg)
    with RunLogger(cfg, point.name, parent_run_id=ctx.parent_run_id, enabled=ctx.tracking, role="trial",
                   entry_point="contra_ray.tune", note=ctx.note, relay=ctx.relay) as logger:
        logger.log_params({"tune.trial_index": point.index, "tune.searched": json.dumps(list(point.searched)),
                           "tune.trial_id": tune.get_context().get_trial_id(),
                           "tune.workers_per_trial": ctx.workers_per_trial,
                           **{f"tune.proxy.{k}": v for k, v in ctx.proxy.items()}})
        if ctx.workers_per_trial == 0:
            store = ensure_experts(cfg, data, train_missing=False)
            artifact, history = run_distillation(run_cfg, data, store, _TrialLogger(logger), resume=True,
                                                 progress=False)
        else:
            artifact, history = _distill_with_ray_train(run_cfg, ctx, logger.run_id)
        artifact.meta["eval"], artifact.meta["config"] = dataclasses.asdict(final_eval), cfg.to_dict()
        out = cfg.run_dir() / "distilled.safetensors"
        artifact.save(out)
        accs = final_accuracies(artifact, data, final_eval, str(cfg.device), ctx.threads,
                                 as_tasks=ctx.workers_per_trial > 0)
        mean, std = summarize(accs)
        # the trial evaluates the distillation network only: it is final_acc's main model
        logger.log_metrics({**accuracy_metrics({cfg.model.name: (mean, std)}, cfg.model.name),
                            "total_minutes": (time.time() - t0) / 60}, step=cfg.distill.iterations)
        logger.log_artifact(str(out))
        log_set_visuals(cfg, artifact, history, data.preprocessor, logger, eval_every=run_cfg.distill.eval_every)
        if storage.is_uri(cfg.output_dir):  # this node's mirror -> the trial's location (checkpoints went already)
            storage.push(cfg.run_dir(), cfg.run_location(), exclude=["checkpoints"])
    proxy = history.get("eval_acc", [])
    tune.report({"iteration": cfg.distill.iterations, "final_acc": mean, "final_acc_std": std,
                 "proxy_acc": float(proxy[-1]) if proxy else mean,
                 "loss": float(history["loss"][-1]) if history.get("loss") else math.nan,
                 "syn_lr": float(artifact.syn_lr)})
