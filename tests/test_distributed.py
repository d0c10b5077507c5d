"""Distributed distillation on Ray Train (CPU, gloo): W-independence, kill-and-resume, torn checkpoints,
``ray job submit`` against a loopback cluster, and the cluster configs."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from contra_ray.common.fileio import load_yaml
from contra_ray.config import load_config
from contra_ray.data.prepare import PreparedData
from contra_ray.data.preprocess import Preprocessor
from contra_ray.data.sources import ImageSet, content_hash
from contra_ray.distill.matching import make_plan
from contra_ray.distill.remote import (
    CheckpointError,
    FaultInjection,
    PreparedSetup,
    fit_distributed,
    read_checkpoint,
    worker_share,
    write_checkpoint,
)
from contra_ray.experts.store import ExpertStore
from contra_ray.models import ModelSpec
from helpers import (
    assert_expert_runs,
    assert_shared_vocabulary,
    fake_expert_store,
    free_ports,
    make_tree,
    patch_everywhere,
    processes_of,
    stop_own_cluster,
)

ROOT = Path(__file__).resolve().parents[1]
SPEC = ModelSpec("convnet", num_classes=3, image_size=8, channels=3, width=4, depth=2)
EPOCHS = 3


def toy_setup(root: Path) -> PreparedSetup:
    """12 random 8x8 images of 3 classes and a store of 2 random-walk expert trajectories."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.arange(12) % 3
    train = ImageSet(images, labels, ["a", "b", "c"], "toy/train", content_hash(images, labels))
    pre = Preprocessor(mean=torch.full((3,), 0.5), std=torch.full((3,), 0.25))
    data = PreparedData(train, train, pre, pre(images), pre(images), SPEC)
    meta = {"model_spec": SPEC.to_dict(), "epochs": EPOCHS, "dataset_id": train.dataset_id,
            "content_hash": train.content_hash, "zca": False, "zca_eps": 0.1,
            "preprocessor_fingerprint": pre.fingerprint(), "classes": train.classes}
    fake_expert_store(root / "experts", meta, pre.state_dict(), SPEC, num_experts=2, epochs=EPOCHS,
                      generator=g)  # the steps continue g's stream after the images
    return PreparedSetup(data, str(root / "experts"))


def toy_config(out: Path, name: str, **distill):
    d = {"ipc": 2, "beta": 0.2, "K": 2, "R": 1, "syn_steps": 3, "expert_epochs": 1, "min_start_epoch": 0,
         "max_start_epoch": 2, "batch_syn": 4, "iterations": 5, "lr_img": 10.0, "dtype": "float64",
         "checkpoint_every": 2, **distill}
    return load_config("tiny_cpu", {"name": name, "output_dir": str(out), "threads": 1,
                                    "model": {"width": 4}, "experts": {"epochs": EPOCHS, "store": str(out / "experts")},
                                    "tracking": {"enabled": False}, "distill": d})


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    """W=1, W=2, and W=2 with rank 1 killed at iteration 3 (restart from the checkpoint at 2)."""
    out = tmp_path_factory.mktemp("dist")
    setup = toy_setup(out)
    timings, res = {}, {}
    for key, W, fault, dtype, extra in (
            ("w1", 1, None, "float64", {}), ("w2", 2, None, "float64", {}),
            ("w2_killed", 2, FaultInjection(iteration=3, rank=1, marker=str(out / "killed")), "float64", {}),
            ("w1_f32", 1, None, "float32", {}), ("w2_f32", 2, None, "float32", {}),
            ("w2_constant_batched", 2, None, "float64", {"unroll_memory": "constant", "student_execution": "batched"})):
        t0 = time.perf_counter()
        res[key] = fit_distributed(toy_config(out, key, dtype=dtype, **extra), W, setup=setup, max_failures=1,
                                   fault=fault)
        timings[key] = time.perf_counter() - t0
    print("fit seconds:", {k: round(v, 1) for k, v in timings.items()})
    res.update(marker=out / "killed", out=out, setup=setup)
    return res


