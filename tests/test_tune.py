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
import yaml

from contra_ray.config import ConfigError, load_config
from contra_ray.tune.cli import main
from contra_ray.tune.space import SweepError, asha_settings, expand_space, load_space, searched_fields
from contra_ray.tune.stores import expert_key, expert_store_resolver
from helpers import assert_shared_vocabulary

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
    import contra_ray.tune.sweep  # where run_sweep looks them up

    def work(*a, **k):
        raise AssertionError("work started before the inputs were checked")

    monkeypatch.setattr(contra_ray.tune.sweep, "ensure_ray", work)
    monkeypatch.setattr(contra_ray.tune.sweep, "prepare_data", work)


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
    from contra_ray.tune.sweep import _close_child_runs

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


def test_bundle_axes_set_fields_together_and_seeds_share_experts(tmp_path):
    space = write_space(tmp_path, """
preset: tiny_cpu
space:
  distill.seed: {grid: [0, 1, 2]}
  method:
    grid:
      - {distill.K: 0, distill.beta: 1.0, distill.iterations: 6}
      - {distill: {K: 2, beta: 0.2}, distill.iterations: 2}
""")
    spec = load_space(space)
    assert searched_fields(spec) == ["distill.seed", "distill.K", "distill.beta", "distill.iterations"]
    points, notes = expand_space(spec)
    got = [(p.searched["distill.seed"], p.searched["distill.K"], p.searched["distill.beta"],
            p.config["distill"]["iterations"]) for p in points]
    assert got == [(0, 0, 1.0, 6), (0, 2, 0.2, 2), (1, 0, 1.0, 6), (1, 2, 0.2, 2), (2, 0, 1.0, 6), (2, 2, 0.2, 2)]
    assert not notes  # K=0 with beta=0.2 is never formed: the bundle keeps them together
    store = expert_store_resolver(spec, {}, "/x/experts")
    assert {store(p.config) for p in points} == {"/x/experts"}  # distill.seed never changes the experts
    assert len({expert_key(p.config) for p in points}) == 1


def test_searching_an_expert_setting_gives_each_value_its_store(tmp_path):
    spec = load_space(ROOT / "tune_spaces" / "ablation_curriculum_cpu.yaml")
    points, _ = expand_space(spec)
    store = expert_store_resolver(spec, {}, "/r/ablation_cpu/experts")
    by_arm = {p.config["experts"]["curriculum"]: store(p.config) for p in points}
    assert by_arm == {False: "/r/ablation_cpu/experts", True: "/r/ablation_cpu/experts-curriculumTrue"}
    other = load_space(ROOT / "tune_spaces" / "ablation_K_cpu.yaml")  # the other CPU ablations share it
    assert {expert_key(p.config) for p in expand_space(other)[0]} == {
        expert_key(p.config) for p in points if not p.config["experts"]["curriculum"]}


@pytest.mark.parametrize("bad, match", [
    ("  m: {uniform: [{distill.K: 0}, {distill.K: 2}]}\n", "a bundle axis .* takes grid or choice"),
    ("  m: {grid: [{distill.K: 0}, {distill.beta: 1.0}]}\n", "every value of a bundle axis sets the same fields"),
    ("  m: {grid: [{distill.K: 0}, 3]}\n", r"space.m.grid\[1\]=3"),
    ("  a.b: {grid: [{distill.K: 0}]}\n", "named without a dot"),
    ("  distill.K: {grid: [0]}\n  m: {grid: [{distill.K: 2}]}\n", "field distill.K is already searched"),
])
def test_malformed_bundle_axes_are_refused(tmp_path, bad, match):
    with pytest.raises(SweepError, match=match):
        load_space(write_space(tmp_path, "preset: tiny_cpu\nspace:\n" + bad))


