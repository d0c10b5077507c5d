"""Distillation iterations/s on a Ray Train worker group for W = 1, 2, ... (one torch thread per worker).

    python benchmarks/distributed_speedup.py --workers 1 2 --width 64 --syn-steps 10 --iterations 12

Runs :func:`contra_ray.distill.remote.fit_distributed` once per W on the ``cifar10_ipc1_cpu`` preset with
the overrides below (default β = 0.2, K = 3: K + 1 = 4 students with non-zero weight), on random
32x32 images and random expert trajectories (timing does not depend on their values). ``s/iter`` is
rank 0's mean time per iteration (unrolls + all-reduce + update) after the first; ``fit s`` is the
whole ``trainer.fit()`` including worker start-up. Each worker requests ``--threads`` CPUs, so
``max(W) * threads`` must fit the machine for the numbers to mean anything.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path


def build_setup(root: Path, width: int, classes: int, image_size: int, epochs: int, seed: int = 0):
    import torch

    from contra_ray.data.prepare import PreparedData
    from contra_ray.data.preprocess import Preprocessor
    from contra_ray.data.sources import ImageSet, content_hash
    from contra_ray.distill.remote import PreparedSetup
    from contra_ray.experts.store import ExpertStore
    from contra_ray.models import ModelSpec, build_model, flat_params

    g = torch.Generator().manual_seed(seed)
    spec = ModelSpec("convnet", num_classes=classes, image_size=image_size, channels=3, width=width)
    images = torch.randint(0, 256, (classes * 4, 3, image_size, image_size), generator=g, dtype=torch.uint8)
    labels = torch.arange(len(images)) % classes
    train = ImageSet(images, labels, [f"c{i}" for i in range(classes)], "random/train", content_hash(images, labels))
    pre = Preprocessor(mean=torch.full((3,), 0.5), std=torch.full((3,), 0.25))
    data = PreparedData(train, train, pre, pre(images), pre(images), spec)
    meta = {"model_spec": spec.to_dict(), "epochs": epochs, "dataset_id": train.dataset_id,
            "content_hash": train.content_hash, "zca": False, "zca_eps": 0.1,
            "preprocessor_fingerprint": pre.fingerprint(), "classes": train.classes}
    store = ExpertStore.create(root / "experts", meta, pre.state_dict())
    for i in range(2):
        torch.manual_seed(seed + i)
        theta = flat_params(build_model(spec))
        steps = 0.01 * torch.randn(epochs, theta.numel(), generator=g)
        store.add(i, i, torch.cat([theta[None], theta[None] + steps.cumsum(0)]), [float("nan")] * epochs)
    return PreparedSetup(data, str(root / "experts"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts W to compare")
    p.add_argument("--threads", type=int, default=1, help="torch threads (= Ray CPUs) per worker")
    p.add_argument("--width", type=int, default=64, help="ConvNet width")
    p.add_argument("--syn-steps", type=int, default=10, help="student steps N")
    p.add_argument("--K", type=int, default=3, help="concurrent segments K")
    p.add_argument("--beta", type=float, default=0.2, help="β (0 drops the sampled student: K active students)")
    p.add_argument("--ipc", type=int, default=1, help="images per class (10 classes)")
    p.add_argument("--iterations", type=int, default=12, help="iterations per W (the first is not timed)")
    p.add_argument("--dtype", default="float32", help="float32 or float64")
    args = p.parse_args()

    import ray

    from contra_ray.config import load_config
    from contra_ray.distill.remote import fit_distributed

    ray.init(address="local", num_cpus=max(args.workers) * args.threads, include_dashboard=False,
             log_to_driver=False)
    students = args.K + (1 if args.beta > 0 else 0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="contra_bench_") as tmp:
        root = Path(tmp)
        setup = build_setup(root, args.width, classes=10, image_size=32, epochs=6)
        for W in args.workers:
            cfg = load_config("cifar10_ipc1_cpu", {
                "name": f"bench_w{W}", "output_dir": str(root), "threads": args.threads,
                "model": {"width": args.width}, "experts": {"epochs": 6, "store": setup.store_path},
                "tracking": {"enabled": False},
                "distill": {"ipc": args.ipc, "beta": args.beta, "K": args.K, "syn_steps": args.syn_steps,
                            "iterations": args.iterations, "checkpoint_every": 0, "dtype": args.dtype,
                            "batch_syn": None}})
            t0 = time.perf_counter()
            run = fit_distributed(cfg, W, setup=setup, resume=False, max_failures=0)
            wall = time.perf_counter() - t0
            if run.error:
                raise SystemExit(f"W={W}: {run.error}")
            rows.append((W, math.ceil(students / W), run.summary["s_per_iter"], wall))
    ray.shutdown()
    base = rows[0][2]
    print(f"ConvNet width {args.width}, 32px, IPC {args.ipc} x 10 classes, N {args.syn_steps}, K {args.K}, "
          f"β {args.beta} ({students} students), {args.dtype}, {args.threads} thread(s)/worker, "
          f"{args.iterations - 1} timed iterations")
    print(f"{'W':>3} {'students/worker':>15} {'s/iter':>8} {'iter/s':>7} {'speed-up':>8} {'fit s':>7}")
    for W, share, s, wall in rows:
        print(f"{W:>3} {share:>15} {s:>8.3f} {1 / s:>7.2f} {base / s:>8.2f} {wall:>7.1f}")


if __name__ == "__main__":
    main()
