"""Artifact locations of a SQLite MLflow store that follow the store when its folder moves.

MLflow 3 records absolute artifact locations: ``create_experiment`` resolves a relative ``artifact_location``
against the current directory (``mlflow.utils.uri.resolve_uri_if_local``), every run stores
``<experiment location>/<run id>/artifacts`` in ``runs.artifact_uri``, and the proxied ``mlflow-artifacts:/``
scheme needs an HTTP tracking server (a ``sqlite:///`` client refuses it). So a ``runs/`` folder copied from a
cluster to a laptop lists no artifacts until its locations are rewritten; a relative location written into the
database would resolve against whatever directory ``mlflow ui`` is started from. :func:`relocate_artifacts`
rewrites them (stdlib ``sqlite3``, no MLflow import): every contra_ray store opening
(``contra_ray.tracking.init_tracking`` / ``tracking_client``) calls it, and ``python -m contra_ray.report
--relocate`` does it before ``mlflow ui``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["ARTIFACT_DIR", "artifact_root", "relocate_artifacts"]

#: contra_ray's artifact folder of a SQLite store, beside the database (``<db dir>/mlartifacts``)
ARTIFACT_DIR = "mlartifacts"


def artifact_root(db: str | Path) -> str:
    """``file://`` URI of ``<db's directory>/mlartifacts`` (absolute, symlinks resolved)."""
    return (Path(db).parent.resolve() / ARTIFACT_DIR).as_uri()


def _moved_root(location: str | None, root: str) -> bool:
    """An ``.../mlartifacts`` location (``file:`` URI or absolute path: the layout contra_ray gives every
    experiment of a SQLite store) other than ``root``."""
    if not location or location.rstrip("/") == root:
        return False
    if location.startswith("file:") or location.startswith("/"):
        return location.rstrip("/").rsplit("/", 1)[-1] == ARTIFACT_DIR
    return False


def relocate_artifacts(db: str | Path) -> dict[str, str]:
    """Point the experiments of the SQLite MLflow store ``db`` whose artifact location is another folder's
    ``mlartifacts`` (the store was moved or copied) at :func:`artifact_root` ``(db)``, and rewrite the same
    prefix of their runs' ``artifact_uri`` and logged models' ``artifact_location``, in one transaction.
    Experiments elsewhere (a bucket, the default experiment's ``mlruns``) are left alone. Idempotent; a missing
    database or one without MLflow's tables changes nothing.

    Returns:
        ``{old location: new location}`` of the experiments rewritten (empty when nothing moved).

    Raises:
        sqlite3.Error: the database cannot be read or written (locked past 60 s, read-only, corrupt).
    """
    db = Path(db)
    if not db.is_file():
        return {}
    root = artifact_root(db)
    con = sqlite3.connect(db, timeout=60)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "experiments" not in tables:
            return {}
        moved = [(i, loc) for i, loc in con.execute("SELECT experiment_id, artifact_location FROM experiments")
                 if _moved_root(loc, root)]
        rewrites = [("runs", "artifact_uri")] + ([("logged_models", "artifact_location")]
                                                  if "logged_models" in tables else [])
        with con:
            for exp_id, loc in moved:
                old = loc.rstrip("/")
                con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (root, exp_id))
                for table, column in rewrites:
                    con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                                f"WHERE experiment_id = ? AND substr({column}, 1, ?) = ?",
                                (root, len(old) + 1, exp_id, len(old) + 1, old + "/"))
        return {loc: root for _, loc in moved}
    finally:
        con.close()
