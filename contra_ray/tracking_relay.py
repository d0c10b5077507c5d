"""Only the driver's node writes to MLflow: a Ray actor pinned to it that logs for every worker and trial.

On a cluster whose nodes share no folder, the default store ``sqlite:///<output_dir>/mlflow.db`` exists only
on the driver's node: a Ray Train rank 0 or a Tune trial elsewhere that opened it would create an empty
database of its own ("Run with id=... not found"). :func:`start_relay` (called by the driver: the
``--num-workers`` path of ``contra_ray.distill`` and the ``tune`` sweep) starts a :class:`RelayServer` actor
on the driver's node (``NodeAffinitySchedulingStrategy(soft=False)``, ``num_cpus=0``) that owns the
``MlflowClient`` of the driver's tracking URI (a SQLite file, or ``http(s)://`` server: any URI MLflow opens).
Workers and trials get the returned :class:`TrackingRelay` (a small picklable handle, passed explicitly in
Ray Train's ``train_loop_config`` and in the Tune trial context; no named actor) and log through it: the
handle has the subset of ``MlflowClient`` that :class:`contra_ray.tracking.RunLogger` uses, so
``RunLogger(cfg, name, relay=handle)`` logs the same tags, params and metrics as in one process. Files
travel as bytes (artifacts read in the caller, figures rendered to PNG in the caller) and the actor writes
them to a temporary file on the driver's node before logging them. Nothing in a worker opens the store or
needs tracking credentials (the driver's ``MLFLOW_*`` variables are given to the actor only).

Restarts do not log the same steps twice: the actor keeps the largest step logged per (run, metric key)
and drops a metric whose step is not larger (a worker-group restart replays the iterations after its
checkpoint). A run it did not create (the driver's own, a resumed sweep's) is seeded once from the run's
metric history in the store.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Sequence

from contra_ray.tracking import init_tracking, sqlite_path, tracking_client

__all__ = ["RelayServer", "TrackingRelay", "start_relay", "absolute_tracking_uri"]

_MAX_PER_BATCH = 100  # metrics / params / tags per MLflow log_batch call (as tracking.RunLogger)


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///relative/mlflow.db`` -> ``sqlite:////abs/cwd/relative/mlflow.db`` (resolved against this
    process's working directory, which a Ray actor does not share); any other URI unchanged."""
    db = sqlite_path(uri)
    if db is None or db.is_absolute():
        return uri
    query = uri.split("?", 1)[1] if "?" in uri else None
    return f"sqlite:///{db.resolve()}" + (f"?{query}" if query else "")


