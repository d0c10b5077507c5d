"""Hyperparameter sweeps of ConTra (β, K, R of paper Eq. 8; Fig. 4) with Ray Tune, Ray Train and MLflow.

``python -m contra_ray.tune --space tune_spaces/cpu_smoke.yaml [--num-samples N] [--max-concurrent C]
[--workers-per-trial W] [--tracking-uri URI] [--output-dir DIR] [--name NAME] [--overwrite] [--dry-run]``;
library: :func:`contra_ray.tune.run_sweep`. A sweep owns ``<output dir>/<name>``: a second sweep of that name
is refused while the first runs (exit 2, naming its pid), and an earlier sweep of the name with another
configuration is only replaced with ``--overwrite`` (the same configuration runs again). Space files,
expansion, early stopping, Ray Train and MLflow: docs/SWEEPS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from contra_ray.common.argtypes import non_negative_float, non_negative_int, positive_int
from contra_ray.common.cli import cli_entry, cli_error, interrupted
from contra_ray.common.fileio import RunInUse
from contra_ray.config import ConfigError, check_run_name, parse_overrides
from contra_ray.tune.space import SweepError, expand_space, load_space
from contra_ray.tune.stores import expert_store_resolver
from contra_ray.tune.sweep import check_search, run_sweep

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m contra_ray.tune", description=__doc__.split("\n")[0])
    p.add_argument("--space", required=True, help="search-space YAML, a path or a name in tune_spaces/")
    p.add_argument("--num-samples", type=positive_int, default=None,
                   help="draws of the random axes per grid point (default: the file's num_samples)")
    p.add_argument("--max-concurrent", type=positive_int, default=None,
                   help="concurrent trials (default: as many as the Ray resources allow)")
    p.add_argument("--workers-per-trial", type=non_negative_int, default=0,
                   help="Ray Train workers per trial; 0 = distill inside the trial process (default: 0)")
    p.add_argument("--use-gpu", action="store_true", help="GPUs for the Train workers (or the W=0 trials)")
    p.add_argument("--cpus-per-trial", type=positive_int, default=None,
                   help="CPUs and torch threads of a W=0 trial / of each Train worker (default: config threads or 1)")
    p.add_argument("--gpus-per-trial", type=non_negative_float, default=None,
                   help="GPUs of a W=0 trial (default: 1 with --use-gpu, else 0)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite:///<output-dir>/mlflow.db; "
                   "for an s3://... output dir, in this node's mirror of it)")
    p.add_argument("--output-dir", default=None, help="root of run directories (default: the preset's, runs)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: tune-<space name>)")
    p.add_argument("--name", default=None, help="sweep name (default: <space name>-<timestamp>)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="extra fixed override applied to every trial (repeatable)")
    p.add_argument("--strict", action="store_true",
                   help="fail on an invalid combination instead of dropping it with a note")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier sweep of this --name that had another configuration (default: refuse)")
    p.add_argument("--note", default=None, help="description of the sweep's MLflow runs (tag mlflow.note.content)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the expanded, validated configurations (no data, experts or trials) and exit")
    p.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2), help="Tune output level (default: 1)")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 a best trial; 1 no trial finished, or a failure of the machine during the work (one
    ``error: <path>: <cause>`` line); 2 invalid input; 130 Ctrl-C, with one line saying what a rerun does."""
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except KeyboardInterrupt:
        name = args.name or "<name>"
        again = "the same command" if args.name else f"the command with --name {name}"
        resume = ("trials resume from their newest distillation checkpoint" if args.workers_per_trial == 0
                  else "trials on Ray Train workers start over")
        return interrupted(f"interrupted: rerunning {again} resumes sweep {name}: finished trials are kept, "
                           f"unfinished ones run again ({resume}; trained experts are kept)")


def _main(args: argparse.Namespace) -> int:
    # Ctrl-C ends the sweep at once (KeyboardInterrupt, exit 130) instead of Tune's own handler, which would
    # end the run quietly and let the sweep rank the unfinished trials
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    try:
        if args.dry_run:
            if args.name is not None:  # what the real run checks first, so a dry run that passes also starts
                check_run_name(args.name, "--name")
            spec = load_space(args.space)
            check_search(spec)
            points, notes = expand_space(spec, parse_overrides(args.set), "error" if args.strict else "drop",
                                         num_samples=args.num_samples)
            for note in notes:
                print(note)
            if spec.algorithm == "grid":
                for p in points:
                    print(p.name, json.dumps(p.searched))
            else:  # Tune samples the trials when the sweep runs; the driver's draws above only checked the space
                from contra_ray.tune.space import param_space

                print(f"search.algorithm={spec.algorithm}: Tune samples {args.num_samples or spec.num_samples} "
                      f"configuration(s) per grid point from param_space "
                      f"{json.dumps(param_space(spec, points), default=str)}; a sample that fails validation "
                      "ends as INVALID (--strict: as a failed trial)")
            store_of = expert_store_resolver(spec, parse_overrides(args.set), "experts")
            stores: dict[str, int] = {}
            for p in points:
                stores[store_of(p.config)] = stores.get(store_of(p.config), 0) + 1
            print("expert stores (under the preset's run directory): " +
                  ", ".join(f"{k} ({v} trial(s))" for k, v in stores.items()))
            return 0
        if args.name is None:  # named here, so the Ctrl-C line can say which name a rerun needs
            args.name = f"{load_space(args.space).name}-{time.strftime('%Y%m%d-%H%M%S')}"
        result = run_sweep(args.space, num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                           workers_per_trial=args.workers_per_trial, use_gpu=args.use_gpu,
                           cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                           tracking_uri=args.tracking_uri, output_dir=args.output_dir, experiment=args.experiment,
                           name=args.name, strict=args.strict, overrides=args.set, tracking=not args.no_tracking,
                           verbose=args.verbose, note=args.note, overwrite=args.overwrite)
    except (SweepError, ConfigError, RunInUse) as e:
        return cli_error(e)
    if result.failed:
        return cli_error(f"{len(result.failed)} of {len(result.rows)} trial(s) failed: " +
                         "; ".join(f"{r['name']}: {r['error']}" for r in result.failed), 1)
    return 0 if result.best is not None else 1
