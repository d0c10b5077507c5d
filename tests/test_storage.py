"""The storage layer (contra_ray.common.storage) against a real S3-compatible server (moto, 127.0.0.1)."""

import os
import time
from pathlib import Path

import pytest

from contra_ray.common import storage
from contra_ray.config import ConfigError, load_config


def test_unknown_scheme_is_refused_by_name_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"output_dir='foo://b/runs': unknown storage scheme 'foo://'"):
        load_config("tiny_cpu", {"output_dir": "foo://b/runs"})
    with pytest.raises(ConfigError, match=r"experts.store='s3:///x': no bucket"):
        load_config("tiny_cpu", {"experts": {"store": "s3:///x"}})
    with pytest.raises(ConfigError, match=r"data.cache_dir='s3://b/c': a URI is not supported for this field"):
        load_config("tiny_cpu", {"data": {"cache_dir": "s3://b/c"}})
    with pytest.raises(ConfigError, match=r"experts.ffcv_dir='foo://x': unknown storage scheme 'foo://'"):
        load_config("tiny_cpu", {"experts": {"ffcv_dir": "foo://x"}})
    assert load_config("tiny_cpu", {"experts": {"ffcv_dir": "s3://bucket/x"}}).experts.ffcv_dir == "s3://bucket/x"
    with pytest.raises(ConfigError, match=r"output_dir='s3:/b/runs': looks like a URI with a slash missing .* "
                                          r"did you mean s3://b/runs\?"):
        load_config("tiny_cpu", {"output_dir": "s3:/b/runs"})
    with pytest.raises(ConfigError, match=r"data.cache_dir='gs:b': .* did you mean gs://b\?"):
        load_config("tiny_cpu", {"data": {"cache_dir": "gs:b"}})
    assert load_config("tiny_cpu", {"output_dir": str(tmp_path / "a:b")}).output_dir.endswith("a:b")  # a real name
    assert not Path("s3:").exists() and not Path("foo:").exists()


def test_gcs_without_credentials_fails_in_bounded_time_naming_the_location(monkeypatch):
    monkeypatch.setenv("CONTRA_RAY_GCS_RETRY_S", "2")
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)  # no credentials, no network: retries
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match=r"gs://contra-no-such-bucket/x"):
        storage.exists("gs://contra-no-such-bucket/x")
    assert time.monotonic() - t0 < 60


def test_uri_output_dir_maps_to_a_node_local_mirror(monkeypatch, tmp_path):
    monkeypatch.setenv("CONTRA_RAY_MIRROR", str(tmp_path / "m"))
    cfg = load_config("tiny_cpu", {"output_dir": "s3://bkt/runs", "name": "r1"})
    assert cfg.run_location() == "s3://bkt/runs/r1"
    assert cfg.run_dir() == tmp_path / "m" / "s3" / "bkt" / "runs" / "r1"
    assert cfg.expert_store_location() == "s3://bkt/runs/r1/experts"
    assert cfg.expert_store() == cfg.run_dir() / "experts"
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path / 'm' / 's3' / 'bkt' / 'runs' / 'mlflow.db'}"
    local = load_config("tiny_cpu", {"output_dir": str(tmp_path / "runs"), "name": "r1"})
    assert local.run_dir() == tmp_path / "runs" / "r1" and local.run_location() == str(tmp_path / "runs" / "r1")


def test_push_pull_round_trip_and_only_changed_files(s3_bucket, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"a" * 1000)
    (src / "sub" / "b.txt").write_text("bee")
    (src / "manifest.json").write_text("{}")
    (src / ".lock").write_text("pid")  # dot files are never published
    loc = f"{s3_bucket}/runs/r"
    assert storage.push(src, loc, last=["manifest.json"]) == ["a.bin", "sub/b.txt", "manifest.json"]
    assert storage.list_files(loc) == {"a.bin": 1000, "sub/b.txt": 3, "manifest.json": 2}
    assert storage.push(src, loc) == []  # nothing changed since the last push
    (src / "sub" / "b.txt").write_text("BEE")  # same size, new content: pushed again
    assert storage.push(src, loc) == ["sub/b.txt"]
    dst = tmp_path / "dst"
    assert sorted(storage.pull(loc, dst)) == ["a.bin", "manifest.json", "sub/b.txt"]
    assert (dst / "sub" / "b.txt").read_text() == "BEE" and (dst / "a.bin").read_bytes() == b"a" * 1000
    assert storage.pull(loc, dst) == []
    time.sleep(1.1)  # S3 keeps modification times in whole seconds
    storage.write_bytes(f"{loc}/sub/b.txt", b"bzz")  # rewritten remotely (same size): fetched again
    assert storage.pull(loc, dst) == ["sub/b.txt"] and (dst / "sub" / "b.txt").read_text() == "bzz"
    assert not list(dst.rglob("*.tmp"))
    assert storage.read_bytes(f"{loc}/a.bin") == b"a" * 1000 and storage.exists(loc)
    with pytest.raises(FileNotFoundError, match="no such file"):
        storage.read_bytes(f"{loc}/missing")
    storage.delete(loc)
    assert storage.list_files(loc) == {}


def test_nested_mirror_is_published_by_its_owner_only(s3_bucket, tmp_path):
    run = tmp_path / "run"
    (run / "experts").mkdir(parents=True)
    (run / "experts" / "e.bin").write_bytes(b"e")
    storage.push(run / "experts", f"{s3_bucket}/r/experts")  # the store's own record
    (run / "set.bin").write_bytes(b"s")
    assert storage.push(run, f"{s3_bucket}/r") == ["set.bin"]


def test_unreachable_location_names_it(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    (tmp_path / "f").write_text("x")
    with pytest.raises(storage.StorageError, match=r"s3://nobucket/x"):
        storage.push(tmp_path, "s3://nobucket/x")


def test_local_mirror_is_the_path_itself_for_local_locations(tmp_path):
    assert storage.local_mirror(tmp_path / "x") == (tmp_path / "x").resolve()
    assert storage.local_mirror(f"file://{tmp_path}/y") == (tmp_path / "y").resolve()
    assert os.fspath(storage.local_mirror("s3://b/../../etc")).endswith(os.path.join("s3", "b", "etc"))
