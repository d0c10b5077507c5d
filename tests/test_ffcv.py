"""FFCV for expert training: .beton files from `python -m contra_ray.data prepare`, the same first-epoch
parameters as the in-memory loader, curriculum epochs that serve exactly the easiest ceil(h(e) N) samples,
Ray tasks reading the .beton, refusal of a .beton written for another resolution or data set, and .beton files
on object storage (moto's S3 server) read through a node-local copy verified by its sha256.

Every FFCV call runs in a subprocess with a timeout (FFCV 1.0.2's Loader constructor can spin forever).
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import make_tiny_imagenet

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}


def _ffcv_importable() -> bool:
    try:
        return subprocess.run([sys.executable, "-c", "import ffcv"], env=ENV, capture_output=True,
                              timeout=180).returncode == 0
    except subprocess.TimeoutExpired:
        return False


pytestmark = pytest.mark.skipif(not _ffcv_importable(), reason="ffcv is not importable: pip install '.[ffcv]' after "
                                "apt-get install libturbojpeg0-dev libopencv-dev (scripts/setup.sh does both)")


def bounded(args: list[str], timeout: int, env: dict | None = None) -> str:
    """Run ``python <args>`` with a timeout; its stdout (the test fails naming the command on a timeout)."""
    try:
        proc = subprocess.run([sys.executable, *args], env=env or ENV, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"FFCV step did not finish within {timeout} s: {' '.join(args)[:200]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ffcv")
    root = make_tiny_imagenet(tmp / "tiny-imagenet-200", train_per_class=12, val_per_class=2, size=20)
    out = bounded(["-m", "contra_ray.data", "prepare", "--dataset", "tiny-imagenet", "--root", str(root),
                   "--resolution", "16", "--mode", "raw", "--out", str(tmp / "betons"), "--cache-dir",
                   str(tmp / "cache")], timeout=300)
    return tmp, root, out


def test_prepare_cli_writes_beton_with_dataset_id_and_hash(prepared):
    tmp, root, out = prepared
    from contra_ray.common.fileio import sha256_file
    from contra_ray.config import DataConfig
    from contra_ray.data.sources import load_split

    beton = tmp / "betons" / "tiny-imagenet@16px-train-raw.beton"
    meta = json.loads(Path(str(beton) + ".json").read_text())
    train = load_split(DataConfig(dataset="tiny-imagenet", root=str(root), resolution=16,
                                  cache_dir=str(tmp / "cache"), zca=False), "train")
    assert beton.is_file() and str(beton) in out and train.content_hash in out
    assert meta["format"] == "contra_ray.beton/1" and meta["mode"] == "raw" and meta["resolution"] == 16
    assert meta["dataset_id"] == "tiny-imagenet@16px/train" and meta["content_hash"] == train.content_hash
    assert meta["num_samples"] == 36 and meta["classes"] == train.classes
    assert meta["sha256"] == sha256_file(beton)


SCRIPT = textwrap.dedent("""
    import json, math, sys, dataclasses
    import torch
    torch.set_num_threads(1)
    from contra_ray.config import Config, DataConfig, ExpertConfig
    from contra_ray.data import fit_preprocessor, load_split
    from contra_ray.experts import CurriculumOrder, ShuffledOrder, train_expert
    from contra_ray.data.ffcv_beton import FFCVBatchLoader, check_beton_for
    from contra_ray.experts.remote import store_meta

    root, tmp, beton = sys.argv[1:4]
    dcfg = DataConfig(dataset="tiny-imagenet", root=root, resolution=16, cache_dir=tmp + "/cache", zca=False)
    train, test = load_split(dcfg, "train"), load_split(dcfg, "test")
    pre = fit_preprocessor(train, dcfg)
    check_beton_for(beton, train)
    cfg = Config()
    cfg.data = dcfg
    spec = cfg.model_spec(train.num_classes, train.image_size)
    spec = dataclasses.replace(spec, width=4)
    x, tx = pre(train.images), pre(test.images)
    out = {}

    # 1. shuffled order, two epochs (the second reuses the first's Loader): FFCV (raw) vs the in-memory
    #    loader, same seed and order
    ecfg = ExpertConfig(epochs=2, lr=0.05, momentum=0.9, batch_size=8, dsa=False, eval_every=0)
    ff = FFCVBatchLoader(beton, pre, ecfg.batch_size, num_workers=1, timeout_s=120, record=True)
    t_ffcv, _ = train_expert(0, 5, None, None, tx, test.labels, spec, ecfg, loader=ff)
    t_mem, _ = train_expert(0, 5, x, train.labels, tx, test.labels, spec, ecfg)
    seeds = torch.randint(0, 2**62, (2,), generator=torch.Generator().manual_seed(5)).tolist()
    gen = torch.Generator().manual_seed(seeds[0])
    expected = [ShuffledOrder(len(x)).epoch_indices(e, gen) for e in range(2)]
    torch.save({"ffcv": t_ffcv, "memory": t_mem, "served": ff.served, "expected": expected,
                "loaders": len(ff.construct_s)}, tmp + "/shuffled.pt")

    # 2. curriculum (App. B), 3 epochs: what FFCV serves in epoch e
    rank = torch.randperm(len(x), generator=torch.Generator().manual_seed(9))
    order = CurriculumOrder(rank, lam=0.4, gamma=2)
    ccfg = dataclasses.replace(ecfg, epochs=3)
    ff = FFCVBatchLoader(beton, pre, ccfg.batch_size, num_workers=2, timeout_s=120, record=True)
    c_ffcv, _ = train_expert(1, 6, None, None, tx, test.labels, spec, ccfg, order=order, loader=ff)
    c_mem, _ = train_expert(1, 6, x, train.labels, tx, test.labels, spec, ccfg,
                            order=CurriculumOrder(rank, lam=0.4, gamma=2))
    torch.save({"ffcv": c_ffcv, "memory": c_mem, "served": ff.served, "rank": rank,
                "sizes": [order.size(e) for e in range(3)], "loaders": len(ff.construct_s)}, tmp + "/curriculum.pt")

    # 3. experts as Ray tasks reading the .beton (experts.loader=ffcv), vs the in-memory loader
    import ray
    from contra_ray.experts.remote import train_experts
    from contra_ray.common.seeds import derive_seed

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg.experts = dataclasses.replace(ecfg, epochs=2, num_experts=1, seed=3, store=tmp + "/experts", loader="ffcv",
                                      ffcv_dir=str(__import__("pathlib").Path(beton).parent))
    data_like = type("D", (), {"spec": spec, "train": train, "preprocessor": pre})()
    meta = {k: v for k, v in store_meta(cfg, data_like).items() if k not in ("model_spec", "epochs")}
    store = train_experts(cfg, x, train.labels, tx, test.labels, spec, meta, pre.state_dict())
    ref, _ = train_expert(0, derive_seed(3, "expert", 0), x, train.labels, tx, test.labels, spec, cfg.experts,
                          threads=1)
    ray.shutdown()
    torch.save({"ray": store.trajectory(0), "memory": ref}, tmp + "/ray.pt")
    print("ok")
