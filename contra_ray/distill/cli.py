"""Distillation from the command line: ``python -m contra_ray.distill --preset cifar10_ipc1 [--K 3 ...]``.

Learns synthetic images, soft labels and syn_lr by concurrent trajectory matching (paper Algorithm 1):
in this process (default) or sharded over ``--num-workers W`` Ray Train workers (:mod:`contra_ray.distill.remote`).
Both run the one loop :func:`contra_ray.distill.loop.run_loop`. Overrides: ``--set section.field=value`` or the
``--ipc/--K/--beta/--R/--syn-steps/...`` flags. A re-run with the same ``--name`` and ``--output-dir``
resumes from the newest valid checkpoint; a changed field that alters the result is refused by name, and
so is one that would replace a finished run's set, with or without a checkpoint (``--no-resume`` starts
over and replaces it). Exit status: 0 done, 1 diverged or workers failed, 2 invalid input (or the run
directory in use by another process), 130 interrupted (Ctrl-C; the newest checkpoint is kept).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from contra_ray.common import storage
from contra_ray.common.cli import DISTILL_HELP, add_common_args, cli_entry, cli_error, config_from_args, interrupted
from contra_ray.common.fileio import RunInUse, run_lock
from contra_ray.config import Config, ConfigError, DistillConfig, check_device
from contra_ray.data.prepare import prepare_data
from contra_ray.distill.artifact import ArtifactError, read_meta
from contra_ray.distill.checkpoint import check_resumable, checkpoint_dirs, newest_valid, resume_mismatches
from contra_ray.distill.distiller import DistillationDiverged
from contra_ray.distill.loop import run_distillation
from contra_ray.distill.memory import check_memory
from contra_ray.distill.remote import run_distributed
from contra_ray.experts.remote import ensure_experts
from contra_ray.experts.store import ExpertStoreError
from contra_ray.plots import log_set_visuals
from contra_ray.tracking import RunLogger, check_destinations, init_tracking

__all__ = ["DISTILL_HELP", "add_common_args", "config_from_args", "build_parser", "precheck_resume",
           "check_finished_run", "experts_interrupted_message", "interrupted_message", "run_in_run_dir", "main"]


# ---------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m contra_ray.distill", description=__doc__.split("\n")[0])
    add_common_args(p)
    g = p.add_argument_group("distillation (override the preset; see paper Table 5)")
    for f in dataclasses.fields(DistillConfig):
        g.add_argument(f"--{f.name.replace('_', '-')}", dest=f"distill.{f.name}", default=None,
                       help=DISTILL_HELP.get(f.name, f.name))
    p.add_argument("--experts", help="expert store directory (default: <run dir>/experts)")
    p.add_argument("--no-train-experts", action="store_true",
                   help="fail instead of training missing experts")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--num-workers", type=int, default=0,
                   help="Ray Train workers sharing the students (0: run in this process)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per Ray Train worker")
    p.add_argument("--note", default=None, help="description of the MLflow run (tag mlflow.note.content)")
    return p


def precheck_resume(cfg: Config, distributed: bool) -> None:
    """Before any work: refuse to resume a checkpoint made with a config that gives another result.

    Looks at the newest valid checkpoint of the run in both places a run of this name keeps them
    (``<run dir>/checkpoints`` in one process, ``<output_dir>/ray_train/<name>`` for Ray Train): the result
    does not depend on the worker count, so switching ``--num-workers`` must not bypass the check. Then
    a finished run's set is compared with this run's config (:func:`check_finished_run`), with or without a
    checkpoint.

    Raises:
        ConfigError: naming the changed fields (see :func:`contra_ray.distill.checkpoint.check_resumable`
            and :func:`check_finished_run`).
    """
    continues = False
    fetch_run(cfg)
    for root in (cfg.run_dir() / "checkpoints", ray_train_dir(cfg)):
        found = newest_valid(checkpoint_dirs(root), log=lambda line: None)  # the loop reports a torn one
        if found is not None:
            check_resumable(found[1].get("config"), cfg, found[0], int(found[1]["distiller"]["iteration"]))
            continues = True
    check_finished_run(cfg, continues)


def ray_train_dir(cfg: Config) -> Path:
    """The folder of the run's Ray Train checkpoints on this node: ``<output_dir>/ray_train/<name>``, or the
    node-local mirror of that location for a URI ``output_dir`` (filled by :func:`fetch_run`)."""
    return storage.local_mirror(storage.join(cfg.output_dir, "ray_train", cfg.name))


def fetch_run(cfg: Config) -> None:
    """A URI ``output_dir``: fetch what the run already published (its set, checkpoints, results; Ray
    Train's checkpoints) into this node's mirror, so resuming and the checks before work read them. The
    expert store is fetched by :func:`contra_ray.experts.ensure_experts`. Local: nothing to do.

    Raises:
        ConfigError: the location cannot be read (names it and the cause).
    """
    if not storage.is_uri(cfg.output_dir):
        return
    try:
        storage.pull(cfg.run_location(), cfg.run_dir(), exclude=["experts"])
        storage.pull(storage.join(cfg.output_dir, "ray_train", cfg.name), ray_train_dir(cfg))
    except storage.StorageError as e:
        raise ConfigError(f"output_dir={cfg.output_dir!r}: {e}") from None


def publish_run(cfg: Config) -> None:
    """A URI ``output_dir``: publish the run's folder (set, results, pictures) from this node's mirror to
    :meth:`~contra_ray.config.Config.run_location` (checkpoints and the expert store are published as they
    are written). Local: nothing to do."""
    if storage.is_uri(cfg.output_dir):
        storage.push(cfg.run_dir(), cfg.run_location(), exclude=["experts", "checkpoints"])


def check_finished_run(cfg: Config, continues: bool) -> None:
    """Before any work: refuse to replace a finished run's distilled set with one of another configuration.

    A run directory holding ``distilled.safetensors`` has finished; re-running its name rewrites that file
    (and the pipeline's ``results.json``). That is allowed for the configuration recorded in the set's meta
    (the run is repeated, or continued from its checkpoint), whatever ``distill.checkpoint_every`` is. The
    fields compared are those a checkpoint is checked on (:func:`contra_ray.distill.checkpoint.resume_mismatches`),
    plus ``distill.iterations`` when no checkpoint is there to continue from (``continues`` False: the run
    would start over and end elsewhere).

    Raises:
        ConfigError: naming every differing field with both values, the set, and the two ways out
            (``--no-resume`` replaces it, another ``--name`` keeps it); or the set cannot be read.
    """
    path = cfg.run_dir() / "distilled.safetensors"
    if not path.is_file():
        return
    way_out = "rerun with --no-resume to replace it, or use another --name"
    try:
        meta = read_meta(path)
    except ArtifactError as e:
        raise ConfigError(f"run {cfg.name!r} has a distilled set that cannot be compared with this run ({e}); "
                          f"{way_out}") from None
    diff = resume_mismatches(meta.get("config") or {}, cfg.to_dict(), where="the finished set")
    done = meta.get("iteration")
    if not continues and done is not None and int(done) != cfg.distill.iterations:
        diff.append(f"distill.iterations={int(done)} in the finished set, {cfg.distill.iterations} now (no "
                    "checkpoint to continue from: the run would start over)")
    if diff:
        where = storage.join(cfg.run_location(), path.name)
        raise ConfigError(f"run {cfg.name!r} has finished with another configuration ({where}): " + "; ".join(diff)
                          + f"; {way_out}")


def experts_interrupted_message(cfg: Config, then: str = "distills") -> str | None:
    """After Ctrl-C: what a rerun does with the expert store ``cfg.expert_store()`` if it holds fewer than
    ``experts.num_experts`` finished experts (the run stopped before or while training them), else ``None``.

    A rerun keeps the finished experts and resumes each unfinished one after its last saved epoch
    (:class:`contra_ray.experts.store.PartialExpert`); an expert with no saved epoch starts from its beginning.
    """
    store = cfg.expert_store()
    finished = len(list(store.glob("expert_*.safetensors"))) if store.is_dir() else 0
    wanted = cfg.experts.num_experts
    if finished >= wanted:
        return None
    partial = len([p for p in store.glob("expert_*.partial") if (p / "state.pt").is_file()]) if store.is_dir() else 0
    rest = wanted - finished - partial
    parts = [f"keeps the {finished} finished one(s)"] if finished else []
    if partial:
        parts.append(f"resumes {partial} unfinished one(s) after its last saved epoch")
    if rest > 0:
        parts.append(f"trains {'the other' if parts else 'all'} {rest} from their first epoch")
    return (f"interrupted before the experts were trained ({finished} of {wanted} finished in {store}): rerunning "
            f"the same command {', '.join(parts)}, then {then}")


def interrupted_message(cfg: Config) -> str:
    """What a user reads after Ctrl-C: where the run stands and what rerunning the same command does."""
    every = cfg.distill.checkpoint_every
    if every and (checkpoint_dirs(cfg.run_dir() / "checkpoints") or checkpoint_dirs(ray_train_dir(cfg))):
        return (f"interrupted: {cfg.run_location()} keeps the newest checkpoint (every "
                f"distill.checkpoint_every={every} iterations); rerun the same command to resume from it")
    experts = experts_interrupted_message(cfg)
    if experts is not None:
        return experts
    if not every:
        return ("interrupted: distill.checkpoint_every=0 keeps no checkpoint, so rerunning the same command starts the "
                "distillation over (finished experts and data are kept)")
    return (f"interrupted before the first checkpoint (every distill.checkpoint_every={every} iterations): rerunning "
            "the same command starts the distillation over (finished experts and data are kept)")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        extra = {k: v for k, v in vars(args).items() if k.startswith("distill.")}
        cfg = config_from_args(args, extra, verbatim={"experts.store": args.experts})
        if args.num_workers < 0:
            raise ConfigError(f"--num-workers={args.num_workers}: must be >= 0 (0: in this process)")
        if args.num_workers == 0:  # Ray Train workers get their own device (--use-gpu)
            check_device(cfg.device)
        if args.use_gpu and args.num_workers == 0:
            raise ConfigError("--use-gpu: GPUs for Ray Train workers (--num-workers >= 1); in this process set "
                              "--set device=cuda instead")
        if args.num_workers > 0 and cfg.distill.monitor_every:
            raise ConfigError(f"distill.monitor_every={cfg.distill.monitor_every}: the forgetting monitor runs "
                              "in-process only; use --num-workers 0")
        if not args.no_resume:
            precheck_resume(cfg, distributed=args.num_workers > 0)

        check_destinations(cfg.output_dir, cfg.tracking_uri() if cfg.tracking.enabled else None,
                           cache_dir=cfg.data.cache_dir)
    except ConfigError as e:
        return cli_error(e)
    return run_in_run_dir(cfg, lambda: _run(cfg, args))


def run_in_run_dir(cfg: Config, work) -> int:
    """``work()`` (returns an exit status) holding the run directory's lock (:func:`contra_ray.common.fileio.run_lock`),
    then (also after a failure or Ctrl-C) :func:`publish_run`.

    Returns 2 with one line if another process holds the run directory, and 130 with
    :func:`interrupted_message` on Ctrl-C; otherwise ``work()``'s status.
    """
    try:
        with run_lock(cfg.run_dir()):  # one process per run directory (on this node)
            try:
                return work()
            finally:
                publish_run(cfg)
    except RunInUse as e:
        return cli_error(e)
    except KeyboardInterrupt:
        return interrupted(interrupted_message(cfg))


def _run(cfg: Config, args: argparse.Namespace) -> int:
    if args.num_workers > 0:

        return run_distributed(cfg, num_workers=args.num_workers, use_gpu=args.use_gpu,
                               resume=not args.no_resume, train_missing=not args.no_train_experts, note=args.note)

    trained: list[tuple] = []  # (expert_id, seed, test_acc) of the experts trained here: child runs below
    try:
        data = prepare_data(cfg)
        plan = check_memory(cfg, data)
        store = ensure_experts(cfg, data, train_missing=not args.no_train_experts,
                               on_trained=lambda *e: trained.append(e))
    except (ConfigError, ExpertStoreError, FileNotFoundError, ValueError) as e:
        return cli_error(e)
    if cfg.tracking.enabled:
        init_tracking(cfg.tracking_uri(), cfg.tracking.experiment)
    try:
        with RunLogger(cfg, f"{cfg.name}-distill", enabled=cfg.tracking.enabled, note=args.note) as logger:
            for expert in trained:
                logger.log_expert(*expert)
            artifact, history = run_distillation(cfg, data, store, logger, resume=not args.no_resume,
                                                 announced_mode=plan.mode)
            out = cfg.run_dir() / "distilled.safetensors"
            artifact.save(out)
            logger.log_artifact(str(out))
            log_set_visuals(cfg, artifact, history, data.preprocessor, logger)
    except DistillationDiverged as e:
        return cli_error(f"{type(e).__name__}: {e}", 1)
    print(f"distilled set: {storage.join(cfg.run_location(), out.name)}  (syn_lr {artifact.syn_lr:.5f})")
    return 0
