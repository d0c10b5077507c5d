"""Aggregation of runs over distillation seeds (report --group-by / --baseline), against hand-computed values."""

import math

import pytest
from scipy.stats import t as student_t

from contra_ray import report


def _run(beta, K, R, seed, acc, name=None):
    return {"distill.beta": beta, "distill.K": K, "distill.R": R, "distill.seed": seed, "final_acc": acc,
            "name": name or f"b{beta}-K{K}-R{R}-s{seed}"}


ROWS = [
    # group A (β=0.2, K=4, R=4): seed 0 twice (60, 62 -> 61), seed 1: 64, seed 2: 58
    _run("0.2", "4", "4", "0", 60.0), _run("0.2", "4", "4", "0", 62.0, "again"), _run("0.2", "4", "4", "1", 64.0),
    _run("0.2", "4", "4", "2", 58.0),
    # group B (β=0.5, K=2, R=2): seeds 0, 1, and 3 (which the baseline lacks)
    _run("0.5", "2", "2", "0", 63.0), _run("0.5", "2", "2", "1", 61.0), _run("0.5", "2", "2", "3", 70.0),
    # baseline (β=1, K=0) with two values of R: seed 0: 59; seed 1: 61 (R=1) and 59 (R=2) -> 60; seed 2: 57
    _run("1.0", "0", "1", "0", 59.0), _run("1.0", "0", "1", "1", 61.0), _run("1.0", "0", "2", "1", 59.0),
    _run("1", "0", "2", "2", 57.0),  # "1" == "1.0": params compare as numbers
    _run("0.2", "4", "4", "5", None),  # stopped early: no final_acc, ignored
]
GROUP_BY = ["distill.beta", "distill.K", "distill.R"]


def test_aggregate_by_seed_hand_values():
    aggs = report.aggregate_by_seed(ROWS, GROUP_BY)
    assert [a["label"] for a in aggs] == ["beta=0.2,K=4,R=4", "beta=0.5,K=2,R=2", "beta=1.0,K=0,R=1",
                                          "beta=1.0,K=0,R=2"]
    a, b, base1, base2 = aggs
    # A: per-seed means 61, 64, 58; mean 61; std ddof=1: sqrt((0 + 9 + 9) / 2) = 3
    assert a["seeds"] == {0.0: 61.0, 1.0: 64.0, 2.0: 58.0} and (a["n_seeds"], a["n_runs"]) == (3, 4)
    assert a["mean"] == pytest.approx(61.0) and a["std"] == pytest.approx(3.0)
    # B: 63, 61, 70 -> mean 194/3; squared deviations (5/3)^2 + (11/3)^2 + (16/3)^2 = 402/9; / 2 -> 201/9
    assert b["mean"] == pytest.approx(194 / 3) and b["std"] == pytest.approx(math.sqrt(201 / 9))
    assert base1["seeds"] == {0.0: 59.0, 1.0: 61.0} and base2["seeds"] == {1.0: 59.0, 2.0: 57.0}
    single = report.aggregate_by_seed([_run("0.2", "4", "4", "0", 60.0)], GROUP_BY)
    assert single[0]["std"] is None  # one seed: no spread


