"""Search spaces of the sweeps: the space file (:func:`load_space`, :class:`SweepSpec`), bundle axes, ASHA
settings checks and the expansion into validated trial configurations (:func:`expand_space`,
:class:`TrialPoint`), all in the driver before any trial starts. Design: docs/SWEEPS.md.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import random
from pathlib import Path
from typing import Any

from contra_ray.common.fileio import YAMLFileError, load_yaml
from contra_ray.config import Config, ConfigError, flatten_dotted, get_dotted, load_config, set_dotted

__all__ = ["SweepSpec", "TrialPoint", "SweepError", "load_space", "expand_space", "asha_settings", "check_schedule",
           "space_path", "axis_fields", "searched_fields", "merge_nested", "short_label", "trial_name",
           "axis_values", "point_of_values", "param_space", "materialize", "SEARCH_ALGORITHMS"]

SPACE_DIR = Path(__file__).resolve().parents[2] / "tune_spaces"
AXIS_KINDS = ("grid", "choice", "uniform")
MAX_DRAWS = 100  # redraws of the random axes for one invalid sample
DEFAULT_PROXY = {"eval_every": 100, "epochs": 50, "runs": 1}
REPORTED_METRICS = ("proxy_acc", "loss", "syn_lr")  # in every report a trial sends Tune (see contra_ray.tune.trial)
ASHA_DEFAULTS = {"grace_period": 1, "reduction_factor": 2}  # max_t defaults to the trials' longest iterations
ASHA_KEYS = ("grace_period", "reduction_factor", "max_t", "brackets", "stop_last_trials")
#: ``search.algorithm`` of a space file -> what samples the trials (docs/SWEEPS.md). Only algorithms whose
#: packages are installed with Ray here: Tune's BasicVariantGenerator in two uses (OptunaSearch, HyperOpt...
#: need packages this project does not install).
SEARCH_ALGORITHMS = {
    "grid": "the driver's validated trials (grid product, seeded draws with redraws) as one tune.grid_search",
    "random": "Tune's BasicVariantGenerator samples the axes (grid_search / choice / uniform) itself",
}


class SweepError(ValueError):
    """The search space file is malformed or leaves no valid configuration; the message says which."""


# ---------------------------------------------------------------------------------------------- dotted dicts
# contra_ray.config has set_dotted (used as is); these are the other dotted-path helpers of the sweeps.

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
        merge_nested(out, set_dotted({}, str(key), value))
    return out


def merge_nested(a: dict, b: dict) -> dict:
    """Merge nested mapping ``b`` into ``a`` (in place, ``b`` wins); returns ``a``."""
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            merge_nested(a[k], v)
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






def short_label(field: str, value: Any) -> str:
    """``("distill.beta", 0.5)`` -> ``beta0.5``: a searched value in trial and expert store names."""
    key = field.rsplit(".", 1)[-1]
    return f"{key}{value:g}" if isinstance(value, float) else f"{key}{value}"


# ---------------------------------------------------------------------------------------------- space

@dataclasses.dataclass
class SweepSpec:
    """A parsed search-space YAML (format: docs/SWEEPS.md)."""

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
    algorithm: str = "grid"  # search.algorithm, a key of SEARCH_ALGORITHMS


@dataclasses.dataclass
class TrialPoint:
    """One configuration of the sweep: ``searched`` values, the full validated config dict and ``values``,
    the axis values as Tune hands them to the trial (:func:`axis_values`)."""

    index: int
    name: str
    searched: dict[str, Any]
    config: dict
    values: dict = dataclasses.field(default_factory=dict)


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
    if axis in Config().to_dict():
        raise SweepError(f"space.{axis}: a bundle axis is not named like a config section (use e.g. 'method')")
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, dict) or not v:
            raise SweepError(f"{where}[{i}]={v!r}: every value of a bundle axis is a non-empty mapping of "
                             "section.field: value")
        out.append(flatten_dotted(v))
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
    known = {"preset", "overrides", "space", "num_samples", "metric", "mode", "proxy", "scheduler", "seed", "search"}
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
    search = raw.get("search") or {}
    if not isinstance(search, dict) or set(search) - {"algorithm"}:
        raise SweepError(f"search={search!r}: expected {{algorithm: {' | '.join(SEARCH_ALGORITHMS)}}}")
    algorithm = search.get("algorithm", "grid")
    if algorithm not in SEARCH_ALGORITHMS:
        raise SweepError(f"search.algorithm={algorithm!r}: expected one of {', '.join(SEARCH_ALGORITHMS)} (the "
                         "searchers installed here; Optuna, HyperOpt, ... need packages this project does not install)")
    return SweepSpec(str(path), path.stem, str(raw["preset"]), _nested(raw.get("overrides"), "overrides"), axes,
                     n, str(metric), mode, proxy, asha, int(raw.get("seed", 0)), str(algorithm))



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


def _materialize(spec: SweepSpec, base: dict, point: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
    """Config for one point (unvalidated) and the searched values as the trial will use them.

    Raises:
        ConfigError: unknown field or wrong type (structural errors; never a dropped combination).
    """
    overrides = copy.deepcopy(base)
    for field, value in point.items():
        set_dotted(overrides, field, value)
    if "distill.K" in point and "distill.R" not in point and not _has_path(spec.overrides, "distill.R"):
        set_dotted(overrides, "distill.R", None)  # paper default floor((T+ - T-)/K)
    cfg = load_config(spec.preset, overrides, validate=False)
    d = cfg.distill
    if d.K > 0:
        d.R = d.resolved_R()  # log the R actually used
    else:
        d.R = None  # no concurrent segments: R is meaningless
    searched = {f: get_dotted(cfg.to_dict(), f) for f in point}
    if "distill.K" in point and "distill.R" not in searched:
        searched["distill.R"] = d.R
    return cfg, searched


def trial_name(index: int, searched: dict[str, Any]) -> str:
    """``t03-beta0.5-K3-R1``: the trial's index and searched values (its run directory and MLflow run name)."""
    return f"t{index:02d}-" + "-".join(short_label(f, v) for f, v in searched.items())


