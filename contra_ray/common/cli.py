"""The command lines' shared pieces: the config flags every run CLI takes and the config they build.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from contra_ray.common.fileio import ensure_writable_dir, os_error_line
from contra_ray.config import Config, ConfigError, load_config, parse_overrides, set_dotted

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
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<output-dir>/mlflow.db; for an "
                   "s3://... output dir, in this node's mirror of it: pass a server URL on a cluster)")
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


def environment_error(exc: BaseException) -> str | None:
    """One line for a failure of the machine rather than of the program, or ``None``.

    Walks ``exc`` and its causes (``__cause__`` / ``__context__``): the first ``OSError`` with an errno gives
    its path(s) and cause (:func:`contra_ray.common.fileio.os_error_line`: ENOSPC is ``disk full``, EROFS
    ``read-only file system``, ...); SQLite's ``database or disk is full`` (MLflow's store, wrapped by
    SQLAlchemy and MLflow) gives ``<tracking URI>: disk full``.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return os_error_line(e)
        if "database or disk is full" in str(e):
            uri = None
            if "mlflow" in sys.modules:
                uri = sys.modules["mlflow"].get_tracking_uri()
            return f"{uri}: disk full" if uri else "SQLite database: disk full"
        e = e.__cause__ or e.__context__
    return None


def interrupted(message: str) -> int:
    """Print what a user reads after Ctrl-C (``interrupted...``, one line on stderr) and return 130."""
    print(f"\n{message}", file=sys.stderr, flush=True)
    return 130


def cli_entry(main):
    """Decorate a command line's ``main(argv)``: a failure of the machine during the work (a full disk, a
    read-only or vanished destination, see :func:`environment_error`) is one ``error: <path>: <cause>`` line
    and exit status 1 (``SystemExit(1)``), never a traceback; any other exception propagates. Refusals a user
    can fix before the work (exit 2) and Ctrl-C (130) are each command line's own."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None):
        try:
            return main(argv)
        except Exception as e:
            line = environment_error(e)
            if line is None:
                raise
            raise SystemExit(cli_error(line, 1)) from None

    return wrapper


def check_folder(path: str, field: str) -> Path:
    """Before any work: ``path`` (the value of ``field``) is a folder, created if missing, that can be written.

    Raises:
        ConfigError: a file stands at ``path`` (or at one of its parents), or the folder cannot be created or
            written (read-only file system, permissions); names ``field``, the path and the cause.
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{field}={path!r}: is a file, expected a folder")
    try:
        return ensure_writable_dir(p)
    except OSError as e:
        raise ConfigError(f"{field}={path!r}: {e.strerror}") from None
