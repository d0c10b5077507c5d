"""Experiment tracking at the edge: MLflow runs, flattened config params, image grids and curves.

Nothing in the core imports this module. The default store is a SQLite database
(``sqlite:///<output_dir>/mlflow.db``, see :meth:`Config.tracking_uri`): MLflow 3 refuses the plain
``./mlruns`` file store by default. :func:`init_tracking` creates the database and the experiment; every
opening of a store (:func:`tracking_client`, :func:`init_tracking`) holds an exclusive ``fcntl`` lock on
``<db>.lock`` beside a SQLite database (:func:`store_lock`), so processes started together on a fresh
database never race through MLflow's schema migrations (``duplicate column name``) or the experiment's
creation. For SQLite stores new experiments keep their artifacts next to the database
(``<db dir>/mlartifacts``) instead of ``./mlruns`` in the current directory, and opening a moved store points
its locations there again (:mod:`contra_ray.common.artifact_root`).
:func:`check_destinations` is what every CLI calls before any work: the output directory is writable
and the tracking store reachable within a few seconds.

:class:`RunLogger` is a context manager whose methods are no-ops when tracking is disabled, so calling
code needs no ``if``. Plots and grids are written atomically (temporary file + ``os.replace``).

**One vocabulary for every run kind** (pipeline, distill, distill ``--num-workers``, Tune trial, evaluate
CLI), so their runs share charts: the metrics of :data:`METRICS` (``loss``, ``syn_lr``, ``eval_acc`` per
iteration; ``final_acc``/``final_acc_std`` for the main model, ``final_acc/<model>`` for every model,
``random_real_acc*`` for the baseline; ``s_per_iter``, ``iters_to_plateau``), the tags of
:func:`run_tags` (role, method, dataset, ipc, K, beta, git commit, entry point, paths, note), and as
params the flattened config without its paths (:data:`PATH_FIELDS`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping

from contra_ray.common import storage
from contra_ray.common.artifact_root import artifact_root, relocate_artifacts
from contra_ray.common.fileio import ensure_writable_dir
from contra_ray.config import ConfigError, flatten_dotted

__all__ = ["init_tracking", "tracking_client", "store_lock", "check_destinations", "flatten_params", "RunLogger",
           "METRICS", "PATH_FIELDS", "METHODS", "PLATEAU_TOLERANCE", "main_model", "accuracy_metrics", "method_of",
           "source_version", "run_tags", "iteration_metrics", "MAX_PARAM_VALUE_LENGTH", "sqlite_path",
           "caller_entry_point"]

MAX_PARAM_VALUE_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_MAX_PER_BATCH = 100  # params (and metrics, conservatively) per log_batch call


STORE_LOCK_TIMEOUT_S = 300.0  # longest wait for another process's store creation / migration


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


@contextlib.contextmanager
def store_lock(uri: str, timeout_s: float = STORE_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``<db>.lock`` beside a ``sqlite:///`` database (no-op for
    other stores, whose servers serialise their own migrations).

    MLflow creates and migrates a SQLite schema when a store is first opened (``SqlAlchemyStore``:
    tables missing -> run every alembic migration); two processes doing it at once fail with
    ``OperationalError: duplicate column name``. The lock is released when the block ends or the process
    dies. The database's directory is created if needed.

    Raises:
        TimeoutError: the lock is still held by another process after ``timeout_s`` seconds (names the
            lock file).
    """
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    lock = db.with_name(db.name + ".lock")
    deadline = time.monotonic() + timeout_s
    with open(lock, "a") as f:
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"tracking.uri={uri!r}: {lock} still locked by another process after "
                                       f"{timeout_s:.0f} s (creating or migrating the MLflow store)") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def tracking_client(uri: str):
    """An ``mlflow.tracking.MlflowClient`` for ``uri``, its store opened (created and migrated if new)
    under :func:`store_lock`. Use it instead of ``MlflowClient(uri)`` wherever the store may be new.

    Raises:
        mlflow.exceptions.MlflowException: the store cannot be opened.
        TimeoutError: see :func:`store_lock`.
    """
    from mlflow.tracking import MlflowClient

    with store_lock(uri):
        client = MlflowClient(tracking_uri=uri)  # opens the store eagerly (MLflow caches it per process)
        if (db := sqlite_path(uri)) is not None:
            relocate_artifacts(db)  # a moved store's artifact locations follow it
        return client