def test_paired_differences_hand_values():
    diffs = report.paired_differences(ROWS, GROUP_BY, {"distill.beta": "1.0", "distill.K": "0"})
    assert [d["label"] for d in diffs] == ["beta=0.2,K=4,R=4", "beta=0.5,K=2,R=2"]  # baseline runs left out
    a, b = diffs
    # baseline per seed (R pooled): {0: 59, 1: (61 + 59) / 2 = 60, 2: 57}
    # A - baseline: d = {0: 61-59 = 2, 1: 64-60 = 4, 2: 58-57 = 1}; mean 7/3
    # sd (ddof=1) = sqrt(((2-7/3)^2 + (4-7/3)^2 + (1-7/3)^2) / 2) = sqrt((1/9 + 25/9 + 16/9) / 2) = sqrt(7/3)
    # CI = 7/3 ± t(0.975, 2) * sqrt(7/3) / sqrt(3) = 7/3 ± 4.302653 * 0.881917 = 7/3 ± 3.794586
    assert a["diffs"] == {0.0: 2.0, 1.0: 4.0, 2.0: 1.0} and a["n_pairs"] == 3 and a["unpaired"] == []
    assert a["mean"] == pytest.approx(7 / 3) and a["std"] == pytest.approx(math.sqrt(7 / 3))
    assert (a["ci_low"], a["ci_high"]) == pytest.approx((7 / 3 - 3.794586, 7 / 3 + 3.794586), abs=1e-5)
    # B - baseline: seeds 0, 1 only (seed 3 unpaired): d = {0: 4, 1: 1}, mean 2.5, sd = sqrt(2 * 1.5^2) = 2.12132
    # CI = 2.5 ± t(0.975, 1) * 2.12132 / sqrt(2) = 2.5 ± 12.706205 * 1.5 = 2.5 ± 19.059308
    assert b["diffs"] == {0.0: 4.0, 1.0: 1.0} and b["unpaired"] == [3.0]
    assert b["mean"] == pytest.approx(2.5) and b["std"] == pytest.approx(math.sqrt(4.5))
    assert (b["ci_low"], b["ci_high"]) == pytest.approx((2.5 - 19.059308, 2.5 + 19.059308), abs=1e-5)
    with pytest.raises(ValueError, match="no run with final_acc matches the baseline"):
        report.paired_differences(ROWS, GROUP_BY, {"distill.beta": "0.9"})


def test_one_pair_has_no_interval():
    rows = [_run("0.2", "4", "4", "0", 61.0), _run("1.0", "0", "2", "0", 60.0)]
    (d,) = report.paired_differences(rows, GROUP_BY, {"distill.K": "0"})
    assert d["mean"] == pytest.approx(1.0) and d["std"] is None and d["ci_low"] is None


def test_t_quantile_matches_scipy():
    for df in range(1, 31):
        assert report.t_quantile_975(df) == pytest.approx(student_t.ppf(0.975, df), abs=1e-6)
    for df in (31, 35, 45, 59, 61, 100, 121, 500, 10_000):
        assert report.t_quantile_975(df) == pytest.approx(student_t.ppf(0.975, df), abs=1e-3)
    with pytest.raises(ValueError, match="df >= 1"):
        report.t_quantile_975(0)


def test_parse_baseline_and_missing_seed():
    assert report.parse_baseline("distill.beta=1.0, distill.K=0") == {"distill.beta": "1.0", "distill.K": "0"}
    for bad in ("distill.beta", "=1", ""):
        with pytest.raises(ValueError, match="--baseline"):
            report.parse_baseline(bad)
    with pytest.raises(ValueError, match="run 'x' has final_acc but no distill.seed param"):
        report.aggregate_by_seed([{"distill.beta": "0", "final_acc": 1.0, "name": "x"}], ["distill.beta"])


def test_table_and_plot(tmp_path):
    aggs = report.aggregate_by_seed(ROWS, GROUP_BY)
    base = {"distill.beta": "1.0", "distill.K": "0"}
    text = report.format_aggregate(aggs, report.paired_differences(ROWS, GROUP_BY, base), base)
    lines = text.splitlines()
    assert lines[2].split()[:6] == ["beta=0.2,K=4,R=4", "3", "4", "61.00", "±", "3.00"]
    assert "2.33 ± 1.53" in lines[2] and "[-1.46, 6.13]" in lines[2]
    assert "baseline" in lines[4] and "ddof=1" in lines[-2] and "t(0.975, n-1)" in lines[-1]
    png = report.plot_aggregate(aggs, report.paired_differences(ROWS, GROUP_BY, base), tmp_path / "r" / "x.png",
                                "demo")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in png.parent.iterdir()] == ["x.png"]


