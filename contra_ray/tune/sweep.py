"""Hyperparameter sweeps of ConTra (β, K, R of paper Eq. 8; Fig. 4) with Ray Tune, Ray Train and MLflow.

``python -m contra_ray.tune --space tune_spaces/cpu_smoke.yaml [--num-samples N] [--max-concurrent C]
[--workers-per-trial W] [--tracking-uri URI] [--output-dir DIR]``; library: :func:`run_sweep`.

Search space YAML (``tune_spaces/*.yaml``)::

    preset: tiny_cpu                  # base config: a preset name or path
    overrides: {eval: {runs: 1}}      # fixed overrides (nested mapping or "section.field": value)
    space:                            # searched fields, "section.field": {grid|choice|uniform: ...}
      distill.beta: {grid: [0.0, 0.5]}
      distill.K: {grid: [2, 3]}
      distill.R: {choice: [1, 2]}
      method:                         # a bundle axis: each value sets several fields together
        grid: [{distill.K: 0, distill.beta: 1.0}, {distill.K: 3, distill.beta: 0.2}]
    num_samples: 1                    # draws of the random axes (choice/uniform) per grid point
    metric: proxy_acc                 # early-stopping metric (mode max)
    proxy: {eval_every: 2, epochs: 2, runs: 1}
    scheduler: {asha: {grace_period: 2, reduction_factor: 2}}
    seed: 0                           # seeds the sampler of the random axes

**Bundle axes** (a name without a dot whose values are mappings, ``grid`` or ``choice``) set several fields
at once, for comparisons a product cannot express: K = 0 needs β = 1, and at equal wall-clock the
sequential arm gets more iterations (``{distill.K: 0, distill.beta: 1.0, distill.iterations: 3400}``).
Every value sets the same fields; a field is searched by one axis only. ``distill.seed`` is an ordinary
axis (``{grid: [0, 1, 2]}``): seeds change only the distillation, never the experts.

**The space is expanded in the driver, before any trial starts** (:func:`expand_space`): grid axes form a
Cartesian product, random axes are drawn with a seeded ``random.Random`` ``num_samples`` times per grid
point, and every configuration is validated with :meth:`Config.validate` (``T- + (K-1)R <= T+``; ``β = 1``
when ``K = 0``; ...), against the data (IPC) and against the expert store (``T+ + M`` saved epochs). Our
choice for an invalid combination: a random axis is redrawn (up to :data:`MAX_DRAWS` times, so the sweep
keeps ``num_samples`` draws per grid point); a grid point that stays invalid is **dropped with a printed
note** naming the field and value (``--strict`` / ``on_invalid="error"`` instead fails with that
:class:`~contra_ray.config.ConfigError`). Unknown fields or wrong types always fail at once. No valid
configuration left is an error. When ``distill.R`` is neither searched nor fixed in ``overrides`` but
``distill.K`` is searched, R takes the paper's default ``floor((T+ - T-)/K)`` (Sec. 6.4); the resolved
integer is what every trial logs. The trials are then Tune's ``grid_search`` over their names
(``t03-beta0.5-K3-R1``, the ``trial`` column of the live table); trial ``t03`` writes into
``<output_dir>/<sweep name>/t03-.../`` and shares the expert store of the preset
(``<output_dir>/<preset name>/experts``, trained once by the driver). A space that searches a setting the
experts depend on (``experts.curriculum``, ``experts.seed``, ``model.width``, ...) gets one store per
value, ``experts-<searched values>`` beside it (:func:`expert_store_resolver`), each trained once.

**Early stopping** (ASHA, ``ray.tune.schedulers.ASHAScheduler``, ``time_attr="iteration"``) acts on a
*proxy accuracy*: every ``proxy.eval_every`` distillation iterations one network is trained for
``proxy.epochs`` epochs on the current synthetic set and tested (:func:`contra_ray.evaluate.train_and_test`).
The matching loss cannot serve: Eq. 8 mixes the sampled segment (weight β) with K concurrent segments
(weight (1-β)/K each) at starts T- + iR, each normalized by its own expert distance
``||θ*_t,0 - θ*_t,M||²``. Trials with different β, K or R therefore minimize different weighted sums over
different segments (K=2 averages two normalized segment losses, K=4 four others; β=0 drops the random
segment), so their loss values are not on one scale: ranking by them would rank how easy each trial's own
objective is, not how good its synthetic set is. Test accuracy of a network trained on the set is
comparable across all of them. A trial that ASHA stops has no final accuracy; its MLflow run ends ``KILLED``.
At the end of a trial that runs through, the final accuracy is measured with the config's ``eval`` recipe
(``eval.runs`` networks, ``eval.epochs`` epochs) and the sweep is ranked by it (``final_acc``).

**Trials drive Ray Train** (Ray Train V2 pattern: the trainable is a driver function). With
``--workers-per-trial 0`` a trial distills in its own process (:func:`contra_ray.distill.run_distillation`,
``cpus_per_trial`` CPUs); with ``W >= 1`` it builds and fits a :class:`~ray.train.torch.TorchTrainer` over
``W`` workers (:mod:`contra_ray.distill.remote`) whose reports reach Tune through a
``TuneReportCallback``; the trial itself then reserves only 0.01 CPU (Ray refuses 0) and runs the final
evaluation as Ray tasks outside its placement group. ``--max-concurrent`` bounds concurrent
trials (the Ray Train docs' advice: at most as many as the cluster can give a full worker group).

**MLflow** (SQLite store, created by the driver before any trial, see :func:`contra_ray.tracking.init_tracking`):
one parent run per sweep (tag ``contra_ray.role=sweep``; the space, the expanded configurations,
``best_final_acc``, tags ``best_run_id``/``best_run_name``, and under ``best/`` the best config, synthetic
set and grid) and one child run per trial (tag ``mlflow.parentRunId``, ``contra_ray.role=trial``) with
the tags of :func:`contra_ray.tracking.run_tags`, the flattened config as params (paths as tags;
``tune.searched`` lists the searched fields), the metrics every run kind logs (``loss``, ``syn_lr``,
``eval_acc`` = the proxy, ``final_acc``/``final_acc_std``, ``s_per_iter``, ``iters_to_plateau``), and the
trial's ``distilled.safetensors``, image grid and curves.
``python -m contra_ray.report --experiment NAME`` ranks the trials of a sweep; ``--dry-run`` prints the
expanded configurations without running anything.
"""

