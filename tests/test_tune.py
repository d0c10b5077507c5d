"""Sweeps (contra_ray.tune): the space is expanded and validated before any trial, a 4-trial CPU sweep
logs 1 parent + 4 child MLflow runs, and an ``mlflow server`` on that store serves them over REST."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from contra_ray.config import ConfigError
from contra_ray.tune import SweepError, asha_settings, expand_space, load_space, main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "tune_spaces" / "cpu_smoke.yaml"


def write_space(tmp_path, text: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


def fits(point) -> bool:
    d = point.config["distill"]
    return d["K"] == 0 or d["min_start_epoch"] + (d["K"] - 1) * d["R"] <= d["max_start_epoch"]


# ---------------------------------------------------------------------------------------------- (a) expansion

def test_smoke_space_redraws_invalid_R_before_trials():
    points, notes = expand_space(load_space(SMOKE))
    assert [(p.searched["distill.beta"], p.searched["distill.K"]) for p in points] == [
        (0.0, 2), (0.0, 3), (0.5, 2), (0.5, 3)]
    assert all(fits(p) for p in points)
    assert all(p.searched["distill.R"] == 1 for p in points if p.searched["distill.K"] == 3)
    # the rejected draw is named with its field and value (tiny_cpu: T- = 0, T+ = 2)
    assert any("distill.K=3" in n and "distill.R=2" in n and "do not fit" in n for n in notes)
    assert expand_space(load_space(SMOKE))[0] == points  # seeded: the same trials every time


def test_invalid_grid_points_dropped_with_note_or_error(tmp_path):
    space = write_space(tmp_path, """
preset: tiny_cpu
space:
  distill.beta: {grid: [0.5, 1.0]}
  distill.K: {grid: [0, 2, 3]}
""")
    points, notes = expand_space(load_space(space))
    got = {(p.searched["distill.beta"], p.searched["distill.K"]): p.searched["distill.R"] for p in points}
    # K=0 needs β=1 (plain MTT; R unused); R not searched -> floor((T+ - T-)/K) = floor(2/K)
    assert got == {(1.0, 0): None, (0.5, 2): 1, (1.0, 2): 1, (0.5, 3): 1, (1.0, 3): 1}
    assert all(fits(p) for p in points)
    assert any(n.startswith("dropped") and "distill.beta=0.5" in n and "distill.K=0" in n and "β must be 1" in n
               for n in notes)
    with pytest.raises(ConfigError, match=r"distill\.beta=0\.5.*β must be 1"):
        expand_space(load_space(space), on_invalid="error")


def test_K_R_constraint_and_checks_against_data(tmp_path):
    space = write_space(tmp_path, """
preset: tiny_cpu
space:
  distill.K: {grid: [2, 3]}
  distill.R: {grid: [1, 2]}
