"""Local Ray gets the CPUs this process may use: affinity mask, cgroup quota, or the user's setting."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from contra_ray.common import raycluster
from contra_ray.common.raycluster import available_cpus, cgroup_cpu_limit

ROOT = Path(__file__).resolve().parents[1]


def fake_cgroup(tmp_path, proc: str, files: dict[str, str]):
    """A fake cgroup mount under tmp_path/cg and a /proc/self/cgroup file; returns (root, proc file)."""
    root = tmp_path / "cg"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (tmp_path / "proc_cgroup").write_text(proc)
    return root, tmp_path / "proc_cgroup"


@pytest.mark.parametrize("proc, files, expected", [
    # cgroup v2: "quota period"; ceil(150000 / 100000) = 2; "max" = no limit
    ("0::/job\n", {"cgroup.controllers": "cpu", "job/cpu.max": "150000 100000\n"}, 2),
    ("0::/job\n", {"cgroup.controllers": "cpu", "job/cpu.max": "max 100000\n"}, None),
    ("0::/job\n", {"cgroup.controllers": "cpu", "job/cpu.max": "20000 100000\n"}, 1),  # at least 1
    # a parent's quota binds its children: the smallest along the path counts
    ("0::/a/b\n", {"a/cpu.max": "300000 100000\n", "a/b/cpu.max": "max 100000\n"}, 3),
    ("0::/a/b\n", {"a/cpu.max": "300000 100000\n", "a/b/cpu.max": "100000 100000\n"}, 1),
    # the process's path is not visible (container namespace): the mount root is read
    ("0::/elsewhere\n", {"cpu.max": "400000 100000\n"}, 4),
    # cgroup v1: cpu.cfs_quota_us / cpu.cfs_period_us under the cpu hierarchy; -1 = no limit
    ("4:memory:/x\n3:cpu,cpuacct:/job\n", {"cpu,cpuacct/job/cpu.cfs_quota_us": "250000\n",
                                           "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n"}, 3),
    ("3:cpu,cpuacct:/job\n", {"cpu,cpuacct/job/cpu.cfs_quota_us": "-1\n",
                              "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n"}, None),
    ("3:cpu:/\n", {"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
    ("3:cpu:/\n", {}, None),  # no files: no limit known
])
def test_cgroup_cpu_limit_parsing(tmp_path, proc, files, expected):
    root, proc_file = fake_cgroup(tmp_path, proc, files)
    assert cgroup_cpu_limit(root, proc_file) == expected


def test_available_cpus_takes_the_smaller_of_affinity_and_quota(tmp_path, monkeypatch):
    monkeypatch.delenv(raycluster.NUM_CPUS_ENV, raising=False)
    affinity = len(os.sched_getaffinity(0))
    root, proc_file = fake_cgroup(tmp_path, "0::/\n", {"cpu.max": "100000 100000\n"})
    assert available_cpus(root, proc_file) == 1
    root, proc_file = fake_cgroup(tmp_path / "u", "0::/\n", {"cpu.max": "max 100000\n"})
    assert available_cpus(root, proc_file) == affinity
    monkeypatch.setenv(raycluster.NUM_CPUS_ENV, "7")
    assert available_cpus(root, proc_file) == 7  # the user's setting wins
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(raycluster.NUM_CPUS_ENV, bad)
        with pytest.raises(ValueError, match=rf"CONTRA_RAY_NUM_CPUS='{bad}'"):
            available_cpus(root, proc_file)


def test_available_cpus_under_taskset_is_1():
    code = "from contra_ray.common.raycluster import available_cpus; print(available_cpus())"
    env = {k: v for k, v in os.environ.items() if k != raycluster.NUM_CPUS_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cpu = sorted(os.sched_getaffinity(0))[0]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), sys.executable, "-c", code]
    else:  # same effect without the tool
        cmd = [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}}); {code}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"


def test_ensure_ray_passes_available_cpus_or_joins_ray_address(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(raycluster.NUM_CPUS_ENV, "3")
    assert raycluster.ensure_ray() is True
    assert calls[-1]["address"] == "local" and calls[-1]["num_cpus"] == 3
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # an existing cluster: its CPUs are its own
    raycluster.ensure_ray()
    assert "num_cpus" not in calls[-1] and "address" not in calls[-1]