def test_worker_share_round_robin_over_active_students():
    plan = make_plan(0, 0, [0], n_syn=4, batch_syn=4, syn_steps=1, beta=0.0, K=3, R=1, min_start=0, max_start=3)
    assert [worker_share(plan, w, 2) for w in range(2)] == [[1, 3], [2]]  # β = 0: student 0 is skipped
    assert [worker_share(plan, w, 4) for w in range(4)] == [[1], [2], [3], []]
    plan = make_plan(0, 0, [0], n_syn=4, batch_syn=4, syn_steps=1, beta=0.2, K=3, R=1, min_start=0, max_start=3)
    shares = [worker_share(plan, w, 3) for w in range(3)]
    assert shares == [[0, 3], [1], [2]] and sorted(sum(shares, [])) == [0, 1, 2, 3]


def test_w1_and_w2_give_the_same_synthetic_set_float64(runs):
    a, b = runs["w1"], runs["w2"]
    assert a.state["iteration"] == b.state["iteration"] == 5 and a.error is None and b.error is None
    for key in ("images", "label_logits", "syn_lr"):
        x, y = a.state[key], b.state[key]
        assert x.dtype == torch.float64
        rel = float((x - y).norm() / x.norm())
        assert rel <= 1e-10, (key, rel)
    assert float(a.state["syn_lr"]) != 0.01  # the state did move (syn_lr_init = 0.01)
    assert a.history["loss"] == pytest.approx(b.history["loss"], rel=1e-10)
    assert len(a.history["loss"]) == 5 and set(a.history) >= {"loss/sampled", "loss/start_0", "loss/start_1"}


def test_w2_constant_memory_batched_students_equal_w1_full_sequential(runs):
    """Issue 9: the constant-memory unroll with vmapped students, sharded over 2 workers, gives the W = 1
    full-unroll result (float64; all differences are summation order)."""
    a, b = runs["w1"], runs["w2_constant_batched"]
    assert b.error is None and b.state["iteration"] == 5
    for key in ("images", "label_logits", "syn_lr"):
        rel = float((a.state[key] - b.state[key]).norm() / a.state[key].norm())
        assert rel <= 1e-10, (key, rel)
    assert a.history["loss"] == pytest.approx(b.history["loss"], rel=1e-10)


def test_w1_and_w2_give_the_same_synthetic_set_float32(runs):
    a, b = runs["w1_f32"], runs["w2_f32"]
    assert a.state["iteration"] == b.state["iteration"] == 5
    for key in ("images", "label_logits", "syn_lr"):
        x, y = a.state[key], b.state[key]
        assert x.dtype == torch.float32
        rel = float((x - y).norm() / x.norm())
        assert rel <= 1e-5, (key, rel)


def test_killed_worker_group_resumes_bit_identically(runs):
    ref, run = runs["w2"], runs["w2_killed"]
    assert runs["marker"].exists()  # the fault fired once
    assert run.summary["start_iteration"] == 2  # the restarted group loaded the checkpoint of iteration 2
    for key in ("images", "label_logits", "syn_lr"):
        assert torch.equal(ref.state[key], run.state[key]), key
    assert ref.history == run.history
    from contra_ray.distill.artifact import DistilledSet

    art = DistilledSet.load(run.artifact)
    assert torch.equal(art.images, run.state["images"].float())


def test_rerun_with_same_name_resumes_and_no_resume_starts_over(runs):
    out, setup = runs["out"], runs["setup"]
    more = fit_distributed(toy_config(out, "w2", iterations=6), 1, setup=setup, max_failures=0)
    assert more.summary["start_iteration"] == 5 and more.state["iteration"] == 6
    fresh = fit_distributed(toy_config(out, "w2", iterations=2, eval_every=1), 1, setup=setup, resume=False,
                            max_failures=0)
    assert fresh.summary["start_iteration"] == 0 and fresh.state["iteration"] == 2
    assert len(fresh.history["eval_acc"]) == 1 and 0 <= fresh.history["eval_acc"][0] <= 100  # rank 0 evaluates
    assert fresh.history["loss"] == pytest.approx(runs["w1"].history["loss"][:2], rel=1e-10)


