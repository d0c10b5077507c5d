"""A 2-node Ray cluster on this machine whose second node does not see the driver's folders (as on two VMs
without shared storage): the second node runs in its own mount namespace with an empty tmpfs over ``hidden``
(the node-local mirrors of object storage, ``$CONTRA_RAY_MIRROR``, live there) and over the data cache, and one
CPU per node, so two workers, experts or trials take one CPU on each node. An S3-compatible server (moto) on
127.0.0.1 is the storage both nodes reach. The real command lines run against it (subprocesses): distill
``--num-workers 2`` to ``s3://`` equal to the in-process run, a killed worker and a killed expert task resuming
from the bucket, ``evaluate --artifact s3://...``, a 2-trial Tune sweep on both nodes, the pipeline on a streamed
ImageNet whose decoded cache node 2 fills from the bucket, and the pre-flight check refusing a node-local folder
before any work."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from helpers import ROOT, free_ports, make_bucket, processes_of, stop_own_cluster

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a node that does not see the head's folders needs a private mount namespace: root and unshare(1)")


@dataclasses.dataclass(frozen=True)
class Cluster:
    address: str
    env: dict  # for a driver: RAY_ADDRESS, PYTHONPATH, AWS_* (the moto server), CONTRA_RAY_MIRROR
    shared: Path  # a folder both nodes see
    hidden: Path  # the second node sees an empty tmpfs here
    cache: str  # the data cache (hidden from the second node too)
    bucket: str  # s3://<bucket> on the moto server
    mirror: Path  # $CONTRA_RAY_MIRROR (under hidden): the driver's node-local copies of s3:// locations

    def db(self, output_dir: str) -> str:
        """The driver's default MLflow store for a run under ``output_dir`` (an s3:// URI)."""
        return f"sqlite:///{self.mirror / output_dir.replace('://', '/', 1) / 'mlflow.db'}"


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, s3_server, cache_dir):
    """A head node and a second node (1 CPU each) that both reach the moto server (AWS_* in their environment)
    and share nothing local but ``shared`` and the code: ``hidden`` (the object-storage mirrors) and the data
    cache are an empty tmpfs on the second node."""
    base = tmp_path_factory.mktemp("cluster")
    shared, hidden = base / "shared", base / "hidden"
    shared.mkdir()
    hidden.mkdir()
    cache = str(Path(cache_dir).resolve())
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp_dir = tempfile.mkdtemp(prefix="crcl", dir="/tmp")  # short: Ray's unix socket paths must fit
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT),
           "CONTRA_RAY_MIRROR": str(hidden / "mirror"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    assert env["AWS_ENDPOINT_URL"] == s3_server  # set by the s3_server fixture, inherited by both nodes
    bucket = make_bucket(s3_server, f"cluster-{os.getpid() % 10000}")
    gcs, *ports = free_ports(8)
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0",
              "--object-store-memory", str(80 * 2**20), "--disable-usage-stats"]
    head = [ray_bin, "start", "--head", "--port", str(gcs), "--temp-dir", temp_dir, "--include-dashboard=false",
            "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
            "--ray-client-server-port", str(ports[2]), *common]
    node2 = [ray_bin, "start", "--address", f"127.0.0.1:{gcs}", "--node-manager-port", str(ports[3]),
             "--object-manager-port", str(ports[4]), "--dashboard-agent-listen-port", str(ports[5]),
             "--dashboard-agent-grpc-port", str(ports[6]), *common]
    hide = f'mount -t tmpfs tmpfs "{hidden}" && mount -t tmpfs tmpfs "{cache}" && exec "$@"'
    try:
        subprocess.run(head, env=env, check=True, capture_output=True, text=True, timeout=180)
        subprocess.run(["unshare", "-m", "sh", "-c", hide, "sh", *node2],
                       env=env, check=True, capture_output=True, text=True, timeout=180)
        yield Cluster(f"127.0.0.1:{gcs}", {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}, shared, hidden, cache, bucket,
                      hidden / "mirror")
    finally:
        stop_own_cluster(temp_dir)
        left = processes_of(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes left running: {left}"


def run_python(code: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def cli(module: str, *args: str, env: dict, cwd, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], env={**env, "PYTHONPATH": str(ROOT)}, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def tail(out: subprocess.CompletedProcess) -> str:
    return out.stdout[-3000:] + "\n--- stderr ---\n" + out.stderr[-4000:]


def bucket_files(location: str) -> list[str]:
    from contra_ray.common import storage

    return sorted(storage.list_files(location))


def actor_nodes(cluster: Cluster, *class_names: str) -> tuple[str, list[str]]:
    """``(head node id, [node id of every actor, alive or dead, whose class is one of class_names])`` from the
    GCS's actor table (reachable without the dashboard)."""
    out = run_python(
        "import json, ray; ray.init()\n"
        "from ray._private import state\n"
        "head = [n['NodeID'] for n in ray.nodes() if 'node:__internal_head__' in n['Resources']]\n"
        f"found = [a['Address']['NodeID'] for a in state.actors().values() if a['ActorClassName'] in {class_names!r}]\n"
        "print('NODES', json.dumps([head[0], found]))\n", cluster.env)
    assert out.returncode == 0, tail(out)
    head, found = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("NODES "))[6:])
    return head, found