def test_cli_group_by_with_mlflow(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from contra_ray.tracking import init_tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp_id = init_tracking(uri, "tune-demo")
    client = MlflowClient(uri)
    parent = client.create_run(exp_id, run_name="sweep", tags={"contra_ray.role": "sweep"}).info.run_id
    for r in ROWS:
        run = client.create_run(exp_id, run_name=r["name"], tags={"mlflow.parentRunId": parent}).info.run_id
        for k in GROUP_BY + ["distill.seed"]:
            client.log_param(run, k, r[k])
        if r["final_acc"] is not None:
            client.log_metric(run, "final_acc", r["final_acc"])
        client.set_terminated(run)
    client.set_terminated(parent)
    plot = tmp_path / "out" / "agg.png"
    assert report.main(["--experiment", "tune-demo", "--tracking-uri", uri, "--group-by", ",".join(GROUP_BY),
                        "--baseline", "distill.beta=1.0,distill.K=0", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "tune-demo: 11 run(s) in 4 group(s) of distill.beta, distill.K, distill.R"
    assert out[3].startswith("beta=0.2,K=4,R=4") and "[-1.46, 6.13]" in out[3]
    assert plot.is_file() and any(line.startswith("plot:") and parent in line for line in out)
    assert [a.path for a in client.list_artifacts(parent, "report")] == ["report/agg.png"]
    assert report.main(["--experiment", "tune-demo", "--tracking-uri", uri, "--baseline", "distill.K=0"]) == 2


def test_within_pairs_each_group_with_its_own_baseline():
    """Table 3: MTT+CT - MTT and DATM+CT - DATM, never across recipes; booleans compare case-insensitively."""
    def run(soft, K, seed, acc):
        return {"distill.soft_labels": soft, "distill.K": K, "distill.seed": seed, "final_acc": acc, "name": "r"}

    rows = [run("False", "0", s, 40.0 + s) for s in (0, 1)] + [run("False", "3", s, 43.0 + s) for s in (0, 1)] + \
           [run("True", "0", s, 50.0 + s) for s in (0, 1)] + [run("True", "3", s, 51.0 + 2 * s) for s in (0, 1)]
    group_by = ["distill.soft_labels", "distill.K"]
    mtt_ct, datm_ct = report.paired_differences(rows, group_by, {"distill.K": "0"}, within=["distill.soft_labels"])
    assert mtt_ct["label"] == "soft_labels=False,K=3" and mtt_ct["diffs"] == {0.0: 3.0, 1.0: 3.0}
    assert datm_ct["label"] == "soft_labels=True,K=3" and datm_ct["diffs"] == {0.0: 1.0, 1.0: 2.0}
    pooled = report.paired_differences(rows, group_by, {"distill.K": "0"})  # without: the two recipes pooled
    assert pooled[0]["diffs"] == {0.0: -2.0, 1.0: -2.0}
    datm = report.paired_differences(rows, group_by, {"distill.K": "0", "distill.soft_labels": "true"})[-1]
    assert datm["diffs"] == {0.0: 1.0, 1.0: 2.0}
    with pytest.raises(ValueError, match="--within distill.init: not one of the --group-by"):
        report.paired_differences(rows, group_by, {"distill.K": "0"}, within=["distill.init"])


def test_cli_unreadable_store_is_one_line_exit_2_in_seconds(tmp_path, capsys):
    """A user finding: a report against a server that does not answer retried for minutes; a missing
    SQLite file silently became a new empty store."""
    import socket

    from contra_ray.report import main

    missing = tmp_path / "nope.db"
    assert main(["--experiment", "x", "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert f"no such SQLite store ({missing})" in capsys.readouterr().err and not missing.exists()
    (tmp_path / "text").write_text("not a database")
    assert main(["--experiment", "x", "--tracking-uri", f"sqlite:///{tmp_path / 'text'}"]) == 2
    assert f"{tmp_path / 'text'} is not an SQLite database" in capsys.readouterr().err
    assert main(["--experiment", "x", "--tracking-uri", "foo://x"]) == 2
    assert "tracking.uri='foo://x': unknown scheme 'foo:'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text"]  # nothing created (no store, no lock)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert main(["--experiment", "x", "--tracking-uri", uri]) == 2  # check_destinations' one GET, no MLflow retries
    err = capsys.readouterr().err
    assert f"tracking.uri='{uri}': tracking store not reachable" in err and "Traceback" not in err


def test_curve_measures_hand_values():
    from contra_ray.common.curves import path_ratio, relative_oscillation

    assert relative_oscillation([2.0] * 15) == 0.0 and math.isnan(relative_oscillation([1.0] * 10))
    # 1, 2, 1, 2, ...: every 11-window averages 16/11 or 17/11, each value sits 6/11 away from it
    assert relative_oscillation([1.0, 2.0] * 10) == pytest.approx((6 / 11) / ((16 / 11 + 17 / 11) / 2))
    trend = [0.5 * t for t in range(30)]  # a straight line has no oscillation around its moving average
    assert relative_oscillation(trend) == pytest.approx(0.0, abs=1e-12)
    assert relative_oscillation([3, 4, 3, 4, 3, 4, 3, 4, 3, 4, 3], window=3) == pytest.approx(
        math.sqrt(((4 - 10 / 3) ** 2 * 5 + (3 - 11 / 3) ** 2 * 4) / 9)
        / ((10 / 3 * 5 + 11 / 3 * 4) / 9))
    assert path_ratio([0, 1, 2, 3]) == 1.0 and path_ratio([0, 2, 1, 3]) == pytest.approx(5 / 3)
    assert math.isnan(path_ratio([1, 2, 1])) and math.isnan(path_ratio([1]))
    with pytest.raises(ValueError, match="window=4"):
        relative_oscillation([1.0] * 9, window=4)


def test_spread_test_closed_form():
    # F(2, 2) has CDF x / (1 + x): variances 1 and 4 -> F = 0.25, P(F' <= 0.25) = 0.2, two-sided p = 0.4
    r = report.spread_test([1.0, 2.0, 3.0], [1.0, 3.0, 5.0])
    assert r["F"] == pytest.approx(0.25) and r["df"] == (2, 2) and r["p"] == pytest.approx(0.4)
    r = report.spread_test([1.0, 3.0, 5.0], [1.0, 2.0, 3.0])
    assert r["F"] == pytest.approx(4.0) and r["p"] == pytest.approx(2 * (1 - 4 / 5))
    assert report.spread_test([1.0], [1.0, 2.0])["p"] is None


def test_cli_pools_stores_several_metrics_and_history_measures(tmp_path, capsys):
    """Runs of one experiment in two stores (a set distilled elsewhere, evaluated here) pooled by --group-by;
    one table per --metric, the history measures derived from the logged loss/syn_lr, the spread line."""
    from mlflow.tracking import MlflowClient

    from contra_ray.common.curves import relative_oscillation
    from contra_ray.tracking import init_tracking

    uris = [f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"]
    losses = {}
    for i, uri in enumerate(uris):
        exp_id = init_tracking(uri, "contra_ray")
        client = MlflowClient(uri)
        for K, seed in ((3, 0), (0, 0), (3, 1), (0, 1), (3, 2), (0, 2)):
            if (K == 3 and seed == 0) != (i == 1):  # store b holds only the K=3 seed-0 run
                continue
            run = client.create_run(exp_id, run_name=f"K{K}-s{seed}").info.run_id
            client.log_param(run, "distill.K", K)
            client.log_param(run, "distill.seed", seed)
            client.log_metric(run, "ddr/lrs", 0.2 + 0.01 * K + 0.001 * seed)
            loss = [1.0 + (0.1 if K == 0 else 0.02) * (-1) ** t * (1 + seed) for t in range(20)]
            losses[(K, seed)] = loss
            for t, v in enumerate(loss):
                client.log_metric(run, "loss", v, step=t)
                client.log_metric(run, "syn_lr", 0.01 + 0.001 * t * (-1) ** (t * K), step=t)
                for start in range(0, 2 * K, 2):  # ConTra's own segments: flat, and one swinging by 10 %
                    client.log_metric(run, f"loss/start_{start}", 1.0 + (0.1 * (-1) ** t if start == 2 else 0), step=t)
            client.set_terminated(run)
        running = client.create_run(exp_id, run_name="still-running").info.run_id  # its curve is not whole: left out
        client.log_param(running, "distill.K", 0)
        client.log_param(running, "distill.seed", 0)
        for t in range(20):
            client.log_metric(running, "loss", 5.0 * (-1) ** t + 10, step=t)
    args = ["--experiment", "contra_ray", "--tracking-uri", uris[0], "--tracking-uri", uris[1], "--group-by",
            "distill.K", "--baseline", "distill.K=0", "--metric", "ddr/lrs,loss_osc,syn_lr_path,segment_loss_osc",
            "--plot", str(tmp_path / "r.png")]
    assert report.main(args) == 0
    out = capsys.readouterr().out
    assert "contra_ray: 6 run(s) in 2 group(s) of distill.K; ddr/lrs" in out  # 5 in a.db + 1 in b.db
    lrs = [ln for ln in out.splitlines() if ln.startswith("K=3")][0]
    assert "0.231 ± 0.001" in lrs and "0.03 ± 0" in lrs  # Δ = 0.03 on every seed
    osc = {k: relative_oscillation(v) for k, v in losses.items()}
    want = sum(osc[(3, s)] - osc[(0, s)] for s in range(3)) / 3
    line = [ln for ln in out.splitlines() if ln.startswith("K=3")][1]
    assert f"{want:.4g} ±" in line
    assert "loss_osc mean ± std over seeds" in out and "syn_lr_path mean ± std over seeds" in out
    k0 = [ln for ln in out.splitlines() if ln.startswith("K=0")]
    assert k0[2].split()[3:6] == ["1", "±", "0"]  # K=0's syn_lr rises monotonically: path ratio 1
    # equal spreads of lrs (F = 1, p = 1); no F for syn_lr_path, whose values do not vary over seeds
    assert out.count("spread over seeds:") == 2 and "F(2, 2) = 1, two-sided p = 1 " in out
    assert all((tmp_path / f"r-{m}.png").is_file() for m in ("ddr_lrs", "loss_osc", "syn_lr_path"))
    # per-segment oscillation, ConTra runs only: the mean over segments 0, 2, 4 of 0, 0.1 / 1 and 0 -> 0.1 / 3
    seg = [ln for ln in out.splitlines() if ln.startswith("K=3")][3]
    assert seg.split()[3] == f"{relative_oscillation([1.0 + 0.1 * (-1) ** t for t in range(20)]) / 3:.4g}"
    assert "no paired differences: no run with segment_loss_osc matches the baseline" in out
    assert report.main(["--experiment", "contra_ray", "--tracking-uri", uris[0], "--tracking-uri", uris[1]]) == 2
    assert "pooling stores needs --group-by" in capsys.readouterr().err
    # a store given twice: its runs count once
    assert report.main([*args[:4], "--tracking-uri", uris[0], *args[4:]]) == 0
    assert "contra_ray: 6 run(s) in 2 group(s) of distill.K; ddr/lrs" in capsys.readouterr().out
    (tmp_path / "afile").write_text("")
    assert report.main([*args[:-1], str(tmp_path / "afile" / "r.png")]) == 2
    assert "--plot=" in capsys.readouterr().err