def test_rerun_falls_back_from_a_torn_newest_checkpoint(runs, capfd):
    """The newest checkpoint in Ray's storage fails its manifest: one line says so, the older one is used."""
    out, setup = runs["out"], runs["setup"]
    dirs = sorted(d for d in (out / "ray_train" / "w1_f32").glob("checkpoint_*") if d.is_dir())
    assert len(dirs) == 2  # num_to_keep=2: iterations 4 and 5
    newest = max(dirs, key=lambda d: json.loads((d / "manifest.json").read_text())["iteration"])
    state = newest / "state.pt"
    state.write_bytes(state.read_bytes()[:-10])  # torn
    again = fit_distributed(toy_config(out, "w1_f32", dtype="float32", iterations=6), 1, setup=setup,
                            max_failures=0)
    assert again.summary["start_iteration"] == 4 and again.state["iteration"] == 6
    skipped = [line for line in capfd.readouterr().out.splitlines() if "[checkpoint] skipping" in line]
    assert len(skipped) == 1 and newest.name in skipped[0]


def test_num_workers_run_logs_the_shared_vocabulary(ray_local, tmp_path):
    """`distill --num-workers 2` (run_distributed): rank 0's metrics and the driver's run read back from the
    store under the names and tags every run kind shares."""
    from mlflow.tracking import MlflowClient

    from contra_ray.distill.remote import run_distributed

    make_tree(tmp_path / "ds", counts={"train": 6, "test": 2})
    cfg = load_config("tiny_cpu", {"name": "w2", "output_dir": str(tmp_path / "out"), "threads": 1,
                                   "data": {"dataset": "imagefolder", "root": str(tmp_path / "ds"),
                                            "cache_dir": str(tmp_path / "cache"), "train_per_class": None},
                                   "model": {"width": 4}, "experts": {"epochs": 3, "dsa": False},
                                   "distill": {"batch_syn": None, "iterations": 3, "lr_img": 1, "lr_lr": 1e-8}})
    assert run_distributed(cfg, num_workers=2) == 0
    client = MlflowClient(tracking_uri=cfg.tracking_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("contra_ray").experiment_id],
                                "tags.`contra_ray.role` = 'distill'")
    assert_shared_vocabulary(client, run, role="distill", entry_point="contra_ray.distill", method="contra",
                             final=False, iterations=3)
    assert_expert_runs(client, run, ExpertStore.open(cfg.expert_store()), [0, 1])  # the driver logged them
    assert "loss/sampled" in run.data.metrics  # rank 0 keeps the '/' names, as in one process
    assert {"distilled_grid.png", "distill_curves.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_torn_checkpoint_is_rejected(tmp_path):
    state = {"distiller": {"iteration": 4, "images": torch.randn(3, 3, 8, 8)}, "history": {"loss": [1.0]},
             "config": {}}
    good = tmp_path / "good"
    write_checkpoint(good, state, run_token="abc")
    assert sorted(p.name for p in good.iterdir()) == ["manifest.json", "state.pt"]  # no temporary files left
    assert torch.equal(read_checkpoint(good)["distiller"]["images"], state["distiller"]["images"])
    assert json.loads((good / "manifest.json").read_text())["run_token"] == "abc"

    def variant(name, damage):
        d = tmp_path / name
        shutil.copytree(good, d)
        damage(d)
        return d

    truncated = variant("truncated", lambda d: (d / "state.pt").write_bytes((d / "state.pt").read_bytes()[:100]))
    with pytest.raises(CheckpointError, match=r"truncated: state.pt has 100 bytes"):
        read_checkpoint(truncated)

    def flip(d):
        b = bytearray((d / "state.pt").read_bytes())
        b[-10] ^= 0xFF
        (d / "state.pt").write_bytes(bytes(b))

    with pytest.raises(CheckpointError, match="sha256"):
        read_checkpoint(variant("flipped", flip))
    with pytest.raises(CheckpointError, match="no manifest.json"):  # copied before the manifest was written
        read_checkpoint(variant("no_manifest", lambda d: (d / "manifest.json").unlink()))
    with pytest.raises(CheckpointError, match="state.pt is missing"):
        read_checkpoint(variant("no_state", lambda d: (d / "state.pt").unlink()))
    with pytest.raises(CheckpointError, match="unreadable"):
        read_checkpoint(variant("bad_manifest", lambda d: (d / "manifest.json").write_text("{not json")))


# ---------------------------------------------------------------------------------------------- ray job submit

@pytest.mark.slow
def test_ray_job_submit_round_trip(tmp_path, monkeypatch, s3_bucket):
    """README "On a cluster": `ray job submit --working-dir . -- python -m contra_ray.distill --num-workers 2
    --output-dir s3://...` against a loopback head node and an S3 server; the set is read back from the bucket."""
    from contra_ray.distill.artifact import DistilledSet

    make_tree(tmp_path / "ds", counts={"train": 6, "test": 2})
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the job client in this process
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp_dir = tempfile.mkdtemp(prefix="crjob", dir="/tmp")  # short: Ray's unix socket paths must fit
    mirror = tmp_path / "mirror"  # the job driver's node-local mirror of the bucket (its MLflow SQLite too)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "CONTRA_RAY_MIRROR": str(mirror),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    monkeypatch.setenv("CONTRA_RAY_MIRROR", str(tmp_path / "reader"))  # this process reads the bucket afresh
    gcs, dash, client, nm, om, agent, agent_grpc, metrics, rt_env = free_ports(9)
    start = [ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard=true",
             "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(100 * 2**20),
             "--temp-dir", temp_dir, "--ray-client-server-port", str(client), "--node-manager-port", str(nm),
             "--object-manager-port", str(om), "--dashboard-agent-listen-port", str(agent),
             "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
             "--runtime-env-agent-port", str(rt_env), "--disable-usage-stats"]
    out = f"{s3_bucket}/runs"
    job = [sys.executable, "-m", "contra_ray.distill", "--preset", "tiny_cpu", "--name", "job",
           "--output-dir", out, "--num-workers", "2",
           "--set", "data.dataset=imagefolder", "--set", f"data.root={tmp_path / 'ds'}",
           "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.train_per_class=null",
           "--set", "model.width=4", "--set", "experts.epochs=3", "--set", "experts.dsa=false",
           "--set", "distill.batch_syn=null", "--set", "distill.iterations=3", "--set", "distill.checkpoint_every=2",
           "--set", "distill.lr_lr=1e-8", "--set", "distill.lr_img=1", "--set", "threads=1"]  # random data
    address = f"http://127.0.0.1:{dash}"
    t0 = time.perf_counter()
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, text=True, timeout=180)
        # the way Ray users ship code: --working-dir . (the job runs the unpacked copy; absolute locations)
        sub = subprocess.run([ray_bin, "job", "submit", "--address", address, "--submission-id", "contra-job",
                              "--working-dir", str(ROOT), "--", *job], env=env, capture_output=True, text=True,
                             timeout=600)
        from ray.job_submission import JobStatus, JobSubmissionClient

        jobs = JobSubmissionClient(address)
        status = jobs.get_job_status("contra-job")
        assert status == JobStatus.SUCCEEDED, (status, sub.stdout[-6000:] + sub.stderr[-3000:])
        # a relative --output-dir would land in Ray's unpack folder, deleted with the job: refused before work
        rel = subprocess.run([ray_bin, "job", "submit", "--address", address, "--submission-id", "contra-rel",
                              "--working-dir", str(ROOT), "--", *job[:8], "runs", *job[9:]], env=env,
                             capture_output=True, text=True, timeout=300)
        assert jobs.get_job_status("contra-rel") == JobStatus.FAILED
        assert "error: output_dir='runs': a relative path inside a Ray job with a working dir" in rel.stdout
        assert "Traceback" not in rel.stdout
    finally:
        stop_own_cluster(temp_dir)
        left = processes_of(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        print(f"job round trip: {time.perf_counter() - t0:.1f} s")
    assert not left
    from contra_ray.common import storage

    artifact = DistilledSet.load(f"{out}/job/distilled.safetensors")
    assert artifact.images.shape == (3, 3, 8, 8) and artifact.meta["iteration"] == 3
    published = storage.list_files(out)
    assert {"job/distilled_grid.png", "job/experts/store.json", "job/experts/index.parquet"} <= set(published)
    assert any(f.startswith("ray_train/job/checkpoint_") and f.endswith("manifest.json") for f in published)
    assert f"distilled set: {out}/job/distilled.safetensors" in sub.stdout
    from mlflow.tracking import MlflowClient  # rank 0 logged per-iteration metrics into the driver's run

    db = mirror / "s3" / s3_bucket[len("s3://"):] / "runs" / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("contra_ray").experiment_id],
                                "tags.`contra_ray.role` = 'distill'")  # its experts' runs are its children
    assert run.info.status == "FINISHED" and run.data.params["distill.iterations"] == "3"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- cluster configs