""")


def test_ffcv_expert_matches_memory_loader_serves_curriculum_and_runs_in_ray(prepared):
    tmp, root, _ = prepared
    beton = tmp / "betons" / "tiny-imagenet@16px-train-raw.beton"
    assert bounded(["-c", SCRIPT, str(root), str(tmp), str(beton)], timeout=560).strip().endswith("ok")

    # raw pixels, the same preprocessing arithmetic per element (zca off) and the same order: the first
    # epoch's parameters are bit-identical in float32 (no tolerance needed)
    r = torch.load(tmp / "shuffled.pt")
    assert all(torch.equal(s, e) for s, e in zip(r["served"], r["expected"]))  # exactly our permutations
    assert len(r["served"]) == 2 and r["loaders"] == 1  # epoch 2 reused epoch 1's Loader
    assert torch.equal(r["ffcv"][1], r["memory"][1]) and not torch.equal(r["ffcv"][0], r["ffcv"][1])
    assert torch.equal(r["ffcv"], r["memory"])

    c = torch.load(tmp / "curriculum.pt")
    n = len(c["rank"])
    for e, served in enumerate(c["served"]):
        h = min(1.0, 0.4 + 0.6 * e / 2)
        k = -(-round(h * n * 1e6) // 1_000_000)  # ceil(h(e) |T|)
        assert k == c["sizes"][e] and len(served) == k and len(set(served.tolist())) == k
        assert set(served.tolist()) == set(torch.nonzero(c["rank"] < k).flatten().tolist())  # the k easiest
    assert [len(s) for s in c["served"]] == [15, 26, 36] and c["loaders"] == 3  # one Loader per pacing stage
    assert torch.equal(c["ffcv"], c["memory"])

    ray_r = torch.load(tmp / "ray.pt")
    assert torch.equal(ray_r["ray"], ray_r["memory"])


def test_beton_for_another_resolution_or_dataset_is_refused_naming_the_path(prepared, tmp_path):
    tmp, root, _ = prepared
    from contra_ray.config import DataConfig
    from contra_ray.data.ffcv_beton import check_beton_for
    from contra_ray.data.sources import load_split

    beton = tmp / "betons" / "tiny-imagenet@16px-train-raw.beton"
    at32 = load_split(DataConfig(dataset="tiny-imagenet", root=str(root), resolution=32,
                                 cache_dir=str(tmp / "cache"), zca=False), "train")
    with pytest.raises(ValueError, match=rf"FFCV file {beton} was written for dataset_id='tiny-imagenet@16px/train', "
                                         r"this run's train set has dataset_id='tiny-imagenet@32px/train'"):
        check_beton_for(beton, at32)
    other = tmp_path / "other.beton"  # same bytes, recorded as another data set: refused
    shutil.copy(beton, other)
    meta = json.loads(Path(str(beton) + ".json").read_text())
    Path(str(other) + ".json").write_text(json.dumps({**meta, "dataset_id": "imagenet@16px/train"}))
    at16 = load_split(DataConfig(dataset="tiny-imagenet", root=str(root), resolution=16,
                                 cache_dir=str(tmp / "cache"), zca=False), "train")
    check_beton_for(beton, at16)
    with pytest.raises(ValueError, match=rf"FFCV file {other} was written for dataset_id='imagenet@16px/train'"):
        check_beton_for(other, at16)
    Path(str(other) + ".json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"FFCV file {other} has no other.beton.json beside it"):
        check_beton_for(other, at16)

    # the expert fan-out refuses it before training anything (experts.loader=ffcv, a .beton of 16 px data)
    from contra_ray.config import Config, ExpertConfig
    from contra_ray.experts.remote import train_experts

    cfg = Config()
    cfg.experts = ExpertConfig(epochs=1, num_experts=1, store=str(tmp_path / "experts"), loader="ffcv",
                               ffcv_dir=str(tmp / "betons"), dsa=False)
    spec = cfg.model_spec(3, 32)
    meta = {"dataset_id": at32.dataset_id, "content_hash": at32.content_hash, "zca": False, "zca_eps": 0.1,
            "preprocessor_fingerprint": "fp", "classes": at32.classes}
    x = torch.zeros(36, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="tiny-imagenet@32px-train-raw.beton does not exist"):
        train_experts(cfg, x, at32.labels, x[:2], at32.labels[:2], spec, meta, {})


NAME = "tiny-imagenet@16px-train-raw.beton"
# in a fresh process, as a Ray task on another node: the pickled factory fills that node's (empty) copy, then
# its loader and one over the module's local .beton serve the same permutation
READ_THROUGH = textwrap.dedent("""
    import pickle, sys
    import torch
    torch.set_num_threads(1)
    from contra_ray.data.ffcv_beton import FFCVBatchLoader
    factory_file, local_beton, result = sys.argv[1:4]
    factory = pickle.loads(open(factory_file, "rb").read())
    loader = factory("cpu", 1)
    ref = FFCVBatchLoader(local_beton, factory.preprocessor, factory.batch_size)
    idx = torch.randperm(len(ref), generator=torch.Generator().manual_seed(0))
    got = [(x.clone(), y.clone()) for x, y in loader.batches(idx)]
    want = [(x.clone(), y.clone()) for x, y in ref.batches(idx)]
    torch.save({"path": loader.path, "got": got, "want": want}, result)
