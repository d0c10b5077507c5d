"""Distillation from the command line: ``python -m contra_ray.distill --preset cifar10_ipc1 [--K 3 ...]``.

Learns synthetic images, soft labels and syn_lr by concurrent trajectory matching (paper Algorithm 1):
in this process (default) or sharded over ``--num-workers W`` Ray Train workers (:mod:`contra_ray.distributed`).
Both run the one loop :func:`contra_ray.loop.run_loop`. Overrides: ``--set section.field=value`` or the
``--ipc/--K/--beta/--R/--syn-steps/...`` flags. A re-run with the same ``--name`` and ``--output-dir``
resumes from the newest valid checkpoint; a changed field that alters the result is refused by name
(``--no-resume`` starts over). Exit status: 0 done, 1 diverged or workers failed, 2 invalid input (or the run directory in use by another
process), 130 interrupted (Ctrl-C; the newest checkpoint is kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import (Config, ConfigError, DistillConfig, check_device, load_config, parse_overrides,
                     set_dotted)

__all__ = ["DISTILL_HELP", "add_common_args", "config_from_args", "build_parser", "precheck_resume",
           "interrupted_message", "run_in_run_dir", "main"]


# ---------------------------------------------------------------------- CLI

DISTILL_HELP = {
    "ipc": "images per class (IPC)", "beta": "β: weight of the sampled segment in Eq. 8 (1 - β spread over K)",
    "K": "number of concurrent segments K (0 with β=1: plain MTT)",
    "R": "spacing R of concurrent starts in epochs (default floor((T+ - T-)/K))",
    "syn_steps": "student steps N per segment", "expert_epochs": "expert epochs M per segment",
    "min_start_epoch": "T-: lowest segment start epoch", "max_start_epoch": "T+: sampled start is in [T-, T+)",
    "batch_syn": "synthetic mini-batch size (default: the whole set)", "iterations": "distillation iterations",
    "lr_img": "learning rate of the synthetic pixels", "lr_label": "learning rate of the soft labels",
    "lr_lr": "learning rate of syn_lr", "syn_lr_init": "initial student step size syn_lr",
    "soft_labels": "learn soft labels (DATM)", "init": "image init: real_correct | real | noise",
    "dsa": "DSA augmentation in the student steps", "seed": "run seed (plans are a function of seed, iteration)",
    "eval_every": "evaluate every n iterations (0: only at the end)",
    "eval_runs_periodic": "runs per periodic evaluation", "checkpoint_every": "checkpoint every n iterations",
    "dtype": "float32 | float64",
    "monitor_every": "log the Eq. 2 loss on the held-out reference expert every n iterations (0: off)",
    "monitor_epochs": "comma-separated epochs of the reference expert to monitor (default T-..T+)",
    "reference_expert": "expert id held out of distillation when monitoring (default: the highest id)",
    "unroll_memory": "full: graph of all N steps; constant: adjoint walk, memory ~ one step (exact gradient); "
                     "auto: the planner measures one step and picks (docs/constant_memory.md)",
    "student_execution": "sequential | batched (the K+1 students vmapped together, one call per step; GPUs)",
}


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cifar10_ipc1_cpu",
                   help="preset name in contra_ray/presets or a YAML path (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set eval.runs=3 (repeatable)")
    p.add_argument("--name", help="run name (output subdirectory; default from the preset)")
    p.add_argument("--output-dir", help="root of run directories (default: runs)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<output-dir>/mlflow.db)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


def config_from_args(args: argparse.Namespace, extra: dict | None = None, verbatim: dict | None = None) -> Config:
    """The validated config of a CLI: preset, ``--set`` items, then ``extra`` (``{"distill.K": "3"}``, values
    read as YAML like ``--set``), then ``--name``/``--output-dir``/``--tracking-uri`` and ``verbatim``
    (``{"experts.store": path}``) taken as given (a run named ``yes`` or ``1e3`` stays that string).

    Raises:
        ConfigError: see :func:`contra_ray.config.load_config`.
    """
    overrides = list(args.set)
    for key, value in (extra or {}).items():
        if value is not None:
            overrides.append(f"{key}={value}")
    nested = parse_overrides(overrides)
    for key, value in (("name", args.name), ("output_dir", args.output_dir), ("tracking.uri", args.tracking_uri),
                       *(verbatim or {}).items()):
        if value is not None:  # an empty --name or --output-dir is refused by validate(), not ignored
            set_dotted(nested, key, value)
    if args.no_tracking:
        set_dotted(nested, "tracking.enabled", False)
    return load_config(args.preset, nested)


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
    does not depend on the worker count, so switching ``--num-workers`` must not bypass the check.

    Raises:
        ConfigError: naming the changed fields (see :func:`contra_ray.checkpoint.check_resumable`).
    """
    from pathlib import Path

    from .checkpoint import check_resumable, checkpoint_dirs, newest_valid

    for root in (cfg.run_dir() / "checkpoints", Path(cfg.output_dir) / "ray_train" / cfg.name):
        found = newest_valid(checkpoint_dirs(root), log=lambda line: None)  # the loop reports a torn one
        if found is not None:
            check_resumable(found[1].get("config"), cfg, found[0], int(found[1]["distiller"]["iteration"]))