def init_tracking(uri: str, experiment: str) -> str:
    """Point MLflow at ``uri`` and make sure ``experiment`` exists; returns its experiment id.

    For ``sqlite:///PATH`` URIs the parent directory is created and the database (schema included) is
    created here, in the calling process, under :func:`store_lock` (the store's creation, migration and
    the experiment's creation), so any number of processes may call this at once on a fresh database;
    new experiments get the artifact location ``<PATH's directory>/mlartifacts``, and those of a store that
    was moved (its folder copied from a cluster) are pointed there again (also by :func:`tracking_client`).
    Experiments are tagged ``mlflow.experimentKind = custom_model_development`` (MLflow 3's UI then opens
    them on their runs, in its "Model training" view, instead of the GenAI traces view).

    Raises:
        mlflow.exceptions.MlflowException: the store cannot be opened or the experiment is deleted.
        TimeoutError: see :func:`store_lock`.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    artifact_location = None
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        artifact_location = artifact_root(db)
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):
        client = MlflowClient(tracking_uri=uri)  # opening a SQLite store creates and migrates the database
        if db is not None:
            relocate_artifacts(db)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                return client.create_experiment(experiment, artifact_location=artifact_location,
                                                tags={"mlflow.experimentKind": EXPERIMENT_KIND})
            except MlflowException:
                exp = client.get_experiment_by_name(experiment)  # created by a process on another host
                if exp is None:
                    raise
    if exp.lifecycle_stage != "active":
        raise MlflowException(f"tracking.experiment={experiment!r} is deleted in {uri}; restore it or pick "
                              "another name")
    if "mlflow.experimentKind" not in exp.tags:  # made before contra_ray tagged its experiments
        client.set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND)
    return exp.experiment_id


_DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def tracking_schemes() -> frozenset[str]:
    """URI schemes MLflow opens a tracking store for: its own (``""`` = a path, ``file``, ``sqlite``,
    ``http``, ``https``, ``databricks``, ``postgresql``, ``mysql``, ``mssql``) and those of installed plugins
    (entry points ``mlflow.tracking_store``), read without importing MLflow."""
    from importlib.metadata import entry_points

    plugins = {ep.name.lower() for ep in entry_points(group="mlflow.tracking_store")}
    return frozenset({"", "file", "sqlite", "http", "https", "databricks", *_DB_PORTS} | plugins)


def check_destinations(output_dir: str | os.PathLike | None, tracking_uri: str | None,
                       timeout_s: float = 5.0, cache_dir: str | os.PathLike | None = None) -> None:
    """Fail fast, before any work, if results could not be written: call at the start of every CLI.

    * ``output_dir``: created if missing and proven writable (a temporary file is created and removed); a URI:
      one object written and deleted there, then its node-local mirror as a folder.
    * ``cache_dir`` (``data.cache_dir``; skip with ``None``): the same.
    * ``tracking_uri`` (skip with ``None``, e.g. tracking disabled): ``sqlite:///PATH`` -> PATH's
      directory creatable and writable, and PATH, if it exists, a writable SQLite database; ``file:`` URIs
      and plain paths (MLflow's file store, which MLflow 3 refuses by default) are refused; ``http(s)://`` ->
      one GET answered within ``timeout_s`` seconds (any HTTP
      status counts as reachable except 502/503/504, a gateway without its server);
      ``postgresql``/``mysql``/``mssql`` URIs -> a TCP connection to host:port within ``timeout_s``;
      ``databricks`` and schemes of installed MLflow tracking-store plugins are accepted unchecked.
      Any other scheme (``bogus://x``), and the Unity Catalog registry URIs ``uc`` / ``databricks-uc``,
      which MLflow refuses as tracking stores, are refused here rather than when the first run is logged.

    Raises:
        ConfigError: one line naming the field (``output_dir`` / ``tracking.uri``), its value and why.
    """
    if output_dir is not None and storage.is_uri(output_dir):  # object storage: one probe object, then its mirror
        probe = storage.join(output_dir, f".contra_ray-write-test-{os.getpid()}")
        try:
            storage.write_bytes(probe, b"")
            storage.delete(probe)
        except storage.StorageError as e:
            raise ConfigError(f"output_dir={str(output_dir)!r}: not writable: {e}") from None
        output_dir = storage.local_mirror(output_dir)
    if output_dir is not None:
        try:
            ensure_writable_dir(output_dir)
        except OSError as e:
            raise ConfigError(f"output_dir={str(output_dir)!r}: {e.strerror}") from None
    if cache_dir is not None:
        try:
            ensure_writable_dir(cache_dir)
        except OSError as e:
            raise ConfigError(f"data.cache_dir={str(cache_dir)!r}: {e.strerror}") from None
    if not tracking_uri:
        return
    uri = str(tracking_uri)
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.lower().split("+", 1)[0]
    if uri in ("uc", "databricks-uc") or scheme in ("uc", "databricks-uc"):
        raise ConfigError(f"tracking.uri={uri!r}: a Unity Catalog model registry URI, which MLflow does not accept "
                          "as a tracking store; use databricks, http(s)://HOST or sqlite:///PATH")
    if uri == "databricks":
        return  # the default Databricks profile's workspace (MLflow reads the bare word as that scheme)
    if len(scheme) == 1 and scheme.isalpha():
        scheme = ""  # C:\runs: a Windows drive letter, a plain path (as MLflow reads it)
    if scheme not in tracking_schemes():
        raise ConfigError(f"tracking.uri={uri!r}: unknown scheme {scheme + ':'!r}; MLflow tracking URIs are "
                          "sqlite:///PATH, http(s)://HOST[:PORT], "
                          "postgresql|mysql|mssql://..., databricks[://PROFILE] or a plugin's scheme")
    if scheme in ("file", ""):
        raise ConfigError(f"tracking.uri={uri!r}: a file store (a directory, as ./mlruns), which MLflow 3 no longer "
                          "opens by default; use sqlite:///PATH/mlflow.db (the default is "
                          "sqlite:///<output_dir>/mlflow.db)")
    if scheme == "sqlite":
        db = sqlite_path(uri)
        folder = db.parent if db is not None else None
        if db is None:
            return  # sqlite:// (in memory)
        try:
            ensure_writable_dir(folder)
            if db is not None and db.exists():
                with open(db, "rb+") as f:
                    head = f.read(16)
                if head and head != b"SQLite format 3\x00":
                    raise ConfigError(f"tracking.uri={uri!r}: {db} exists and is not an SQLite database")
        except OSError as e:
            raise ConfigError(f"tracking.uri={uri!r}: {e.strerror or e}") from None
        return
    try:
        if scheme in ("http", "https"):
            try:
                with urllib.request.urlopen(uri, timeout=timeout_s):
                    pass
            except urllib.error.HTTPError as e:
                if e.code in (502, 503, 504):  # a gateway answered for a server it cannot reach
                    raise OSError(f"HTTP {e.code} {e.reason}") from None
        elif scheme in _DB_PORTS and parsed.hostname:
            with socket.create_connection((parsed.hostname, parsed.port or _DB_PORTS[scheme]), timeout=timeout_s):
                pass
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise ConfigError(f"tracking.uri={uri!r}: tracking store not reachable within {timeout_s:g} s "
                          f"({reason}); start the server, fix --tracking-uri, or pass --no-tracking") from None


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> ``{"section.field": "value"}`` with string values for MLflow params.

    Lists and tuples are JSON-encoded (``["convnet", "resnet18"]``), everything else ``str()``-ed
    (``None`` -> ``"None"``); values longer than MLflow's 6000 characters are truncated (ending in
    ``"..."``).
    """
    out: dict[str, str] = {}
    for name, value in flatten_dotted(config, prefix).items():
        if isinstance(value, (list, tuple)):
            try:
                text = json.dumps(list(value))
            except TypeError:
                text = str(list(value))
        else:
            text = str(value)
        if len(text) > MAX_PARAM_VALUE_LENGTH:
            text = text[:MAX_PARAM_VALUE_LENGTH - 3] + "..."
        out[name] = text
    return out


# ---------------------------------------------------------------------------------------------- vocabulary

#: The metric names every run kind shares (pipeline, distill, distill --num-workers, Tune trial, evaluate
#: CLI), so runs of any kind share one chart in the MLflow UI. Accuracies are in percent.
METRICS = {
    "loss": "Eq. 8 matching loss, per distillation iteration (step = iteration)",
    "loss/sampled": "Eq. 2 loss of the sampled segment, per iteration (when β > 0)",
    "loss/start_<t>": "Eq. 2 loss of the concurrent segment starting at epoch t, per iteration",
    "syn_lr": "learned student step size α, per iteration",
    "eval_acc": "test accuracy (%) of the periodic evaluation at iteration `step` (distill.eval_every; in a "
                "Tune trial the proxy recipe, proxy.eval_every)",
    "final_acc": "final evaluation of the distilled set: mean test accuracy (%) over eval.runs networks of the "
                 "main model (model.name if evaluated, else the first of eval.models)",
    "final_acc_std": "population standard deviation (%) of those eval.runs accuracies",
    "final_acc/<model>": "the same mean for every evaluated model (final_acc_std/<model>: its std)",
    "random_real_acc": "random real images of the same IPC (hard labels), main model: mean (%) over eval.runs "
                       "(random_real_acc_std; random_real_acc/<model>, random_real_acc_std/<model>)",
    "expert_test_acc": "an expert's test accuracy (%) after epoch `step` (1..experts.epochs; epochs it was "
                       "evaluated on, experts.eval_every), in the expert's child run of the run that trained it",
    "s_per_iter": "median wall-clock seconds per distillation iteration (logging included, periodic "
                  "evaluations excluded); logged when the run ends",
    "iters_to_plateau": "first iteration whose eval_acc is within PLATEAU_TOLERANCE (0.5) points of the run's "
                        "best eval_acc (needs >= 2 evaluations); logged when the run ends",
}
PLATEAU_TOLERANCE = 0.5  # accuracy points, see iters_to_plateau
#: Config fields that are paths: tags ``path.<field>``, never params (they differ between machines and
#: sweeps, and would show as "differences" in the UI's run comparison).
PATH_FIELDS = ("output_dir", "data.cache_dir", "data.shared_cache", "data.root", "experts.store", "tracking.uri")
METHODS = ("contra", "mtt", "random_real")
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3 UI: open the experiment in its "Model training" view
_ROLES = {"contra_ray.pipeline": "pipeline", "contra_ray.distill": "distill", "contra_ray.evaluate": "evaluate",
          "contra_ray.tune": "trial"}


def caller_entry_point(caller_globals: Mapping[str, Any]) -> str:
    """The stage package of the module whose globals are ``caller_globals`` (``contra_ray.distill.cli`` ->
    ``contra_ray.distill``, ``contra_ray.pipeline`` -> itself); a module run as ``python -m NAME`` (its
    ``__name__`` is ``__main__``) is named by its ``__spec__`` (``NAME``), a script by its file's place in the
    package; ``contra_ray`` when neither names a ``contra_ray`` module (a notebook, a test)."""
    name = str(caller_globals.get("__name__", ""))
    if name == "__main__":
        spec = caller_globals.get("__spec__")
        name = getattr(spec, "name", None) or ""
        if not name and caller_globals.get("__file__"):
            with contextlib.suppress(ValueError):
                rel = Path(caller_globals["__file__"]).resolve().relative_to(Path(__file__).resolve().parents[1])
                name = ".".join(rel.with_suffix("").parts)
    if not name.startswith("contra_ray."):
        return "contra_ray"
    return ".".join(name.split(".")[:2])


def main_model(cfg: Any) -> str:
    """The model whose accuracy is ``final_acc``: the distillation network ``model.name`` when it is among
    ``eval.models``, else the first of ``eval.models``."""
    return cfg.model.name if cfg.model.name in cfg.eval.models else cfg.eval.models[0]


def accuracy_metrics(per_model: Mapping[str, tuple[float, float]], main: str,
                     name: str = "final_acc") -> dict[str, float]:
    """``{model: (mean, std)}`` -> ``{name: mean(main), name_std: std(main), name/<model>: mean,
    name_std/<model>: std}`` (``name`` = ``final_acc`` for the distilled set, ``random_real_acc`` for the
    baseline); accuracies in percent. ``main`` missing from ``per_model``: only the per-model names."""
    out: dict[str, float] = {}
    if main in per_model:
        out[name], out[f"{name}_std"] = (float(v) for v in per_model[main])
    for model, (mean, std) in per_model.items():
        out[f"{name}/{model}"], out[f"{name}_std/{model}"] = float(mean), float(std)
    return out


def method_of(cfg: Any) -> str | None:
    """``contra`` (K > 0 concurrent segments) or ``mtt`` (K = 0: sampling-based matching only, MTT/DATM);
    ``None`` when K is not a number (a sweep parent, where K is searched)."""
    K = cfg.distill.K
    if isinstance(K, bool) or not isinstance(K, int):
        return None
    return "contra" if K > 0 else "mtt"


@functools.lru_cache(maxsize=1)
def source_version() -> tuple[str, str | None]:
    """(version tag value, git commit or ``None``): ``git rev-parse HEAD`` of the repository holding this
    package when there is one (a checkout, ``pip install -e``), else ``contra_ray <installed version>``."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    if len(sha) == 40:
        return sha, sha
    try:
        from importlib.metadata import version

        return f"contra_ray {version('contra_ray')}", None
    except Exception:  # noqa: BLE001 - not installed: the package's own version string
        from contra_ray import __version__

        return f"contra_ray {__version__}", None


def run_tags(cfg: Any, role: str, entry_point: str, method: str | None = None,
             note: str | None = None) -> dict[str, str]:
    """The tags of every run (one place, used by :class:`RunLogger`).

    ``contra_ray.role`` (pipeline | distill | trial | sweep | evaluate | ...), ``method`` (contra | mtt |
    random_real; default :func:`method_of`), ``dataset``, ``ipc``, ``K``, ``beta`` (left out when not a
    concrete value, e.g. searched in a sweep parent), ``git_commit`` (:func:`source_version`; also
    ``mlflow.source.git.commit`` when it is a commit), ``mlflow.source.name`` = ``entry_point`` (e.g.
    ``contra_ray.pipeline``: MLflow would otherwise record Ray's worker script for a Tune trial),
    ``mlflow.source.type`` = LOCAL, ``path.<field>`` for the config's :data:`PATH_FIELDS` that are set,
    and ``mlflow.note.content`` (the run's description in the UI) when ``note`` is given.

    Raises:
        ValueError: ``method`` not in :data:`METHODS`.
    """
    method = method or method_of(cfg)
    if method is not None and method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    version, sha = source_version()
    d = cfg.distill
    tags = {"contra_ray.role": role, "mlflow.source.name": entry_point, "mlflow.source.type": "LOCAL",
            "dataset": str(cfg.data.dataset), "git_commit": version}
    if sha:
        tags["mlflow.source.git.commit"] = sha
    if method:
        tags["method"] = method
    for key, value in (("ipc", d.ipc), ("K", d.K), ("beta", d.beta)):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            tags[key] = str(value)
    flat = flatten_params(cfg.to_dict())
    for field in PATH_FIELDS:
        if flat.get(field) not in (None, "None", ""):
            tags[f"path.{field}"] = flat[field]
    if note:
        tags["mlflow.note.content"] = str(note)
    return tags


def iteration_metrics(client: Any, run_id: str) -> dict[str, float]:
    """``s_per_iter`` and ``iters_to_plateau`` (see :data:`METRICS`) from a run's logged ``loss`` and
    ``eval_acc`` histories; empty when the run logged no distillation iterations.

    ``s_per_iter``: the median over iterations s of the time (ms timestamps) from the ``loss`` of step s-1,
    or from the ``eval_acc`` of step s when an evaluation ran in between (the loop evaluates after
    iteration s-1 and logs it at step s), to the ``loss`` of step s. It reads the store, so it works the
    same for one process and for Ray Train's rank 0 logging from another process.
    """
    import statistics

    out: dict[str, float] = {}
    loss = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: (m.step, m.timestamp))
    evals = sorted(client.get_metric_history(run_id, "eval_acc"), key=lambda m: m.step)
    eval_at = {m.step: m.timestamp for m in evals}
    deltas = [(b.timestamp - max(a.timestamp, eval_at.get(b.step, a.timestamp))) / 1000
              for a, b in zip(loss, loss[1:]) if b.step == a.step + 1]
    if deltas:
        out["s_per_iter"] = statistics.median(deltas)
    if len(evals) >= 2:
        best = max(m.value for m in evals)
        out["iters_to_plateau"] = float(next(m.step for m in evals if m.value >= best - PLATEAU_TOLERANCE))
    return out


class RunLogger:
    """One MLflow run as a context manager; every method is a no-op when disabled.

    ``RunLogger(cfg, "distill", nested=False, enabled=True)``: on enter, calls :func:`init_tracking`
    with ``cfg.tracking_uri()`` and ``cfg.tracking.experiment``, starts a run named ``run_name`` with the
    tags of :func:`run_tags` and logs the flattened config as params, except the paths
    (:data:`PATH_FIELDS`, tags ``path.<field>`` instead); on exit logs :func:`iteration_metrics`
    (``s_per_iter``, ``iters_to_plateau``) when the run distilled, and ends it as FINISHED (FAILED if an
    exception escapes). ``nested=True`` makes it a child of the active run in this process (tag
    ``mlflow.parentRunId``); ``parent_run_id`` names the parent explicitly (e.g. from another process).
    Disabled when ``enabled`` is false or ``cfg.tracking.enabled`` is false; then ``run_id`` is ``None``.
    ``resume_run_id`` continues that existing run (status RUNNING again; params and tags are not logged
    again): a resumed sweep's parent run.

    ``relay`` (a :class:`contra_ray.tracking_relay.TrackingRelay`, e.g. in a Ray Train worker or a Tune
    trial on another node): everything goes through the driver's relay actor instead of opening the store
    here: the run is created there in ``cfg.tracking.experiment`` with the same tags (MLflow's context tags
    resolved in this process), and its parent is ``parent_run_id`` (``nested=True`` is refused: there is no
    active run in the relay). Metric steps already logged to the run are dropped (see the relay).

    ``entry_point`` (tag ``mlflow.source.name``) defaults to the ``contra_ray`` module that creates the
    logger (:func:`caller_entry_point`: ``contra_ray.distill.remote`` counts as ``contra_ray.distill``, and
    ``python -m contra_ray.pipeline`` as ``contra_ray.pipeline``); ``role`` (tag ``contra_ray.role``)
    defaults from it (pipeline, distill, evaluate, trial for ``contra_ray.tune``, else the module's last
    name: analyze, nas); ``method`` and ``note``: see :func:`run_tags`. :meth:`log_expert` adds one child
    run per trained expert.

    Attributes:
        run_id: MLflow run id once entered (``None`` when disabled).
        enabled: whether anything is logged.
    """

    def __init__(self, cfg: Any, run_name: str, nested: bool = False, enabled: bool = True,
                 parent_run_id: str | None = None, *, role: str | None = None, entry_point: str | None = None,
                 method: str | None = None, note: str | None = None, resume_run_id: str | None = None,
                 relay: Any = None):
        if relay is not None and nested:
            raise ValueError("RunLogger(nested=True) with a relay: name the parent with parent_run_id")
        self.cfg = cfg
        self.relay = relay
        self.resume_run_id = resume_run_id
        self.run_name = run_name
        self.nested = nested
        self.parent_run_id = parent_run_id
        self.enabled = bool(enabled and cfg.tracking.enabled)
        module = entry_point or caller_entry_point(sys._getframe(1).f_globals)
        self.entry_point = module
        self.role = role or _ROLES.get(module, module.rsplit(".", 1)[-1])
        self.method, self.note = method, note
        self.run_id: str | None = None
        self._client = None

    def __enter__(self) -> "RunLogger":
        if not self.enabled:
            return self
        if self.relay is not None:
            return self._enter_relay()
        import mlflow

        uri = self.cfg.tracking_uri()
        exp_id = init_tracking(uri, self.cfg.tracking.experiment)
        self._client = tracking_client(uri)
        if self.resume_run_id is not None:  # continue an existing run: its params and tags stay as logged
            self.run_id = mlflow.start_run(run_id=self.resume_run_id).info.run_id
            return self
        run = mlflow.start_run(experiment_id=exp_id, run_name=self.run_name, nested=self.nested,
                               parent_run_id=self.parent_run_id,
                               tags=run_tags(self.cfg, self.role, self.entry_point, self.method, self.note))
        self.run_id = run.info.run_id
        return self._log_config()

    def _log_config(self) -> "RunLogger":
        params = flatten_params(self.cfg.to_dict())
        self.log_params({k: v for k, v in params.items() if k not in PATH_FIELDS})
        return self

    def _enter_relay(self) -> "RunLogger":
        from mlflow.tracking.context import registry

        self._client = self.relay
        if self.resume_run_id is not None:
            self.run_id = self.relay.resume_run(self.resume_run_id)
            return self
        tags = run_tags(self.cfg, self.role, self.entry_point, self.method, self.note)
        tags["mlflow.runName"] = self.run_name
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        # as mlflow.start_run: the context's tags (user, source, git) seen from this process, ours over them
        self.run_id = self.relay.create_run(self.cfg.tracking.experiment, self.run_name, registry.resolve_tags(tags))
        return self._log_config()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run_id is None:
            return
        import mlflow

        status = "FINISHED" if exc_type is None else "FAILED"
        if exc_type is None:
            self.log_metrics(iteration_metrics(self._client, self.run_id), step=0)
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status)
        else:
            self._client.set_terminated(self.run_id, status)

    def log_expert(self, expert_id: int, seed: int, test_acc: list[float]) -> str | None:
        """A finished child run ``expert-XXXX`` of this run for an expert it trained: ``expert_test_acc`` (%)
        at step = epoch (1-based) for each evaluated epoch (``test_acc``: fractions in [0, 1], NaN = not
        evaluated, as :func:`contra_ray.experts.train_expert` returns them), tags ``contra_ray.role=expert``,
        ``expert_id``, ``seed``, params ``experts.*``. One run per expert under one metric name, so the UI charts
        every expert's curve on one axis. Returns its run id (``None`` when disabled). Call it in the driver.

        Raises:
            mlflow.exceptions.MlflowException: the store refuses the run.
            ValueError: a logger with a relay (not the driver's).
        """
        if self.run_id is None:
            return None
        import math

        from mlflow.entities import Metric, Param

        version, sha = source_version()
        tags = {"contra_ray.role": "expert", "expert_id": str(expert_id), "seed": str(seed),
                "mlflow.source.name": self.entry_point, "mlflow.source.type": "LOCAL", "git_commit": version,
                "dataset": str(self.cfg.data.dataset), "mlflow.parentRunId": self.run_id}
        if sha:
            tags["mlflow.source.git.commit"] = sha
        name = f"expert-{expert_id:04d}"
        if self.relay is not None:
            raise ValueError("RunLogger.log_expert: call it on the driver's logger, not through a relay")
        exp_id = self._client.get_run(self.run_id).info.experiment_id
        child = self._client.create_run(exp_id, tags=tags, run_name=name).info.run_id
        ts = int(time.time() * 1000)
        metrics = [Metric("expert_test_acc", 100 * float(a), ts, e) for e, a in enumerate(test_acc, 1)
                   if not math.isnan(float(a))]
        params = [Param(k, v) for k, v in flatten_params({"experts": self.cfg.to_dict()["experts"]}).items()
                  if k not in PATH_FIELDS]
        self._client.log_batch(child, metrics=metrics, params=params)
        self._client.set_terminated(child, "FINISHED")
        return child

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (nested dicts are flattened with :func:`flatten_params`). MLflow params are
        immutable: re-logging a key with a different value raises ``MlflowException``."""
        if self.run_id is None:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten_params(params).items()]
        for i in range(0, len(items), _MAX_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i:i + _MAX_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values ``str()``-ed; tags, unlike params, may be overwritten)."""
        if self.run_id is None:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), _MAX_PER_BATCH):
            self._client.log_batch(self.run_id, tags=items[i:i + _MAX_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log scalar metrics (Python numbers or 0-d tensors) at integer ``step``."""
        if self.run_id is None or not metrics:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
        for i in range(0, len(items), _MAX_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=items[i:i + _MAX_PER_BATCH])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a local file into the run's artifacts (under ``artifact_path`` if given)."""
        if self.run_id is None:
            return
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        """Save a JSON-serializable object as run artifact ``name`` (``.json`` or ``.yaml``)."""
        if self.run_id is None:
            return
        self._client.log_dict(self.run_id, obj, name)

    def log_figure(self, fig: Any, name: str) -> None:
        """Save a matplotlib figure as run artifact ``name`` (e.g. ``"curves/loss.png"``)."""
        if self.run_id is None:
            return
        self._client.log_figure(self.run_id, fig, name)
