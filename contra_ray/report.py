"""Ranked table of a sweep's trials, read from MLflow.

``python -m contra_ray.report --experiment tune-cpu_smoke [--parent-run ID] [--tracking-uri URI]``

A sweep (:mod:`contra_ray.tune`) is one parent run (tag ``contra_ray.role=sweep``) with one child run per
trial (tag ``mlflow.parentRunId``). Without ``--parent-run`` the latest sweep of the experiment is shown.
Trials are ranked by ``final_acc`` (mean test accuracy of the final evaluation, %); trials without one
(stopped early by ASHA, failed) follow, ranked by their last proxy accuracy ``eval_acc``.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["sweep_rows", "format_report", "main"]


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


def main(argv: list[str] | None = None) -> int:
    from .config import Config
    from .tracking import tracking_client

    p = argparse.ArgumentParser(prog="python -m contra_ray.report", description=__doc__.split("\n")[0])
    p.add_argument("--experiment", required=True, help="MLflow experiment of the sweep (tune-<space name>)")
    p.add_argument("--parent-run", default=None, help="sweep (parent) run id (default: the latest sweep)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite:///runs/mlflow.db)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = p.parse_args(argv)
    uri = args.tracking_uri or Config().tracking_uri()
    client = tracking_client(uri)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        print(f"error: --experiment {args.experiment!r}: no such experiment in {uri}", file=sys.stderr)
        return 2
    if args.parent_run:
        from mlflow.exceptions import MlflowException

        try:
            parent = client.get_run(args.parent_run)
        except MlflowException:
            print(f"error: --parent-run {args.parent_run!r}: no such run in {uri}", file=sys.stderr)
            return 2
    else:
        parent = _latest_sweep(client, exp.experiment_id)
    if parent is None:
        print(f"error: experiment {args.experiment!r} has no sweep run in {uri}", file=sys.stderr)
        return 2
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