from __future__ import annotations

from contra_ray.common.cli import cli_error

import argparse
import copy
import dataclasses
import itertools
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from contra_ray.config import Config, ConfigError, check_run_name, load_config, parse_overrides, set_dotted
from contra_ray.common.fileio import YAMLFileError, load_yaml

__all__ = ["SweepSpec", "TrialPoint", "SweepResult", "SweepError", "load_space", "expand_space", "run_sweep",
           "asha_settings", "check_schedule", "format_trials_table", "main"]

SPACE_DIR = Path(__file__).resolve().parents[2] / "tune_spaces"
AXIS_KINDS = ("grid", "choice", "uniform")
MAX_DRAWS = 100  # redraws of the random axes for one invalid sample
DEFAULT_PROXY = {"eval_every": 100, "epochs": 50, "runs": 1}
REPORTED_METRICS = ("proxy_acc", "loss", "syn_lr")  # in every report a trial sends Tune (see _TrialLogger)
ASHA_DEFAULTS = {"grace_period": 1, "reduction_factor": 2}  # max_t defaults to the trials' longest iterations
ASHA_KEYS = ("grace_period", "reduction_factor", "max_t", "brackets", "stop_last_trials")


class SweepError(ValueError):
    """The search space file is malformed or leaves no valid configuration; the message says which."""


# ---------------------------------------------------------------------------------------------- space

@dataclasses.dataclass
class SweepSpec:
    """A parsed search-space YAML (see the module docstring)."""

    path: str
    name: str
    preset: str
    overrides: dict
    space: dict[str, tuple[str, list]]  # field -> (kind, values); uniform: [low, high]; bundle axis: values are
    #                                     {"section.field": value} mappings, all setting the same fields
    num_samples: int = 1
    metric: str = "proxy_acc"
    mode: str = "max"
    proxy: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_PROXY))
    scheduler: dict | None = None  # ASHA settings as written ({} = ASHA defaults); None = no early stopping
    seed: int = 0


@dataclasses.dataclass
class TrialPoint:
    """One configuration of the sweep: ``searched`` values and the full validated config dict."""

    index: int
    name: str
    searched: dict[str, Any]
    config: dict


def _nested(overrides: Any, where: str) -> dict:
    """``{"a.b": 1}`` or ``{"a": {"b": 1}}`` -> nested dict."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise SweepError(f"{where}: expected a mapping, got {overrides!r}")
    out: dict = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            value = _nested(value, f"{where}.{key}")
        _merge(out, _set_path({}, str(key), value))
    return out


def _set_path(d: dict, dotted: str, value: Any) -> dict:
    """:func:`contra_ray.config.set_dotted` (ConfigError naming a path through a single value)."""
    return set_dotted(d, dotted, value)


def _merge(a: dict, b: dict) -> dict:
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            _merge(a[k], v)
        else:
            a[k] = v
    return a


def _has_path(d: dict, dotted: str) -> bool:
    node = d
    for p in dotted.split("."):
        if not isinstance(node, dict) or p not in node:
            return False
        node = node[p]
    return True


def space_path(space: str | os.PathLike) -> Path:
    """A space file by path, or by name in ``tune_spaces/`` (``cpu_smoke``)."""
    p = Path(space)
    if p.exists():
        return p
    q = SPACE_DIR / f"{space}.yaml"
    if q.exists():
        return q
    known = ", ".join(sorted(x.stem for x in SPACE_DIR.glob("*.yaml"))) if SPACE_DIR.is_dir() else "none"
    raise SweepError(f"--space {space!r}: no such file or space name (known in {SPACE_DIR}: {known})")


def _dotted(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"distill": {"K": 0}, "eval.runs": 1}`` -> ``{"distill.K": 0, "eval.runs": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _bundles(axis: str, kind: str, values: list) -> list[dict[str, Any]]:
    """The values of a bundle axis, each a ``{"section.field": value}`` mapping (all the same fields).

    Raises:
        SweepError: a uniform bundle axis, a value that is not a mapping, an empty mapping, mappings that
            set different fields, or an axis name with a dot (it would read as a config field).
    """
    where = f"space.{axis}.{kind}"
    if kind == "uniform":
        raise SweepError(f"{where}: a bundle axis (values are mappings of fields) takes grid or choice")
    if "." in axis:
        raise SweepError(f"space.{axis}: a bundle axis is named without a dot (e.g. 'method'); its values "
                         "name the fields")
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, dict) or not v:
            raise SweepError(f"{where}[{i}]={v!r}: every value of a bundle axis is a non-empty mapping of "
                             "section.field: value")
        out.append(_dotted(v))
        if set(out[-1]) != set(out[0]):
            raise SweepError(f"{where}[{i}] sets {sorted(out[-1])}, {where}[0] sets {sorted(out[0])}: every value "
                             "of a bundle axis sets the same fields")
    return out


def axis_fields(axis: str, values: list) -> list[str]:
    """The config fields an axis searches: its name, or a bundle axis's fields."""
    return list(values[0]) if values and isinstance(values[0], dict) else [axis]


def searched_fields(spec: SweepSpec) -> list[str]:
    """Every config field the space searches, bundle axes expanded, in the file's order."""
    return [f for axis, (_, values) in spec.space.items() for f in axis_fields(axis, values)]