class RelayServer:
    """The actor's body (plain class; :func:`start_relay` runs it as a Ray actor on the driver's node).

    Args:
        uri: the driver's MLflow tracking URI (absolute for SQLite).

    Raises (in the constructor):
        mlflow.exceptions.MlflowException: the store cannot be opened.
    """

    def __init__(self, uri: str):
        self.uri = uri
        self.client = tracking_client(uri)
        self._experiments: dict[str, str] = {}
        self._max_step: dict[tuple[str, str], int] = {}
        self._seeded: set[str] = set()  # runs whose logged steps are known

    def node_id(self) -> str:
        """The Ray node id the actor runs on (the driver's)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def experiment_id(self, experiment: str) -> str:
        """Id of ``experiment`` (created if missing, as :func:`contra_ray.tracking.init_tracking`)."""
        if experiment not in self._experiments:
            self._experiments[experiment] = init_tracking(self.uri, experiment)
        return self._experiments[experiment]

    def create_run(self, experiment: str, run_name: str, tags: Mapping[str, str]) -> str:
        """Create a RUNNING run in ``experiment`` named ``run_name`` with ``tags`` (a parent run is the tag
        ``mlflow.parentRunId``); returns its run id."""
        run = self.client.create_run(self.experiment_id(experiment), tags=dict(tags), run_name=run_name)
        self._seeded.add(run.info.run_id)  # new: nothing logged yet
        return run.info.run_id

    def resume_run(self, run_id: str) -> str:
        """Set an existing run's status to RUNNING again; returns ``run_id``."""
        self.client.update_run(run_id, "RUNNING")
        self._seed(run_id)
        return run_id

    def _seed(self, run_id: str) -> None:
        if run_id in self._seeded:
            return
        for key in self.client.get_run(run_id).data.metrics:
            steps = [m.step for m in self.client.get_metric_history(run_id, key)]
            if steps:
                self._max_step[(run_id, key)] = max(steps)
        self._seeded.add(run_id)

    def new_metrics(self, run_id: str, metrics: Sequence[Any]) -> list:
        """The metrics whose step is larger than every step logged for their key in ``run_id`` (in order;
        the largest step is updated), i.e. what :meth:`log_batch` logs."""
        self._seed(run_id)
        out = []
        for m in metrics:
            key = (run_id, m.key)
            if m.step > self._max_step.get(key, -(2 ** 63)):
                self._max_step[key] = m.step
                out.append(m)
        return out

    def log_batch(self, run_id: str, metrics: Sequence[Any] = (), params: Sequence[Any] = (),
                  tags: Sequence[Any] = ()) -> int:
        """``MlflowClient.log_batch`` in chunks of 100, less the metric steps already logged (see the module
        docstring); returns the number of metrics dropped as already logged."""
        fresh = self.new_metrics(run_id, metrics) if metrics else []
        for items, field in ((fresh, "metrics"), (list(params), "params"), (list(tags), "tags")):
            for i in range(0, len(items), _MAX_PER_BATCH):
                self.client.log_batch(run_id, **{field: items[i:i + _MAX_PER_BATCH]})
        return len(metrics) - len(fresh)

    def set_terminated(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def get_metric_history(self, run_id: str, key: str) -> list:
        return self.client.get_metric_history(run_id, key)

    def log_artifact_bytes(self, run_id: str, data: bytes, file_name: str, artifact_path: str | None) -> None:
        """Write ``data`` to ``<temporary dir>/<file_name>`` on this node and log it under ``artifact_path``."""
        with tempfile.TemporaryDirectory(prefix="contra_relay_") as tmp:
            path = Path(tmp) / file_name
            path.write_bytes(data)
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_dict(self, run_id: str, obj: Any, name: str) -> None:
        self.client.log_dict(run_id, obj, name)


@dataclasses.dataclass(frozen=True)
class TrackingRelay:
    """A handle on the driver's :class:`RelayServer` actor (picklable into Ray Train's ``train_loop_config``
    and Tune trial contexts). Every call blocks until the actor has logged it, so errors reach the caller.

    The methods named like ``MlflowClient``'s (``log_batch``, ``set_terminated``, ``get_metric_history``,
    ``log_artifact``, ``log_dict``, ``log_figure``) take the same arguments, so
    :class:`contra_ray.tracking.RunLogger` uses the handle as its client.

    Attributes:
        actor: the Ray actor handle; uri: the tracking URI it logs to; node_id: the Ray node it runs on.
    """

    actor: Any
    uri: str
    node_id: str

    def _call(self, method: str, *args: Any) -> Any:
        import ray

        return ray.get(getattr(self.actor, method).remote(*args))

    # ----------------------------------------------------------------------------- runs
    def create_run(self, experiment: str, run_name: str, tags: Mapping[str, str]) -> str:
        """See :meth:`RelayServer.create_run`."""
        return self._call("create_run", experiment, run_name, dict(tags))

    def resume_run(self, run_id: str) -> str:
        """See :meth:`RelayServer.resume_run`."""
        return self._call("resume_run", run_id)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> int:
        """Log scalar ``metrics`` at integer ``step`` with this process's clock as timestamp (ms); returns
        how many were dropped as already logged at a step >= ``step``."""
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        return self.log_batch(run_id, metrics=[Metric(k, float(v), ts, int(step)) for k, v in metrics.items()])

    def close(self) -> None:
        """End the actor (calls still queued are lost)."""
        import ray

        ray.kill(self.actor)

    # ----------------------------------------------------------------------------- MlflowClient's subset
    def log_batch(self, run_id: str, metrics: Sequence[Any] = (), params: Sequence[Any] = (),
                  tags: Sequence[Any] = (), synchronous: bool | None = None) -> int:
        """``mlflow.entities`` ``Metric`` / ``Param`` / ``RunTag`` lists; see :meth:`RelayServer.log_batch`."""
        return self._call("log_batch", run_id, list(metrics), list(params), list(tags))

    def set_terminated(self, run_id: str, status: str = "FINISHED") -> None:
        self._call("set_terminated", run_id, status)

    def get_metric_history(self, run_id: str, key: str) -> list:
        return self._call("get_metric_history", run_id, key)

    def log_artifact(self, run_id: str, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Ship the bytes of the local file ``local_path`` (read here) to the actor, which logs it under its
        file name.

        Raises:
            OSError: the file cannot be read (``IsADirectoryError`` for a directory).
        """
        data = Path(local_path).read_bytes()
        self._call("log_artifact_bytes", run_id, data, Path(local_path).name, artifact_path)

    def log_dict(self, run_id: str, dictionary: Any, artifact_file: str) -> None:
        """A JSON-serializable object as artifact ``artifact_file`` (``.json`` or ``.yaml``)."""
        self._call("log_dict", run_id, dictionary, artifact_file)

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure rendered here (format from the suffix of ``artifact_file``, PNG by default)
        and logged as artifact ``artifact_file`` (e.g. ``"curves/loss.png"``)."""
        name = PurePosixPath(artifact_file)
        buf = io.BytesIO()
        figure.savefig(buf, format=name.suffix.lstrip(".") or "png")
        folder = str(name.parent) if str(name.parent) != "." else None
        self._call("log_artifact_bytes", run_id, buf.getvalue(), name.name, folder)


def start_relay(uri: str, experiment: str | None = None) -> TrackingRelay:
    """Start a :class:`RelayServer` actor on this process's Ray node (the driver's), pinned there
    (``NodeAffinitySchedulingStrategy(node_id, soft=False)``), taking no CPU; Ray must be initialized.

    Args:
        uri: the tracking URI (a relative ``sqlite:///`` path is resolved here, see
            :func:`absolute_tracking_uri`). This process's ``MLFLOW_*`` environment variables (a server's
            credentials) are set in the actor's environment (they are part of its Ray runtime env).
        experiment: created (or checked) now, before any worker logs, when given.

    Returns:
        The handle; the actor lives as long as a handle on it (or until :meth:`TrackingRelay.close`).

    Raises:
        ray.exceptions.RayActorError: the actor could not start (e.g. the store cannot be opened; the
            cause is in the message).
        mlflow.exceptions.MlflowException: ``experiment`` is deleted in the store.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    uri = absolute_tracking_uri(str(uri))
    node = ray.get_runtime_context().get_node_id()
    options: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 1,
                               "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False)}
    env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    if env:
        options["runtime_env"] = {"env_vars": env}
    actor = ray.remote(RelayServer).options(**options).remote(uri)
    relay = TrackingRelay(actor, uri, node)
    if experiment is not None:
        relay._call("experiment_id", experiment)
    return relay
