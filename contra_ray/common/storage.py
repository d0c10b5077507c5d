"""One storage layer for every persistent file: a location is a local path or a URI (``s3://``, ``gs://``, ...).

Remote locations go through ``pyarrow.fs`` (the library Ray Train itself uses for ``RunConfig.storage_path``);
an S3-compatible endpoint comes from the standard ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` settings and
credentials from the standard environment, config files or instance roles. A scheme pyarrow cannot open is
refused by name (:func:`check_location`) before any work: nothing ever becomes a local folder called ``s3:``.

The code that reads and writes the run's files (expert store, checkpoints, artifacts, sweep outputs) works
on a node-local **mirror** of each remote location (:func:`local_mirror`) and publishes with :func:`push`
(files listed in ``last`` go last: a manifest or ``store.json`` written last makes a copy that was cut off
never look complete, as an atomic rename does locally) and fetches with :func:`pull` (only files that are
missing or differ in size; into temporary names, then renamed). A remote object appears only when its
upload completed (S3 and GCS single-object semantics), so readers never see half an object.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

from contra_ray.common.fileio import atomic_write, wait_lock

__all__ = ["URI_SCHEME", "SCHEMES", "StorageError", "is_uri", "check_location", "filesystem", "join", "exists",
           "read_bytes", "write_bytes", "list_files", "push", "pull", "delete", "local_mirror", "pulled",
           "read_through", "check_writable", "ray_storage"]

URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_LOOKS_LIKE_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:$")  # first path component "s3:" (not "C:")
# what pyarrow.fs.FileSystem.from_uri opens (file:// is a local path written as a URI)
SCHEMES = {"s3": "Amazon S3 or an S3-compatible server (AWS_ENDPOINT_URL)", "gs": "Google Cloud Storage",
           "gcs": "Google Cloud Storage", "hdfs": "HDFS", "viewfs": "HDFS (viewfs)", "abfs": "Azure Data Lake",
           "abfss": "Azure Data Lake", "file": "a local path"}
_MIRROR_ENV = "CONTRA_RAY_MIRROR"
_FILESYSTEMS: dict[tuple, object] = {}



def _errors() -> tuple[type, ...]:
    """What a storage call may raise: OSError and any pyarrow error (a GCS credential error is an
    ``ArrowException``, not an OSError); pyarrow is imported only when a location is used."""
    import pyarrow.lib

    return (OSError, pyarrow.lib.ArrowException)
_CHUNK = 8 << 20


class StorageError(ValueError):
    """A location cannot be used: unknown scheme, unreachable, missing, or not readable/writable (names it)."""


def is_uri(location: str | os.PathLike | None) -> bool:
    """``True`` for ``scheme://...`` (including ``file://``), ``False`` for a plain path or ``None``."""
    return location is not None and bool(URI_SCHEME.match(str(location)))


def _scheme(location: str) -> str:
    m = URI_SCHEME.match(location)
    return m.group(1).lower() if m else ""


def check_location(field: str, location: str | os.PathLike) -> None:
    """Refuse a URI whose scheme the layer cannot open, naming ``field``, the value and the schemes it opens.

    Raises:
        StorageError: unknown scheme, a URI without a bucket/host (``s3:///x``), or a path whose first part
            looks like a scheme with a slash missing (``s3:/bucket/x``, ``gs:bucket``).
    """
    loc = str(location)
    if not is_uri(loc):
        head = loc.split("/", 1)[0]
        known = head.split(":", 1)[0].lower() in SCHEMES and ":" in head
        if _LOOKS_LIKE_SCHEME.match(head) or known:  # s3:/bucket, gs:bucket: a URI with a slash missing
            scheme, rest = head.split(":", 1)[0], loc.split(":", 1)[1].lstrip("/")
            raise StorageError(f"{field}={loc!r}: looks like a URI with a slash missing (a local folder named "
                               f"{head!r} would be created); did you mean {scheme}://{rest}?")
        return
    scheme = _scheme(loc)
    if scheme not in SCHEMES:
        raise StorageError(f"{field}={loc!r}: unknown storage scheme {scheme + '://'!r}; contra_ray opens local "
                           f"paths and {', '.join(s + '://' for s in SCHEMES)}")
    if scheme != "file" and not loc[len(scheme) + 3:].split("/", 1)[0]:
        raise StorageError(f"{field}={loc!r}: no bucket or host after {scheme}://")


