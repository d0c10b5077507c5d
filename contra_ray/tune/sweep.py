"""The driver side of a sweep (:func:`run_sweep`): expand and validate the space, prepare data and expert
stores, run the Tuner, collect and rank the trials, write the best config and log the MLflow parent run.
Design: docs/SWEEPS.md.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from contra_ray.common import storage
from contra_ray.common.fileio import atomic_write, run_lock
from contra_ray.common.raycluster import check_locations_on_nodes, ensure_ray
from contra_ray.config import Config, check_run_name, config_from_dict, flatten_dotted, parse_overrides, set_dotted
from contra_ray.data.prepare import prepare_data, streamed_locations
from contra_ray.distill.checkpoint import resume_mismatches
from contra_ray.experts.remote import ensure_experts
from contra_ray.tracking import RunLogger, check_destinations, init_tracking, tracking_client
from contra_ray.tracking_relay import start_relay
from contra_ray.tune.space import (
    SweepError,
    SweepSpec,
    TrialPoint,
    asha_settings,
    expand_space,
    load_space,
    param_space,
)
from contra_ray.tune.stores import expert_fields, expert_store_resolver
from contra_ray.tune.trial import SweepContext, resolve_trial, run_trial, trial_index

__all__ = ["SweepResult", "run_sweep", "format_trials_table", "check_search", "sweep_differences", "SWEEP_MAY_CHANGE"]

#: Tune's experiment-state snapshot period in seconds while a sweep runs (Tune's "auto" waits >= 10 s, so a
#: driver killed within 10 s of a trial's end would rerun it); a TUNE_GLOBAL_CHECKPOINT_S in the
#: environment wins.
STATE_PERIOD_S = "1"


@dataclasses.dataclass
class SweepResult:
    """What :func:`run_sweep` returns.

    Attributes:
        rows: one dict per trial, ranked (best first): index, name, searched values, status (DONE,
            STOPPED by ASHA, ERROR, or INVALID: a configuration Tune sampled that fails validation),
            final_acc, final_acc_std, proxy_acc, iteration, run_id, error (``"Type: message"`` or None).
        best: the best row (highest ``final_acc``), or ``None`` if no trial finished.
        best_config: the best trial's full config dict as written to ``best_config.yaml`` (renamed
            ``<sweep>-best`` for a rerun, see :func:`_rerun_config`).
        notes: dropped / redrawn combinations.
        parent_run_id, experiment_id, tracking_uri: where the sweep is in MLflow.
        result_grid: Tune's ``ResultGrid``.
        resumed: whether this run continued an interrupted (or finished) sweep of the same name.
    """

    rows: list[dict]
    best: dict | None
    best_config: dict | None
    notes: list[str]
    parent_run_id: str | None
    experiment_id: str | None
    tracking_uri: str
    result_grid: Any = None
    resumed: bool = False

    @property
    def failed(self) -> list[dict]:
        """The rows of trials that errored (status ``ERROR``)."""
        return [r for r in self.rows if r["status"] == "ERROR"]


def _absolute(cfg: Config) -> None:
    """Make the config's paths independent of the working directory (trials run elsewhere); URIs stay."""
    if not storage.is_uri(cfg.output_dir):
        cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    cfg.data.cache_dir = str(Path(cfg.data.cache_dir).expanduser().resolve())
    if cfg.data.shared_cache and not storage.is_uri(cfg.data.shared_cache):
        cfg.data.shared_cache = str(Path(cfg.data.shared_cache).expanduser().resolve())
    if cfg.data.root and "://" not in cfg.data.root:
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    location = cfg.expert_store_location()
    cfg.experts.store = location if storage.is_uri(location) else str(cfg.expert_store().expanduser().resolve())
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


def check_search(spec: SweepSpec) -> None:
    """Refuse a ``search.algorithm: random`` space that searches a setting of the experts: the driver trains
    each expert store before the trials, so it must know every value a trial will use.

    Raises:
        SweepError: naming the field.
    """
    fields = expert_fields(spec)
    if spec.algorithm != "grid" and fields:
        raise SweepError(f"search.algorithm={spec.algorithm}: space.{fields[0]} changes the expert store, which the "
                         "driver trains before the trials; search it with the default algorithm (grid)")