""")
    points, notes = expand_space(load_space(space))
    assert sorted((p.searched["distill.K"], p.searched["distill.R"]) for p in points) == [(2, 1), (2, 2), (3, 1)]
    drops = [n for n in notes if n.startswith("dropped")]
    assert len(drops) == 1 and "distill.K=3 distill.R=2" in drops[0] and "T- + (K-1)R = 4" in drops[0]

    def no_K3(cfg):  # stands for the data / expert-store checks run_sweep passes
        if cfg.distill.K == 3:
            raise ConfigError(f"distill.K={cfg.distill.K}: not in the store")

    points, notes = expand_space(load_space(space), check=no_K3)
    assert sorted((p.searched["distill.K"], p.searched["distill.R"]) for p in points) == [(2, 1), (2, 2)]
    assert any("not in the store" in n for n in notes)


def test_structural_errors_fail_at_once(tmp_path):
    bad_field = write_space(tmp_path, "preset: tiny_cpu\nspace:\n  distill.bta: {grid: [0.1]}\n")
    with pytest.raises(ConfigError, match="distill.bta"):
        expand_space(load_space(bad_field))  # never "dropped" as an invalid combination
    with pytest.raises(SweepError, match="space.distill.beta"):
        load_space(write_space(tmp_path, "preset: tiny_cpu\nspace:\n  distill.beta: {normal: [0, 1]}\n"))
    with pytest.raises(SweepError, match="no valid configuration"):
        expand_space(load_space(write_space(tmp_path, "preset: tiny_cpu\nspace:\n  distill.K: {grid: [5, 6]}\n"
                                            "  distill.R: {grid: [1]}\n")))


def test_space_with_a_key_given_twice_is_refused(tmp_path):
    space = write_space(tmp_path, "preset: tiny_cpu\nspace:\n  distill.beta: {grid: [0.1]}\n"
                                  "  distill.beta: {grid: [0.5]}\n")
    with pytest.raises(SweepError, match=r"space.yaml:4: duplicate key 'distill.beta' \(first given at line 3\)"):
        load_space(space)


def _no_work(monkeypatch):
    """Make any start of real work (Ray, data, experts) fail the test loudly."""
    import contra_ray.stages
    import contra_ray.evaluate

    def work(*a, **k):
        raise AssertionError("work started before the inputs were checked")

    monkeypatch.setattr(contra_ray.evaluate, "ensure_ray", work)
    monkeypatch.setattr(contra_ray.stages, "prepare_data", work)


@pytest.mark.parametrize("dry_run", [True, False])
def test_grace_period_longer_than_the_trials_fails_before_any_work(tmp_path, monkeypatch, capsys, dry_run):
    _no_work(monkeypatch)
    out = tmp_path / "out"
    argv = ["--space", str(SMOKE), "--set", "distill.iterations=2", "--output-dir", str(out), "--no-tracking"]
    assert main(argv + (["--dry-run"] if dry_run else [])) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "scheduler.asha.grace_period=4: larger than distill.iterations=2 of trial t00-" in err
    assert not out.exists()


def test_asha_settings_are_checked_against_every_trial(tmp_path):
    head = "preset: tiny_cpu\nproxy: {eval_every: 2, epochs: 1, runs: 1}\n"
    spec = load_space(write_space(tmp_path, head + "space:\n  distill.iterations: {grid: [8, 2]}\n"
                                  "scheduler: {asha: {grace_period: 4}}\n"))
    with pytest.raises(SweepError, match=r"grace_period=4: larger than distill.iterations=2 of trial "
                                         r"t01-iterations2.*grace_period <= 2"):
        expand_space(spec)  # max_t = 8 would satisfy Ray, but trial t01 could never be judged
    spec = load_space(write_space(tmp_path, head + "space:\n  distill.beta: {grid: [0.0]}\n"
                                  "scheduler: {asha: {grace_period: 1, max_t: 2}}\n"))
    with pytest.raises(SweepError, match=r"max_t=2: smaller than distill.iterations=4 of trial t00-beta0"):
        expand_space(spec)  # ASHA would stop every trial before its final evaluation
    spec = load_space(write_space(tmp_path, head.replace("eval_every: 2", "eval_every: 4") +
                                  "space:\n  distill.beta: {grid: [0.0]}\nscheduler: {asha: {}}\n"))
    points, notes = expand_space(spec)  # {asha: {}} is ASHA with its defaults, not "no scheduler"
    assert asha_settings(spec, points) == {"grace_period": 1, "reduction_factor": 2, "max_t": 4}
    assert any("ASHA cannot stop trial t00-beta0 early: proxy.eval_every=4 >= distill.iterations=4" in n
               for n in notes)
    smoke = load_space(SMOKE)
    from ray.tune.schedulers import ASHAScheduler

    ASHAScheduler(time_attr="iteration", metric="proxy_acc", mode="max", **asha_settings(smoke, expand_space(smoke)[0]))
    for bad, match in (("{asha: {grace: 2}}", r"scheduler.asha.grace=2: unknown ASHA setting"),
                       ("{asha: {reduction_factor: 1}}", r"reduction_factor=1: expected a number > 1"),
                       ("{asha: {grace_period: 0}}", r"grace_period=0: expected an integer >= 1"),
                       ("{asha: {max_t: 2.5}}", r"max_t=2.5: expected an integer >= 1"),
                       ("{hyperband: {}}", r"only 'asha'")):
        with pytest.raises(SweepError, match=match):
            load_space(write_space(tmp_path, head + f"space:\n  distill.beta: {{grid: [0.0]}}\nscheduler: {bad}\n"))
    with pytest.raises(SweepError, match=r"metric='proxy_accuracy'"):
        load_space(write_space(tmp_path, head + "metric: proxy_accuracy\nspace:\n  distill.beta: {grid: [0.0]}\n"))


def test_tune_cli_checks_output_dir_and_tracking_store_before_any_work(tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    (tmp_path / "file").write_text("")
    assert main(["--space", str(SMOKE), "--output-dir", str(tmp_path / "file" / "out"), "--no-tracking"]) == 2
    assert f"output_dir='{tmp_path / 'file' / 'out'}'" in capsys.readouterr().err
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    assert main(["--space", str(SMOKE), "--output-dir", str(tmp_path / "out"), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert f"tracking.uri='{uri}': tracking store not reachable" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["cifar10_ipc1", "cifar10_ipc10", "cifar100_ipc10"])
def test_gpu_spaces_expand_to_valid_configs(name):
    spec = load_space(ROOT / "tune_spaces" / f"{name}.yaml")
    points, _ = expand_space(spec)
    assert len(points) >= 6 and all(fits(p) for p in points)
    assert spec.scheduler and spec.metric == "proxy_acc"
    assert all(p.config["distill"]["R"] >= 1 for p in points)


def test_stopped_trials_end_killed_in_mlflow(tmp_path):
    """ASHA ends a trial with SystemExit at its next report (its run ends FAILED) or kills it (RUNNING)."""
    from mlflow import MlflowClient

    from contra_ray.tracking import init_tracking
    from contra_ray.tune import _close_child_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = init_tracking(uri, "t")
    client = MlflowClient(uri)
    parent = client.create_run(exp).info.run_id
    ids = []
    for i, status in enumerate(["FINISHED", "FAILED", "RUNNING", "RUNNING"]):
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
        client.log_param(run, "tune.trial_index", i)
        if status != "RUNNING":
            client.set_terminated(run, status)
        ids.append(run)
    rows = [{"index": i, "status": s} for i, s in enumerate(["DONE", "STOPPED", "STOPPED", "ERROR"])]
    _close_child_runs(uri, exp, parent, rows)
    got = [client.get_run(r) for r in ids]
    assert [r.info.status for r in got] == ["FINISHED", "KILLED", "KILLED", "FAILED"]
    assert [r.data.tags.get("contra_ray.stopped") for r in got] == [None, "early", "early", None]
    assert [row["run_id"] for row in rows] == ids


# ---------------------------------------------------------------------------------------------- (b) a sweep

@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir):
    """The 4-trial cpu_smoke sweep on real CIFAR-10 (tiny_cpu preset), 2 trials at a time."""
    import ray

    from contra_ray.tune import run_sweep

    started = not ray.is_initialized()
    if started:  # a private local instance, never someone else's `ray start` cluster on this host
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    out = tmp_path_factory.mktemp("sweep")
    t0 = time.time()
    try:
        result = run_sweep(SMOKE, output_dir=str(out), max_concurrent=2, name="smoke",
                           overrides=[f"data.cache_dir={cache_dir}"], verbose=0)
    finally:
        if started:
            ray.shutdown()
    print(f"cpu_smoke sweep: {time.time() - t0:.0f} s")
    return result, out


@pytest.mark.slow
def test_smoke_sweep_logs_parent_and_children(sweep, capsys):
    from mlflow import MlflowClient

    from contra_ray.report import main as report_main

    result, out = sweep
    assert result.tracking_uri == f"sqlite:///{(out / 'mlflow.db').resolve()}" and (out / "mlflow.db").is_file()
    assert [r["status"] for r in result.rows] == ["DONE"] * 4 and result.best is not None
    finals = [r["final_acc"] for r in result.rows]
    assert finals == sorted(finals, reverse=True)
    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs([result.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert len(runs) == 5 and len(parents) == 1 and len(children) == 4
    assert parents[0].info.run_id == result.parent_run_id and parents[0].data.metrics["best_final_acc"] > 0
    assert parents[0].data.params["distill.beta"] == "<searched>"
    seen = set()
    for run in children:
        p, m = run.data.params, run.data.metrics
        assert run.info.status == "FINISHED"
        assert json.loads(p["tune.searched"]) == ["distill.beta", "distill.K", "distill.R"]
        seen.add((float(p["distill.beta"]), int(p["distill.K"]), int(p["distill.R"])))
        assert p["model.width"] == "8" and p["data.train_per_class"] == "20"  # the full flattened config
        assert 0 < m["final_acc"] <= 100 and 0 < m["eval_acc"] <= 100 and "loss" in m
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 4  # one per iteration
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"distilled.safetensors", "distilled_grid.png"} <= arts
    assert seen == {(0.0, 2, 2), (0.0, 3, 1), (0.5, 2, 2), (0.5, 3, 1)}
    assert (out / "smoke" / "best_config.yaml").is_file()

    capsys.readouterr()
    assert report_main(["--experiment", "tune-cpu_smoke", "--tracking-uri", result.tracking_uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sweep smoke") and len(lines) == 3 + 4
    assert lines[3].split()[1] == result.best["name"]


# ---------------------------------------------------------------------------------------------- (c) REST

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 10) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read().decode()
    return json.loads(text) if text.strip().startswith("{") else {"text": text}


@pytest.mark.slow
def test_mlflow_server_serves_the_sweep(sweep, tmp_path):
    result, out = sweep
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server", "--backend-store-uri",
           result.tracking_uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(tmp_path / "mlflow_server.log", "w")
    # its own process group: the server's worker processes end with it
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "mlflow_server.log").read_text()[-3000:]
            try:
                _http(f"{base}/health", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.time() > deadline:
                    pytest.fail("mlflow server did not answer /health within 120 s")
                time.sleep(1)
        exp = _http(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=tune-cpu_smoke")["experiment"]
        found = _http(f"{base}/api/2.0/mlflow/runs/search",
                      {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
        assert len(found) == 5
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in found]
        assert sum(t.get("mlflow.parentRunId") == result.parent_run_id for t in tags) == 4
        finals = [m["value"] for r in found for m in r["data"].get("metrics", []) if m["key"] == "final_acc"]
        assert len(finals) == 4
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the group we started (pgid = the server's pid)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
    assert proc.returncode is not None