def filesystem(location: str | os.PathLike):
    """``(pyarrow.fs.FileSystem, path)`` for a location (a local path: the local file system, absolute path).

    S3: ``endpoint_override`` from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` when set (an S3-compatible
    server), so the file system pickles with it to Ray workers. GCS: requests retry for at most
    ``$CONTRA_RAY_GCS_RETRY_S`` seconds (default 60; without credentials the client would retry for minutes).

    Raises:
        StorageError: unknown scheme (see :func:`check_location`) or a file system pyarrow cannot open.
    """
    import pyarrow.fs as pafs

    loc = str(location)
    if not is_uri(loc):
        return pafs.LocalFileSystem(), str(Path(loc).expanduser().resolve())
    check_location("location", loc)
    try:
        if _scheme(loc) == "s3":  # one file system per endpoint and region (building one costs ~0.1 s)
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            key = ("s3", endpoint, region)
            if key not in _FILESYSTEMS:
                kwargs = {"endpoint_override": endpoint} if endpoint else {}
                if region:
                    kwargs["region"] = region
                _FILESYSTEMS[key] = pafs.S3FileSystem(**kwargs)
            return _FILESYSTEMS[key], loc[len("s3://"):].split("?", 1)[0].rstrip("/")
        if _scheme(loc) in ("gs", "gcs"):  # bounded retries: without credentials the client retries ~forever
            import datetime

            limit = float(os.environ.get("CONTRA_RAY_GCS_RETRY_S", "60"))
            path = loc.split("://", 1)[1].split("?", 1)[0].rstrip("/")
            return pafs.GcsFileSystem(retry_time_limit=datetime.timedelta(seconds=limit)), path
        return pafs.FileSystem.from_uri(loc)
    except (OSError, ValueError, TypeError) as e:  # pyarrow.lib.ArrowInvalid is a ValueError
        raise StorageError(f"{loc}: cannot open its file system ({' '.join(str(e).split())})") from e


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location/part/...`` for a URI or a local path (as a string)."""
    loc = str(location)
    if is_uri(loc):
        return "/".join([loc.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(loc, *parts))


def _wrap(location: str, e: Exception) -> StorageError:
    return StorageError(f"{location}: {' '.join(str(e).split()) or type(e).__name__}")


def exists(location: str | os.PathLike) -> bool:
    """Whether a file or folder exists at ``location``."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except _errors() as e:
        raise _wrap(str(location), e) from e


