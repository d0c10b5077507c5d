"""Experiment tracking at the edge: MLflow runs, flattened config params, image grids and curves.

Nothing in the core imports this module. The default store is a SQLite database
(``sqlite:///<output_dir>/mlflow.db``, see :meth:`Config.tracking_uri`): MLflow 3 refuses the plain
``./mlruns`` file store by default. :func:`init_tracking` creates the database and the experiment; every
opening of a store (:func:`tracking_client`, :func:`init_tracking`) holds an exclusive ``fcntl`` lock on
``<db>.lock`` beside a SQLite database (:func:`store_lock`), so processes started together on a fresh
database never race through MLflow's schema migrations (``duplicate column name``) or the experiment's
creation. For SQLite stores new experiments keep their artifacts next to the database
(``<db dir>/mlartifacts``) instead of ``./mlruns`` in the current directory.
:func:`check_destinations` is what every CLI calls before any work: the output directory is writable
and the tracking store reachable within a few seconds.

:class:`RunLogger` is a context manager whose methods are no-ops when tracking is disabled, so calling
code needs no ``if``. Plots and grids are written atomically (temporary file + ``os.replace``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from .config import ConfigError
from .fileio import atomic_write, ensure_writable_dir

__all__ = ["init_tracking", "tracking_client", "store_lock", "check_destinations", "flatten_params", "RunLogger",
           "save_image_grid", "save_curves", "MAX_PARAM_VALUE_LENGTH"]

MAX_PARAM_VALUE_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_MAX_PER_BATCH = 100  # params (and metrics, conservatively) per log_batch call


STORE_LOCK_TIMEOUT_S = 300.0  # longest wait for another process's store creation / migration


def _sqlite_path(uri: str) -> Path | None:
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
    db = _sqlite_path(uri)
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
        return MlflowClient(tracking_uri=uri)  # opens the store eagerly (MLflow caches it per process)


def init_tracking(uri: str, experiment: str) -> str:
    """Point MLflow at ``uri`` and make sure ``experiment`` exists; returns its experiment id.

    For ``sqlite:///PATH`` URIs the parent directory is created and the database (schema included) is
    created here, in the calling process, under :func:`store_lock` (the store's creation, migration and
    the experiment's creation), so any number of processes may call this at once on a fresh database;
    new experiments get the artifact location ``<PATH's directory>/mlartifacts``.

    Raises:
        mlflow.exceptions.MlflowException: the store cannot be opened or the experiment is deleted.
        TimeoutError: see :func:`store_lock`.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    db = _sqlite_path(uri)
    artifact_location = None
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        artifact_location = (db.parent.resolve() / "mlartifacts").as_uri()
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):
        client = MlflowClient(tracking_uri=uri)  # opening a SQLite store creates and migrates the database
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                return client.create_experiment(experiment, artifact_location=artifact_location)
            except MlflowException:
                exp = client.get_experiment_by_name(experiment)  # created by a process on another host
                if exp is None:
                    raise
    if exp.lifecycle_stage != "active":
        raise MlflowException(f"tracking.experiment={experiment!r} is deleted in {uri}; restore it or pick "
                              "another name")
    return exp.experiment_id


_DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def check_destinations(output_dir: str | os.PathLike | None, tracking_uri: str | None,
                       timeout_s: float = 5.0) -> None:
    """Fail fast, before any work, if results could not be written: call at the start of every CLI.

    * ``output_dir``: created if missing and proven writable (a temporary file is created and removed).
    * ``tracking_uri`` (skip with ``None``, e.g. tracking disabled): ``sqlite:///PATH`` -> PATH's
      directory creatable and writable, and PATH writable if it exists; ``file:`` URIs and plain paths ->
      the directory writable; ``http(s)://`` -> one GET answered within ``timeout_s`` seconds (any HTTP
      status counts as reachable except 502/503/504, a gateway without its server);
      ``postgresql``/``mysql``/``mssql`` URIs -> a TCP connection to host:port within ``timeout_s``.
      Other schemes (``databricks``, ...) are not checked.

    Raises:
        ConfigError: one line naming the field (``output_dir`` / ``tracking.uri``), its value and why.
    """
    if output_dir is not None:
        try:
            ensure_writable_dir(output_dir)
        except OSError as e:
            raise ConfigError(f"output_dir={str(output_dir)!r}: {e.strerror}") from None
    if not tracking_uri:
        return
    uri = str(tracking_uri)
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.lower().split("+", 1)[0]
    if scheme in ("sqlite", "file", ""):
        db = _sqlite_path(uri) if scheme == "sqlite" else None
        folder = db.parent if db is not None else (urllib.request.url2pathname(parsed.path) if scheme else uri)
        if scheme == "sqlite" and db is None:
            return  # sqlite:// (in memory)
        try:
            ensure_writable_dir(folder)
            if db is not None and db.exists():
                with open(db, "ab"):
                    pass
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
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f"{name}."))
            continue
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