def max_diff(a, b) -> dict[str, float]:
    """Max abs differences of two DistilledSets' images, label logits and syn_lr."""
    return {"images": (a.images.double() - b.images.double()).abs().max().item(),
            "label_logits": (a.label_logits.double() - b.label_logits.double()).abs().max().item(),
            "syn_lr": abs(float(a.syn_lr) - float(b.syn_lr))}


def distill_args(cluster: Cluster, *extra: str) -> list[str]:
    return ["--preset", "tiny_cpu", "--set", "threads=1", "--set", f"data.cache_dir={cluster.cache}",
            "--set", "distill.checkpoint_every=2", *extra]


# ---------------------------------------------------------------------------------------------- pre-flight


def test_preflight_names_the_node_that_does_not_see_a_folder(two_nodes):
    shared, hidden = two_nodes.shared, two_nodes.hidden / "probe"
    out = run_python(
        "import ray; ray.init()\n"
        "from contra_ray.common.raycluster import check_locations_on_nodes, LocationNotShared\n"
        f"print('nodes', check_locations_on_nodes({{'output_dir': {str(shared)!r}}}))\n"
        f"print('s3', check_locations_on_nodes({{'output_dir': {two_nodes.bucket + '/probe'!r}}}))\n"
        "try:\n"
        f"    check_locations_on_nodes({{'output_dir': {str(shared)!r}, 'data.cache_dir': {str(hidden)!r}}})\n"
        "except LocationNotShared as e:\n"
        "    print('refused', e)\n", two_nodes.env)
    assert out.returncode == 0, tail(out)
    lines = [line for line in out.stdout.splitlines() if line.startswith(("nodes", "s3", "refused"))]
    assert lines[:2] == ["nodes 2", "s3 2"]  # both nodes see the shared folder and the bucket
    refused = lines[2]
    assert refused.count("does not see the files the driver wrote there") == 1  # one node, one field
    assert f"data.cache_dir={hidden}" in refused and "output_dir" not in refused.split(".")[0]
    assert "use object storage (--output-dir s3://bucket/runs" in refused
    assert sorted(os.listdir(shared)) == [] and not hidden.exists()  # no probe files (nor folders) left
    assert bucket_files(two_nodes.bucket + "/probe") == []


def test_distill_on_the_cluster_refuses_a_node_local_output_dir_before_any_work(two_nodes, tmp_path):
    hidden = two_nodes.hidden / "local"
    out = cli("contra_ray.distill", "--preset", "tiny_cpu", "--num-workers", "2", "--output-dir", str(hidden),
              "--no-tracking", "--set", "threads=1", "--set", f"data.cache_dir={two_nodes.shared / 'cache'}",
              env=two_nodes.env, cwd=tmp_path)
    assert out.returncode == 2, tail(out)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"output_dir={hidden}" in errors[0] and "(id " in errors[0]
    assert errors[0].startswith("error: node ") and "s3://" in errors[0]  # names the node, says what to do
    assert "[data]" not in out.stdout  # refused before the data were prepared: the cache holds nothing
    cache = two_nodes.shared / "cache"  # the CLI's destination check may create it (empty); nothing is decoded into it
    assert not cache.exists() or list(cache.iterdir()) == []
    # a refused run leaves nothing in the run's folder but the run directory's lock file
    assert [p.relative_to(hidden).as_posix() for p in hidden.rglob("*") if p.is_file()] == ["tiny_cpu/.lock"]


