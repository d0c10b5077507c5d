"""File helpers shared by every module that reads or writes: one atomic writer, one sha256, one strict
YAML reader, writable-directory checks.

Every file contra_ray writes (caches, expert trajectories, checkpoints, artifacts, plots, JSON results)
goes through :func:`atomic_write`, so a reader sees either the previous file or the complete new one,
never half a file, and an interrupted write leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

__all__ = ["atomic_write", "sha256_file", "load_yaml", "YAMLFileError", "ensure_writable_dir", "RunInUse", "run_lock",
           "wait_lock", "os_error_cause", "os_error_line"]

# what a user reads for the OS errors a run meets on its destinations (else the OS's own strerror)
_CAUSES = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
           errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
           errno.EEXIST: "already exists", errno.ENOTDIR: "not a directory (a file stands where a folder goes)",
           errno.EISDIR: "is a directory (a file was expected)", errno.ENOENT: "no such file or directory"}
_FULL_BYTES = 1 << 20  # a writer failing with less than this free on its file system failed for lack of space


def os_error_cause(e: OSError) -> str:
    """The cause of ``e`` in words: ``"disk full"`` for ENOSPC, ``"read-only file system"`` for EROFS, ...;
    the OS's message for the other errnos."""
    return _CAUSES.get(e.errno) or e.strerror or " ".join(str(e).split()) or type(e).__name__


def os_error_line(e: OSError) -> str:
    """One line naming the path(s) of ``e`` and its cause: ``"/data/out: read-only file system"``."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    return f"{where}: {os_error_cause(e)}" if where else os_error_cause(e)


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Path], None], *,
                 fsync: bool = True) -> Path:
    """Write ``path`` atomically: a temporary file in the same directory, then ``os.replace``.

    Args:
        path: destination; its parent directory is created.
        data: the bytes or text (UTF-8) to write, or ``write(tmp_path)``, a function that writes the
            whole file at the path it is given (``torch.save``, ``safetensors.torch.save_file``,
            ``fig.savefig``: keep the suffix in mind, the temporary name ends in ``.tmp``).
        fsync: flush the file to disk before the rename (a crash then never leaves an empty file).

    Returns:
        ``Path(path)``.

    Raises:
        OSError: the directory is not writable, or the disk is full (no temporary file is left behind);
            ``filename`` is ``path``. A writer that fails otherwise (``torch.save`` raises ``RuntimeError``
            on a short write) while its file system has under 1 MiB free raises ``OSError(ENOSPC)`` naming
            ``path`` too. Whatever else ``data`` raises, after removing the temporary file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would: some writers (safetensors) create files 0600
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno is None:
            raise
        raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
    except Exception as e:
        if _nearly_full(path.parent):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _nearly_full(folder: Path) -> bool:
    """True when ``folder``'s file system has less than ``_FULL_BYTES`` free (False if it cannot be asked)."""
    try:
        return shutil.disk_usage(folder).free < _FULL_BYTES
    except OSError:
        return False


