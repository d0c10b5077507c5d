"""Ranked table of a sweep's trials, read from MLflow.

``python -m contra_ray.report --experiment tune-cpu_smoke [--parent-run ID] [--tracking-uri URI]``

A sweep (:mod:`contra_ray.tune`) is one parent run (tag ``contra_ray.role=sweep``) with one child run per
trial (tag ``mlflow.parentRunId``). Without ``--parent-run`` the latest sweep of the experiment is shown.
Trials are ranked by ``final_acc`` (mean test accuracy of the final evaluation, %); trials without one
(stopped early by ASHA, failed) follow, ranked by their last proxy accuracy ``eval_acc``.

Over distillation seeds: ``python -m contra_ray.report --experiment NAME --group-by
distill.beta,distill.K,distill.R [--baseline "distill.beta=1.0,distill.K=0"]`` groups the runs of the
experiment (or of ``--parent-run``'s sweep) by those params. Per group, the runs of one distillation seed
(param ``distill.seed``) are first averaged (each run's ``final_acc`` is already a mean over evaluation
networks), then the group reports the mean and the standard deviation *over seeds* (``ddof=1``) of those
per-seed means, and the number of seeds (:func:`aggregate_by_seed`). With ``--baseline``, every group is
compared with the runs matching the baseline params, paired by seed: mean difference, its standard
deviation over pairs (``ddof=1``) and a 95 % Student-t interval ``mean ± t(0.975, n-1) * sd / sqrt(n)``
(:func:`paired_differences`; ``--within distill.soft_labels`` pairs each group with the baseline of its own
recipe). ``--metric`` aggregates other per-run metrics the same way, one table each (comma-separated:
``s_per_iter``, ``iters_to_plateau``, the fair protocol's ``ddr_acc/<key>`` and ``ddr/<score>``, and the curve
measures derived from each run's logged history, :data:`contra_ray.common.curves.HISTORY_METRICS`:
``loss_osc``, ``syn_lr_osc``, ``syn_lr_path``). With exactly two groups a line compares their spread over
seeds (:func:`spread_test`, an F-test of equal variances). ``--tracking-uri`` may be given more than once: the
runs of the experiment in every store are pooled (e.g. a set distilled elsewhere and evaluated here).
A bar chart with the seed standard deviations (and, with a baseline, the
differences with their intervals) is written atomically to ``--plot`` and logged to the parent run when
there is one. Why the seeds and not the evaluation runs: docs/EXPERIMENTS.md.

After moving or copying a ``runs/`` folder (a cluster's to a laptop): ``python -m contra_ray.report --relocate
--tracking-uri sqlite:///runs/mlflow.db`` points its artifact locations at ``runs/mlartifacts``
(:func:`contra_ray.common.artifact_root.relocate_artifacts`; every contra_ray command that opens the store
does it too), so ``mlflow ui`` shows the artifacts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from contra_ray.common.cli import cli_error
from contra_ray.common.curves import HISTORY_METRICS
from contra_ray.config import Config, ConfigError
from contra_ray.tracking import check_destinations, sqlite_path, tracking_client

__all__ = ["sweep_rows", "format_report", "parse_baseline", "t_quantile_975", "aggregate_by_seed",
           "paired_differences", "spread_test", "format_aggregate", "plot_aggregate", "main"]


def _latest_sweep(client, experiment_id: str):
    runs = client.search_runs([experiment_id], "tags.`contra_ray.role` = 'sweep'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def sweep_rows(client, experiment_id: str, parent_run_id: str) -> tuple[list[dict], list[str]]:
    """The trials of one sweep, ranked; and the searched fields.

    Returns:
        (rows with ``name, run_id, status, searched, final_acc, final_acc_std, proxy_acc, minutes``,
        searched field names).
    """
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  max_results=10000)
    searched: list[str] = []
    rows = []
    for run in children:
        if "contra_ray.superseded" in run.data.tags:  # an interrupted attempt a resumed sweep ran again
            continue
        p, m = run.data.params, run.data.metrics
        fields = json.loads(p.get("tune.searched", "[]"))
        searched += [f for f in fields if f not in searched]
        end = run.info.end_time or run.info.start_time
        rows.append({"name": run.info.run_name, "run_id": run.info.run_id, "status": run.info.status,
                     "searched": {f: p.get(f) for f in fields}, "final_acc": m.get("final_acc"),
                     "final_acc_std": m.get("final_acc_std"), "proxy_acc": m.get("eval_acc"),
                     "minutes": (end - run.info.start_time) / 60000 if end else None})
    rows.sort(key=lambda r: (r["final_acc"] is None, -(r["final_acc"] or 0.0), -(r["proxy_acc"] or -1.0), r["name"]))
    return rows, searched


def format_report(rows: list[dict], searched: list[str]) -> str:
    head = ["rank", "trial"] + [f.rsplit(".", 1)[-1] for f in searched] + ["status", "final acc (%)",
                                                                          "proxy acc (%)", "min", "run id"]
    body = []
    for i, r in enumerate(rows, 1):
        fin = f"{r['final_acc']:.2f} ± {r['final_acc_std'] or 0.0:.2f}" if r["final_acc"] is not None else "-"
        body.append([str(i), r["name"]] + [str(r["searched"].get(f, "")) for f in searched] +
                    [r["status"], fin, f"{r['proxy_acc']:.2f}" if r["proxy_acc"] is not None else "-",
                     f"{r['minutes']:.1f}" if r["minutes"] is not None else "-", r["run_id"]])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(b) for b in body])


# ---------------------------------------------------------------------------------------------- over seeds

def t_quantile_975(df: int) -> float:
    """``t(0.975, df)``, the two-sided 95 % Student-t quantile (``scipy.stats.t.ppf(0.975, df)``).

    Raises:
        ValueError: ``df < 1``.
    """
    from scipy.stats import t as student_t  # heavy import, only needed with --baseline

    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    return float(student_t.ppf(0.975, df))


def _key(value: Any) -> Any:
    """Param values compare as numbers when they parse as one ("1" == "1.0"), booleans case-insensitively
    ("True" == "true"), else as strings."""
    if str(value).lower() in ("true", "false"):
        return str(value).lower()
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def parse_baseline(text: str) -> dict[str, str]:
    """``"distill.beta=1.0,distill.K=0"`` -> ``{"distill.beta": "1.0", "distill.K": "0"}``.

    Raises:
        ValueError: an item without ``=`` or an empty name.
    """
    out = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--baseline item {item!r}: expected name=value")
        out[name.strip()] = value.strip()
    if not out:
        raise ValueError(f"--baseline {text!r}: expected name=value[,name=value...]")
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std


def _per_seed(rows: Sequence[Mapping], metric: str, seed_key: str) -> dict[Any, float]:
    by_seed: dict[Any, list[float]] = {}
    for r in rows:
        by_seed.setdefault(_key(r[seed_key]), []).append(float(r[metric]))
    return {s: sum(v) / len(v) for s, v in sorted(by_seed.items(), key=lambda kv: (str(type(kv[0])), kv[0]))}


def _usable(rows: Sequence[Mapping], metric: str, seed_key: str) -> list[Mapping]:
    out = []
    for r in rows:
        if r.get(metric) is None or (isinstance(r[metric], float) and math.isnan(r[metric])):
            continue  # no final accuracy (stopped early, failed)
        if seed_key not in r:
            raise ValueError(f"run {r.get('name', r.get('run_id', '?'))!r} has {metric} but no {seed_key} param")
        out.append(r)
    return out


def _label(group: Mapping[str, Any]) -> str:
    return ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in group.items())


def aggregate_by_seed(rows: Sequence[Mapping], group_by: Sequence[str], metric: str = "final_acc",
                      seed_key: str = "distill.seed") -> list[dict]:
    """Mean and spread over distillation seeds, per group of ``group_by`` param values.

    Args:
        rows: one dict per run: params (MLflow strings, e.g. ``"distill.beta": "0.2"``) and ``metric``
            (``None``/missing for runs without it, which are skipped).
        group_by: param names defining a group; values compare numerically when they parse as numbers.
        metric: the per-run accuracy (``final_acc``: already the mean over that run's evaluation networks).
        seed_key: the distillation seed param.

    Returns:
        One dict per group, in order of the group values: ``group`` (name -> first-seen value),
        ``label``, ``seeds`` (seed -> mean of that seed's runs), ``n_seeds``, ``n_runs``, ``mean`` (of the
        per-seed means) and ``std`` (their standard deviation over seeds, ``ddof=1``; ``None`` for one seed).

    Raises:
        ValueError: a run with the metric lacks ``seed_key`` or a ``group_by`` param.
    """
    groups: dict[tuple, list[Mapping]] = {}
    shown: dict[tuple, dict] = {}
    for r in _usable(rows, metric, seed_key):
        missing = [k for k in group_by if k not in r]
        if missing:
            raise ValueError(f"run {r.get('name', r.get('run_id', '?'))!r} has no param {missing[0]!r}")
        key = tuple(_key(r[k]) for k in group_by)
        groups.setdefault(key, []).append(r)
        shown.setdefault(key, {k: r[k] for k in group_by})
    out = []
    for key in sorted(groups, key=lambda k: tuple((str(type(v)), v) for v in k)):
        seeds = _per_seed(groups[key], metric, seed_key)
        mean, std = _mean_std(list(seeds.values()))
        out.append({"group": shown[key], "label": _label(shown[key]), "seeds": seeds, "n_seeds": len(seeds),
                    "n_runs": len(groups[key]), "mean": mean, "std": std})
    return out


def paired_differences(rows: Sequence[Mapping], group_by: Sequence[str], baseline: Mapping[str, Any],
                       metric: str = "final_acc", seed_key: str = "distill.seed",
                       within: Sequence[str] = ()) -> list[dict]:
    """Each group minus the baseline, paired by distillation seed, with a 95 % t interval.

    The baseline is every run whose params match all of ``baseline`` (numerically when they parse as
    numbers); params of ``group_by`` it does not name are free (e.g. R when K = 0), and its runs of one
    seed are averaged. ``within`` (params of ``group_by``) splits the comparison: a group is compared with
    the baseline runs that share its values of those params (Table 3: ``within=["distill.soft_labels"]``
    compares MTT+CT with MTT and DATM+CT with DATM, never across recipes). For a group,
    ``d_s = mean_group(s) - mean_baseline(s)`` over the seeds both have;
    ``mean`` and ``std`` (``ddof=1``) of the ``d_s``, and ``mean ± t(0.975, n-1) * std / sqrt(n)``.
    The compared groups are formed from the runs that do not match the baseline.

    Returns:
        One dict per group (order of :func:`aggregate_by_seed`): ``group``, ``label``, ``n_pairs``,
        ``diffs`` (seed -> d_s), ``unpaired`` (the group's seeds without a baseline run), ``mean``, ``std``,
        ``ci_low``, ``ci_high`` (``None`` below 2 pairs; ``mean`` too with no pair).

    Raises:
        ValueError: no run matches ``baseline`` (or, with ``within``, none shares a group's values), or a
            ``within`` param is not in ``group_by``.
    """
    for k in within:
        if k not in group_by:
            raise ValueError(f"--within {k}: not one of the --group-by params {', '.join(group_by)}")
    usable = _usable(rows, metric, seed_key)
    want = {k: _key(v) for k, v in baseline.items()}
    is_base = [all(k in r and _key(r[k]) == v for k, v in want.items()) for r in usable]
    base_rows = [r for r, b in zip(usable, is_base) if b]
    if not base_rows:
        raise ValueError(f"no run with {metric} matches the baseline {dict(baseline)}")
    out = []
    for agg in aggregate_by_seed([r for r, b in zip(usable, is_base) if not b], group_by, metric, seed_key):
        same = [r for r in base_rows if all(k in r and _key(r[k]) == _key(agg["group"][k]) for k in within)]
        if not same:
            raise ValueError(f"no baseline run {dict(baseline)} has {_label({k: agg['group'][k] for k in within})}")
        base = _per_seed(same, metric, seed_key)
        diffs = {s: v - base[s] for s, v in agg["seeds"].items() if s in base}
        n = len(diffs)
        mean, std = _mean_std(list(diffs.values())) if n else (None, None)
        half = t_quantile_975(n - 1) * std / math.sqrt(n) if std is not None else None
        out.append({"group": agg["group"], "label": agg["label"], "n_pairs": n, "diffs": diffs,
                    "unpaired": [s for s in agg["seeds"] if s not in base], "mean": mean, "std": std,
                    "ci_low": mean - half if half is not None else None,
                    "ci_high": mean + half if half is not None else None})
    return out


def _fmt(v: float | None, digits: int | str = 2) -> str:
    """``v`` with ``digits`` decimals, or in the format ``digits`` names (``".4g"``); ``-`` for ``None``."""
    if v is None:
        return "-"
    return f"{v:{digits}}" if isinstance(digits, str) else f"{v:.{digits}f}"


def _digits(metric: str) -> int | str:
    """How values show: 2 decimals for accuracies and times (percent, seconds), else 4 significant digits."""
    return 2 if "acc" in metric or metric.startswith("s_per") or metric == "iters_to_plateau" else ".4g"


def spread_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Do two groups differ in their spread over seeds? Two-sided F-test of equal variances: ``F = s_a^2 / s_b^2``
    (``ddof=1``) against F(n_a - 1, n_b - 1), ``p = 2 min(P(F' <= F), P(F' >= F))`` (``scipy.stats.f``). It
    assumes normally distributed per-seed values, and with 3 seeds per group it detects only very large ratios
    (F(2, 2) needs a ratio above 39 for p < 0.05).

    Returns:
        ``{"F", "df": (n_a - 1, n_b - 1), "p"}``; ``F`` and ``p`` are ``None`` when a group has fewer than 2
        values or ``s_b = 0``.
    """
    from scipy.stats import f as f_dist

    df = (len(a) - 1, len(b) - 1)
    if min(df) < 1:
        return {"F": None, "df": df, "p": None}
    va, vb = _mean_std(list(a))[1] ** 2, _mean_std(list(b))[1] ** 2
    if vb == 0:
        return {"F": None, "df": df, "p": None}
    F = va / vb
    cdf = float(f_dist.cdf(F, *df))
    return {"F": F, "df": df, "p": min(1.0, 2 * min(cdf, 1 - cdf))}


def format_aggregate(aggs: Sequence[dict], diffs: Sequence[dict] | None = None,
                     baseline: Mapping[str, Any] | None = None, metric: str = "final_acc") -> str:
    """Table: group, seeds, runs, mean ± std over seeds; with ``diffs`` also Δ vs baseline and its 95 % CI."""
    by_label = {d["label"]: d for d in diffs or []}
    head = ["group", "seeds", "runs", f"{'acc (%)' if metric == 'final_acc' else metric} mean ± std over seeds"]
    if diffs is not None:
        head += ["pairs", "Δ vs baseline", "95% CI (t)"]
    body = []
    k = _digits(metric)
    for a in aggs:
        row = [a["label"], str(a["n_seeds"]), str(a["n_runs"]), f"{_fmt(a['mean'], k)} ± {_fmt(a['std'], k)}"]
        if diffs is not None:
            d = by_label.get(a["label"])
            if d is None:
                row += ["", "baseline", ""]
            else:
                ci = f"[{_fmt(d['ci_low'], k)}, {_fmt(d['ci_high'], k)}]" if d["ci_low"] is not None else "-"
                row += [str(d["n_pairs"]), f"{_fmt(d['mean'], k)} ± {_fmt(d['std'], k)}" if d["n_pairs"] else "-",
                        ci]
        body.append(row)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(b) for b in body]
    lines.append(f"std: over distillation seeds of the per-seed mean {metric} (ddof=1)")
    if diffs is not None and baseline:
        lines.append(f"Δ: minus the baseline runs ({_label(baseline)}), paired by seed; mean ± std (ddof=1); "
                     "CI = mean ± t(0.975, n-1)·std/√n")
    return "\n".join(lines)


def plot_aggregate(aggs: Sequence[dict], diffs: Sequence[dict] | None, path: str | os.PathLike,
                   title: str, metric: str = "final_acc") -> Path:
    """Bar chart of the per-group mean with ± std-over-seeds error bars (and the per-seed means as dots);
    with ``diffs`` a second panel of the paired differences with their 95 % t intervals. Written
    atomically (temporary file + ``os.replace``) with matplotlib's Agg canvas; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = 2 if diffs else 1
    fig = Figure(figsize=(max(5.0, 0.9 * len(aggs) + 2), 3.6 * panels), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(panels, 1, 1)
    xs = range(len(aggs))
    ax.bar(xs, [a["mean"] for a in aggs], yerr=[a["std"] or 0.0 for a in aggs], capsize=4, color="tab:blue",
           alpha=0.7)
    for x, a in zip(xs, aggs):
        ax.plot([x] * a["n_seeds"], list(a["seeds"].values()), "k.", markersize=4)
    ax.set_xticks(list(xs), [f"{a['label']}\n(n={a['n_seeds']})" for a in aggs], fontsize=7)
    ax.set_ylabel("final acc (%)" if metric == "final_acc" else metric)
    ax.set_title(f"{title}: mean ± std over distillation seeds")
    if diffs:
        ax2 = fig.add_subplot(2, 1, 2)
        ok = [d for d in diffs if d["mean"] is not None]
        lo = [d["mean"] - d["ci_low"] if d["ci_low"] is not None else 0.0 for d in ok]
        hi = [d["ci_high"] - d["mean"] if d["ci_high"] is not None else 0.0 for d in ok]
        ax2.bar(range(len(ok)), [d["mean"] for d in ok], yerr=[lo, hi], capsize=4, color="tab:orange", alpha=0.7)
        ax2.axhline(0.0, color="k", linewidth=0.8)
        ax2.set_xticks(list(range(len(ok))), [f"{d['label']}\n(pairs={d['n_pairs']})" for d in ok], fontsize=7)
        ax2.set_ylabel("Δ final acc (pp)" if metric == "final_acc" else f"Δ {metric}")
        ax2.set_title("paired difference vs baseline, 95% t interval")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        fig.savefig(str(tmp), format=(path.suffix.lstrip(".") or "png"))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def run_rows(client, experiment_id: str, parent_run_id: str | None = None,
             derive: Sequence[str] = ()) -> list[dict]:
    """One flat dict per run (params, ``final_acc``-style metrics, ``name``, ``run_id``, ``parent``): the
    children of ``parent_run_id``, or every run of the experiment; never sweep parents nor experts' runs
    (:meth:`contra_ray.tracking.RunLogger.log_expert`). ``derive``: names of
    :data:`~contra_ray.common.curves.HISTORY_METRICS` computed from each run's logged history (runs without
    that history get none)."""
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'" if parent_run_id else ""
    rows = []
    for run in client.search_runs([experiment_id], query, max_results=50000):
        if run.data.tags.get("contra_ray.role") in ("sweep", "expert"):
            continue
        row = {**run.data.params, **run.data.metrics, "name": run.info.run_name, "run_id": run.info.run_id,
               "parent": run.data.tags.get("mlflow.parentRunId")}
        histories: dict[str, list[float]] = {}
        for name in derive if run.info.status == "FINISHED" else ():  # a running run's curve is not whole
            pattern, fn = HISTORY_METRICS[name]
            series = ([k for k in sorted(run.data.metrics) if k.startswith(pattern[:-1])] if pattern.endswith("*")
                      else [pattern])
            for key in series:
                if key not in histories:
                    steps = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
                    histories[key] = list({m.step: m.value for m in steps}.values())  # a replayed step: its last
            values = [fn(histories[k]) for k in series if histories[k]]
            if values:
                row[name] = sum(values) / len(values)
        rows.append(row)
    return rows


def _aggregate_cli(args, stores: Sequence[tuple[str, Any, Any]]) -> int:
    """``--group-by``: one table per ``--metric`` over the runs of the experiment in every store
    (``(uri, client, experiment)``)."""
    group_by = [g.strip() for g in args.group_by.split(",") if g.strip()]
    metrics = [m.strip() for m in args.metric.split(",") if m.strip()]
    try:
        baseline = parse_baseline(args.baseline) if args.baseline else None
        within = [w.strip() for w in (args.within or "").split(",") if w.strip()]
        if within and not baseline:
            raise ValueError("--within needs --baseline")
        if not metrics:
            raise ValueError(f"--metric={args.metric!r}: name at least one metric")
    except ValueError as e:
        return cli_error(e)
    derive = [m for m in metrics if m in HISTORY_METRICS]
    rows, seen = [], set()
    for _, client, exp in stores:  # a store given twice (or a copy beside its original) counts its runs once
        for r in run_rows(client, exp.experiment_id, args.parent_run, derive):
            if r["run_id"] not in seen:
                seen.add(r["run_id"])
                rows.append(r)
    tables = []
    for metric in metrics:
        unpaired = None
        try:
            aggs = aggregate_by_seed(rows, group_by, metric, args.seed_key)
            diffs = paired_differences(rows, group_by, baseline, metric, args.seed_key, within) if baseline else None
        except ValueError as e:
            if len(metrics) == 1 or not str(e).startswith("no run with"):
                return cli_error(e)
            diffs, unpaired = None, str(e)  # e.g. segment_loss_osc: concurrent runs only
        if not aggs:
            return cli_error(f"no run in {args.experiment!r} has a {metric} metric")
        spread = None
        if len(aggs) == 2:
            spread = spread_test(list(aggs[0]["seeds"].values()), list(aggs[1]["seeds"].values()))
        tables.append((metric, aggs, diffs, spread, unpaired))
    if args.json:
        print(json.dumps({m: {"groups": a, "differences": d, "spread": sp} for m, a, d, sp, _ in tables}
                         if len(tables) > 1 else {"groups": tables[0][1], "differences": tables[0][2],
                                                  "spread": tables[0][3]}, indent=2, default=str))
        return 0
    out = Config(output_dir=args.output_dir) if args.output_dir else Config()
    parents = {r["parent"] for r in rows if any(r.get(m) is not None for m in metrics)}
    parent = args.parent_run or (next(iter(parents)) if len(parents) == 1 else None)
    for metric, aggs, diffs, spread, unpaired in tables:
        print(f"{args.experiment}: {sum(a['n_runs'] for a in aggs)} run(s) in {len(aggs)} group(s) of "
              f"{', '.join(group_by)}" + (f"; {metric}" if len(tables) > 1 else ""))
        print(format_aggregate(aggs, diffs, baseline, metric))
        if unpaired:
            print(f"no paired differences: {unpaired}")
        if spread is not None and spread["F"] is not None:
            k = _digits(metric)
            print(f"spread over seeds: std {_fmt(aggs[0]['std'], k)} ({aggs[0]['label']}) vs "
                  f"{_fmt(aggs[1]['std'], k)} ({aggs[1]['label']}): F({spread['df'][0]}, {spread['df'][1]}) = "
                  f"{spread['F']:.3g}, two-sided p = {spread['p']:.3g} (F-test of equal variances)")
        if min(a["n_seeds"] for a in aggs) < 3:
            print("note: some groups have fewer than 3 distillation seeds; their spread is not a reliable "
                  "uncertainty (docs/EXPERIMENTS.md)")
        name = f"report-{args.experiment}" + (f"-{metric.replace('/', '_')}" if len(tables) > 1 else "")
        plot = Path(args.plot or out.run_dir().parent / f"{name}.png")
        if args.plot and len(tables) > 1:
            plot = plot.with_name(f"{plot.stem}-{metric.replace('/', '_')}{plot.suffix}")
        try:
            plot_aggregate(aggs, diffs, plot, args.experiment, metric)
        except OSError as e:
            return cli_error(f"--plot={str(plot)!r}: cannot be written ({e.strerror or e})")
        if parent:
            stores[0][1].log_artifact(parent, str(plot), "report")
            print(f"plot: {plot} (logged to parent run {parent} under report/)\n")
        else:
            print(f"plot: {plot}\n")
    return 0


def _check_readable_store(uri: str) -> None:
    """Before any query: a report only reads, so a missing SQLite file is an error (MLflow would create an
    empty store) and an HTTP server must answer within seconds (MLflow's client retries for minutes).

    Raises:
        ConfigError: naming ``--tracking-uri`` and why.
    """
    db = sqlite_path(uri) if uri.lower().startswith("sqlite") else None
    if db is None:
        check_destinations(None, uri)  # the scheme is known, a server answers
    elif not db.is_file():
        raise ConfigError(f"--tracking-uri={uri!r}: no such SQLite store ({db})")
    else:
        with open(db, "rb") as f:
            if f.read(16) not in (b"", b"SQLite format 3\x00"):
                raise ConfigError(f"--tracking-uri={uri!r}: {db} is not an SQLite database")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m contra_ray.report", description=__doc__.split("\n")[0])
    p.add_argument("--experiment", default=None, help="MLflow experiment of the sweep (tune-<space name>); "
                   "required unless --relocate")
    p.add_argument("--relocate", action="store_true",
                   help="only point a moved SQLite store's artifact locations at <its folder>/mlartifacts (run it "
                        "after copying runs/ elsewhere, before mlflow ui) and exit")
    p.add_argument("--parent-run", default=None, help="sweep (parent) run id (default: the latest sweep)")
    p.add_argument("--tracking-uri", action="append", default=None,
                   help="MLflow store (default: sqlite:///<output-dir>/mlflow.db; for an s3://... output dir, in this "
                        "node's mirror of it); with --group-by repeatable: the experiment's runs in every store are "
                        "pooled")
    p.add_argument("--output-dir", default=None, help="the sweeps' --output-dir, a path or a URI whose SQLite store "
                   "is in this node's mirror (default: runs)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--group-by", default=None,
                   help="comma-separated params (e.g. distill.beta,distill.K,distill.R): aggregate the runs over "
                        "distillation seeds per group instead of ranking one sweep's trials (default: rank)")
    p.add_argument("--baseline", default=None,
                   help='with --group-by: params of the baseline runs, e.g. "distill.beta=1.0,distill.K=0"; '
                        "adds paired differences by seed with 95%% t intervals (default: none)")
    p.add_argument("--within", default=None,
                   help="with --baseline: comma-separated --group-by params; each group is compared with the "
                        "baseline runs that share its values of them, e.g. distill.soft_labels (default: none)")
    p.add_argument("--metric", default="final_acc",
                   help="with --group-by: comma-separated per-run metrics to aggregate, one table each, e.g. "
                        "s_per_iter, ddr/lrs, ddr_acc/syn_hard, or loss_osc, syn_lr_osc, syn_lr_path (derived from "
                        "each run's logged history) (default: final_acc)")
    p.add_argument("--seed-key", default="distill.seed", help="param holding the distillation seed "
                   "(default: distill.seed)")
    p.add_argument("--plot", default=None,
                   help="with --group-by: PNG path of the bar chart; with several --metric values one chart each, "
                        "<stem>-<metric>.png (default: runs/report-<experiment>[-<metric>].png)")
    args = p.parse_args(argv)
    if not args.experiment and not args.relocate:
        p.error("the following arguments are required: --experiment")
    base = Config(output_dir=args.output_dir) if args.output_dir else Config()
    uris = args.tracking_uri or [base.tracking_uri()]
    uri = uris[0]
    try:
        if len(uris) > 1 and not args.group_by:
            raise ConfigError(f"--tracking-uri given {len(uris)} times: pooling stores needs --group-by")
        for u in uris:
            _check_readable_store(u)
        if args.relocate and sqlite_path(uri) is None:
            raise ConfigError(f"--tracking-uri={uri!r}: --relocate rewrites a SQLite store (sqlite:///PATH)")
    except ConfigError as e:
        return cli_error(e)
    if args.relocate:
        from contra_ray.common.artifact_root import relocate_artifacts

        moved = relocate_artifacts(sqlite_path(uri))
        for old, new in moved.items():
            print(f"artifacts: {old} -> {new}")
        print(f"{len(moved)} experiment(s) relocated in {sqlite_path(uri)}")
        return 0
    stores = []
    for u in uris:
        c = tracking_client(u)
        e = c.get_experiment_by_name(args.experiment)
        if e is None:
            return cli_error(f"--experiment {args.experiment!r}: no such experiment in {u}")
        stores.append((u, c, e))
    _, client, exp = stores[0]
    if args.group_by:
        if args.parent_run:
            from mlflow.exceptions import MlflowException

            try:
                client.get_run(args.parent_run)
            except MlflowException:
                return cli_error(f"--parent-run {args.parent_run!r}: no such run in {uri}")
        return _aggregate_cli(args, stores)
    if args.baseline:
        print("error: --baseline needs --group-by", file=sys.stderr)
        return 2
    if args.parent_run:
        from mlflow.exceptions import MlflowException

        try:
            parent = client.get_run(args.parent_run)
        except MlflowException:
            return cli_error(f"--parent-run {args.parent_run!r}: no such run in {uri}")
    else:
        parent = _latest_sweep(client, exp.experiment_id)
    if parent is None:
        return cli_error(f"experiment {args.experiment!r} has no sweep run in {uri}")
    rows, searched = sweep_rows(client, exp.experiment_id, parent.info.run_id)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    best = parent.data.metrics.get("best_final_acc")
    print(f"sweep {parent.info.run_name} (run {parent.info.run_id}, {parent.info.status}): {len(rows)} trial(s)"
          + (f", best final accuracy {best:.2f}%" if best is not None else ""))
    print(format_report(rows, searched))
    return 0


if __name__ == "__main__":
    sys.exit(main())
