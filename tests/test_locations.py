"""Where a run's files go: a URI is opened by the storage layer or refused by field before any work (so
``--output-dir s3://bucket/runs`` never becomes a local folder ``./s3:/bucket``), and inside a Ray job with
a working dir, relative paths (which would land in Ray's temporary unpack folder) are refused."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from contra_ray.config import ConfigError, load_config, ray_job_working_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flag, field, value, why", [
    (["--output-dir", "s3://bucket/runs"], "output_dir", "s3://bucket/runs", "s3://bucket/runs/tiny_cpu: "),
    (["--set", "data.cache_dir=gs://bucket/cache"], "data.cache_dir", "gs://bucket/cache",
     "a URI is not supported for this field"),
    (["--set", "experts.store=foo://x/y"], "experts.store", "foo://x/y", "unknown storage scheme 'foo://'"),
])
def test_unusable_uri_locations_are_refused_by_field_before_any_work(tmp_path, flag, field, value, why):
    # an S3 endpoint where nothing listens: the bucket cannot be reached
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
           "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "CONTRA_RAY_MIRROR": str(tmp_path / "mirror")}
    out = subprocess.run([sys.executable, "-m", "contra_ray.distill", "--preset", "tiny_cpu", "--no-tracking", *flag],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"error: {field}={value!r}: {why}"), out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert [p.name for p in tmp_path.iterdir()] in ([], ["mirror"])  # no ./s3:/ or ./runs folder


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


def test_moving_a_run_s_locations_does_not_block_its_resume():
    """Locations (a cluster's data.shared_cache, a URI experts.ffcv_dir, ...) change where files are, not the
    result: a checkpoint or finished set made without them continues; a changed beta is still named."""
    from contra_ray.config import config_from_dict
    from contra_ray.distill.checkpoint import resume_mismatches

    saved = config_from_dict({"output_dir": "runs"}).to_dict()
    moved = config_from_dict({"output_dir": "s3://bkt/runs", "data": {"shared_cache": "s3://bkt/cache",
                                                                      "cache_dir": "/mnt/local"},
                              "experts": {"ffcv_dir": "s3://bkt/betons", "store": "s3://bkt/experts"}}).to_dict()
    assert resume_mismatches(saved, moved) == []
    moved["distill"]["beta"] = 0.5
    assert resume_mismatches(saved, moved) == [f"distill.beta={saved['distill']['beta']!r} in the checkpoint, 0.5 now"]