def axis_values(axes: dict[str, Any]) -> dict:
    """``{axis: value}`` -> the nested values Tune hands a trial: ``{"distill.beta": 0.5}`` ->
    ``{"distill": {"beta": 0.5}}``; a bundle axis keeps its name, its value nested
    (``{"method": {"distill": {"K": 0, "beta": 1.0}}}``)."""
    out: dict = {}
    for axis, value in axes.items():
        if isinstance(value, dict):
            nested: dict = {}
            for f, v in value.items():
                set_dotted(nested, f, v)
            out[axis] = nested
        else:
            set_dotted(out, axis, value)
    return out


def point_of_values(spec: SweepSpec, values: dict) -> dict[str, Any]:
    """Inverse of :func:`axis_values`: a trial's nested values -> ``{"section.field": value}``.

    Raises:
        SweepError: an axis of the space has no value in ``values``.
    """
    out: dict[str, Any] = {}
    for axis, (_, choices) in spec.space.items():
        try:
            if choices and isinstance(choices[0], dict):
                out.update(flatten_dotted(values[axis]))
            else:
                out[axis] = get_dotted(values, axis)
        except (KeyError, TypeError):
            raise SweepError(f"trial values {values!r}: no value for space.{axis}") from None
    return out


def param_space(spec: SweepSpec, points: list[TrialPoint]) -> dict:
    """Tune's ``param_space`` of the sweep; a trial receives ``config["searched"]`` = nested axis values.

    ``grid`` (default): ``tune.grid_search`` over the validated points' values (each a nested dict; the
    redraws and drops of :func:`expand_space` stay exact). ``random``: every axis as its Tune domain,
    sampled by Tune: grid axes ``tune.grid_search``, ``choice`` ``tune.choice``, ``uniform``
    ``tune.uniform``, bundle axes a grid/choice over nested dicts.
    """
    from ray import tune

    if spec.algorithm == "grid":
        return {"searched": tune.grid_search([p.values for p in points])}
    domains: dict[str, Any] = {}
    for axis, (kind, values) in spec.space.items():
        if values and isinstance(values[0], dict):
            values = [axis_values({"_": v})["_"] for v in values]
        dom = (tune.grid_search(values) if kind == "grid" else tune.choice(values) if kind == "choice"
               else tune.uniform(float(values[0]), float(values[1])))
        if "." in axis:
            set_dotted(domains, axis, dom)
        else:
            domains[axis] = dom
    return {"searched": domains}


def materialize(spec: SweepSpec, base: dict, point: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
    """Config of one point (unvalidated; R resolved) and its searched values, as :func:`expand_space`
    builds them (the trials of ``search.algorithm: random`` build theirs with it).

    Raises:
        ConfigError: unknown field or wrong type.
    """
    return _materialize(spec, merge_nested(copy.deepcopy(spec.overrides), copy.deepcopy(base)), point)


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
    base = merge_nested(copy.deepcopy(spec.overrides), copy.deepcopy(base_overrides or {}))
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
        fixed_axes = dict(zip([f for f, _ in grid], combo))
        fixed = _flat_point(fixed_axes)
        for _ in range(n if rand else 1):
            reason, cfg, searched = None, None, None
            for _attempt in range(MAX_DRAWS if rand else 1):
                drawn = {f: _draw(rng, k, v) for f, k, v in rand}
                axes = {**fixed_axes, **drawn}  # grid axes first: the order of the searched values (names)
                point = _flat_point(axes)
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
            points.append(TrialPoint(len(points), trial_name(len(points), searched), searched, cfg.to_dict(),
                                     axis_values(axes)))
    if not points:
        raise SweepError(f"search space {spec.path}: no valid configuration:\n  " + "\n  ".join(notes))
    notes += check_schedule(spec, points)
    return points, notes