def load_space(space: str | os.PathLike) -> SweepSpec:
    """Parse a search-space YAML.

    Read with the strict :func:`contra_ray.common.fileio.load_yaml` (a key given twice is an error).

    Raises:
        SweepError: malformed YAML or a key given twice (names the file and line); unknown top-level key,
            axis kind, metric or ASHA setting; malformed values (naming the key and value).
    """
    path = space_path(space)
    try:
        raw = load_yaml(path) or {}
    except YAMLFileError as e:
        raise SweepError(f"--space {str(space)!r}: {e}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping (preset, space, ...), got {type(raw).__name__}")
    known = {"preset", "overrides", "space", "num_samples", "metric", "mode", "proxy", "scheduler", "seed"}
    for key in raw:
        if key not in known:
            raise SweepError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(known))})")
    if not raw.get("preset"):
        raise SweepError(f"{path}: 'preset' is required")
    axes: dict[str, tuple[str, list]] = {}
    for field, spec in (raw.get("space") or {}).items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in AXIS_KINDS:
            raise SweepError(f"space.{field}={spec!r}: expected one of {{grid: [...]}}, {{choice: [...]}}, "
                             "{uniform: [low, high]}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise SweepError(f"space.{field}.{kind}={values!r}: expected a non-empty list")
        if any(isinstance(v, dict) for v in values):
            values = _bundles(field, kind, values)
        elif kind == "uniform" and (len(values) != 2 or not all(isinstance(v, (int, float)) for v in values)
                                    or values[0] > values[1]):
            raise SweepError(f"space.{field}.uniform={values!r}: expected [low, high] with low <= high")
        axes[field] = (kind, list(values))
    if not axes:
        raise SweepError(f"{path}: 'space' lists no searched field")
    owner: dict[str, str] = {}
    for axis, fields in ((a, axis_fields(a, v)) for a, (_, v) in axes.items()):
        for f in fields:
            if f in owner:
                raise SweepError(f"space.{axis}: field {f} is already searched by space.{owner[f]}")
            owner[f] = axis
    proxy = {**DEFAULT_PROXY, **(raw.get("proxy") or {})}
    for k, v in proxy.items():
        if k not in DEFAULT_PROXY or not isinstance(v, int) or v < 1:
            raise SweepError(f"proxy.{k}={v!r}: expected one of {', '.join(DEFAULT_PROXY)} with an integer >= 1")
    sched = raw.get("scheduler")
    if sched is not None and (not isinstance(sched, dict) or set(sched) != {"asha"}):
        raise SweepError(f"scheduler={sched!r}: only 'asha' is supported (or leave it out: no early stopping)")
    asha = _asha_settings_checked(sched["asha"]) if sched is not None else None
    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        raise SweepError(f"mode={mode!r}: expected max or min")
    metric = raw.get("metric", "proxy_acc")
    if metric not in REPORTED_METRICS:
        raise SweepError(f"metric={metric!r}: trials report only {', '.join(REPORTED_METRICS)} at every step")
    n = raw.get("num_samples", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise SweepError(f"num_samples={n!r}: expected an integer >= 1")
    return SweepSpec(str(path), path.stem, str(raw["preset"]), _nested(raw.get("overrides"), "overrides"), axes,
                     n, str(metric), mode, proxy, asha, int(raw.get("seed", 0)))


def _asha_settings_checked(asha: Any) -> dict:
    """The ``scheduler.asha`` mapping, checked key by key (``None`` = ASHA defaults).

    Raises:
        SweepError: unknown key, or a value ``ray.tune.schedulers.ASHAScheduler`` would reject with a bare
            ``AssertionError`` (grace_period, max_t, brackets integers >= 1; reduction_factor > 1).
    """
    if asha is None:
        return {}
    if not isinstance(asha, dict):
        raise SweepError(f"scheduler.asha={asha!r}: expected a mapping of ASHA settings ({', '.join(ASHA_KEYS)})")
    for key, v in asha.items():
        if key not in ASHA_KEYS:
            raise SweepError(f"scheduler.asha.{key}={v!r}: unknown ASHA setting (known: {', '.join(ASHA_KEYS)}; "
                             "time_attr, metric and mode are fixed by the sweep)")
        if key == "stop_last_trials":
            ok = isinstance(v, bool)
        elif key == "reduction_factor":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 1
        else:
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
        if not ok:
            want = {"stop_last_trials": "true or false", "reduction_factor": "a number > 1"}.get(key, "an integer >= 1")
            raise SweepError(f"scheduler.asha.{key}={v!r}: expected {want}")
    return dict(asha)


def asha_settings(spec: SweepSpec, points: list["TrialPoint"]) -> dict | None:
    """The keyword arguments of ``ASHAScheduler`` for this sweep (``None``: no scheduler).

    ``max_t`` defaults to the longest trial's ``distill.iterations`` (``time_attr="iteration"``).
    """
    if spec.scheduler is None:
        return None
    return {**ASHA_DEFAULTS, "max_t": max(p.config["distill"]["iterations"] for p in points), **spec.scheduler}


def check_schedule(spec: SweepSpec, points: list["TrialPoint"]) -> list[str]:
    """Check the ASHA settings against every trial's length, before anything runs; returns notes.

    A trial reports ``proxy_acc`` to Tune at every multiple of ``proxy.eval_every`` below
    ``distill.iterations`` and once more at ``distill.iterations`` with its final accuracy. ASHA judges a
    trial at iterations ``grace_period * reduction_factor^k`` and stops every trial at ``max_t``.

    Returns:
        Notes for trials ASHA can never stop early (no proxy report before their end).

    Raises:
        SweepError (one line, naming the setting, its value, the trial and its ``distill.iterations``):
            ``grace_period`` larger than a trial's iterations (ASHA could never judge it; when larger than
            every trial's, Ray itself fails with ``AssertionError: grace_period must be <= max_t!``), or a
            ``max_t`` below a trial's iterations (ASHA would stop it before its final evaluation).
    """
    a = asha_settings(spec, points)
    if a is None:
        return []
    notes = []
    for p in points:
        it = p.config["distill"]["iterations"]
        if a["grace_period"] > it:
            raise SweepError(f"scheduler.asha.grace_period={a['grace_period']}: larger than distill.iterations={it} "
                             f"of trial {p.name} (ASHA's first decision is at iteration grace_period); set "
                             f"grace_period <= {min(q.config['distill']['iterations'] for q in points)} or raise "
                             "distill.iterations")
        if a["max_t"] < it:
            raise SweepError(f"scheduler.asha.max_t={a['max_t']}: smaller than distill.iterations={it} of trial "
                             f"{p.name} (ASHA would stop it at max_t, before its final evaluation); leave max_t "
                             "out (default: the longest trial's iterations)")
        if spec.proxy["eval_every"] >= it:
            notes.append(f"ASHA cannot stop trial {p.name} early: proxy.eval_every={spec.proxy['eval_every']} "
                         f">= distill.iterations={it}, so it reports no proxy accuracy before its end")
    return notes


def _short(field: str, value: Any) -> str:
    key = field.rsplit(".", 1)[-1]
    return f"{key}{value:g}" if isinstance(value, float) else f"{key}{value}"


def _materialize(spec: SweepSpec, base: dict, point: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
    """Config for one point (unvalidated) and the searched values as the trial will use them.

    Raises:
        ConfigError: unknown field or wrong type (structural errors; never a dropped combination).
    """
    overrides = copy.deepcopy(base)
    for field, value in point.items():
        _set_path(overrides, field, value)
    if "distill.K" in point and "distill.R" not in point and not _has_path(spec.overrides, "distill.R"):
        _set_path(overrides, "distill.R", None)  # paper default floor((T+ - T-)/K)
    cfg = load_config(spec.preset, overrides, validate=False)
    d = cfg.distill
    if d.K > 0:
        d.R = d.resolved_R()  # log the R actually used
    else:
        d.R = None  # no concurrent segments: R is meaningless
    searched = {f: _get_path(cfg.to_dict(), f) for f in point}
    if "distill.K" in point and "distill.R" not in searched:
        searched["distill.R"] = d.R
    return cfg, searched


def _get_path(d: dict, dotted: str) -> Any:
    for p in dotted.split("."):
        d = d[p]
    return d


def _flat_point(point: dict[str, Any]) -> dict[str, Any]:
    """Axis values -> ``{"section.field": value}``: a bundle axis's mapping sets its fields."""
    out: dict[str, Any] = {}
    for axis, value in point.items():
        out.update(value if isinstance(value, dict) else {axis: value})
    return out


def _draw(rng: random.Random, kind: str, values: list) -> Any:
    if kind == "choice":
        return rng.choice(values)
    return round(rng.uniform(float(values[0]), float(values[1])), 4)


def expand_space(spec: SweepSpec, base_overrides: dict | None = None, on_invalid: str = "drop",
                 check: Any = None, num_samples: int | None = None) -> tuple[list[TrialPoint], list[str]]:
    """All trial configurations of the sweep, validated, before any trial runs.

    Args:
        spec: the parsed space.
        base_overrides: nested overrides applied after ``spec.overrides`` (output dir, tracking, ...).
        on_invalid: ``"drop"`` (note and skip the combination; random axes are redrawn first) or
            ``"error"`` (raise at the first invalid combination).
        check: optional ``check(cfg)`` raising ``ConfigError`` (or another ValueError) for a config that
            cannot run with the data or expert store at hand; treated like a failed ``validate()``.
        num_samples: overrides ``spec.num_samples``.

    Returns:
        (trial points in order, notes naming each dropped or redrawn combination and why).

    Raises:
        ConfigError: an unknown field / wrong type anywhere, or (``on_invalid="error"``) an invalid
            combination: the message names the searched values, the field and the offending value.
        SweepError: no valid configuration is left, or the ASHA settings do not fit a trial's
            ``distill.iterations`` (:func:`check_schedule`).
    """
    if on_invalid not in ("drop", "error"):
        raise ValueError(f"on_invalid={on_invalid!r}: expected drop or error")
    base = _merge(copy.deepcopy(spec.overrides), copy.deepcopy(base_overrides or {}))
    n = num_samples or spec.num_samples
    grid = [(f, v) for f, (k, v) in spec.space.items() if k == "grid"]
    rand = [(f, k, v) for f, (k, v) in spec.space.items() if k != "grid"]
    rng = random.Random(spec.seed)
    points: list[TrialPoint] = []
    notes: list[str] = []
    seen: set[str] = set()

    def why_invalid(cfg: Config) -> str | None:
        try:
            cfg.validate()
            if check is not None:
                check(cfg)
        except (ConfigError, ValueError) as e:
            return str(e)
        return None

    for combo in itertools.product(*[v for _, v in grid]) if grid else [()]:
        fixed = _flat_point(dict(zip([f for f, _ in grid], combo)))
        for _ in range(n if rand else 1):
            reason, cfg, searched = None, None, None
            for attempt in range(MAX_DRAWS if rand else 1):
                point = {**fixed, **_flat_point({f: _draw(rng, k, v) for f, k, v in rand})}
                cfg, searched = _materialize(spec, base, point)
                reason = why_invalid(cfg)
                label = " ".join(f"{f}={v!r}" for f, v in searched.items())
                if reason is None:
                    key = json.dumps(searched, sort_keys=True)
                    if key in seen:
                        reason = "duplicate of an earlier configuration"
                        if not rand:
                            break
                        continue
                    seen.add(key)
                    break
                if on_invalid == "error":
                    raise ConfigError(f"search space {spec.path}: invalid combination [{label}]: {reason}")
                if rand and f"redrawn [{label}]: {reason}" not in notes:
                    notes.append(f"redrawn [{label}]: {reason}")
            if reason is not None:
                notes.append(f"dropped [{' '.join(f'{f}={v!r}' for f, v in fixed.items()) or label}]: {reason}"
                             + (f" (no valid draw of {', '.join(f for f, _, _ in rand)} in {MAX_DRAWS})"
                                if rand else ""))
                continue
            name = f"t{len(points):02d}-" + "-".join(_short(f, v) for f, v in searched.items())
            points.append(TrialPoint(len(points), name, searched, cfg.to_dict()))
    if not points:
        raise SweepError(f"search space {spec.path}: no valid configuration:\n  " + "\n  ".join(notes))
    notes += check_schedule(spec, points)
    return points, notes


# ---------------------------------------------------------------------------------------------- expert stores

#: Settings that do not change what an expert store holds (paths, resources, how often experts are tested).
EXPERT_KEY_IGNORED = ("data.cache_dir", "data.download", "experts.store", "experts.cpus_per_expert",
                      "experts.gpus_per_expert", "experts.eval_every")


def expert_key(config: dict) -> str:
    """What an expert store depends on: the ``data``, ``model`` and ``experts`` settings of a config dict
    (without :data:`EXPERT_KEY_IGNORED`), as canonical JSON. ``distill.*`` (``distill.seed`` included)
    never enters: trials differing only there distil from the same experts."""
    flat = _dotted({k: config[k] for k in ("data", "model", "experts")})
    return json.dumps({k: v for k, v in flat.items() if k not in EXPERT_KEY_IGNORED}, sort_keys=True, default=str)


def expert_store_resolver(spec: SweepSpec, base_overrides: dict | None, default_store: str):
    """``store(config dict) -> expert store directory`` for the trials of a sweep.

    Trials whose data, model and experts settings (:func:`expert_key`) equal those of the space's
    unsearched configuration (preset + ``overrides``) use ``default_store`` (shared with every other run
    of the preset); a trial that searches such a setting (``experts.curriculum``, ``experts.seed``,
    ``model.width``...) to another value uses ``<default_store>-<searched values>`` (e.g.
    ``experts-curriculumTrue``), trained once by the driver. So both arms of a curriculum on/off sweep
    never share one store, while every ``distill.seed`` of a configuration does.
    """
    unsearched = load_config(spec.preset, _merge(copy.deepcopy(spec.overrides), copy.deepcopy(base_overrides or {})),
                             validate=False).to_dict()
    base_key = expert_key(unsearched)
    relevant = [f for f in searched_fields(spec)
                if f.split(".", 1)[0] in ("data", "model", "experts") and f not in EXPERT_KEY_IGNORED]

    def store(config: dict) -> str:
        key = expert_key(config)
        if key == base_key:
            return default_store
        suffix = "-".join(_short(f, _get_path(config, f)) for f in relevant)
        if not suffix:  # not reachable from a space file; a stable name all the same
            import hashlib

            suffix = hashlib.sha256(key.encode()).hexdigest()[:8]
        return f"{default_store}-{re.sub(r'[^A-Za-z0-9_.=+-]', '_', suffix)}"

    return store


# ---------------------------------------------------------------------------------------------- trial side

@dataclasses.dataclass
class SweepContext:
    """What every trial needs (put in the object store once by ``tune.with_parameters``)."""

    points: list[TrialPoint]
    proxy: dict
    workers_per_trial: int
    use_gpu: bool
    threads: int
    parent_run_id: str | None
    tracking: bool
    note: str | None = None


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
                from contra_ray.distill.checkpoint import read_checkpoint

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
    from contra_ray.distill.artifact import DistilledSet
    from contra_ray.distill.distiller import DistillationDiverged
    from contra_ray.distill.remote import make_trainer, read_checkpoint

    callback = _proxy_callback(cfg.distill.iterations, cfg.distill.eval_every)
    trainer = make_trainer(cfg, ctx.workers_per_trial, ctx.use_gpu, resume=False, callbacks=[callback],
                           tracking_run_id=run_id, num_to_keep=1)
    result = trainer.fit()
    if (result.metrics or {}).get("error"):
        raise DistillationDiverged(result.metrics["error"])
    history: dict = {}
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as path:
            history = read_checkpoint(path)["history"]
    return DistilledSet.load(cfg.run_dir() / "distilled.safetensors"), history


def _final_accuracies(artifact, data, ecfg, device: str, threads: int, as_tasks: bool) -> list[float]:
    """Test accuracies of ``ecfg.runs`` networks trained on the distilled set (``evaluation_seeds``).

    ``as_tasks`` (W >= 1): one Ray task per run with ``ecfg.cpus_per_run`` / ``ecfg.gpus_per_run``, scheduled
    outside the trial's placement group (which holds only the Train driver's 0.01 CPU; Tune would
    otherwise capture the tasks into it). Else sequentially in the trial process, on its own CPUs / GPU.
    """
    from contra_ray.augment import DSA
    from contra_ray.evaluate.remote import evaluate_runs
    from contra_ray.evaluate.training import evaluation_seeds, train_and_test

    seeds = evaluation_seeds(ecfg.seed, ecfg.runs)
    augment = DSA() if ecfg.dsa else None
    lr = ecfg.lr or artifact.syn_lr
    if not as_tasks:
        return evaluate_runs(artifact.images, artifact.targets(), lr, data.spec, ecfg,
                             data.test_x, data.test.labels, seeds, augment, device, threads, use_ray=False)
    import ray

    task = ray.remote(train_and_test).options(num_cpus=ecfg.cpus_per_run, num_gpus=ecfg.gpus_per_run,
                                              scheduling_strategy="DEFAULT")
    refs = [ray.put(t) for t in (artifact.images, artifact.targets(), data.test_x, data.test.labels)]
    run_device = "cuda" if ecfg.gpus_per_run > 0 else "cpu"
    return [float(a) for a in ray.get([task.remote(refs[0], refs[1], lr, data.spec, ecfg, refs[2],
                                                   refs[3], s, augment, run_device, max(1, int(ecfg.cpus_per_run)))
                                       for s in seeds])]


def _trial(config: dict, ctx: SweepContext) -> None:
    """One trial (a Tune function trainable and, with W >= 1, the Ray Train driver)."""
    import torch
    from ray import tune

    from contra_ray.config import config_from_dict
    from contra_ray.distill.loop import run_distillation
    from contra_ray.experts.remote import ensure_experts
    from contra_ray.plots import log_set_visuals
    from contra_ray.data.prepare import prepare_data
    from contra_ray.evaluate.training import summarize
    from contra_ray.tracking import RunLogger, accuracy_metrics

    point = next(p for p in ctx.points if p.name == config["trial"])
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
    data = prepare_data(cfg)
    with RunLogger(cfg, point.name, parent_run_id=ctx.parent_run_id, enabled=ctx.tracking, role="trial",
                   entry_point="contra_ray.tune", note=ctx.note) as logger:
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
        accs = _final_accuracies(artifact, data, final_eval, str(cfg.device), ctx.threads,
                                 as_tasks=ctx.workers_per_trial > 0)
        mean, std = summarize(accs)
        # the trial evaluates the distillation network only: it is final_acc's main model
        logger.log_metrics({**accuracy_metrics({cfg.model.name: (mean, std)}, cfg.model.name),
                            "total_minutes": (time.time() - t0) / 60}, step=cfg.distill.iterations)
        logger.log_artifact(str(out))
        log_set_visuals(cfg, artifact, history, data.preprocessor, logger, eval_every=run_cfg.distill.eval_every)
    proxy = history.get("eval_acc", [])
    tune.report({"iteration": cfg.distill.iterations, "final_acc": mean, "final_acc_std": std,
                 "proxy_acc": float(proxy[-1]) if proxy else mean,
                 "loss": float(history["loss"][-1]) if history.get("loss") else math.nan,
                 "syn_lr": float(artifact.syn_lr)})


# ---------------------------------------------------------------------------------------------- driver side

@dataclasses.dataclass
class SweepResult:
    """What :func:`run_sweep` returns.

    Attributes:
        rows: one dict per trial, ranked (best first): index, name, searched values, status,
            final_acc, final_acc_std, proxy_acc, iteration, run_id.
        best: the best row (highest ``final_acc``), or ``None`` if no trial finished.
        best_config: the best trial's full config dict as written to ``best_config.yaml`` (renamed
            ``<sweep>-best`` for a rerun, see :func:`_rerun_config`).
        notes: dropped / redrawn combinations.
        parent_run_id, experiment_id, tracking_uri: where the sweep is in MLflow.
        result_grid: Tune's ``ResultGrid``.
    """

    rows: list[dict]
    best: dict | None
    best_config: dict | None
    notes: list[str]
    parent_run_id: str | None
    experiment_id: str | None
    tracking_uri: str
    result_grid: Any = None


def _absolute(cfg: Config) -> None:
    """Make the config's paths independent of the working directory (trials run elsewhere)."""
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    cfg.data.cache_dir = str(Path(cfg.data.cache_dir).expanduser().resolve())
    if cfg.data.root and "://" not in cfg.data.root:
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    cfg.experts.store = str(cfg.expert_store().expanduser().resolve())
    if cfg.tracking.uri is None:
        cfg.tracking.uri = cfg.tracking_uri()


def format_trials_table(rows: list[dict], searched: list[str]) -> str:
    """Plain-text ranking: rank, trial, searched fields, status, final acc (mean ± std), last proxy acc."""
    head = ["rank", "trial"] + [f.rsplit(".", 1)[-1] for f in searched] + ["status", "final acc (%)",
                                                                          "proxy acc (%)", "iter"]
    body = []
    for r, row in enumerate(rows, 1):
        fin = row.get("final_acc")
        prx = row.get("proxy_acc")
        body.append([str(r), row["name"]] + [str(row["searched"].get(f, "")) for f in searched] +
                    [row["status"], f"{fin:.2f} ± {row.get('final_acc_std', 0.0):.2f}" if fin is not None else "-",
                     f"{prx:.2f}" if prx is not None else "-", str(row.get("iteration", "-"))])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(b) for b in body])


def _rank_key(row: dict) -> tuple:
    fin, prx = row.get("final_acc"), row.get("proxy_acc")
    return (fin is None, -(fin if fin is not None else 0.0), -(prx if prx is not None else -1.0), row["index"])


def _param_space(points: list[TrialPoint]) -> dict:
    """Tune's grid over the trial names (``t03-beta0.5-K3-R1``: the live table's ``trial`` column)."""
    from ray import tune

    return {"trial": tune.grid_search([p.name for p in points])}


def _make_tuner(spec: SweepSpec, ctx: SweepContext, name: str, storage: Path, max_concurrent: int | None,
                gpus_per_trial: float | None, verbose: int):
    """The Tuner: one trial per point, ASHA on the proxy metric, resources per trial."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    if ctx.workers_per_trial:
        resources = {"cpu": 0.01}  # only the Ray Train driver (Ray refuses 0); workers hold the CPUs/GPUs
    else:
        resources = {"cpu": ctx.threads,
                     "gpu": gpus_per_trial if gpus_per_trial is not None else float(ctx.use_gpu)}
    scheduler = None
    a = asha_settings(spec, ctx.points)  # checked against every trial by expand_space (check_schedule)
    if a is not None:
        scheduler = ASHAScheduler(time_attr="iteration", metric=spec.metric, mode=spec.mode, **a)
    return tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial, ctx=ctx), resources),
        param_space=_param_space(ctx.points),
        tune_config=tune.TuneConfig(num_samples=1, scheduler=scheduler, reuse_actors=False,
                                    max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=verbose,
                                  failure_config=tune.FailureConfig(max_failures=0)))


def _collect_rows(grid, points: list[TrialPoint]) -> list[dict]:
    """One row per Tune result: DONE (has ``final_acc``), STOPPED (by ASHA) or ERROR; ranked."""
    rows = []
    for res in grid:
        p = next((q for q in points if q.name == (res.config or {}).get("trial")), None)
        if p is None:
            continue
        m = res.metrics or {}
        status = "ERROR" if res.error else ("DONE" if "final_acc" in m else "STOPPED")
        rows.append({"index": p.index, "name": p.name, "searched": p.searched, "status": status,
                     "final_acc": m.get("final_acc"), "final_acc_std": m.get("final_acc_std"),
                     "proxy_acc": m.get("proxy_acc"), "iteration": m.get("iteration"),
                     "error": str(res.error).splitlines()[0] if res.error else None})
    return sorted(rows, key=_rank_key)


def _rerun_config(trial_config: dict, sweep: str, output_dir: str) -> dict:
    """The best trial's config for a rerun (``python -m contra_ray.pipeline --preset best_config.yaml``):
    the same fields, named ``<sweep>-best`` under the sweep's output directory (not the trial's directory,
    whose set it would overwrite) and logged to the default experiment ``contra_ray`` (not the sweep's,
    whose seed aggregation it would join)."""
    out = copy.deepcopy(trial_config)
    out["name"], out["output_dir"] = f"{sweep}-best", str(output_dir)
    out["tracking"]["experiment"] = Config().tracking.experiment
    return out


def _log_best(parent, run_dir: Path, best: dict, best_config: dict, trial_config: dict) -> None:
    """Write ``best_config.yaml``; log it, the best set and its grid to the parent run under ``best/``,
    tag the parent with the best child's run id and name; print them."""
    from contra_ray.common.fileio import atomic_write

    atomic_write(run_dir / "best_config.yaml", yaml.safe_dump(best_config, sort_keys=False))
    best_dir = Path(trial_config["output_dir"]) / trial_config["name"]
    parent.log_metrics({"best_final_acc": best["final_acc"], "best_final_acc_std": best["final_acc_std"]})
    parent.log_params({"best.trial": best["name"], **{f"best.{f}": v for f, v in best["searched"].items()}})
    parent.set_tags({"best_run_name": best["name"], **({"best_run_id": best["run_id"]} if best.get("run_id") else {})})
    parent.log_artifact(str(run_dir / "best_config.yaml"), "best")
    for f in ("distilled.safetensors", "distilled_grid.png"):
        if (best_dir / f).exists():
            parent.log_artifact(str(best_dir / f), "best")
    print(f"[tune] best: {best['name']}  " + "  ".join(f"{f}={v}" for f, v in best["searched"].items()) +
          f"  final acc {best['final_acc']:.2f} ± {best['final_acc_std']:.2f}%\n[tune] best config "
          f"({run_dir / 'best_config.yaml'}: rerun with python -m contra_ray.pipeline --preset "
          f"{run_dir / 'best_config.yaml'}; distilled set {best_dir / 'distilled.safetensors'}):\n"
          + yaml.safe_dump({"distill": best_config["distill"]}, sort_keys=False), flush=True)


