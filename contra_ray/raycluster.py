"""Where this process's Ray comes from: one policy for every entry point (experts, evaluation, Train, Tune)."""

from __future__ import annotations

import os


def ensure_ray() -> bool:
    """Initialize Ray in this process unless it already is; True if this call started it.

    With ``$RAY_ADDRESS`` set (as inside ``ray job submit``) it connects to that cluster; otherwise it
    starts a private local instance (``address="local"``, ``num_cpus=os.cpu_count()``, no dashboard),
    never joining a cluster somebody else started with ``ray start`` on a shared host. Call ``ray.init``
    yourself first to use any other cluster.
    """
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(include_dashboard=False, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True)
    return True