def interrupted_message(cfg: Config) -> str:
    """What a user reads after Ctrl-C: where the run stands and how to go on."""
    from pathlib import Path

    from .checkpoint import checkpoint_dirs

    every = cfg.distill.checkpoint_every
    if not every:
        return "interrupted: distill.checkpoint_every=0 keeps no checkpoint, so rerunning the same command starts over"
    if checkpoint_dirs(cfg.run_dir() / "checkpoints") or checkpoint_dirs(Path(cfg.output_dir) / "ray_train" / cfg.name):
        return (f"interrupted: {cfg.run_dir()} keeps the newest checkpoint (every distill.checkpoint_every={every} "
                "iterations); rerun the same command to resume from it")
    return (f"interrupted before the first checkpoint (every distill.checkpoint_every={every} iterations): rerunning "
            "the same command starts the distillation over (finished experts and data are kept)")


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
        from .tracking import check_destinations  # output dir writable, tracking store reachable: before any work

        check_destinations(cfg.output_dir, cfg.tracking_uri() if cfg.tracking.enabled else None)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_in_run_dir(cfg, lambda: _run(cfg, args))


def run_in_run_dir(cfg: Config, work) -> int:
    """``work()`` (returns an exit status) holding the run directory's lock (:func:`contra_ray.fileio.run_lock`).

    Returns 2 with one line if another process holds the run directory, and 130 with
    :func:`interrupted_message` on Ctrl-C; otherwise ``work()``'s status.
    """
    from .fileio import RunInUse, run_lock

    try:
        with run_lock(cfg.run_dir()):  # one process per run directory
            return work()
    except RunInUse as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{interrupted_message(cfg)}", file=sys.stderr)
        return 130


def _run(cfg: Config, args: argparse.Namespace) -> int:
    if args.num_workers > 0:
        from .distributed import run_distributed

        return run_distributed(cfg, num_workers=args.num_workers, use_gpu=args.use_gpu,
                               resume=not args.no_resume, train_missing=not args.no_train_experts, note=args.note)
    from .distiller import DistillationDiverged
    from .expert_store import ExpertStoreError
    from .loop import run_distillation
    from .stages import check_memory, ensure_experts, log_set_visuals, prepare_data
    from .tracking import RunLogger, init_tracking

    try:
        data = prepare_data(cfg)
        check_memory(cfg, data)
        store = ensure_experts(cfg, data, train_missing=not args.no_train_experts)
    except (ConfigError, ExpertStoreError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.tracking.enabled:
        init_tracking(cfg.tracking_uri(), cfg.tracking.experiment)
    try:
        with RunLogger(cfg, f"{cfg.name}-distill", enabled=cfg.tracking.enabled, note=args.note) as logger:
            artifact, history = run_distillation(cfg, data, store, logger, resume=not args.no_resume)
            out = cfg.run_dir() / "distilled.safetensors"
            artifact.save(out)
            logger.log_artifact(str(out))
            log_set_visuals(cfg, artifact, history, data.preprocessor, logger)
    except DistillationDiverged as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"distilled set: {out}  (syn_lr {artifact.syn_lr:.5f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