def run_sweep(space_path: str | os.PathLike, *, num_samples: int | None = None, max_concurrent: int | None = None,
              workers_per_trial: int = 0, use_gpu: bool = False, cpus_per_trial: int | None = None,
              gpus_per_trial: float | None = None, tracking_uri: str | None = None, output_dir: str | None = None,
              experiment: str | None = None, name: str | None = None, strict: bool = False,
              overrides: list[str] | None = None, tracking: bool = True, verbose: int = 1,
              note: str | None = None) -> SweepResult:
    """Expand, validate and run a sweep; log it to MLflow; return the ranked trials.

    Args:
        space_path: search-space YAML (path or name in ``tune_spaces/``).
        num_samples: overrides the file's ``num_samples``.
        max_concurrent: concurrent trials (default: as many as the resources allow).
        workers_per_trial: 0 = distill inside the trial process; W >= 1 = a TorchTrainer with W workers.
        use_gpu: one GPU per Ray Train worker (W >= 1) or per trial (W = 0, unless ``gpus_per_trial``).
        cpus_per_trial: CPUs (and torch threads) of a W=0 trial / of each Train worker (default:
            ``max(1, threads)`` of the config).
        gpus_per_trial: GPUs of a W=0 trial (default 1 with ``use_gpu``, else 0).
        tracking_uri, output_dir: override the config's (default ``sqlite:///<output_dir>/mlflow.db``, ``runs``).
        experiment: MLflow experiment (default ``tune-<space name>``).
        name: sweep name (Tune experiment directory, parent run name; default ``<space>-<timestamp>``).
        strict: fail on an invalid combination instead of dropping it.
        overrides: extra ``section.field=value`` overrides (after the file's).
        tracking: log to MLflow.
        verbose: Tune verbosity (0 silent, 1 live table, 2 more).
        note: description of the parent and child runs (tag ``mlflow.note.content``).

    Raises:
        SweepError, ConfigError: malformed space, no valid configuration, a sweep name that is not one folder
            name, ASHA settings that do not fit a trial's iterations, an output directory that cannot be
            written or a tracking store that does not answer (all before data, experts or trials).
    """
    from contra_ray.config import config_from_dict
    from contra_ray.experts.remote import ensure_experts
    from contra_ray.data.prepare import prepare_data
    from contra_ray.evaluate.cli import ensure_ray
    from contra_ray.common.fileio import atomic_write
    from contra_ray.tracking import RunLogger, check_destinations, init_tracking

    spec = load_space(space_path)
    if workers_per_trial < 0:
        raise SweepError(f"--workers-per-trial={workers_per_trial}: must be >= 0")
    name = name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_run_name(name, "--name")  # the sweep's directory is <output_dir>/<name>
    base = parse_overrides(overrides)
    if output_dir:
        base["output_dir"] = output_dir
    if tracking_uri:
        _set_path(base, "tracking.uri", tracking_uri)
    _set_path(base, "tracking.experiment", experiment or f"tune-{spec.name}")
    _set_path(base, "tracking.enabled", bool(tracking))
    # expand once without data (fails fast: malformed space, --strict, nothing valid); the first valid
    # configuration then fixes paths, data and experts (β, K, R change neither)
    probe_points, _ = expand_space(spec, base, "error" if strict else "drop", num_samples=num_samples)
    base_cfg = config_from_dict(probe_points[0].config)
    _absolute(base_cfg)
    threads = cpus_per_trial or max(1, base_cfg.threads)
    for key, value in (("output_dir", base_cfg.output_dir), ("data.cache_dir", base_cfg.data.cache_dir),
                       ("data.root", base_cfg.data.root), ("experts.store", base_cfg.experts.store),
                       ("tracking.uri", base_cfg.tracking.uri), ("threads", threads)):
        _set_path(base, key, value)
    base_cfg.threads = threads
    check_destinations(base_cfg.output_dir, base_cfg.tracking.uri if tracking else None)  # before any work

    if str(base_cfg.device).startswith("cuda") and not use_gpu:
        raise SweepError(f"device={base_cfg.device!r} (preset {spec.preset}): pass --use-gpu (or override device=cpu)")
    ensure_ray()
    store_of = expert_store_resolver(spec, base, base_cfg.experts.store)
    prepared: dict[str, tuple] = {}  # store directory -> (data, expert store): trained once per setting

    def setup(cfg: Config) -> tuple:
        path = store_of(cfg.to_dict())
        if path not in prepared:
            scfg = copy.deepcopy(cfg)
            scfg.experts.store = path
            print(f"[tune] data and experts for {spec.preset} (store {path})", flush=True)
            data = prepare_data(scfg)  # fills the cache every trial reads
            prepared[path] = (data, ensure_experts(scfg, data, train_missing=True))
        return prepared[path]

    setup(base_cfg)

    def check(cfg: Config) -> None:
        data, store = setup(cfg)
        cfg.validate_data(data.spec.num_classes, int(data.train.class_counts().min()))
        d = cfg.distill
        store.check_compatible(cfg.model_spec(data.spec.num_classes, data.spec.image_size, data.spec.channels),
                               data.train.dataset_id, cfg.data.zca, d.max_start_epoch + d.expert_epochs,
                               data.preprocessor.fingerprint())

    points, notes = expand_space(spec, base, "error" if strict else "drop", check=check, num_samples=num_samples)
    run_dir = Path(base_cfg.output_dir) / name
    for p in points:  # trial run directories <output_dir>/<sweep>/<trial>, the expert store of its setting
        p.config["experts"]["store"] = store_of(p.config)
        p.config["output_dir"], p.config["name"] = str(run_dir), p.name
    for note in notes:
        print(f"[tune] {note}", flush=True)
    searched = list(points[0].searched)
    print(f"[tune] {len(points)} trial(s) of {spec.path}: " +
          "; ".join(" ".join(f"{f.rsplit('.', 1)[-1]}={v}" for f, v in p.searched.items()) for p in points), flush=True)

    experiment_id = None
    if tracking:
        experiment_id = init_tracking(base_cfg.tracking.uri, base_cfg.tracking.experiment)  # DB before trials
    parent_cfg = copy.deepcopy(base_cfg)  # the parent's params: the fixed config, "<searched>" where searched
    for f in searched:
        section, key = f.rsplit(".", 1) if "." in f else ("", f)
        setattr(getattr(parent_cfg, section) if section else parent_cfg, key, "<searched>")
    with RunLogger(parent_cfg, name, enabled=tracking, role="sweep", entry_point="contra_ray.tune",
                   note=note) as parent:
        parent.set_tags({"path.sweep.space": str(Path(spec.path).resolve())})
        parent.log_params({"sweep.space": spec.name, "sweep.num_trials": len(points),
                           "sweep.num_dropped": sum(n.startswith("dropped") for n in notes),
                           "sweep.searched": json.dumps(searched), "sweep.workers_per_trial": workers_per_trial,
                           "sweep.max_concurrent": max_concurrent, "sweep.metric": spec.metric,
                           "sweep.proxy": json.dumps(spec.proxy), "sweep.asha": json.dumps(spec.scheduler)})
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "trials.json", json.dumps(
            {"space": spec.path, "notes": notes, "trials": [dataclasses.asdict(p) for p in points]}, indent=2))
        if parent.run_id is not None:
            parent.log_artifact(spec.path)
            parent.log_artifact(str(run_dir / "trials.json"))

        ctx = SweepContext(points, spec.proxy, workers_per_trial, use_gpu, threads, parent.run_id, tracking, note)
        tuner = _make_tuner(spec, ctx, name, Path(base_cfg.output_dir) / "tune", max_concurrent, gpus_per_trial,
                            verbose)
        grid = tuner.fit()

        rows = _collect_rows(grid, points)
        best = rows[0] if rows and rows[0].get("final_acc") is not None else None
        table = format_trials_table(rows, searched)
        print(f"\n[tune] sweep {name}: {len(rows)} trial(s), ranked by final accuracy "
              f"({base_cfg.eval.runs} run(s) x {base_cfg.eval.epochs} epochs)\n{table}", flush=True)
        atomic_write(run_dir / "results.txt", table + "\n")
        best_config = None
        if parent.run_id is not None:
            _close_child_runs(base_cfg.tracking.uri, experiment_id, parent.run_id, rows)
            parent.log_artifact(str(run_dir / "results.txt"))
        if best is not None:
            best_config = _rerun_config(points[best["index"]].config, name, base_cfg.output_dir)
            _log_best(parent, run_dir, best, best_config, points[best["index"]].config)
        else:
            print("[tune] no trial finished", flush=True)
        if parent.run_id is not None:
            print(f"[tune] MLflow: experiment {base_cfg.tracking.experiment!r} (id {experiment_id}), parent run "
                  f"{parent.run_id}, store {base_cfg.tracking.uri}", flush=True)
    return SweepResult(rows, best, best_config, notes, parent.run_id, experiment_id, base_cfg.tracking.uri, grid)