class RunLogger:
    """One MLflow run as a context manager; every method is a no-op when disabled.

    ``RunLogger(cfg, "distill", nested=False, enabled=True)``: on enter, calls :func:`init_tracking`
    with ``cfg.tracking_uri()`` and ``cfg.tracking.experiment``, starts a run named ``run_name`` and
    logs the flattened config as params; on exit ends it as FINISHED (FAILED if an exception escapes).
    ``nested=True`` makes it a child of the active run in this process (tag ``mlflow.parentRunId``);
    ``parent_run_id`` names the parent explicitly (e.g. from another process). Disabled when
    ``enabled`` is false or ``cfg.tracking.enabled`` is false; then ``run_id`` is ``None``.

    Attributes:
        run_id: MLflow run id once entered (``None`` when disabled).
        enabled: whether anything is logged.
    """

    def __init__(self, cfg: Any, run_name: str, nested: bool = False, enabled: bool = True,
                 parent_run_id: str | None = None):
        self.cfg = cfg
        self.run_name = run_name
        self.nested = nested
        self.parent_run_id = parent_run_id
        self.enabled = bool(enabled and cfg.tracking.enabled)
        self.run_id: str | None = None
        self._client = None

    def __enter__(self) -> "RunLogger":
        if not self.enabled:
            return self
        import mlflow

        uri = self.cfg.tracking_uri()
        exp_id = init_tracking(uri, self.cfg.tracking.experiment)
        self._client = tracking_client(uri)
        run = mlflow.start_run(experiment_id=exp_id, run_name=self.run_name, nested=self.nested,
                               parent_run_id=self.parent_run_id)
        self.run_id = run.info.run_id
        self.log_params(self.cfg.to_dict())
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run_id is None:
            return
        import mlflow

        status = "FINISHED" if exc_type is None else "FAILED"
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status)
        else:
            self._client.set_terminated(self.run_id, status)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (nested dicts are flattened with :func:`flatten_params`). MLflow params are
        immutable: re-logging a key with a different value raises ``MlflowException``."""
        if self.run_id is None:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten_params(params).items()]
        for i in range(0, len(items), _MAX_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i:i + _MAX_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log scalar metrics (Python numbers or 0-d tensors) at integer ``step``."""
        if self.run_id is None:
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

    def log_figure(self, fig: Any, name: str) -> None:
        """Save a matplotlib figure as run artifact ``name`` (e.g. ``"curves/loss.png"``)."""
        if self.run_id is None:
            return
        self._client.log_figure(self.run_id, fig, name)


def save_image_grid(images: torch.Tensor, nrow: int, path: str | os.PathLike) -> None:
    """Write images as one grid picture (``torchvision.utils.save_image``, padding 2) atomically.

    Args:
        images: float ``[n, C, H, W]`` display images in [0, 1] (values outside are clamped), C = 1 or 3.
        nrow: images per grid row.
        path: output file; the format follows the suffix (``.png`` recommended).

    The picture is ``min(n, nrow) * (W + 2) + 2`` pixels wide and ``ceil(n / nrow) * (H + 2) + 2`` high.
    """
    from torchvision.utils import save_image

    fmt = Path(path).suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: save_image(images.detach().float().cpu().clamp(0, 1), str(tmp), nrow=nrow,
                                              format=fmt))


def save_curves(series: Mapping[str, list[float]], path: str | os.PathLike, title: str) -> None:
    """Plot each named series against its index (one line each, with legend) and save atomically.

    Uses matplotlib's Agg canvas directly (no pyplot global state, safe in worker threads).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, values in series.items():
        ax.plot(range(len(values)), list(values), label=name)
    ax.set_title(title)
    ax.set_xlabel("step")
    if series:
        ax.legend()
    fmt = Path(path).suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(str(tmp), format=fmt))
