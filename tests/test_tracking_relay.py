"""Only the driver's node writes to MLflow (contra_ray.tracking_relay): a Ray task logs a whole run through the
driver's relay actor without touching the store, replayed steps are logged once, and a relay started for an
existing run (a resumed driver) knows the steps already logged."""

import json
import os
from pathlib import Path

import pytest

from contra_ray.config import load_config
from contra_ray.tracking import PATH_FIELDS, RunLogger, flatten_params
from contra_ray.tracking_relay import RelayServer, absolute_tracking_uri, start_relay


def _cfg(tmp_path, uri, name="relayed"):
    return load_config("tiny_cpu", {"name": name, "output_dir": str(tmp_path / "out"),
                                    "tracking": {"uri": uri, "experiment": "relay"}})


def test_a_task_elsewhere_logs_a_run_through_the_driver_relay(ray_local, tmp_path):
    """A Ray task in another working directory, whose own config names a store it must never open, logs
    params, tags, metrics (a replayed step included), a file, a dict and a figure; everything is read back
    from the driver's SQLite store with the tags and params a direct RunLogger logs."""
    import ray
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'driver' / 'mlflow.db'}"
    relay = start_relay(uri, "relay")
    assert relay.node_id == ray.get_runtime_context().get_node_id() == ray.get(relay.actor.node_id.remote())
    parent = relay.create_run("relay", "parent", {})
    nowhere = tmp_path / "nowhere"  # the worker's config points here: the worker must not create it
    worker_cfg = _cfg(tmp_path, f"sqlite:///{nowhere / 'mlflow.db'}").to_dict()
    payload = bytes(range(256)) * 40
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    @ray.remote(num_cpus=0)
    def log_from_a_worker(relay, cfg_dict, parent, workdir, payload):
        from matplotlib.figure import Figure

        from contra_ray.config import config_from_dict
        from contra_ray.tracking import RunLogger

        os.chdir(workdir)
        with open("set.bin", "wb") as f:
            f.write(payload)
        fig = Figure(figsize=(2, 1))
        fig.subplots().plot([0, 1], [1, 0])
        with RunLogger(config_from_dict(cfg_dict), "relayed", parent_run_id=parent, role="trial",
                       entry_point="contra_ray.tune", relay=relay) as log:
            log.log_params({"extra": {"a": 1}})
            log.set_tags({"k": "v"})
            for step, loss in enumerate([1.0, 0.9, 0.8]):
                log.log_metrics({"loss": loss}, step=step)
            log.log_metrics({"loss": 5.0, "eval_acc": 40.0}, step=2)  # a restart replays step 2
            log.log_metrics({"loss": 0.7}, step=3)
            log.log_artifact("set.bin", "sets")
            log.log_dict({"a": [1, 2]}, "meta/info.json")
            log.log_figure(fig, "curves/c.png")
        return log.run_id, os.getcwd()

    run_id, cwd = ray.get(log_from_a_worker.remote(relay, worker_cfg, parent, str(elsewhere), payload))
    assert cwd == str(elsewhere) and not nowhere.exists()

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "relayed"
    assert client.get_experiment(run.info.experiment_id).name == "relay"
    hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert hist == [(0, 1.0), (1, 0.9), (2, 0.8), (3, 0.7)]  # the replayed step 2 (5.0) was dropped
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval_acc")] == [(2, 40.0)]  # a new key
    assert run.data.metrics["s_per_iter"] >= 0  # RunLogger's exit read the history through the relay
    expected = {k: v for k, v in flatten_params(worker_cfg).items() if k not in PATH_FIELDS}
    assert run.data.params == {**expected, "extra.a": "1"}
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == parent and tags["k"] == "v" and tags["contra_ray.role"] == "trial"
    assert tags["path.tracking.uri"] == f"sqlite:///{nowhere / 'mlflow.db'}"  # logged as the config says
    def artifact(path):
        return Path(download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(tmp_path / "dl"),
                                       tracking_uri=uri)).read_bytes()

    assert artifact("sets/set.bin") == payload
    assert json.loads(artifact("meta/info.json")) == {"a": [1, 2]}
    assert artifact("curves/c.png")[:8] == b"\x89PNG\r\n\x1a\n"

    # the same tags as a RunLogger opening the store itself (as the driver does), less the run's own ones
    with RunLogger(_cfg(tmp_path, uri), "direct", parent_run_id=parent, role="trial",
                   entry_point="contra_ray.tune") as direct:
        pass
    own = ("k", "mlflow.runName", "path.tracking.uri")
    assert {k: v for k, v in tags.items() if k not in own} == \
        {k: v for k, v in client.get_run(direct.run_id).data.tags.items() if k not in own}
    relay.close()


def test_a_relay_for_an_existing_run_drops_the_steps_already_in_the_store(tmp_path):
    """A resumed driver's new relay reads the run's history once: steps up to the logged maximum are dropped
    per key, later ones (and other keys) logged."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = RelayServer(uri)
    run_id = first.create_run("relay", "r", {"mlflow.runName": "r"})
    assert first.log_batch(run_id, [Metric("loss", v, 0, s) for s, v in enumerate([1.0, 0.9, 0.8])]) == 0
    assert first.log_batch(run_id, [Metric("loss", 7.0, 0, 1)]) == 1

    again = RelayServer(uri)  # another process: nothing known about the run until it is seen
    dropped = again.log_batch(run_id, [Metric("loss", 9.0, 0, 2), Metric("loss", 0.5, 0, 3),
                                       Metric("syn_lr", 0.01, 0, 2), Metric("loss", 9.0, 0, 3)])
    assert dropped == 2
    client = MlflowClient(tracking_uri=uri)
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss")) == \
        [(0, 1.0), (1, 0.9), (2, 0.8), (3, 0.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "syn_lr")] == [(2, 0.01)]
    assert again.resume_run(run_id) == run_id and client.get_run(run_id).info.status == "RUNNING"


def test_relative_sqlite_uri_is_resolved_on_the_driver_and_nested_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("sqlite:///runs/mlflow.db") == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert absolute_tracking_uri("sqlite:///runs/m.db?timeout=5") == f"sqlite:///{tmp_path}/runs/m.db?timeout=5"
    assert absolute_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    with pytest.raises(ValueError, match=r"RunLogger\(nested=True\) with a relay"):
        RunLogger(_cfg(tmp_path, "sqlite:///x.db"), "n", nested=True, relay=object())


W1_SPACE = """
preset: tiny_cpu
overrides:
  eval: {runs: 1}
  distill: {iterations: 3, checkpoint_every: 0}
space:
  distill.seed: {grid: [0]}
proxy: {eval_every: 1, epochs: 1, runs: 1}
"""