def _trial_namer(ctx: SweepContext):
    """Tune's trial name and directory: the trial's name (``t03-beta0.5-K3-R1``)."""

    def name(trial) -> str:
        return resolve_trial(trial.config["searched"], trial_index(trial.trial_id), ctx)[0].name

    return name


def _make_tuner(spec: SweepSpec, ctx: SweepContext, name: str, tune_location: str, max_concurrent: int | None,
                gpus_per_trial: float | None, verbose: int, num_samples: int, restore: bool):
    """The Tuner: the space as ``param_space`` (:func:`contra_ray.tune.space.param_space`), ASHA on the
    proxy metric, resources per trial; or, with ``restore``, the interrupted sweep's Tuner
    (``Tuner.restore``: finished trials kept, unfinished and errored ones run again)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if ctx.workers_per_trial:
        resources = {"cpu": 0.01}  # only the Ray Train driver (Ray refuses 0); workers hold the CPUs/GPUs
    else:
        resources = {"cpu": ctx.threads,
                     "gpu": gpus_per_trial if gpus_per_trial is not None else float(ctx.use_gpu)}
    scheduler = None
    a = asha_settings(spec, ctx.points)  # checked against every trial by expand_space (check_schedule)
    if a is not None:
        scheduler = ASHAScheduler(time_attr="iteration", metric=spec.metric, mode=spec.mode, **a)
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)
    storage_path, storage_filesystem = storage.ray_storage(tune_location)
    if restore:
        return tune.Tuner.restore(storage.join(tune_location, name) if storage_filesystem is None else
                                  f"{storage_path}/{name}", trainable=trainable, resume_unfinished=True,
                                  resume_errored=True, storage_filesystem=storage_filesystem)
    search = None if spec.algorithm == "grid" else BasicVariantGenerator(random_state=spec.seed)
    namer = _trial_namer(dataclasses.replace(ctx, relay=None, data_refs={}))  # pickled into tuner.pkl: no handles
    return tune.Tuner(
        trainable,
        param_space=param_space(spec, ctx.points),
        tune_config=tune.TuneConfig(num_samples=1 if spec.algorithm == "grid" else num_samples, scheduler=scheduler,
                                    search_alg=search, reuse_actors=False, max_concurrent_trials=max_concurrent,
                                    trial_name_creator=namer, trial_dirname_creator=namer),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                                  verbose=verbose,
                                  failure_config=tune.FailureConfig(max_failures=0)))


def _error_line(error: BaseException) -> str:
    """``"DistillationDiverged: iteration 0: syn_lr became -3.2; ..."``: the exception raised inside the
    trial (Tune wraps it in a ``RayTaskError``), type and first line."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}".strip()


def _collect_rows(grid, ctx: SweepContext) -> tuple[list[dict], dict[int, TrialPoint]]:
    """One row per Tune result: DONE (has ``final_acc``), STOPPED (by ASHA), ERROR or INVALID; ranked.
    Also the trials' points by index."""
    rows, points = [], {}
    for res in grid:
        values = (res.config or {}).get("searched")
        if values is None:
            continue
        m = res.metrics or {}
        m_name = re.match(r"t(\d+)-", Path(res.path).name) if res.path else None
        p, _ = resolve_trial(values, int(m_name.group(1)) if m_name else 0, ctx)
        points[p.index] = p
        status = ("ERROR" if res.error else "INVALID" if "invalid" in m else
                  "DONE" if "final_acc" in m else "STOPPED")
        rows.append({"index": p.index, "name": p.name, "searched": p.searched, "status": status,
                     "final_acc": m.get("final_acc"), "final_acc_std": m.get("final_acc_std"),
                     "proxy_acc": m.get("proxy_acc"), "iteration": m.get("iteration"),
                     "error": _error_line(res.error) if res.error else m.get("invalid")})
    return sorted(rows, key=_rank_key), points


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
    atomic_write(run_dir / "best_config.yaml", yaml.safe_dump(best_config, sort_keys=False))
    trial = config_from_dict(trial_config, validate=False)
    best_dir = trial.run_dir()  # this node's mirror of a URI: the best trial may have run on another node
    storage.pull(trial.run_location(), best_dir, files=["distilled.safetensors", "distilled_grid.png"])
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
          f"{run_dir / 'best_config.yaml'}; distilled set {storage.join(trial.run_location(), 'distilled.safetensors')}"
          "):\n"
          + yaml.safe_dump({"distill": best_config["distill"]}, sort_keys=False), flush=True)


