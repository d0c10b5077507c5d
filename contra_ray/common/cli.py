"""The command lines' shared pieces: the config flags every run CLI takes and the config they build.
"""

from __future__ import annotations

import argparse
import sys

from contra_ray.config import Config, load_config, parse_overrides, set_dotted

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


def cli_error(message: object, code: int = 2) -> int:
    """Print ``error: <message>`` as one line on stderr (no traceback) and return the exit status ``code``:
    2 for input the user can fix before any work (the default), 1 for a failure during the work."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code
