"""Helpers shared by the test modules (imported as ``helpers``: pytest puts tests/ on sys.path, and a subprocess
gets it through PYTHONPATH). Test modules import from here, never from one another or from conftest."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CONTRA_RAY_SHARED", ROOT.parent / "shared"))
CIFAR_TARBALL = SHARED / "datasets" / "cifar10-jpeg.tar.gz"


# ---------------------------------------------------------------------------------------------- toy tensors


def toy_data(n: int, seed: int):
    """Learnable toy problem: 4 classes, each a fixed random 3x8x8 pattern plus noise (float32, int64)."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(123))
    y = torch.arange(n) % 4
    x = patterns[y] + 0.8 * torch.randn(n, 3, 8, 8, generator=g)
    return x.float(), y.long()


def toy_halves(n_per_class: int, seed: int, signal: bool = True):
    """Two classes: left half +1 / right half -1 (class 0) or the opposite (class 1), plus noise (1 x 8 x 8; a
    spatial pattern: ConvNet's instance norm removes a constant offset); without signal pure noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(2).repeat_interleave(n_per_class)
    x = 0.3 * torch.randn(2 * n_per_class, 1, 8, 8, generator=g)
    if signal:
        half = torch.ones(8, 8)
        half[:, 4:] = -1
        x += (1 - 2 * y.float()).view(-1, 1, 1, 1) * half
    else:
        y = y[torch.randperm(y.numel(), generator=g)]
    return x, y


def flip_noise_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Flip drawn from the expert's generator plus noise from torch's global RNG (a resumed expert must restore
    both)."""
    flip = torch.rand(len(x), generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x) + 0.01 * torch.randn(x.shape)


# ---------------------------------------------------------------------------------------------- expert store


def fake_expert_store(path, meta: dict, preprocessor_state: dict, spec, num_experts: int, epochs: int,
                      generator: torch.Generator | None = None):
    """An ExpertStore at ``path`` of ``num_experts`` random-walk trajectories (epochs + 1 rows each, no
    accuracies) that start from ``build_model(spec)`` seeded with the expert id; the steps are drawn from
    ``generator`` (default: a fresh one seeded 0)."""
    from contra_ray.experts.store import ExpertStore
    from contra_ray.models import build_model, flat_params

    store = ExpertStore.create(path, meta, preprocessor_state)
    g = torch.Generator().manual_seed(0) if generator is None else generator
    for i in range(num_experts):
        torch.manual_seed(i)
        theta = flat_params(build_model(spec))
        steps = 0.05 * torch.randn(epochs, theta.numel(), generator=g)
        store.add(i, i, torch.cat([theta[None], theta[None] + steps.cumsum(0)]), [float("nan")] * epochs)
    return store


# ---------------------------------------------------------------------------------------------- image trees

CLASSES = ("cat", "dog", "frog")  # make_tree's class folders


def make_tree(root, counts=None, size=8, test_name="test", mode="RGB", seed=0):
    """ImageFolder tree of random PNGs; returns {split: (uint8 [N, C, H, W], labels)} in ImageFolder order."""
    counts = counts or {"train": 6, test_name: 2}
    rng = np.random.default_rng(seed)
    out = {}
    for split, per_class in counts.items():
        imgs, labels = [], []
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                shape = (size, size) if mode == "L" else (size, size, 3)
                arr = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(arr, mode).save(d / f"{i:03d}.png")
                imgs.append(arr[None] if mode == "L" else arr.transpose(2, 0, 1))
                labels.append(c)
        out[split] = (torch.from_numpy(np.stack(imgs)), torch.tensor(labels))
    return out


WNIDS = ["n02085620", "n01443537", "n04067472"]  # wnids.txt order is not sorted
WORDS = {"n01443537": "goldfish, Carassius auratus", "n02085620": "Chihuahua",
         "n04067472": "reel", "n09999999": "unrelated, other"}