def test_unknown_scheme_is_refused_by_name(two_nodes, tmp_path):
    out = cli("contra_ray.distill", *distill_args(two_nodes, "--num-workers", "2", "--output-dir", "foo://x/y"),
              env=two_nodes.env, cwd=tmp_path)
    assert out.returncode == 2, tail(out)
    assert "unknown storage scheme 'foo://'" in out.stderr and "output_dir='foo://x/y'" in out.stderr
    assert list(tmp_path.iterdir()) == []  # no folder called foo: (nor anything else) here


# ---------------------------------------------------------------------------------------------- distill on s3


@pytest.fixture(scope="module")
def s3_distill(two_nodes, tmp_path_factory):
    """``distill --num-workers 2 --output-dir s3://<bucket>/runs --name w2`` on the cluster:
    ``(CompletedProcess, output_dir)``."""
    out_dir = f"{two_nodes.bucket}/runs"
    out = cli("contra_ray.distill", *distill_args(two_nodes, "--num-workers", "2", "--output-dir", out_dir,
                                                  "--name", "w2"),
              env=two_nodes.env, cwd=tmp_path_factory.mktemp("w2"))
    return out, out_dir


def test_distill_to_s3_with_a_worker_on_node_2_equals_the_in_process_run(two_nodes, s3_distill, tmp_path):
    from contra_ray.common import storage
    from contra_ray.distill.artifact import DistilledSet

    out, out_dir = s3_distill
    assert out.returncode == 0, tail(out)
    assert f"distilled set: {out_dir}/w2/distilled.safetensors" in out.stdout
    head, workers = actor_nodes(two_nodes, "RayTrainWorker")
    assert len(workers) == 2 and set(workers) - {head}, workers  # a worker on the non-head node
    files = bucket_files(f"{out_dir}/w2")
    assert {"distilled.safetensors", "experts/store.json", "experts/index.parquet",
            "experts/expert_0000.safetensors", "experts/expert_0001.safetensors"} <= set(files), files
    assert not [f for f in files if ".partial" in f]  # finished experts leave no resume state
    ckpts = {f.split("/")[0] for f in bucket_files(f"{out_dir}/ray_train/w2") if f.startswith("checkpoint_2")}
    assert len(ckpts) == 2, ckpts  # iterations 2 and 4 (num_to_keep=2), in the bucket
    # rank 0 (on either node) logged every iteration to the driver's SQLite (through the driver's MLflow relay:
    # until that exists, rank 0 on node 2 fails with "Run with id=... not found" and the run exits 1)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(two_nodes.db(out_dir))
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.info.run_name == "w2-distill"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [0, 1, 2, 3]
    # the in-process run of the same config, without a cluster, on a local folder, same experts
    env = {k: v for k, v in two_nodes.env.items() if k != "RAY_ADDRESS"}
    ref = cli("contra_ray.distill", *distill_args(two_nodes, "--output-dir", str(tmp_path / "runs"), "--name", "ref",
                                                  "--no-tracking", "--no-train-experts",
                                                  "--experts", f"{out_dir}/w2/experts"),
              env=env, cwd=tmp_path)
    assert ref.returncode == 0, tail(ref)
    published = tmp_path / "published.safetensors"
    published.write_bytes(storage.read_bytes(f"{out_dir}/w2/distilled.safetensors"))
    reference = tmp_path / "runs" / "ref" / "distilled.safetensors"
    diff = max_diff(DistilledSet.load(published), DistilledSet.load(reference))
    assert max(diff.values()) <= 1e-6, diff


KILLED_WORKER = """
import json, ray
ray.init()
from contra_ray.config import load_config
from contra_ray.data.prepare import prepare_data
from contra_ray.distill.remote import ClusterSetup, FaultInjection, fit_distributed
from contra_ray.experts.remote import ensure_experts

cfg = load_config("tiny_cpu", {{"name": "killed", "output_dir": {out_dir!r}, "threads": 1,
                               "data": {{"cache_dir": {cache!r}}}, "experts": {{"store": {store!r}}},
                               "tracking": {{"enabled": False}}, "distill": {{"checkpoint_every": 2}}}})
data = prepare_data(cfg)
ensure_experts(cfg, data, train_missing=False)
run = fit_distributed(cfg, 2, setup=ClusterSetup(ray.put(data)),
                      fault=FaultInjection(iteration=3, rank={rank}, marker={marker!r}))
print("RESULT", json.dumps({{"start": run.summary["start_iteration"], "iteration": run.summary["iteration"],
                            "checkpoint": run.result.checkpoint.path, "artifact": str(run.artifact)}}))
"""