def read_bytes(location: str | os.PathLike) -> bytes:
    """The whole file. Raises: FileNotFoundError (names the location), StorageError."""
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{location}: no such file") from None
    except _errors() as e:
        if "not exist" in str(e) or "NoSuchKey" in str(e) or "not found" in str(e).lower():
            raise FileNotFoundError(f"{location}: no such file") from None
        raise _wrap(str(location), e) from e


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write one file whole: locally through :func:`~contra_ray.common.fileio.atomic_write`, remotely as one
    object (visible only once complete). Raises: StorageError."""
    if not is_uri(location) or _scheme(str(location)) == "file":
        fs, path = filesystem(location)
        atomic_write(path, data)
        return
    fs, path = filesystem(location)
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except _errors() as e:
        raise _wrap(str(location), e) from e


def list_files(location: str | os.PathLike) -> dict[str, int]:
    """``{relative path: size in bytes}`` of every file under the folder ``location`` (empty if none)."""
    return {name: size for name, (size, _) in _remote_files(location).items()}


def _copy(src_fs, src: str, dst_fs, dst: str) -> None:
    with src_fs.open_input_stream(src) as fin, dst_fs.open_output_stream(dst) as fout:
        while chunk := fin.read(_CHUNK):
            fout.write(chunk)


_RECORD = ".contra_ray-sync.json"  # in a mirror's root: {relative path: {"local": [size, mtime_ns], "remote": [...]}}


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _read_record(local: Path) -> dict:
    try:
        return json.loads((local / _RECORD).read_text())
    except (OSError, ValueError):
        return {}


def _excluded(rel: str, exclude: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(rel.split("/", 1)[0], pattern) for pattern in exclude)


def _local_files(local: Path) -> list[str]:
    """Files of a mirror, without dot files (locks, temporaries, records) and without nested mirrors
    (a sub-folder with its own record is published by its own owner, e.g. the expert store)."""
    if not local.is_dir():
        return []
    nested = [p.parent for p in local.rglob(_RECORD) if p.parent != local]
    out = []
    for p in local.rglob("*"):
        rel = p.relative_to(local)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and not p.name.endswith(".tmp") \
                and not any(n in p.parents for n in nested):
            out.append(rel.as_posix())
    return sorted(out)


def push(local_dir: str | os.PathLike, location: str | os.PathLike, *, files: Iterable[str] | None = None,
         last: Iterable[str] = (), exclude: Iterable[str] = ()) -> list[str]:
    """Publish the files of the mirror ``local_dir`` (or only ``files``, relative paths) to the folder ``location``.

    Files named in ``last`` (relative paths, e.g. ``manifest.json``, ``store.json``) are uploaded after all
    others, so a reader that trusts them sees a complete copy. A file unchanged (size and mtime) since this
    mirror last pushed or pulled it is skipped; the record is ``<local_dir>/.contra_ray-sync.json``. Dot files,
    ``*.tmp`` files, nested mirrors (sub-folders with their own record) and top-level names matching a
    pattern in ``exclude`` are not published. A local ``location`` equal to ``local_dir`` is a no-op.

    Returns:
        The relative paths uploaded.

    Raises:
        StorageError: the location is not writable (names the file and the cause).
    """
    local = Path(local_dir)
    if not is_uri(location) and Path(location).expanduser().resolve() == local.resolve():
        return []
    names = sorted(files) if files is not None else _local_files(local)
    names = [n for n in names if not _excluded(n, exclude)]
    late = [n for n in last if n in names]
    order = [n for n in names if n not in late] + late
    record = _read_record(local)
    fs, root = filesystem(location)
    done, name = [], ""
    try:
        for name in order:
            stamp = _stamp(local / name)
            if record.get(name, {}).get("local") == stamp:
                continue
            if not is_uri(location):
                atomic_write(Path(root, name), (local / name).read_bytes())
            else:
                _copy(_local_fs(), str(local / name), fs, f"{root.rstrip('/')}/{name}")
            record[name] = {"local": stamp}
            done.append(name)
    except _errors() as e:
        raise _wrap(join(location, name), e) from e
    finally:
        if done:
            atomic_write(local / _RECORD, json.dumps(record), fsync=False)
    return done


def _local_fs():
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem()


def _remote_files(location: str | os.PathLike) -> dict[str, list]:
    """``{relative path: [size, mtime_ns]}`` of every file under the folder ``location``."""
    import pyarrow.fs as pafs

    fs, root = filesystem(location)
    root = root.rstrip("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except _errors() as e:
        raise _wrap(str(location), e) from e
    return {i.path[len(root) + 1:]: [i.size, i.mtime_ns] for i in infos if i.type == pafs.FileType.File}


def pull(location: str | os.PathLike, local_dir: str | os.PathLike, *, files: Iterable[str] | None = None,
         exclude: Iterable[str] = ()) -> list[str]:
    """Fetch the files under the folder ``location`` (or only ``files``) into the mirror ``local_dir``.

    Each file is written to a temporary name and renamed, so a crash leaves no partial file. A file is
    skipped when the mirror holds it as last fetched (same remote size and modification time, which S3 keeps
    in whole seconds; local file unchanged) or,
    with no record of it, when the local file has the remote size. ``exclude``: patterns of top-level names
    not fetched (``"*.partial"``).
    A local ``location`` equal to ``local_dir`` is a no-op.

    Returns:
        The relative paths fetched.

    Raises:
        StorageError: the location is not readable.
    """
    local = Path(local_dir)
    if not is_uri(location) and Path(location).expanduser().resolve() == local.resolve():
        return []
    remote = _remote_files(location)
    names = sorted(n for n in (remote if files is None else files)
                   if n in remote and not _excluded(n, exclude) and not Path(n).name.startswith("."))
    record = _read_record(local)
    fs, root = filesystem(location)
    done = []
    try:
        for name in names:
            dest = local / name
            have = record.get(name, {})
            if dest.is_file():
                if have.get("remote") == remote[name] and have.get("local") == _stamp(dest):
                    continue
                if not have and dest.stat().st_size == remote[name][0]:
                    record[name] = {"local": _stamp(dest), "remote": remote[name]}
                    continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                _copy(fs, f"{root.rstrip('/')}/{name}", _local_fs(), str(tmp))
                os.replace(tmp, dest)
            except _errors() as e:
                raise _wrap(join(location, name), e) from e
            finally:
                tmp.unlink(missing_ok=True)
            record[name] = {"local": _stamp(dest), "remote": remote[name]}
            done.append(name)
    finally:
        if names and local.is_dir():
            atomic_write(local / _RECORD, json.dumps(record), fsync=False)
    return done


def delete(location: str | os.PathLike, *, missing_ok: bool = True) -> None:
    """Delete the file or folder at ``location``."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)
        elif not missing_ok:
            raise FileNotFoundError(f"{location}: no such file or folder")
    except _errors() as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise _wrap(str(location), e) from e


