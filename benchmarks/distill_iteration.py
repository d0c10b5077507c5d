"""Time one ConTra distillation iteration and its peak memory, for several K, in one run.

    python benchmarks/distill_iteration.py --ipc 1 --syn-steps 20 --width 128 --K 0 3

Each K runs in a fresh subprocess (peak RSS is per process); the table compares K against the first
one. On CUDA the peak is ``torch.cuda.max_memory_allocated``; on CPU it is the process's peak resident
set size minus its size before the first iteration (so it includes the one unroll's autograd graph).
Expert trajectories are random (timing and memory do not depend on their values).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(args) -> dict:
    import torch

    from contra_ray.distill.matching import accumulate_matching_gradients, make_plan
    from contra_ray.models import ModelSpec, build_model, flat_params, functional_forward

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    spec = ModelSpec("convnet", num_classes=args.classes, image_size=args.image_size, width=args.width)
    model = build_model(spec).to(dev)
    theta = flat_params(model).to(dev)
    traj = [theta + 0.01 * k for k in range(args.max_start + args.expert_epochs + 1)]
    n = args.ipc * args.classes
    images = torch.randn(n, 3, args.image_size, args.image_size, device=dev, requires_grad=True)
    labels = torch.randn(n, args.classes, device=dev, requires_grad=True)
    syn_lr = torch.tensor(0.01, device=dev, requires_grad=True)
    beta = 1.0 if args.K == 0 else args.beta
    R = max(1, args.max_start // max(args.K, 1))
    fwd = lambda t, x: functional_forward(model, t, x)
    times = []
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for it in range(args.warmup + args.iterations):
        plan = make_plan(0, it, [0], n, min(args.batch_syn or n, n), args.syn_steps, beta, args.K, R, 0,
                         args.max_start)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        accumulate_matching_gradients(plan, lambda s, m: (traj[s], traj[s + m]), fwd, images, labels, syn_lr,
                                      args.expert_epochs)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if it >= args.warmup:
            times.append(time.perf_counter() - t0)
        images.grad = labels.grad = syn_lr.grad = None
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # KiB on Linux
    students = (1 if beta > 0 else 0) + args.K
    return {"K": args.K, "students": students, "s_per_iter": sum(times) / len(times), "peak_mb": peak_mb}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--K", type=int, nargs="+", default=[0, 3], help="numbers of concurrent segments to compare")
    p.add_argument("--child-K", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--beta", type=float, default=0.2, help="β for K > 0 (K = 0 always uses β = 1)")
    p.add_argument("--ipc", type=int, default=1, help="images per class")
    p.add_argument("--classes", type=int, default=10, help="number of classes")
    p.add_argument("--syn-steps", type=int, default=20, help="student steps N")
    p.add_argument("--expert-epochs", type=int, default=2, help="M")
    p.add_argument("--max-start", type=int, default=4, help="T+")
    p.add_argument("--batch-syn", type=int, default=0, help="synthetic batch (0: whole set)")
    p.add_argument("--width", type=int, default=128, help="ConvNet width")
    p.add_argument("--image-size", type=int, default=32, help="pixels")
    p.add_argument("--iterations", type=int, default=3, help="timed iterations per K")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.K = args.child_K
        print(json.dumps(one(args)))
        return
    rows = []
    for K in args.K:
        cmd = [sys.executable, __file__, "--child", "--child-K", str(K)] + [
            a for k, v in vars(args).items() if k not in ("K", "child", "child_K")
            for a in (f"--{k.replace('_', '-')}", str(v))]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"K={K} failed:\n{res.stderr}")
        out = res.stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    print(f"ConvNet width {args.width}, IPC {args.ipc}, N {args.syn_steps}, {args.image_size}px, "
          f"device {args.device}, {args.threads} threads")
    print(f"{'K':>3} {'students':>8} {'s/iter':>8} {'x K0':>6} {'peak MB':>8} {'x K0':>6}")
    for r in rows:
        print(f"{r['K']:>3} {r['students']:>8} {r['s_per_iter']:>8.3f} {r['s_per_iter'] / rows[0]['s_per_iter']:>6.2f}"
              f" {r['peak_mb']:>8.0f} {r['peak_mb'] / max(rows[0]['peak_mb'], 1e-9):>6.2f}")


if __name__ == "__main__":
    main()