def test_killed_worker_resumes_from_the_bucket_checkpoint(two_nodes, s3_distill, tmp_path):
    from contra_ray.distill.artifact import DistilledSet

    out, out_dir = s3_distill
    assert out.returncode == 0, tail(out)
    marker = two_nodes.shared / "killed-worker"
    run = run_python(KILLED_WORKER.format(out_dir=out_dir, cache=two_nodes.cache, store=f"{out_dir}/w2/experts",
                                          rank=1, marker=str(marker)), two_nodes.env, timeout=400)
    assert run.returncode == 0, tail(run)
    assert marker.read_text() == "killed rank 1 at iteration 3\n"
    result = json.loads(next(ln for ln in run.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    # the restarted group began at the checkpoint of iteration 2, read from the bucket (the path is the bucket's)
    assert result["start"] == 2 and result["iteration"] == 4
    bucket = two_nodes.bucket[len("s3://"):]
    assert result["checkpoint"].startswith(f"{bucket}/runs/ray_train/killed/checkpoint_"), result
    assert "resum" in (run.stdout + run.stderr).lower()
    uninterrupted = tmp_path / "w2.safetensors"
    from contra_ray.common import storage

    uninterrupted.write_bytes(storage.read_bytes(f"{out_dir}/w2/distilled.safetensors"))
    killed = tmp_path / "killed.safetensors"
    killed.write_bytes(storage.read_bytes(f"{out_dir}/killed/distilled.safetensors"))
    diff = max_diff(DistilledSet.load(killed), DistilledSet.load(uninterrupted))
    assert max(diff.values()) <= 1e-6, diff


KILLED_EXPERT = """
import os, shutil, signal, ray
ray.init()
from contra_ray.common import storage
from contra_ray.config import load_config
from contra_ray.data.prepare import prepare_data
from contra_ray.experts.remote import store_meta, train_experts

HEAD = ray.get_runtime_context().get_node_id()
STORE = {store!r}


class KillOnNode2:
    \"\"\"SIGKILL the task's own process once, after epoch 2 on the non-head node, its local copy of the store gone
    (as with a lost node): the retry can only resume from the bucket.\"\"\"

    def __call__(self, expert_id, epoch):
        if epoch == 2 and ray.get_runtime_context().get_node_id() != HEAD and not os.path.exists({marker!r}):
            with open({marker!r}, "w") as f:
                f.write(f"killed expert {{expert_id}} after epoch {{epoch}}\\n")
            shutil.rmtree(storage.local_mirror(STORE))
            os.kill(os.getpid(), signal.SIGKILL)


cfg = load_config("tiny_cpu", {{"name": "xkill", "output_dir": {out_dir!r}, "threads": 1,
                               "data": {{"cache_dir": {cache!r}}}, "experts": {{"store": STORE, "max_retries": 1}},
                               "tracking": {{"enabled": False}}}})
data = prepare_data(cfg)
train_experts(cfg, data.train_x, data.train.labels, data.test_x, data.test.labels, data.spec, store_meta(cfg, data),
              data.preprocessor.state_dict(), epoch_hook=KillOnNode2())
print("DONE")
"""


def test_expert_killed_on_node_2_resumes_from_the_bucket(two_nodes, s3_distill, tmp_path):
    from contra_ray.common import storage
    from contra_ray.experts.store import ExpertStore

    out, out_dir = s3_distill
    assert out.returncode == 0, tail(out)
    marker = two_nodes.shared / "killed-expert"
    store = f"{two_nodes.bucket}/xkill/experts"
    run = run_python(KILLED_EXPERT.format(out_dir=out_dir, cache=two_nodes.cache, store=store, marker=str(marker)),
                     two_nodes.env, timeout=400)
    assert run.returncode == 0, tail(run)
    killed = int(marker.read_text().split()[2])
    assert marker.read_text() == f"killed expert {killed} after epoch 2\n"
    said = run.stdout + run.stderr
    assert f"expert {killed:04d}: resuming after epoch 2/4" in said, tail(run)
    resumed = {m.groups() for m in re.finditer(r"expert (\d{4}): resuming after epoch (\d+)/4 from (\S+)", said)}
    partial = two_nodes.mirror / "s3" / store[len("s3://"):] / f"expert_{killed:04d}.partial"  # a node's mirror
    assert resumed == {(f"{killed:04d}", "2", str(partial))}  # only the killed expert, once, after its epoch 2
    assert not [f for f in bucket_files(store) if ".partial" in f]  # resume state dropped once finished
    # bit for bit the trajectories of the uninterrupted run (the w2 run's store: same data, seeds and recipe)
    here, ref = tmp_path / "killed", tmp_path / "ref"
    storage.pull(store, here)
    storage.pull(f"{out_dir}/w2/experts", ref)
    a, b = ExpertStore.open(here), ExpertStore.open(ref)
    assert a.expert_ids == b.expert_ids == [0, 1]
    for i in a.expert_ids:
        assert torch.equal(a.trajectory(i), b.trajectory(i)), i


def test_evaluate_reads_the_artifact_from_the_bucket(two_nodes, s3_distill, tmp_path):
    out, out_dir = s3_distill
    assert out.returncode == 0, tail(out)
    ev = cli("contra_ray.evaluate", "--artifact", f"{out_dir}/w2/distilled.safetensors", "--no-tracking",
             "--runs", "1", "--epochs", "2", "--cache-dir", two_nodes.cache, env=two_nodes.env, cwd=tmp_path)
    assert ev.returncode == 0, tail(ev)
    rows = [ln.split() for ln in ev.stdout.splitlines() if ln.startswith("ConTra ")]
    assert len(rows) == 1 and rows[0][:4] == ["ConTra", "convnet", "1", "1"] and rows[0][5] == "±", ev.stdout[-2000:]
    assert 0 <= float(rows[0][4]) <= 100


# ---------------------------------------------------------------------------------------------- Tune

SPACE = """
preset: tiny_cpu
overrides:
  eval: {runs: 1, epochs: 2}
  distill: {checkpoint_every: 0, iterations: 2}
space:
  distill.beta: {grid: [0.0, 0.5]}
num_samples: 1
seed: 0
metric: proxy_acc
proxy: {eval_every: 2, epochs: 1, runs: 1}
"""


def test_tune_sweep_on_both_nodes_logs_every_trial_to_the_driver_sqlite(two_nodes, tmp_path):
    from mlflow.tracking import MlflowClient

    space = tmp_path / "two_points.yaml"
    space.write_text(SPACE)
    out_dir = f"{two_nodes.bucket}/sweeps"
    out = cli("contra_ray.tune", "--space", str(space), "--output-dir", out_dir, "--name", "sw",
              "--set", "threads=1", "--set", f"data.cache_dir={two_nodes.cache}", env=two_nodes.env, cwd=tmp_path,
              timeout=500)
    head, trials = actor_nodes(two_nodes, "ImplicitFunc", "run_trial")
    assert len(trials) == 2 and set(trials) - {head}, (trials, tail(out))  # one trial on each node (1 CPU each)
    # a trial on node 2 logs to the driver's SQLite only through the driver's MLflow relay actor; without it,
    # it fails with "Run with id=... not found" (node 2 has its own, empty mlflow.db) and tune exits 1
    assert out.returncode == 0, tail(out)
    files = bucket_files(out_dir)
    assert any(f.startswith("sw/") for f in files), files  # the sweep's files in the bucket
    assert sum(f.endswith("/distilled.safetensors") for f in files) == 2, files
    db = two_nodes.db(out_dir)
    client = MlflowClient(db)
    exp = client.get_experiment_by_name("tune-two_points")
    runs = client.search_runs([exp.experiment_id])
    trials_logged = [r for r in runs if r.data.tags.get("contra_ray.role") == "trial"]
    assert len(trials_logged) == 2 and all(r.info.status == "FINISHED" for r in trials_logged)
    assert sorted(r.data.params["distill.beta"] for r in trials_logged) == ["0.0", "0.5"]
    assert all(0 <= r.data.metrics["final_acc"] <= 100 for r in trials_logged)
    rep = cli("contra_ray.report", "--experiment", "tune-two_points", "--tracking-uri", db, env=two_nodes.env,
              cwd=tmp_path)
    assert rep.returncode == 0, tail(rep)
    assert sum("0.5" in ln or "0.0" in ln for ln in rep.stdout.splitlines()) >= 2, rep.stdout


# ---------------------------------------------------------------------------------------------- pipeline, streamed data

STREAMED_PRESET = """
name: streamed
device: cpu
data: {dataset: imagenet, root: %(root)s, resolution: 8, zca: false}
model: {name: convnet, width: 4}
experts: {num_experts: 2, epochs: 2, batch_size: 20, dsa: false, eval_every: 0}
distill: {ipc: 1, beta: 0.5, K: 1, R: 1, syn_steps: 2, expert_epochs: 1, min_start_epoch: 0, max_start_epoch: 1,
          batch_syn: 10, iterations: 2, checkpoint_every: 0}
eval: {runs: 2, epochs: 2}
"""

NODE2_CACHE = """
import json, os, ray
ray.init()
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
node2 = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" not in n["Resources"]][0]

@ray.remote(num_cpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(node2, soft=False))
def look(cache, root):
    from contra_ray.data.imagenet import decoded_hash
    base = os.path.join(cache, "decoded")
    out = {"root_visible": os.path.exists(root), "entries": sorted(os.listdir(base)) if os.path.isdir(base) else []}
    out["hashes"] = {n: [decoded_hash(os.path.join(base, n)), json.load(open(os.path.join(base, n, "meta.json")))
                         ["content_hash"]] for n in out["entries"] if not n.startswith(".")}
    return out

print("NODE2", json.dumps(ray.get(look.remote(%(cache)r, %(root)r))))
"""


def test_pipeline_with_streamed_imagenet_publishes_to_the_bucket_and_node_2_reads_through(two_nodes, tmp_path):
    """The pipeline to s3:// with ImageNet streamed from the decoded cache (data.in_memory false), data.root and
    data.cache_dir on the head only: the driver decodes once and publishes to <output_dir>/data-cache; the expert
    task on node 2 fills node 2's own data.cache_dir from the bucket (content hash checked), leaving no
    temporaries; the set, results.json and the store land in the bucket and the run in the driver's SQLite."""
    from mlflow.tracking import MlflowClient
    from PIL import Image

    root = two_nodes.hidden / "imagenet"  # node 2 sees an empty tmpfs here: it cannot decode the JPEGs itself
    rng = torch.Generator().manual_seed(0)
    for split, n in (("train", 4), ("val", 1)):
        for c in range(10):
            (root / split / f"n{c:08d}").mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8, generator=rng).numpy()
                Image.fromarray(pixels).save(root / split / f"n{c:08d}" / f"{i}.JPEG")
    preset = tmp_path / "streamed.yaml"
    preset.write_text(STREAMED_PRESET % {"root": root})
    out_dir = f"{two_nodes.bucket}/pipe"
    out = cli("contra_ray.pipeline", "--preset", str(preset), "--output-dir", out_dir, "--name", "p",
              "--skip-baseline", "--set", "threads=1", "--set", f"data.cache_dir={two_nodes.cache}",
              env=two_nodes.env, cwd=tmp_path)
    assert out.returncode == 0, tail(out)
    files = bucket_files(f"{out_dir}/p")
    assert {"distilled.safetensors", "results.json", "experts/store.json"} <= set(files), files
    runs = MlflowClient(two_nodes.db(out_dir)).search_runs(
        [e.experiment_id for e in MlflowClient(two_nodes.db(out_dir)).search_experiments()])
    assert any(r.info.status == "FINISHED" and "final_acc" in r.data.metrics for r in runs)
    published = {f.split("/")[1] for f in bucket_files(f"{out_dir}/data-cache") if f.startswith("decoded/")}
    assert len(published) == 2 and all(re.fullmatch(r"imagenet-[0-9a-f]{16}-(train|test)", p) for p in published)
    for name in published:
        assert sorted(bucket_files(f"{out_dir}/data-cache/decoded/{name}")) == ["images.npy", "labels.npy",
                                                                                 "meta.json"]
    look = run_python(NODE2_CACHE % {"cache": two_nodes.cache, "root": str(root)}, two_nodes.env)
    assert look.returncode == 0, tail(look)
    seen = json.loads(next(ln for ln in look.stdout.splitlines() if ln.startswith("NODE2 "))[6:])
    assert not seen["root_visible"]
    fills = [n for n in seen["entries"] if n.startswith(".")]
    assert all(n.endswith(".fill.lock") for n in fills), seen  # locks only: no .fill-* temporaries
    assert {n for n in seen["entries"] if not n.startswith(".")} <= published and seen["hashes"], seen
    assert all(got == want for got, want in seen["hashes"].values()), seen  # node 2's copies verify