def run_sweep(space_path: str | os.PathLike, *, num_samples: int | None = None, max_concurrent: int | None = None,
              workers_per_trial: int = 0, use_gpu: bool = False, cpus_per_trial: int | None = None,
              gpus_per_trial: float | None = None, tracking_uri: str | None = None, output_dir: str | None = None,
              experiment: str | None = None, name: str | None = None, strict: bool = False,
              overrides: list[str] | None = None, tracking: bool = True, verbose: int = 1,
              note: str | None = None, overwrite: bool = False) -> SweepResult:
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
        overwrite: replace an earlier sweep of this name that had another configuration (its trial
            directories, results and best config); without it that sweep is refused.

    The sweep holds ``<output_dir>/<name>/.lock`` (:func:`contra_ray.common.fileio.run_lock`) from before
    data and experts to its end; ``trials.json`` there records what decides its results, and a later sweep of
    the name is compared with it (the same configuration runs again).

    Raises:
        SweepError, ConfigError: malformed space, no valid configuration, a sweep name that is not one folder
            name, ASHA settings that do not fit a trial's iterations, an output directory that cannot be
            written, a tracking store that does not answer, or an earlier sweep of this name with another
            configuration (naming the differing fields) without ``overwrite`` (all before data, experts or
            trials).
        RunInUse: another live process holds the sweep's name (names its pid).
    """
    spec = load_space(space_path)
    check_search(spec)
    if workers_per_trial < 0:
        raise SweepError(f"--workers-per-trial={workers_per_trial}: must be >= 0")
    name = name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_run_name(name, "--name")  # the sweep's directory is <output_dir>/<name>
    base = parse_overrides(overrides)
    if output_dir:
        base["output_dir"] = output_dir
    if tracking_uri:
        set_dotted(base, "tracking.uri", tracking_uri)
    set_dotted(base, "tracking.experiment", experiment or f"tune-{spec.name}")
    set_dotted(base, "tracking.enabled", bool(tracking))
    # expand once without data (fails fast: malformed space, --strict, nothing valid); the first valid
    # configuration then fixes paths, data and experts (β, K, R change neither)
    probe_points, _ = expand_space(spec, base, "error" if strict else "drop", num_samples=num_samples)
    base_cfg = config_from_dict(probe_points[0].config)
    _absolute(base_cfg)
    threads = cpus_per_trial or max(1, base_cfg.threads)
    for key, value in (("output_dir", base_cfg.output_dir), ("data.cache_dir", base_cfg.data.cache_dir),
                       ("data.root", base_cfg.data.root), ("experts.store", base_cfg.experts.store),
                       ("tracking.uri", base_cfg.tracking.uri), ("threads", threads)):
        set_dotted(base, key, value)
    base_cfg.threads = threads
    check_destinations(base_cfg.output_dir, base_cfg.tracking.uri if tracking else None)  # before any work

    if str(base_cfg.device).startswith("cuda") and not use_gpu:
        raise SweepError(f"device={base_cfg.device!r} (preset {spec.preset}): pass --use-gpu (or override device=cpu)")
    location = storage.join(base_cfg.output_dir, name)  # the sweep's folder: a path or a URI
    run_dir = storage.local_mirror(location) if storage.is_uri(location) else Path(location)
    with run_lock(run_dir):  # one sweep per name: a second one is refused (RunInUse) before any work
        storage.pull(location, run_dir, files=["trials.json", "results.txt", "best_config.yaml"])
        request = _sweep_request(spec, probe_points)
        _check_earlier_sweep(run_dir, request, overwrite, location)
        try:
            return _run_owned(spec, base, base_cfg, name, run_dir, request, num_samples=num_samples,
                              max_concurrent=max_concurrent, workers_per_trial=workers_per_trial, use_gpu=use_gpu,
                              gpus_per_trial=gpus_per_trial, strict=strict, tracking=tracking, verbose=verbose,
                              note=note, threads=threads)
        finally:  # the sweep's own files (trial folders are published by their trials)
            if storage.is_uri(location) and run_dir.is_dir():
                storage.push(run_dir, location, files=[f for f in ("trials.json", "results.txt", "best_config.yaml")
                                                       if (run_dir / f).is_file()])


# fields a sweep rerun may change without changing its results: locations, resources, execution strategy,
# and the distill evaluation settings the trials replace by the space's proxy
SWEEP_MAY_CHANGE = {
    "data": {"cache_dir", "root", "download", "decode_threads", "shared_cache"},
    "experts": {"store", "cpus_per_expert", "gpus_per_expert", "eval_every", "max_retries"},
    "distill": {"checkpoint_every", "eval_every", "eval_runs_periodic", "unroll_memory", "student_execution"},
    "eval": {"cpus_per_run", "gpus_per_run", "test_batch_size"},
}
SWEEP_SECTIONS = ("data", "model", "experts", "distill", "eval")


def _sweep_request(spec: SweepSpec, points: list[TrialPoint]) -> dict:
    """What decides a sweep's results: the trials of the space expanded without data (deterministic for one
    space, overrides and ``num_samples``), and the proxy, metric and scheduler that rank and stop them.
    Recorded in ``trials.json``; a later sweep of the same name is compared with it."""
    request = {"trials": [{"name": p.name, "config": {k: p.config[k] for k in SWEEP_SECTIONS}} for p in points],
               "metric": spec.metric, "mode": spec.mode, "proxy": spec.proxy, "scheduler": spec.scheduler}
    return json.loads(json.dumps(request))  # as read back from trials.json (tuples become lists)


def sweep_differences(earlier: dict, now: dict) -> list[str]:
    """What differs between two sweep requests (see :func:`_sweep_request`), one entry per field:
    trials only in one of them, a ranking setting, or a config field of the trials both have
    (:func:`contra_ray.distill.checkpoint.resume_mismatches` over :data:`SWEEP_SECTIONS` less
    :data:`SWEEP_MAY_CHANGE`)."""
    out = []
    for key in ("metric", "mode", "proxy", "scheduler"):
        if earlier.get(key) != now.get(key):
            out.append(f"{key}={earlier.get(key)!r} in the finished sweep, {now.get(key)!r} now")
    before = {t["name"]: t["config"] for t in earlier.get("trials", [])}
    after = {t["name"]: t["config"] for t in now.get("trials", [])}
    gone, new = [n for n in before if n not in after], [n for n in after if n not in before]
    if gone:
        out.append(f"trial(s) {', '.join(gone)} only in the finished sweep")
    if new:
        out.append(f"trial(s) {', '.join(new)} only in this one")
    for n in (n for n in after if n in before):
        out += resume_mismatches(before[n], after[n], where="the finished sweep", sections=SWEEP_SECTIONS,
                                 may_change=SWEEP_MAY_CHANGE)
    return list(dict.fromkeys(out))  # a fixed field differs alike in every trial: say it once


def _check_earlier_sweep(run_dir: Path, request: dict, overwrite: bool, location: str | None = None) -> None:
    """Refuse to replace an earlier sweep of this name (``<run_dir>/trials.json``) that had another
    configuration, unless ``overwrite``: then its trial directories, ``results.txt``, ``best_config.yaml`` and
    Tune's experiment state (``<output_dir>/tune/<name>``) are removed first
    (a trial of the same name would otherwise resume the old trial's checkpoint), also at ``location`` (the
    sweep's URI, whose mirror ``run_dir`` is). The same configuration runs again, as it always did.

    Raises:
        SweepError: naming every differing field and the ``--overwrite`` / ``--name`` ways out.
    """
    path = run_dir / "trials.json"
    if not path.is_file():
        return
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        earlier = {"unreadable": f"{type(e).__name__}: {e}"}
    if "request" not in earlier:  # written before sweeps recorded it, or unreadable: cannot be compared
        diff = [f"{path} records no comparable configuration ({earlier.get('unreadable', 'an older contra_ray')})"]
    else:
        diff = sweep_differences(earlier["request"], request)
    if not diff:
        return
    if not overwrite:
        raise SweepError(f"sweep {run_dir.name!r} has already run in {run_dir} with another configuration: "
                         + "; ".join(diff) + "; rerun with --overwrite to replace it, or use another --name")
    removed = []
    for t in earlier.get("trials", []):
        d = run_dir / str(t.get("name", ""))
        if t.get("name") and d.parent == run_dir and d.is_dir():
            shutil.rmtree(d)
            removed.append(d.name)
    for f in ("results.txt", "best_config.yaml", "trials.json"):
        (run_dir / f).unlink(missing_ok=True)
    tune_state = run_dir.parent / "tune" / run_dir.name  # Tune's experiment state: a rerun would restore it
    if tune_state.is_dir():
        shutil.rmtree(tune_state)
    if storage.is_uri(location):
        for f in [*removed, "results.txt", "best_config.yaml", "trials.json"]:
            storage.delete(storage.join(location, f))
        storage.delete(storage.join(location.rstrip("/").rpartition("/")[0], "tune", run_dir.name))
    print(f"[tune] --overwrite: replacing sweep {run_dir.name!r} ({'; '.join(diff)}); removed "
          f"{len(removed)} trial director{'y' if len(removed) == 1 else 'ies'} of it", flush=True)


def _run_owned(spec: SweepSpec, base: dict, base_cfg: Config, name: str, run_dir: Path, request: dict, *,
               num_samples: int | None, max_concurrent: int | None, workers_per_trial: int, use_gpu: bool,
               gpus_per_trial: float | None, strict: bool, tracking: bool, verbose: int, note: str | None,
               threads: int) -> SweepResult:
    """The rest of :func:`run_sweep`, holding the sweep's run directory: data and experts, the full
    expansion, the Tuner, the ranking and the MLflow parent run."""
    ensure_ray()
    import ray

    location = storage.join(base_cfg.output_dir, name)
    # every node must reach the sweep's locations (trials run anywhere); the data reach them through Ray's
    # object store (a streamed set as handles that fill each node's data.cache_dir from data.shared_cache, or
    # read a shared data.cache_dir)
    store_location = base_cfg.experts.store
    shared = {"output_dir": base_cfg.output_dir if storage.is_uri(base_cfg.output_dir) else run_dir.parent,
              "experts.store": store_location if storage.is_uri(store_location) else Path(store_location).parent,
              **streamed_locations(base_cfg)}
    check_locations_on_nodes(shared)
    store_of = expert_store_resolver(spec, base, base_cfg.experts.store)
    data_refs: dict[str, object] = {}
    prepared: dict[str, tuple] = {}  # store directory -> (data, expert store): trained once per setting

    def setup(cfg: Config) -> tuple:
        path = store_of(cfg.to_dict())
        if path not in prepared:
            scfg = copy.deepcopy(cfg)
            scfg.experts.store = path
            print(f"[tune] data and experts for {spec.preset} (store {path})", flush=True)
            data = prepare_data(scfg)
            prepared[path] = (data, ensure_experts(scfg, data, train_missing=True))
            data_refs[path] = ray.put(data)  # trials get the prepared data from the object store
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
    for p in points:  # trial run directories <output_dir>/<sweep>/<trial>, the expert store of its setting
        p.config["experts"]["store"] = store_of(p.config)
        p.config["output_dir"], p.config["name"] = location, p.name
    for note in notes:
        print(f"[tune] {note}", flush=True)
    searched = list(points[0].searched)
    if spec.algorithm == "grid":
        print(f"[tune] {len(points)} trial(s) of {spec.path}: " + "; ".join(
            " ".join(f"{f.rsplit('.', 1)[-1]}={v}" for f, v in p.searched.items()) for p in points), flush=True)
    else:
        print(f"[tune] trials of {spec.path} sampled by Tune (search.algorithm={spec.algorithm}, "
              f"num_samples={num_samples or spec.num_samples} per grid point)", flush=True)

    # an earlier run of this sweep name: resumed if it ran the same trials, else refused
    tune_location = storage.join(base_cfg.output_dir, "tune")
    record = {"space": spec.path, "search": spec.algorithm, "num_samples": num_samples or spec.num_samples,
              "notes": notes, "trials": [dataclasses.asdict(p) for p in points]}
    previous = _read_record(run_dir / "trials.json")
    if previous is not None:
        diff = _record_difference(previous, record)
        if diff:
            raise SweepError(f"--name={name!r}: {run_dir} holds a sweep of other trials ({diff}); rerun it with "
                             "the same space and settings to resume it, or choose another --name")
    from ray.tune import Tuner

    tune_path, tune_fs = storage.ray_storage(tune_location)
    restore = Tuner.can_restore(f"{tune_path}/{name}", storage_filesystem=tune_fs)

    experiment_id = None
    if tracking:
        experiment_id = init_tracking(base_cfg.tracking.uri, base_cfg.tracking.experiment)  # DB before trials
    parent_cfg = copy.deepcopy(base_cfg)  # the parent's params: the fixed config, "<searched>" where searched
    for f in searched:
        section, key = f.rsplit(".", 1) if "." in f else ("", f)
        setattr(getattr(parent_cfg, section) if section else parent_cfg, key, "<searched>")
    resume_id = (previous or {}).get("parent_run_id") if tracking else None
    if resume_id is not None and not _run_exists(base_cfg.tracking.uri, resume_id):
        resume_id = None
    with RunLogger(parent_cfg, name, enabled=tracking, role="sweep", entry_point="contra_ray.tune",
                   note=note, resume_run_id=resume_id) as parent:
        if restore:
            print(f"[tune] resuming sweep {name} ({storage.join(tune_location, name)}): finished trials are kept, "
                  "the others run"
                  + (f"; MLflow parent run {parent.run_id}" if parent.run_id else ""), flush=True)
        if resume_id is not None:
            _supersede_unfinished_children(base_cfg.tracking.uri, experiment_id, parent.run_id)
        elif parent.run_id is not None:
            _log_parent_params(parent, spec, points, notes, searched, workers_per_trial, max_concurrent)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "trials.json", json.dumps({**record, "request": request, "parent_run_id": parent.run_id},
                                                         indent=2))
        if parent.run_id is not None and resume_id is None:
            parent.log_artifact(spec.path)
            parent.log_artifact(str(run_dir / "trials.json"))

        # trials log to MLflow through an actor on this (the driver's) node: they may run on any node
        relay = start_relay(base_cfg.tracking.uri, base_cfg.tracking.experiment) if parent.run_id else None
        ctx = SweepContext(points, spec.proxy, workers_per_trial, use_gpu, threads, parent.run_id, tracking, note,
                           spec, base, location, base_cfg.experts.store, strict, data_refs=data_refs, relay=relay)
        tuner = _make_tuner(spec, ctx, name, tune_location, max_concurrent, gpus_per_trial, verbose,
                            num_samples or spec.num_samples, restore)
        try:
            with _env("TUNE_GLOBAL_CHECKPOINT_S", STATE_PERIOD_S):
                grid = tuner.fit()
        finally:
            if relay is not None:
                relay.close()

        rows, by_index = _collect_rows(grid, ctx)
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
            best_config = _rerun_config(by_index[best["index"]].config, name, base_cfg.output_dir)
            _log_best(parent, run_dir, best, best_config, by_index[best["index"]].config)
        else:
            print("[tune] no trial finished", flush=True)
        if parent.run_id is not None:
            print(f"[tune] MLflow: experiment {base_cfg.tracking.experiment!r} (id {experiment_id}), parent run "
                  f"{parent.run_id}, store {base_cfg.tracking.uri}", flush=True)
        failed = [r for r in rows if r["status"] == "ERROR"]
        if failed:
            print(f"[tune] {len(failed)} of {len(rows)} trial(s) failed (rerunning the same command retries them):\n"
                  + "\n".join(f"  {r['name']}: {r['error']}" for r in failed), flush=True)
    return SweepResult(rows, best, best_config, notes, parent.run_id, experiment_id, base_cfg.tracking.uri, grid,
                       restore)


@contextlib.contextmanager
def _env(key: str, value: str):
    """Set environment variable ``key`` to ``value`` unless it is set; restored on exit."""
    had = key in os.environ
    os.environ.setdefault(key, value)
    try:
        yield
    finally:
        if not had:
            os.environ.pop(key, None)


def _log_parent_params(parent, spec: SweepSpec, points: list[TrialPoint], notes: list[str], searched: list[str],
                       workers_per_trial: int, max_concurrent: int | None) -> None:
    parent.set_tags({"path.sweep.space": str(Path(spec.path).resolve())})
    parent.log_params({"sweep.space": spec.name, "sweep.num_trials": len(points),
                       "sweep.num_dropped": sum(n.startswith("dropped") for n in notes),
                       "sweep.searched": json.dumps(searched), "sweep.workers_per_trial": workers_per_trial,
                       "sweep.max_concurrent": max_concurrent, "sweep.metric": spec.metric,
                       "sweep.proxy": json.dumps(spec.proxy), "sweep.asha": json.dumps(spec.scheduler),
                       "sweep.search": spec.algorithm})


def _read_record(path: Path) -> dict | None:
    """The ``trials.json`` of an earlier run of the sweep (``None``: none, or unreadable)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _record_difference(previous: dict, record: dict) -> str | None:
    """The first difference between an earlier run's record and this one's, in words (``None``: same)."""
    for key in ("search", "num_samples"):
        if previous.get(key) != record[key]:
            return f"{key} {previous.get(key)!r}, now {record[key]!r}"
    old, new = previous.get("trials") or [], record["trials"]
    if len(old) != len(new):
        return f"{len(old)} trial(s), now {len(new)}"
    for a, b in zip(old, new):
        if a.get("name") != b["name"]:
            return f"trial {a.get('name')!r}, now {b['name']!r}"
        fa, fb = flatten_dotted(a.get("config") or {}), flatten_dotted(b["config"])
        for f in sorted(set(fa) | set(fb)):
            if fa.get(f) != fb.get(f):
                return f"trial {b['name']}: {f}={fa.get(f)!r}, now {fb.get(f)!r}"
    return None


def _run_exists(uri: str, run_id: str) -> bool:
    try:
        tracking_client(uri).get_run(run_id)
    except Exception:  # noqa: BLE001 - any store answer but a run means "start a new parent"
        return False
    return True


def _supersede_unfinished_children(uri: str, experiment_id: str, parent_run_id: str) -> None:
    """A resumed sweep: the child runs of trials that were running (``RUNNING``: the driver was killed) or
    failed (``FAILED``; Tune runs them again) end ``KILLED`` with tag ``contra_ray.superseded`` (the trial
    runs again under a new child); finished trials keep theirs and are not run again."""
    client = tracking_client(uri)
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10000)
    for run in runs:
        if run.info.status in ("RUNNING", "FAILED") and "contra_ray.stopped" not in run.data.tags:
            client.set_tag(run.info.run_id, "contra_ray.superseded", "rerun by the resumed sweep")
            client.set_terminated(run.info.run_id, "KILLED")


def _close_child_runs(uri: str, experiment_id: str, parent_run_id: str, rows: list[dict]) -> None:
    """Mark the child runs of trials ASHA stopped as ``KILLED`` with tag ``contra_ray.stopped=early`` (Tune
    ends a stopped function trainable with ``SystemExit`` at its next report, so :class:`RunLogger` ended
    it ``FAILED``, or it was left ``RUNNING``); end any other run still ``RUNNING`` as ``FAILED``. Fills in
    each row's MLflow ``run_id``."""
    client = tracking_client(uri)
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10000,
                              order_by=["attributes.start_time DESC"])
    by_index: dict = {}
    for r in runs:  # the newest run of a trial (a resumed sweep superseded the others)
        if "contra_ray.superseded" not in r.data.tags:
            by_index.setdefault(int(r.data.params.get("tune.trial_index", -1)), r)
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