def local_mirror(location: str | os.PathLike) -> Path:
    """The node-local folder that stands for ``location``: the path itself when local, else
    ``$CONTRA_RAY_MIRROR`` (default ``~/.cache/contra_ray/mirror``) ``/<scheme>/<bucket>/<path>``, the same
    path on every node (each node has its own copy)."""
    loc = str(location)
    if not is_uri(loc):
        return Path(loc).expanduser().resolve()
    scheme = _scheme(loc)
    if scheme == "file":
        return Path(loc[len("file://"):]).resolve()
    base = Path(os.environ.get(_MIRROR_ENV) or Path.home() / ".cache" / "contra_ray" / "mirror").expanduser()
    rest = loc[len(scheme) + 3:].strip("/")
    safe = [p for p in rest.split("/") if p not in ("", ".", "..")]
    return base.resolve() / scheme / Path(*safe)


@contextlib.contextmanager
def pulled(location: str | os.PathLike, what: str) -> Iterator[Path]:
    """The local mirror of the folder ``location``, filled (missing files only) under a lock, so that two
    processes on one node fetch once; yields the local folder. A local location is yielded as is."""
    mirror = local_mirror(location)
    if not is_uri(location):
        yield mirror
        return
    mirror.mkdir(parents=True, exist_ok=True)
    with wait_lock(mirror.parent / f".{mirror.name}.pull.lock", f"fetching {what}"):
        pull(location, mirror)
    yield mirror


def check_writable(field: str, location: str | os.PathLike) -> None:
    """Write and delete a probe object under the folder ``location`` (a URI): before work that would publish there.

    Raises:
        StorageError: ``<field>=<location>: cannot be written (<cause>)``.
    """
    probe = join(location, f".contra_ray-probe-{uuid.uuid4().hex}")
    try:
        write_bytes(probe, b"")
        delete(probe)
    except StorageError as e:
        raise StorageError(f"{field}={str(location)!r}: cannot be written ({e})") from None


def read_through(location: str | os.PathLike, local: str | os.PathLike, *, complete: Callable[[Path], bool],
                 verify: Callable[[Path], None], what: str, files: Iterable[str] | None = None) -> Path:
    """A node-local read-through cache: the folder ``local`` filled once per node from the folder ``location``.

    If ``complete(local)`` holds, ``local`` is returned at once (no lock, nothing read remotely). Otherwise,
    holding ``<parent>/.<name>.fill.lock`` (so two processes on one node fetch once; the second finds the work
    done): the files (all, or only ``files``) are fetched into a temporary sibling ``.<name>.fill-*``, ``verify``
    checks that copy (e.g. recomputes a content hash; it raises ``ValueError`` on a mismatch), and the copy is
    renamed to ``local`` (a folder already there, incomplete, is moved aside and deleted). A crash leaves no
    half ``local``: only a ``.<name>.fill-*`` sibling, which the next fill deletes under the lock.

    Args:
        complete: whether a folder holds a complete, verified copy (e.g. a marker file written last, with the
            expected content hash); called on ``local`` before and after taking the lock, and on the fetched copy.
        what: the data in words, for the waiting message and errors.

    Returns:
        ``local`` (a ``Path``).

    Raises:
        StorageError: ``location`` is not readable, or holds no complete copy (names it).
        ValueError: ``verify`` failed (the message names ``location``); nothing is left behind.
    """
    local = Path(local)
    if complete(local):
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    with wait_lock(local.parent / f".{local.name}.fill.lock", f"fetching {what}"):
        if complete(local):
            return local
        for debris in local.parent.glob(f".{local.name}.fill-*"):  # left by a fill that crashed
            shutil.rmtree(debris, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{local.name}.fill-", dir=local.parent))
        try:
            print(f"fetching {what} from {location} into {local}", flush=True)
            pull(location, tmp, files=files)
            if not complete(tmp):
                raise StorageError(f"{location}: no complete copy of {what} there (files: "
                                   f"{', '.join(sorted(_local_files(tmp))) or 'none'})")
            try:
                verify(tmp)
            except ValueError as e:
                raise ValueError(f"{what} fetched from {location} fails its check: {e}") from None
            (tmp / _RECORD).unlink(missing_ok=True)
            if local.exists():
                stale = Path(tempfile.mkdtemp(prefix=f".{local.name}.fill-stale-", dir=local.parent))
                os.replace(local, stale / local.name)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, local)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return local


def ray_storage(location: str | os.PathLike) -> tuple[str, object | None]:
    """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig`` / ``ray.tune.RunConfig``: a local path
    as is (absolute) with no file system; a URI as its path plus the :func:`filesystem` that opens it."""
    if not is_uri(location):
        return str(Path(location).expanduser().resolve()), None
    fs, path = filesystem(location)
    return path, fs
