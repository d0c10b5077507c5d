"""Where this process's Ray comes from: one policy for every entry point (experts, evaluation, Train, Tune)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from contra_ray.common import storage
from contra_ray.config import ConfigError

__all__ = ["ensure_ray", "available_cpus", "cgroup_cpu_limit", "check_locations_on_nodes", "LocationNotShared",
           "NUM_CPUS_ENV"]

NUM_CPUS_ENV = "CONTRA_RAY_NUM_CPUS"


def cgroup_cpu_limit(cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
                     proc_cgroup: str | os.PathLike = "/proc/self/cgroup") -> int | None:
    """CPUs allowed by the tightest CFS quota on this process's cgroup and its ancestors, or ``None``.

    cgroup v1 (a ``cpu`` controller line in ``proc_cgroup``): ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
    (quota ``-1`` = unlimited) under the mounted ``cpu`` hierarchy (``cpu`` or ``cpu,cpuacct``). cgroup v2
    (the ``0::PATH`` line): ``cpu.max`` = ``"QUOTA PERIOD"`` (``"max ..."`` = unlimited). Each level from
    the process's cgroup up to the mount root is read (a parent's quota binds its children); when the
    process's path is not visible under the mount (a container's namespace) only the mount root is read.

    Args:
        cgroup_root: the cgroup mount (a parameter so tests can use a fake tree).
        proc_cgroup: the process's cgroup membership file.

    Returns:
        ``max(1, ceil(quota / period))`` of the smallest quota, or ``None`` when no level sets one (or the
        files cannot be read).
    """
    root = Path(cgroup_root)
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    v1_path = v2_path = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if "cpu" in controllers.split(","):
            v1_path = path
        elif parts[0] == "0" and controllers == "":
            v2_path = path
    limits: list[float] = []
    if v1_path is not None:
        mounts = [d for d in (root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu") if d.is_dir()]
        for base in mounts[:1]:
            for d in _levels(base, v1_path):
                quota, period = _read_ints(d / "cpu.cfs_quota_us"), _read_ints(d / "cpu.cfs_period_us")
                if quota and period and quota[0] > 0 and period[0] > 0:
                    limits.append(quota[0] / period[0])
    elif v2_path is not None:
        for d in _levels(root, v2_path):
            try:
                quota, period = (d / "cpu.max").read_text().split()[:2]
            except (OSError, ValueError):
                continue
            if quota != "max" and quota.isdigit() and period.isdigit() and int(period) > 0:
                limits.append(int(quota) / int(period))
    return max(1, math.ceil(min(limits))) if limits else None


def _levels(base: Path, path: str) -> list[Path]:
    """``base/path`` and its ancestors up to ``base`` (just ``base`` when ``base/path`` does not exist)."""
    d = base / path.strip("/")
    if not d.is_dir():
        return [base]
    out = [d]
    while d != base:
        d = d.parent
        out.append(d)
    return out


def _read_ints(path: Path) -> list[int] | None:
    try:
        return [int(x) for x in path.read_text().split()]
    except (OSError, ValueError):
        return None


def available_cpus(cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
                   proc_cgroup: str | os.PathLike = "/proc/self/cgroup") -> int:
    """CPUs this process may use: ``$CONTRA_RAY_NUM_CPUS`` if set, else the CPUs of its affinity mask
    (``len(os.sched_getaffinity(0))``, so ``taskset -c 0`` gives 1) capped by the cgroup CPU quota
    (:func:`cgroup_cpu_limit`), at least 1. ``os.cpu_count()`` counts the machine's CPUs instead.

    Raises:
        ValueError: ``$CONTRA_RAY_NUM_CPUS`` is not an integer >= 1 (names it and its value).
    """
    env = os.environ.get(NUM_CPUS_ENV)
    if env is not None and env.strip() != "":
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{NUM_CPUS_ENV}={env!r}: expected an integer >= 1 (CPUs for the local Ray instance)")
        return n
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    return max(1, min(n, limit) if limit is not None else n)


def ensure_ray() -> bool:
    """Initialize Ray in this process unless it already is; True if this call started it.

    With ``$RAY_ADDRESS`` set (as inside ``ray job submit``) it connects to that cluster, whose CPUs are
    what they are; otherwise it starts a private local instance (``address="local"``, no dashboard) with
    ``num_cpus=available_cpus()`` (``$CONTRA_RAY_NUM_CPUS``, else the affinity mask capped by the cgroup
    quota), never joining a cluster somebody else started with ``ray start`` on a shared host. Call
    ``ray.init`` yourself first to use any other cluster.

    Raises:
        ValueError: ``$CONTRA_RAY_NUM_CPUS`` is malformed (see :func:`available_cpus`).
    """
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(include_dashboard=False, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=available_cpus(), include_dashboard=False, log_to_driver=True)
    return True


class LocationNotShared(ConfigError):
    """A Ray node cannot see a folder the run shares between nodes (names the node, the field and the path)."""


def _probe_on_node(probes: dict[str, str], token: str, reply_suffix: str) -> dict[str, str]:
    """Ray task body: read each probe file's token and write a reply beside it; ``{field: problem}``.
    A probe may be a URI (object storage, :mod:`contra_ray.common.storage`)."""
    from contra_ray.common import storage

    problems = {}
    for field, probe in probes.items():
        try:
            if storage.read_bytes(probe).decode() != token:
                problems[field] = "sees another file at the probe's path"
                continue
            storage.write_bytes(probe + reply_suffix, token.encode())
        except FileNotFoundError:
            problems[field] = ("does not see the files the driver wrote there (a node-local folder?)"
                               if not storage.is_uri(probe) else "does not see the object the driver wrote there")
        except storage.StorageError as e:
            problems[field] = f"cannot read or write there ({e})"
        except OSError as e:
            problems[field] = f"cannot write there ({e.strerror or e})"
    return problems


def check_locations_on_nodes(locations: dict[str, str | os.PathLike], timeout_s: float = 120.0) -> int:
    """Before any worker starts: one tiny task on every alive Ray node checks that it reads the files the
    driver writes in each of ``locations`` and that the driver reads what it writes there, so a folder that
    is node-local (not shared) is caught before the work, not by a worker after it. Connects to Ray
    (:func:`ensure_ray`) if needed; leaves no files behind.

    Args:
        locations: ``{config field: folder}`` (created if missing), e.g. ``{"output_dir": "/nfs/runs"}``.

    Returns:
        The number of nodes checked.

    Raises:
        LocationNotShared: naming each node (IP), field and folder that failed, and what to do.
    """
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ensure_ray()
    token = uuid.uuid4().hex
    probes, created = {}, []
    for field, folder in locations.items():
        if storage.is_uri(folder):  # object storage: every node must reach it with its own credentials
            probes[field] = storage.join(folder, f".contra_ray-probe-{token}")
            storage.write_bytes(probes[field], token.encode())
            continue
        d = Path(folder).expanduser().resolve()
        missing = [p for p in (d, *d.parents) if not p.exists()]
        d.mkdir(parents=True, exist_ok=True)
        created += missing  # removed again if the check fails: a refused run leaves nothing behind
        probes[field] = str(d / f".contra_ray-probe-{token}")
        Path(probes[field]).write_text(token)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    task = ray.remote(_probe_on_node)
    try:
        refs = {n["NodeID"]: task.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                    n["NodeID"], soft=False)).remote(probes, token, f".{n['NodeID'][:12]}") for n in nodes}
        problems = []
        for n in nodes:
            where = f"node {n.get('NodeManagerAddress', '?')} (id {n['NodeID'][:8]})"
            try:
                found = ray.get(refs[n["NodeID"]], timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                problems.append(f"{where}: no answer within {timeout_s:g} s")
                continue
            for field, probe in probes.items():
                if field in found:
                    problems.append(f"{where} {found[field]}: {field}={locations[field]!s}")
                elif not storage.exists(probe + f".{n['NodeID'][:12]}"):
                    problems.append(f"{where} wrote into {field}={locations[field]!s} but this node does not see it")
    finally:
        for probe in probes.values():
            if storage.is_uri(probe):
                for n in [*nodes, {"NodeID": ""}]:
                    storage.delete(probe + (f".{n['NodeID'][:12]}" if n["NodeID"] else ""))
                continue
            for f in Path(probe).parent.glob(Path(probe).name + "*"):
                f.unlink(missing_ok=True)
    if problems:
        for d in sorted(set(created), key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()
            except OSError:
                pass  # not empty: something else wrote there meanwhile
        raise LocationNotShared("; ".join(problems) + ". Every node of the cluster must see the run's locations: use "
                               "object storage (--output-dir s3://bucket/runs, gs://...; credentials on every node) "
                               "or a folder every node mounts (NFS, EFS, a ReadWriteMany volume)")
    return len(nodes)