def test_cluster_launcher_config_matches_ray_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = load_yaml(ROOT / "clusters" / "aws-gpu.yaml")
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and cfg["provider"]["type"] == "aws"
    gpu_types = [t["node_config"]["InstanceType"] for n, t in types.items() if n != cfg["head_node_type"]]
    assert gpu_types and all(t.split(".")[0] in ("g5", "g6", "p4d", "p5") for t in gpu_types)
    assert any("pip install" in c and "contra_ray" in c for c in cfg["setup_commands"])
    assert all("RAY_AUTH_MODE=token" in " ".join(cfg[k]) for k in ("head_start_ray_commands",
                                                                    "worker_start_ray_commands"))


def test_kuberay_manifest_has_the_raycluster_required_fields():
    docs = [d for d in load_yaml(ROOT / "clusters" / "kuberay-raycluster.yaml", all_documents=True) if d]
    (rc,) = [d for d in docs if d.get("kind") == "RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"]
    head = rc["spec"]["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # the CRD wants strings
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = rc["spec"]["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert g["groupName"] and isinstance(g["replicas"], int) and isinstance(g["rayStartParams"], dict)
        assert g.get("minReplicas", 0) <= g["replicas"] <= g.get("maxReplicas", g["replicas"])
        containers = g["template"]["spec"]["containers"]
        assert containers and all(c["name"] and c["image"] for c in containers)
        assert any(int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1 for c in containers)
    envs = [e["name"] for c in head["template"]["spec"]["containers"] for e in c.get("env", [])]
    assert "RAY_AUTH_MODE" in envs and "RAY_AUTH_TOKEN" in envs


def test_use_gpu_without_gpus_is_refused_before_work_and_without_workers(ray_local, tmp_path, capsys, monkeypatch):
    """A user finding: --use-gpu --num-workers 1 on a machine without GPUs waited forever for a GPU."""
    from contra_ray.distill.cli import main as distill_main
    from contra_ray.distill.remote import run_distributed

    patch_everywhere(monkeypatch, "contra_ray.data.prepare.prepare_data", lambda *a, **k: pytest.fail("work started"))
    cfg = load_config("tiny_cpu", {"name": "g", "output_dir": str(tmp_path), "threads": 1})
    assert run_distributed(cfg, num_workers=1, use_gpu=True) == 2
    assert "--use-gpu with --num-workers=1 needs 1 GPUs, the Ray cluster has 0" in capsys.readouterr().err
    assert distill_main(["--preset", "tiny_cpu", "--output-dir", str(tmp_path), "--use-gpu", "--no-tracking"]) == 2
    assert "--use-gpu: GPUs for Ray Train workers (--num-workers >= 1)" in capsys.readouterr().err