def _close_child_runs(uri: str, experiment_id: str, parent_run_id: str, rows: list[dict]) -> None:
    """Mark the child runs of trials ASHA stopped as ``KILLED`` with tag ``contra_ray.stopped=early`` (Tune
    ends a stopped function trainable with ``SystemExit`` at its next report, so :class:`RunLogger` ended
    it ``FAILED``, or it was left ``RUNNING``); end any other run still ``RUNNING`` as ``FAILED``. Fills in
    each row's MLflow ``run_id``."""
    from contra_ray.tracking import tracking_client

    client = tracking_client(uri)
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10000)
    by_index = {int(r.data.params.get("tune.trial_index", -1)): r for r in runs}
    for row in rows:
        run = by_index.get(row["index"])
        row["run_id"] = run.info.run_id if run else None
        if run is None:
            continue
        if row["status"] == "STOPPED":
            client.set_tag(run.info.run_id, "contra_ray.stopped", "early")
            client.set_terminated(run.info.run_id, "KILLED", end_time=run.info.end_time)
        elif run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "FAILED")


# ---------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    from contra_ray.common.argtypes import non_negative_float, non_negative_int, positive_int

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
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite:///<output-dir>/mlflow.db)")
    p.add_argument("--output-dir", default=None, help="root of run directories (default: the preset's, runs)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: tune-<space name>)")
    p.add_argument("--name", default=None, help="sweep name (default: <space name>-<timestamp>)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="extra fixed override applied to every trial (repeatable)")
    p.add_argument("--strict", action="store_true",
                   help="fail on an invalid combination instead of dropping it with a note")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--note", default=None, help="description of the sweep's MLflow runs (tag mlflow.note.content)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the expanded, validated configurations (no data, experts or trials) and exit")
    p.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2), help="Tune output level (default: 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.dry_run:
            if args.name is not None:  # what the real run checks first, so a dry run that passes also starts
                check_run_name(args.name, "--name")
            spec = load_space(args.space)
            points, notes = expand_space(spec, parse_overrides(args.set), "error" if args.strict else "drop",
                                         num_samples=args.num_samples)
            for note in notes:
                print(note)
            for p in points:
                print(p.name, json.dumps(p.searched))
            store_of = expert_store_resolver(spec, parse_overrides(args.set), "experts")
            stores: dict[str, int] = {}
            for p in points:
                stores[store_of(p.config)] = stores.get(store_of(p.config), 0) + 1
            print("expert stores (under the preset's run directory): " +
                  ", ".join(f"{k} ({v} trial(s))" for k, v in stores.items()))
            return 0
        result = run_sweep(args.space, num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                           workers_per_trial=args.workers_per_trial, use_gpu=args.use_gpu,
                           cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                           tracking_uri=args.tracking_uri, output_dir=args.output_dir, experiment=args.experiment,
                           name=args.name, strict=args.strict, overrides=args.set, tracking=not args.no_tracking,
                           verbose=args.verbose, note=args.note)
    except (SweepError, ConfigError) as e:
        return cli_error(e)
    return 0 if result.best is not None else 1