""")


def _want(tmp: Path) -> dict:
    meta = json.loads((tmp / "betons" / f"{NAME}.json").read_text())
    return {k: meta[k] for k in ("dataset_id", "content_hash", "resolution", "num_samples")}


def test_prepare_to_a_uri_then_each_node_reads_a_verified_copy_serving_the_same_pixels(
        prepared, s3_server, s3_bucket, tmp_path, monkeypatch):
    import hashlib
    import pickle

    import helpers
    from contra_ray.common import storage
    from contra_ray.common.fileio import sha256_file
    from contra_ray.config import ExpertConfig
    from contra_ray.data.preprocess import Preprocessor
    from contra_ray.experts.remote import _ffcv_factory
    from contra_ray.models import ModelSpec

    tmp, root, _ = prepared
    uri = f"{s3_bucket}/betons"
    env = {**ENV, **helpers.S3_ENV, "AWS_ENDPOINT_URL": s3_server, "CONTRA_RAY_MIRROR": str(tmp_path / "driver")}
    out = bounded(["-m", "contra_ray.data", "prepare", "--dataset", "tiny-imagenet", "--root", str(root),
                   "--resolution", "16", "--mode", "raw", "--out", uri, "--cache-dir", str(tmp / "cache")],
                  timeout=300, env=env)
    assert f"{uri}/{NAME}" in out
    assert set(storage.list_files(uri)) == {NAME, f"{NAME}.json"}  # no probe or temporary left there
    meta = json.loads(storage.read_bytes(f"{uri}/{NAME}.json"))
    written = tmp_path / "driver" / "s3" / s3_bucket[len("s3://"):] / "betons" / f"{NAME}.d" / NAME
    assert meta["sha256"] == sha256_file(written) == hashlib.sha256(storage.read_bytes(f"{uri}/{NAME}")).hexdigest()

    real_pull, pulls = storage.pull, []
    monkeypatch.setattr(storage, "pull", lambda *a, **k: pulls.append(a[0]) or real_pull(*a, **k))
    monkeypatch.setenv("CONTRA_RAY_MIRROR", str(tmp_path / "driver"))
    want = _want(tmp)
    pre = Preprocessor(torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3]))
    factory = _ffcv_factory(ExpertConfig(loader="ffcv", ffcv_dir=uri, batch_size=8), want,
                            torch.zeros(want["num_samples"]), ModelSpec(num_classes=3, image_size=16), pre.state_dict())
    assert factory.path == str(written) and pulls == []  # the preparing node's copy is complete: nothing fetched

    (tmp_path / "factory.pkl").write_bytes(pickle.dumps(factory))
    node = tmp_path / "node"  # another node: its mirror is empty
    bounded(["-c", READ_THROUGH, str(tmp_path / "factory.pkl"), str(tmp / "betons" / NAME), str(tmp_path / "r.pt")],
            timeout=300, env={**env, "CONTRA_RAY_MIRROR": str(node)})
    r = torch.load(tmp_path / "r.pt")
    copy = node / "s3" / s3_bucket[len("s3://"):] / "betons" / f"{NAME}.d" / NAME
    assert r["path"] == str(copy) and sha256_file(copy) == meta["sha256"]
    assert len(r["got"]) == len(r["want"]) == 5 and r["want"][0][0].std() > 0.1  # 36 images in batches of 8
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(r["got"], r["want"]))

    monkeypatch.setenv("CONTRA_RAY_MIRROR", str(node))  # a second task on that node: nothing fetched
    assert pickle.loads(pickle.dumps(factory))("cpu", 1).path == str(copy) and pulls == []


def test_a_corrupted_remote_beton_is_refused_leaving_nothing_and_crash_debris_is_removed(
        prepared, s3_bucket, tmp_path, monkeypatch):
    import hashlib
    import re

    from contra_ray.common import storage
    from contra_ray.common.fileio import sha256_file
    from contra_ray.data.ffcv_beton import beton_cache, open_beton, publish_beton

    tmp, _, _ = prepared
    uri, beton, want = f"{s3_bucket}/betons", tmp / "betons" / NAME, _want(tmp)
    good = json.loads(Path(f"{beton}.json").read_text())["sha256"]
    assert publish_beton(beton, uri) == f"{uri}/{NAME}"

    monkeypatch.setenv("CONTRA_RAY_MIRROR", str(tmp_path / "a"))
    cache = beton_cache(uri, NAME)
    debris = cache.parent / f".{cache.name}.fill-x1y2"  # left by a fill that crashed
    debris.mkdir(parents=True)
    (debris / NAME).write_bytes(b"half a file")
    path, fill = open_beton(uri, NAME, **want)
    assert path == cache / NAME and sha256_file(path) == good == fill.sha256
    assert sorted(p.name for p in cache.parent.iterdir()) == [f".{cache.name}.fill.lock", cache.name]

    data = bytearray(beton.read_bytes())  # same size, one byte changed
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(f"{uri}/{NAME}", bytes(data))
    bad = hashlib.sha256(data).hexdigest()
    monkeypatch.setenv("CONTRA_RAY_MIRROR", str(tmp_path / "b"))
    with pytest.raises(ValueError, match=rf"fetched from {uri} fails its check: {re.escape(NAME)} has sha256 {bad}, "
                                         rf"its {re.escape(NAME)}.json records sha256 {good}"):
        fill()
    assert [p.name for p in beton_cache(uri, NAME).parent.iterdir()] == [f".{cache.name}.fill.lock"]

    meta = json.loads(Path(f"{beton}.json").read_text())  # a JSON written before .beton files had a sha256
    storage.write_bytes(f"{uri}/{NAME}.json", json.dumps({k: v for k, v in meta.items() if k != "sha256"}).encode())
    with pytest.raises(ValueError, match=rf"FFCV file {uri}/{re.escape(NAME)}: its {re.escape(NAME)}.json records "
                                         rf"no sha256 .*; rerun python -m contra_ray.data prepare --out {uri}$"):
        open_beton(uri, NAME, **want)


def test_prepare_refuses_an_unusable_out_uri_before_any_work(prepared, s3_server, tmp_path, monkeypatch, capsys):
    from contra_ray.data.cli import main

    tmp, root, _ = prepared
    monkeypatch.setenv("CONTRA_RAY_MIRROR", str(tmp_path / "mirror"))
    args = ["prepare", "--dataset", "tiny-imagenet", "--root", str(root), "--resolution", "16",
            "--cache-dir", str(tmp / "cache"), "--out"]
    assert main([*args, "foo://x/b"]) == 2
    assert capsys.readouterr().err.startswith("error: --out='foo://x/b': unknown storage scheme 'foo://'")
    assert main([*args, "s3://no-such-bucket-7f3a/b"]) == 2  # the server has no such bucket
    err = capsys.readouterr().err
    assert err.startswith("error: --out='s3://no-such-bucket-7f3a/b': cannot be written (") and err.count("\n") == 1
    assert main([*args, ""]) == 2  # not "here": an empty --out would write into the working directory
    assert capsys.readouterr().err.startswith("error: --out='': give the folder or URI for the .beton files")
    assert not (tmp_path / "mirror").exists()  # nothing written
