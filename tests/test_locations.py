"""Where a run's files go: URIs are refused by field before any work (object storage is not supported yet, so
``--output-dir s3://bucket/runs`` must never become a local folder ``./s3:/bucket``), and inside a Ray job with
a working dir, relative paths (which would land in Ray's temporary unpack folder) are refused."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from contra_ray.config import ConfigError, load_config, ray_job_working_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flag, field, value", [
    (["--output-dir", "s3://bucket/runs"], "output_dir", "s3://bucket/runs"),
    (["--set", "data.cache_dir=gs://bucket/cache"], "data.cache_dir", "gs://bucket/cache"),
    (["--set", "experts.store=file:///tmp/x"], "experts.store", "file:///tmp/x"),
])
def test_uri_locations_are_refused_by_field_before_any_work(tmp_path, flag, field, value):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "contra_ray.distill", "--preset", "tiny_cpu", "--no-tracking", *flag],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith(f"error: {field}={value!r}: object storage and other URIs are not supported yet")
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []  # no ./s3:/ or ./runs folder


def test_ray_job_working_dir_is_the_unpack_folder():
    base = "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_0123"
    assert ray_job_working_dir(base) == Path(base)
    assert ray_job_working_dir(base + "/sub/dir") == Path(base)
    assert ray_job_working_dir("/work/main") is None


def test_relative_paths_are_refused_inside_a_ray_job_working_dir(tmp_path, monkeypatch):
    job_dir = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    monkeypatch.delenv("CONTRA_RAY_SHARED", raising=False)
    with pytest.raises(ConfigError, match=r"^output_dir='runs': a relative path inside a Ray job with a working dir "
                                          rf"resolves into Ray's temporary unpack folder {job_dir}"):
        load_config("tiny_cpu", {"output_dir": "runs"})
    with pytest.raises(ConfigError, match=r"^data\.root=None: the default location of the CIFAR-10 tarball"):
        load_config("tiny_cpu", {"output_dir": str(tmp_path / "out"), "data": {"cache_dir": str(tmp_path / "c")}})
    tarball = str(tmp_path / "cifar10-jpeg.tar.gz")
    cfg = load_config("tiny_cpu", {"output_dir": str(tmp_path / "out"),
                                   "data": {"cache_dir": str(tmp_path / "c"), "root": tarball}})
    assert cfg.run_dir() == tmp_path / "out" / "tiny_cpu"  # absolute locations are accepted
    monkeypatch.setenv("CONTRA_RAY_SHARED", str(tmp_path))
    load_config("tiny_cpu", {"output_dir": str(tmp_path / "out"), "data": {"cache_dir": str(tmp_path / "c")}})
