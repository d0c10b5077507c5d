"""Where a run's files may live: the checks :meth:`contra_ray.config.Config.validate` applies to its location
fields (``output_dir``, ``data.cache_dir``, ``experts.store``, ...), and the Ray job working dir they must not
resolve into. Plain paths and :mod:`contra_ray.common.storage` URIs; no config objects."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from contra_ray.common import storage

__all__ = ["ray_job_working_dir", "check_location_fields"]


def ray_job_working_dir(cwd: str | None = None) -> Path | None:
    """The folder Ray unpacked a job's ``--working-dir`` into, when this process runs in one (its working
    directory lies under ``.../runtime_resources/working_dir_files/``); else ``None``. Relative paths there
    resolve into a temporary folder that is deleted with the job."""
    parts = Path(cwd or os.getcwd()).resolve().parts
    for i in range(len(parts) - 2):
        if parts[i:i + 2] == ("runtime_resources", "working_dir_files"):
            return Path(*parts[:i + 3]) if i + 2 < len(parts) else Path(*parts[:i + 2])
    return None


def check_location_fields(locations: Iterable[tuple[str, str | None]], uri_fields: Iterable[str],
                          job_dir: Path | None) -> None:
    """Check each ``(field, location)`` (``None`` or empty: skipped): a URI only in ``uri_fields`` and with a scheme
    :func:`contra_ray.common.storage.check_location` opens; a local path absolute inside a Ray job's working dir
    ``job_dir`` (:func:`ray_job_working_dir`) and, except ``data.root``, not a file.

    Raises:
        StorageError: ``<field>=<value>: <why>`` for the first location that fails.
    """
    def bad(field: str, value, why: str) -> None:
        raise storage.StorageError(f"{field}={value!r}: {why}")

    uri_fields = tuple(uri_fields)
    for field, path in locations:
        if not path:
            continue
        if field in uri_fields or not storage.URI_SCHEME.match(str(path)):
            storage.check_location(field, path)
            if storage.is_uri(path):
                continue
        else:
            bad(field, path, "a URI is not supported for this field: give a local path (on a multi-node "
                             "cluster the driver prepares the data once and workers receive it through Ray's "
                             "object store; a streamed data set through data.shared_cache, which may be a URI)")
        if job_dir is not None and not os.path.isabs(os.path.expanduser(str(path))):
            bad(field, path, f"a relative path inside a Ray job with a working dir resolves into Ray's "
                             f"temporary unpack folder {job_dir}, deleted with the job; give an absolute path "
                             "(on a cluster, a folder every node mounts)")
        if field != "data.root" and os.path.exists(os.path.expanduser(str(path))) \
                and not os.path.isdir(os.path.expanduser(str(path))):
            bad(field, path, "is a file, expected a directory")