def _umask() -> int:
    """The process's file-creation mask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- strict YAML

class YAMLFileError(ValueError):
    """A YAML file or text is malformed or gives a mapping key twice; the message names the file and line."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose mappings refuse a key given twice (PyYAML silently keeps the last value).

    Keys brought in by a merge key (``<<: *anchor``) may be overridden, as YAML 1.1 merge intends; only
    keys written twice in the same mapping are refused.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # SafeLoader raises its own "found unhashable key" error below
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise YAMLFileError(f"{key_node.start_mark.name}:{line}: duplicate key {key!r} (first given at "
                                        f"line {first_line[key]}); a key may appear only once in a mapping")
                first_line[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(path: str | os.PathLike | None = None, *, text: str | None = None, name: str = "<text>",
              all_documents: bool = False) -> Any:
    """Parse YAML strictly: safe tags only, and no mapping key given twice.

    Every YAML file of the project (presets, tune spaces, cluster configs) is read through this one
    function, so ``zca: false`` followed later by ``zca: true`` is an error instead of silently keeping
    the last value (what ``yaml.safe_load`` does).

    Args:
        path: the file to read (UTF-8); or
        text: YAML text (then ``name`` labels it in errors).
        all_documents: return the list of all documents of a ``---``-separated stream
            (``yaml.safe_load_all``) instead of the single document.

    Returns:
        The document (``None`` for an empty one), or with ``all_documents`` a list of documents.

    Raises:
        YAMLFileError: a duplicate key (names the file, the key and both line numbers) or malformed YAML
            (names the file, line and column).
        FileNotFoundError: ``path`` does not exist.
        TypeError: neither or both of ``path`` and ``text`` given.
    """
    if (path is None) == (text is None):
        raise TypeError("load_yaml: pass exactly one of path= or text=")
    if path is not None:
        name = str(path)
        text = Path(path).read_text(encoding="utf-8")
    loader = _StrictLoader(text)
    loader.name = name  # marks (error positions) carry this name
    try:
        if all_documents:
            docs = []
            while loader.check_data():
                docs.append(loader.get_data())
            return docs
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise YAMLFileError(f"{name}: invalid YAML: {' '.join(str(e).split())}") from None
    finally:
        loader.dispose()


# ---------------------------------------------------------------------------------------- directories

def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create directory ``path`` (with parents) if needed and prove it is writable; returns it.

    Writability is tested by creating and removing a temporary file (``os.access`` is wrong for root and
    for read-only mounts).

    Raises:
        OSError: the directory cannot be created or written; the message names the directory and the
            OS error (callers prefix the config field that named it).
    """
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".contra_ray-write-test-", dir=p)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise OSError(e.errno, f"directory {p} cannot be created or written ({os_error_cause(e)})") from None
    return p


# ---------------------------------------------------------------------------------------- run lock

class RunInUse(RuntimeError):
    """Another live process holds the run directory's lock; the message names the directory and its pid."""


@contextlib.contextmanager
def _pid_lock(lock: Path, on_busy: Callable[[str], None]) -> Iterator[Path]:
    """Exclusive ``fcntl.flock`` on ``lock`` holding this process's pid while held. If another process
    holds it, ``on_busy(its pid)`` is called first: it raises (refuse) or returns (then wait for it)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            on_busy(f.read().strip() or "unknown")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield lock
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``<run_dir>/.lock`` (an exclusive, non-blocking ``fcntl.flock``) while a run writes there.

    Two processes distilling into one run directory (the same ``--name`` and ``--output-dir``) would
    interleave checkpoints and overwrite each other's artifact. The second one is refused at once. The
    lock file keeps the holder's pid for the message; the kernel releases the lock when the process ends,
    however it ends, so a crashed run never leaves a stale lock.

    Raises:
        RunInUse: the lock is held (names the run directory and the holder's pid).
        OSError: the directory cannot be created.
    """
    run_dir = Path(run_dir)

    def refuse(holder: str) -> None:
        raise RunInUse(f"run directory {run_dir} is in use by another process (pid {holder}): wait for it to "
                       f"finish, or choose another --name / --output-dir")

    with _pid_lock(run_dir / ".lock", refuse) as lock:
        yield lock


@contextlib.contextmanager
def wait_lock(lock: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold an exclusive ``fcntl.flock`` on the file ``lock``, waiting for another holder to finish.

    For work two runs may start at once on shared state, e.g. training the experts of one store: the
    second waits (saying so once, with the holder's pid) and then finds the work done. Released when the
    block ends or the process dies.

    Raises:
        OSError: the lock file cannot be created.
    """
    lock = Path(lock)

    def wait(holder: str) -> None:
        print(f"waiting for pid {holder}, which is {what} ({lock})", flush=True)

    with _pid_lock(lock, wait) as held:
        yield held