SPACES = sorted((ROOT / "tune_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_every_space_dry_runs(path, capsys):
    assert main(["--space", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "expert stores" in out and "Traceback" not in out


def test_ablation_spaces_come_in_cpu_gpu_pairs_with_seeds_and_no_early_stopping():
    names = {p.stem for p in SPACES if p.stem.startswith("ablation_")}
    assert {n.rsplit("_", 1)[0] for n in names} == {"ablation_table3", "ablation_equal_time", "ablation_K",
                                                     "ablation_curriculum", "ablation_recipe"}
    for n in names:
        assert n.endswith(("_cpu", "_gpu")) and f"{n[:-4]}_cpu" in names and f"{n[:-4]}_gpu" in names
        spec = load_space(ROOT / "tune_spaces" / f"{n}.yaml")
        assert spec.scheduler is None  # every seed runs to its final evaluation
        kind, seeds = spec.space["distill.seed"]
        assert kind == "grid" and len(seeds) >= 3
        points, notes = expand_space(spec)
        assert not [x for x in notes if x.startswith("dropped")]
        groups = {json.dumps({k: v for k, v in p.searched.items() if k != "distill.seed"}) for p in points}
        assert len(points) == len(groups) * len(seeds) and len(groups) >= 2  # every group has every seed
        cpu = n.endswith("_cpu")
        assert (points[0].config["device"] == "cpu") == cpu
    equal_time = {p.searched["distill.K"]: p.config["distill"]["iterations"]
                  for p in expand_space(load_space(ROOT / "tune_spaces" / "ablation_equal_time_gpu.yaml"))[0]}
    assert equal_time[0] == round(equal_time[4] * 1.10 / 0.32, -2)  # paper Table 4 right: r = 3.44


# ---------------------------------------------------------------------------------------------- (b) a sweep

@pytest.fixture(scope="module")
def sweep(ray_local, tmp_path_factory, cache_dir):
    """The 4-trial cpu_smoke sweep on real CIFAR-10 (tiny_cpu preset), 2 trials at a time."""
    from contra_ray.tune.sweep import run_sweep

    out = tmp_path_factory.mktemp("sweep")
    t0 = time.time()
    result = run_sweep(SMOKE, output_dir=str(out), max_concurrent=2, name="smoke",
                       overrides=[f"data.cache_dir={cache_dir}"], verbose=0)
    print(f"cpu_smoke sweep: {time.time() - t0:.0f} s")
    return result, out


SEEDS_SPACE = """
preset: tiny_cpu
overrides:
  eval: {runs: 1}
  distill: {iterations: 3, checkpoint_every: 0}
space:
  distill.seed: {grid: [0, 1]}
  method:
    grid:
      - {distill.K: 0, distill.beta: 1.0}
      - {distill.K: 2, distill.beta: 0.2}
proxy: {eval_every: 1, epochs: 1, runs: 1}
"""


@pytest.fixture(scope="module")
def seed_sweep(sweep, tmp_path_factory, cache_dir):
    """2 distillation seeds x 2 groups (sequential K=0 vs concurrent K=2) on tiny_cpu, 3 iterations, in
    the smoke sweep's output directory (same data cache and expert store) and MLflow store."""
    from contra_ray.tune.sweep import run_sweep

    result, out = sweep
    space = tmp_path_factory.mktemp("space") / "seeds.yaml"
    space.write_text(SEEDS_SPACE)
    t0 = time.time()
    seeds = run_sweep(space, output_dir=str(out), max_concurrent=2, name="seeds", verbose=0,
                      overrides=[f"data.cache_dir={cache_dir}"])
    print(f"seeds sweep: {time.time() - t0:.0f} s")
    return seeds, out


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
    parent = parents[0]
    assert parent.info.run_id == result.parent_run_id and parent.data.metrics["best_final_acc"] > 0
    assert parent.data.params["distill.beta"] == "<searched>" and "K" not in parent.data.tags  # searched
    assert parent.data.tags["contra_ray.role"] == "sweep"
    assert parent.data.tags["mlflow.source.name"] == "contra_ray.tune"
    assert parent.data.tags["best_run_id"] == result.best["run_id"]
    assert parent.data.tags["best_run_name"] == result.best["name"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "best")} == {
        "best/best_config.yaml", "best/distilled.safetensors", "best/distilled_grid.png"}  # README: best/
    seen = set()
    for run in children:
        p, m = run.data.params, run.data.metrics
        assert run.info.status == "FINISHED"
        assert_shared_vocabulary(client, run, role="trial", entry_point="contra_ray.tune", method="contra",
                                 iterations=4)
        assert json.loads(p["tune.searched"]) == ["distill.beta", "distill.K", "distill.R"]
        seen.add((float(p["distill.beta"]), int(p["distill.K"]), int(p["distill.R"])))
        assert p["model.width"] == "8" and p["data.train_per_class"] == "20"  # the full flattened config
        assert 0 < m["eval_acc"] <= 100 and "iters_to_plateau" not in m  # one proxy evaluation (iteration 2)
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"distilled.safetensors", "distilled_grid.png", "distill_curves.png"} <= arts
    assert seen == {(0.0, 2, 2), (0.0, 3, 1), (0.5, 2, 2), (0.5, 3, 1)}
    best = load_config(str(out / "smoke" / "best_config.yaml"))  # README: rerun it as a preset
    assert best.name == "smoke-best" and best.output_dir == str(out.resolve())
    assert best.tracking.experiment == "contra_ray"

    capsys.readouterr()
    assert report_main(["--experiment", "tune-cpu_smoke", "--tracking-uri", result.tracking_uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sweep smoke") and len(lines) == 3 + 4
    assert lines[3].split()[1] == result.best["name"]


@pytest.mark.slow
def test_seed_sweep_logs_the_shared_vocabulary_and_the_report_aggregates_it(seed_sweep, tmp_path, capsys):
    """The report command of docs/EXPERIMENTS.md on a real sweep over seeds, read back from the store."""
    from mlflow import MlflowClient

    from contra_ray.report import main as report_main

    result, out = seed_sweep
    assert [r["status"] for r in result.rows] == ["DONE"] * 4
    client = MlflowClient(result.tracking_uri)
    children = client.search_runs([result.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert sorted((r.data.params["distill.seed"], r.data.tags["method"]) for r in children) == [
        ("0", "contra"), ("0", "mtt"), ("1", "contra"), ("1", "mtt")]
    for run in children:
        assert_shared_vocabulary(client, run, role="trial", entry_point="contra_ray.tune",
                                 method=run.data.tags["method"], iterations=3)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_acc")] == [1, 2]
        assert run.data.metrics["iters_to_plateau"] in (1.0, 2.0)
        assert run.data.tags["path.experts.store"] == str(out.resolve() / "tiny_cpu" / "experts")  # one store
    capsys.readouterr()
    argv = ["--experiment", "tune-seeds", "--tracking-uri", result.tracking_uri, "--plot", str(tmp_path / "r.png")]
    assert report_main(argv + ["--group-by", "distill.beta,distill.K,distill.R",
                               "--baseline", "distill.beta=1.0,distill.K=0"]) == 0
    text = capsys.readouterr().out
    assert "tune-seeds: 4 run(s) in 2 group(s)" in text and "baseline" in text and (tmp_path / "r.png").is_file()
    assert report_main(argv + ["--group-by", "distill.beta,distill.K,distill.R", "--json",
                               "--baseline", "distill.beta=1.0,distill.K=0"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [(g["label"], g["n_seeds"], g["n_runs"]) for g in got["groups"]] == [
        ("beta=0.2,K=2,R=1", 2, 2), ("beta=1.0,K=0,R=None", 2, 2)]
    (diff,) = got["differences"]
    assert diff["label"] == "beta=0.2,K=2,R=1" and diff["n_pairs"] == 2 and diff["ci_low"] is not None
    assert report_main(argv + ["--group-by", "distill.K", "--metric", "s_per_iter"]) == 0
    assert "s_per_iter mean ± std over seeds" in capsys.readouterr().out


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
        killed = False
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            killed = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
    # it served until stopped, then shut down cleanly on SIGTERM: `mlflow server` forwards the signal to its
    # uvicorn child, waits for it and exits 0 (a crash, or needing SIGKILL, would show here)
    assert not killed and proc.returncode == 0, (proc.returncode, (tmp_path / "mlflow_server.log").read_text()[-3000:])


@pytest.mark.parametrize("flag, value, message", [("--workers-per-trial", "-1", "expected a non-negative integer"),
                                                  ("--max-concurrent", "0", "expected a positive integer"),
                                                  ("--num-samples", "0", "expected a positive integer"),
                                                  ("--cpus-per-trial", "0", "expected a positive integer"),
                                                  ("--gpus-per-trial", "nan", "expected a non-negative number")])
def test_cli_refuses_counts_that_cannot_run_also_in_dry_run(flag, value, message, capsys):
    """A user finding: --dry-run accepted --workers-per-trial -1, and --max-concurrent 0 was ignored."""
    from contra_ray.tune import cli as tune_cli

    with pytest.raises(SystemExit) as e:
        tune_cli.main(["--space", "cpu_smoke", "--dry-run", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: {message}" in err


def test_sweep_name_must_be_one_folder_inside_output_dir(tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    for name in ("../escape", "a/b", ".."):
        assert main(["--space", str(SMOKE), "--output-dir", str(tmp_path / "out"), "--no-tracking",
                     "--name", name]) == 2
        assert capsys.readouterr().err.startswith(f"error: --name={name!r}: ")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "out").exists()


def test_dry_run_checks_the_sweep_name_like_the_real_run(capsys):
    from contra_ray.tune import cli as tune_cli

    assert tune_cli.main(["--space", "cpu_smoke", "--dry-run", "--name", "../x"]) == 2
    assert capsys.readouterr().err.startswith("error: --name='../x': ")


# ---------------------------------------------------------------------------------------------- (d) resume, failures

RESUME_SPACE = """
preset: tiny_cpu
overrides:
  eval: {runs: 1, epochs: 1}
  distill: {iterations: 2, checkpoint_every: 0}
space:
  distill.beta: {grid: [0.0, 0.5]}
proxy: {eval_every: 1, epochs: 1, runs: 1}
"""


def _tune_cmd(space: Path, out: Path, name: str, cache_dir: str) -> list[str]:
    return [sys.executable, "-m", "contra_ray.tune", "--space", str(space), "--output-dir", str(out), "--name", name,
            "--max-concurrent", "1", "--set", f"data.cache_dir={cache_dir}", "--verbose", "0"]


def _run_cli(cmd: list[str], log: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as f:  # its own session: whatever Ray leaves behind is ended with the group
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=600)
        finally:
            _end_group(proc)
    return subprocess.CompletedProcess(cmd, rc, log.read_text())


def _end_group(proc: subprocess.Popen) -> None:
    """End what is left of the process group the test started (pgid = the driver's pid)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.mark.slow
def test_a_killed_sweep_driver_resumes_and_reports_like_an_uninterrupted_sweep(sweep, tmp_path, cache_dir):
    """SIGKILL to the driver after its first trial finished; the same command resumes: the finished trial is
    not run again (one MLflow child, started before the kill), the other runs, under the same parent run, and
    results.txt / best_config.yaml equal those of an uninterrupted sweep of the same space."""
    from mlflow import MlflowClient

    _, out = sweep  # its expert store and data cache: no expert training here
    space = tmp_path / "resume.yaml"
    space.write_text(RESUME_SPACE)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "cut1.log", "w")
    proc = subprocess.Popen(_tune_cmd(space, out, "cut", cache_dir), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=env, start_new_session=True)
    try:
        deadline = time.time() + 400
        while not any("TERMINATED" in p.read_text() for p in (out / "tune" / "cut").glob("experiment_state-*.json")):
            assert proc.poll() is None, (tmp_path / "cut1.log").read_text()[-3000:]
            assert time.time() < deadline, "no trial finished within 400 s"
            time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only
        killed_at = time.time() * 1000
    finally:
        _end_group(proc)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "cut" / "results.txt").exists()

    resumed = _run_cli(_tune_cmd(space, out, "cut", cache_dir), tmp_path / "cut2.log")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "[tune] resuming sweep cut" in resumed.stdout
    whole = _run_cli(_tune_cmd(space, out, "whole", cache_dir), tmp_path / "whole.log")
    assert whole.returncode == 0 and "resuming" not in whole.stdout, whole.stdout[-3000:]

    table = (out / "cut" / "results.txt").read_text()
    assert table == (out / "whole" / "results.txt").read_text() and table.count("DONE") == 2
    best = [yaml.safe_load((out / s / "best_config.yaml").read_text()) for s in ("cut", "whole")]
    assert best[0].pop("name") == "cut-best" and best[1].pop("name") == "whole-best" and best[0] == best[1]

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tune-resume")
    parents = client.search_runs([exp.experiment_id],
                                 "tags.`contra_ray.role` = 'sweep' and attributes.run_name = 'cut'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the parent was reused, not a second one
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    by_name: dict[str, list] = {}
    for run in children:
        by_name.setdefault(run.info.run_name, []).append(run)
    first = min(children, key=lambda r: r.info.start_time).info.run_name
    (done_before,) = by_name[first]  # the trial that finished before the kill ran once, before the kill
    assert done_before.info.status == "FINISHED" and done_before.info.end_time < killed_at
    (other,) = set(by_name) - {first}
    live = [r for r in by_name[other] if "contra_ray.superseded" not in r.data.tags]
    assert len(live) == 1 and live[0].info.status == "FINISHED" and live[0].info.start_time > killed_at
    assert parents[0].data.tags["best_run_name"] in by_name


FAILING_SPACE = """
preset: tiny_cpu
overrides:
  eval: {runs: 1, epochs: 1}
  distill: {iterations: 2, checkpoint_every: 0}
space:
  distill.lr_lr: {grid: [1.0e+30]}   # one SGD step on syn_lr drives it far below 0: the trial diverges
proxy: {eval_every: 1, epochs: 1, runs: 1}
"""


@pytest.mark.slow
def test_a_sweep_with_a_failed_trial_exits_1_and_names_it(sweep, tmp_path, cache_dir):
    _, out = sweep
    space = tmp_path / "failing.yaml"
    space.write_text(FAILING_SPACE)
    res = _run_cli(_tune_cmd(space, out, "failing", cache_dir), tmp_path / "failing.log")
    assert res.returncode == 1, res.stdout[-3000:]
    assert ("error: 1 of 1 trial(s) failed: t00-lr_lr1e+30: DistillationDiverged: iteration 0: syn_lr became -"
            in res.stdout)
    assert "lower distill.lr_lr (now 1e+30)" in res.stdout


def test_random_search_gives_tune_the_axes_as_domains(tmp_path, capsys):
    from ray import tune

    from contra_ray.tune.space import param_space, point_of_values
    from contra_ray.tune.sweep import check_search

    space = write_space(tmp_path, """
preset: tiny_cpu
search: {algorithm: random}
space:
  distill.seed: {grid: [0, 1]}
  distill.lr_img: {uniform: [10, 100]}
  method: {choice: [{distill.K: 0, distill.beta: 1.0}, {distill.K: 2, distill.beta: 0.2}]}
""")
    assert main(["--space", str(space), "--dry-run"]) == 0  # before write_space replaces space.yaml
    assert "search.algorithm=random: Tune samples 1 configuration(s) per grid point" in capsys.readouterr().out
    spec = load_space(space)
    points, _ = expand_space(spec)
    got = param_space(spec, points)["searched"]
    assert got["distill"]["seed"] == tune.grid_search([0, 1])
    assert isinstance(got["distill"]["lr_img"], tune.search.sample.Float)
    assert got["distill"]["lr_img"].lower == 10.0 and got["distill"]["lr_img"].upper == 100.0
    assert got["method"].categories == [{"distill": {"K": 0, "beta": 1.0}}, {"distill": {"K": 2, "beta": 0.2}}]
    values = {"distill": {"seed": 1, "lr_img": 42.0}, "method": {"distill": {"K": 2, "beta": 0.2}}}
    assert point_of_values(spec, values) == {"distill.seed": 1, "distill.lr_img": 42.0, "distill.K": 2,
                                             "distill.beta": 0.2}
    grid_spec = load_space(SMOKE)
    assert param_space(grid_spec, expand_space(grid_spec)[0])["searched"]["grid_search"][1] == {
        "distill": {"beta": 0.0, "K": 3, "R": 1}}
    with pytest.raises(SweepError, match=r"search.algorithm='optuna': expected one of grid, random"):
        load_space(write_space(tmp_path, "preset: tiny_cpu\nsearch: {algorithm: optuna}\n"
                                         "space:\n  distill.beta: {grid: [0.1]}\n"))
    curriculum = load_space(write_space(tmp_path, "preset: tiny_cpu\nsearch: {algorithm: random}\n"
                                                  "space:\n  experts.curriculum: {grid: [true, false]}\n"))
    with pytest.raises(SweepError, match=r"space.experts.curriculum changes the expert store"):
        check_search(curriculum)


# ---------------------------------------------------------------------------------------------- owned names

LONG_SPACE = """
preset: tiny_cpu
overrides:
  eval: {runs: 1, epochs: 1}
  distill: {iterations: 400, checkpoint_every: 0}
space:
  distill.beta: {grid: [0.2]}
proxy: {eval_every: 400, epochs: 1, runs: 1}
"""


def test_a_second_sweep_with_the_same_name_is_refused_while_the_first_runs(tmp_path, cache_dir):
    """The issue: two sweeps started at once with one --name shared its directories and the second replaced
    the first's results. The first holds <out>/<name>/.lock (400 iterations: it is stopped once checked)."""
    space = write_space(tmp_path, LONG_SPACE)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "contra_ray.tune", "--space", str(space), "--name", "same", "--output-dir",
           str(out), "--no-tracking", "--verbose", "0", "--set", f"data.cache_dir={cache_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                 start_new_session=True)
    try:
        lock = out / "same" / ".lock"
        deadline = time.time() + 240
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "the first sweep never took its lock"
            time.sleep(0.2)
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert first.poll() is None  # the first one still runs: the refusal was the lock's
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stderr.strip() == (f"error: run directory {out / 'same'} is in use by another process (pid "
                                         f"{first.pid}): wait for it to finish, or choose another --name / "
                                         "--output-dir")
        assert "[tune]" not in second.stdout  # refused before data, experts or trials
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGINT)
            try:
                first.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(first.pid, signal.SIGKILL)
                first.wait(timeout=30)


def _earlier_sweep(run_dir: Path, overrides: list[str]) -> list:
    """Make ``run_dir`` look like a cpu_smoke sweep run with ``overrides``: its trials.json and trial folders."""
    from contra_ray.config import parse_overrides
    from contra_ray.tune.sweep import _sweep_request

    spec = load_space(SMOKE)
    points, _ = expand_space(spec, parse_overrides(overrides))
    for p in points:
        (run_dir / p.name).mkdir(parents=True)
        (run_dir / p.name / "distilled.safetensors").write_bytes(b"earlier")
    (run_dir / "results.txt").write_text("earlier\n")
    (run_dir / "trials.json").write_text(json.dumps({"trials": [{"name": p.name} for p in points],
                                                     "request": _sweep_request(spec, points)}))
    return points


def test_an_earlier_sweep_of_the_name_with_another_configuration_is_refused(tmp_path, monkeypatch, capsys):
    """A finished sweep's results are replaced only by the same configuration, or with --overwrite."""
    from contra_ray.tune.sweep import _check_earlier_sweep, _sweep_request

    _no_work(monkeypatch)
    out = tmp_path / "out"
    points = _earlier_sweep(out / "same", ["distill.iterations=8"])
    args = ["--space", str(SMOKE), "--output-dir", str(out), "--name", "same", "--no-tracking"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sweep 'same' has already run in ") and len(err.strip().splitlines()) == 1
    assert err.count("distill.iterations=8 in the finished sweep, 4 now") == 1  # said once, not per trial
    assert "--overwrite" in err and (out / "same" / "results.txt").read_text() == "earlier\n"

    with pytest.raises(AssertionError, match="work started"):  # --overwrite: replaced, then the work starts
        main(args + ["--overwrite"])
    assert "--overwrite: replacing sweep 'same' (distill.iterations=8" in capsys.readouterr().out
    assert not any((out / "same" / p.name).exists() for p in points)
    assert not (out / "same" / "results.txt").exists() and not (out / "same" / "trials.json").exists()

    spec = load_space(SMOKE)  # the same configuration runs again (and other spaces name their trials)
    same, _ = expand_space(spec)
    _check_earlier_sweep(out / "again", _sweep_request(spec, same), overwrite=False)  # nothing there
    _earlier_sweep(out / "again", [])
    _check_earlier_sweep(out / "again", _sweep_request(spec, same), overwrite=False)
    other = [p for p in same if p.searched["distill.beta"] == 0.0]
    with pytest.raises(SweepError, match=r"trial\(s\) .*-beta0.5-.* only in the finished sweep"):
        _check_earlier_sweep(out / "again", _sweep_request(spec, other), overwrite=False)
