"""A 2-node Ray cluster on this machine whose second node does not see the driver's folder (as on two VMs
without shared storage): the second node runs in its own mount namespace with an empty tmpfs over that
folder. The pre-flight check catches it before any work, naming the node, the field and the folder."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import ROOT, free_ports, processes_of, stop_own_cluster

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a node that does not see the head's folders needs a private mount namespace: root and unshare(1)")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """``(address, env, shared, hidden)``: a head node and a second node (1 CPU each); ``hidden`` is a folder
    the second node sees as an empty tmpfs, ``shared`` one both nodes see."""
    base = tmp_path_factory.mktemp("cluster")
    shared, hidden = base / "shared", base / "hidden"
    shared.mkdir()
    hidden.mkdir()
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp_dir = tempfile.mkdtemp(prefix="crcl", dir="/tmp")  # short: Ray's unix socket paths must fit
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    gcs, *ports = free_ports(8)
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0",
              "--object-store-memory", str(80 * 2**20), "--disable-usage-stats"]
    head = [ray_bin, "start", "--head", "--port", str(gcs), "--temp-dir", temp_dir, "--include-dashboard=false",
            "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
            "--ray-client-server-port", str(ports[2]), *common]
    node2 = [ray_bin, "start", "--address", f"127.0.0.1:{gcs}", "--node-manager-port", str(ports[3]),
             "--object-manager-port", str(ports[4]), "--dashboard-agent-listen-port", str(ports[5]),
             "--dashboard-agent-grpc-port", str(ports[6]), *common]
    try:
        subprocess.run(head, env=env, check=True, capture_output=True, text=True, timeout=180)
        subprocess.run(["unshare", "-m", "sh", "-c", f'mount -t tmpfs tmpfs "{hidden}" && exec "$@"', "sh", *node2],
                       env=env, check=True, capture_output=True, text=True, timeout=180)
        yield f"127.0.0.1:{gcs}", {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}, shared, hidden
    finally:
        stop_own_cluster(temp_dir)
        left = processes_of(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes left running: {left}"


def run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_preflight_names_the_node_that_does_not_see_a_folder(two_nodes):
    _, env, shared, hidden = two_nodes
    out = run_python(
        "import ray; ray.init()\n"
        "from contra_ray.common.raycluster import check_locations_on_nodes, LocationNotShared\n"
        f"print('nodes', check_locations_on_nodes({{'output_dir': {str(shared)!r}}}))\n"
        "try:\n"
        f"    check_locations_on_nodes({{'output_dir': {str(shared)!r}, 'data.cache_dir': {str(hidden)!r}}})\n"
        "except LocationNotShared as e:\n"
        "    print('refused', e)\n", env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith(("nodes", "refused"))]
    assert lines[0] == "nodes 2"  # both nodes see the shared folder
    refused = lines[1]
    assert refused.count("does not see the files the driver wrote there") == 1  # one node, one field
    assert f"data.cache_dir={hidden}" in refused and "output_dir" not in refused.split(".")[0]
    assert "put it on storage every node mounts" in refused
    assert sorted(os.listdir(shared)) == [] and sorted(os.listdir(hidden)) == []  # no probe files left


def test_distill_on_the_cluster_refuses_a_node_local_output_dir_before_any_work(two_nodes, tmp_path):
    _, env, shared, hidden = two_nodes
    out = subprocess.run([sys.executable, "-m", "contra_ray.distill", "--preset", "tiny_cpu", "--num-workers", "2",
                          "--output-dir", str(hidden), "--no-tracking", "--set", "threads=1",
                          "--set", f"data.cache_dir={shared / 'cache'}"],
                         env={**env, "PYTHONPATH": str(ROOT)}, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"output_dir={hidden}" in errors[0] and "(id " in errors[0]
    assert "[data]" not in out.stdout  # refused before the data were prepared: the cache holds nothing
    cache = shared / "cache"  # the CLI's destination check may create it (empty); nothing is decoded into it
    assert not cache.exists() or list(cache.iterdir()) == []
    # a refused run leaves nothing in the run's folder but the run directory's lock file
    assert [p.relative_to(hidden).as_posix() for p in hidden.rglob("*") if p.is_file()] == ["tiny_cpu/.lock"]