def make_tiny_imagenet(root, train_per_class=3, val_per_class=2, size=64, seed=0):
    """A Tiny ImageNet tree exactly as published: wnids.txt, words.txt, train/<wnid>/images/*.JPEG
    (+ the boxes file), val/images/*.JPEG + val_annotations.txt, an unlabelled test/images/."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\t{n}\n" for w, n in WORDS.items()))
    for w in WNIDS:
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        boxes = []
        for i in range(train_per_class):
            mode = "L" if (w == WNIDS[0] and i == 0) else "RGB"  # Tiny ImageNet has some grayscale JPEGs
            arr = rng.integers(0, 256, (size, size) if mode == "L" else (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr, mode).save(d / f"{w}_{i}.JPEG", quality=95)
            boxes.append(f"{w}_{i}.JPEG\t0\t0\t{size - 1}\t{size - 1}")
        (root / "train" / w / f"{w}_boxes.txt").write_text("\n".join(boxes) + "\n")
    (root / "val" / "images").mkdir(parents=True)
    lines, k = [], 0
    for _ in range(val_per_class):
        for w in reversed(WNIDS):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / "val" / "images" / f"val_{k}.JPEG", quality=95)
            lines.append(f"val_{k}.JPEG\t{w}\t1\t2\t30\t40")
            k += 1
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "test" / "images").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "test/images/test_0.JPEG")
    return root


# ---------------------------------------------------------------------------------------------- tracking


def assert_shared_vocabulary(client, run, *, role: str, entry_point: str, method: str, final: bool = True,
                             iterations: int | None = None) -> None:
    """A run read back from the store logs contra_ray.tracking's shared metric names and tags, and no paths
    as params (every run kind: pipeline, distill, distill --num-workers, Tune trial, evaluate CLI)."""
    from contra_ray.tracking import PATH_FIELDS

    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags["contra_ray.role"] == role and tags["mlflow.source.name"] == entry_point
    assert tags["method"] == method and tags["dataset"] and tags["git_commit"]
    for key in ("ipc", "K", "beta"):
        assert tags[key] == params[f"distill.{key}"]
    assert not set(PATH_FIELDS) & set(params) and tags["path.output_dir"]
    if final:
        assert 0 <= metrics["final_acc"] <= 100 and metrics["final_acc_std"] >= 0
        model = params["model.name"]
        assert metrics[f"final_acc/{model}"] == metrics["final_acc"]
    if iterations is not None:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(iterations))
        assert len(client.get_metric_history(run.info.run_id, "syn_lr")) == iterations
        assert metrics["s_per_iter"] > 0


def assert_expert_runs(client, parent, store, ids: list[int]) -> None:
    """The experts ``ids`` that the run ``parent`` trained read back as its child runs ``expert-XXXX`` (role
    expert, its entry point, FINISHED), each with ``expert_test_acc`` = the store's test accuracies in percent at
    the epochs evaluated (1-based; NaN epochs left out) and the store's seed."""
    import math

    import pytest

    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == [f"expert-{i:04d}" for i in ids]
    index = store.index.set_index("expert_id")
    for child in children:
        tags, i = child.data.tags, int(child.data.tags["expert_id"])
        assert tags["contra_ray.role"] == "expert" and child.info.status == "FINISHED"
        assert tags["mlflow.source.name"] == parent.data.tags["mlflow.source.name"]
        assert tags["seed"] == str(index.loc[i, "seed"]) and child.data.params["experts.epochs"] == str(store.epochs)
        history = sorted((m.step, m.value) for m in client.get_metric_history(child.info.run_id, "expert_test_acc"))
        want = [(e, pytest.approx(100 * a)) for e, a in enumerate(index.loc[i, "test_acc"], 1) if not math.isnan(a)]
        assert history and history == want


ENTRY_MODULES = ("contra_ray.pipeline", "contra_ray.distill.cli", "contra_ray.distill.remote", "contra_ray.analyze.cli",
                 "contra_ray.evaluate.cli", "contra_ray.tune.sweep", "contra_ray.tune.trial", "contra_ray.nas")


def patch_everywhere(monkeypatch, dotted: str, replacement) -> int:
    """Replace the function ``dotted`` (``"contra_ray.data.prepare.prepare_data"``) in its module and in every
    loaded contra_ray module that imported it by name (imports sit at module top), the entry points loaded
    first; returns how many modules were patched. For "refused before any work" tests."""
    import importlib
    import sys

    module, name = dotted.rsplit(".", 1)
    original = getattr(importlib.import_module(module), name)
    for m in ENTRY_MODULES:
        importlib.import_module(m)
    patched = 0
    for mod_name, mod in list(sys.modules.items()):
        if (mod_name == "contra_ray" or mod_name.startswith("contra_ray.")) and getattr(mod, name, None) is original:
            monkeypatch.setattr(mod, name, replacement)
            patched += 1
    return patched


# ---------------------------------------------------------------------------------------------- Ray clusters

def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def processes_of(marker: str) -> list[int]:
    """PIDs whose command line names ``marker`` (our private Ray temp dir), plus all their descendants
    (workers rename themselves ``ray::...``, so they are found through their parents)."""
    parent, found = {}, set()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if marker in cmd and int(p.name) != os.getpid():
            found.add(int(p.name))
    grew = True
    while grew:
        kids = {pid for pid, pp in parent.items() if pp in found} - found
        found |= kids
        grew = bool(kids)
    return sorted(found)


def stop_own_cluster(temp_dir: str) -> None:
    """Stop the Ray processes of the head node started with ``--temp-dir temp_dir``, by PID (no `ray stop`)."""
    pids = processes_of(temp_dir)
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.2)
        pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
        if not pids:
            return


def start_s3_server() -> tuple[subprocess.Popen, str]:
    """moto's S3-compatible server on 127.0.0.1 (a free port); returns (process, endpoint URL) once it answers."""
    import urllib.request

    port = free_ports(1)[0]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).read()
            return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start on {endpoint}") from None
            time.sleep(0.2)


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


def make_bucket(endpoint: str, name: str) -> str:
    """Create bucket ``name`` on the server; returns ``s3://name``."""
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", access_key="testing", secret_key="testing",
                      allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"
