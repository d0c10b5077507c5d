"""Peak memory and time per iteration of the full vs the constant-memory unroll (and, on CUDA, of
sequential vs batched students), for several N.

    python benchmarks/unroll_memory.py --threads 1 --syn-steps 10 20 40 80 --max-full-N 40
    python benchmarks/unroll_memory.py --device cuda            # adds K = 3, 5 sequential vs batched

ConvNet-3 (width 128), 32x32x3 images, IPC 10 x 10 classes = 100 images, batch 100, DSA on, random
expert parameters (time and memory do not depend on their values). Each configuration runs in a fresh
subprocess: on CPU its peak is the growth of the peak resident set size (``ru_maxrss``) over its size
after setup; on CUDA ``torch.cuda.max_memory_allocated`` over the allocation after setup. Before a full
unroll is run the planner (:mod:`contra_ray.distill.memory`: its probe on 8 and 16 rows, scaled to the
batch) is asked for its estimate; a full configuration that would not fit (or N above ``--max-full-N``) is
skipped and said so. The planner's estimate is printed next to the measured peak. Times: wall-clock s/iter
and this process's CPU s/iter (robust to other load on a shared machine; with one thread the honest
compute cost).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def setup(args, K: int):
    import torch

    from contra_ray.augment import DSA
    from contra_ray.models import ModelSpec, build_model, flat_params, functional_forward

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    spec = ModelSpec("convnet", num_classes=args.classes, image_size=args.image_size, width=args.width, depth=3)
    model = build_model(spec).to(dev)
    theta = flat_params(model).to(dev)
    traj = [theta + 0.01 * torch.randn_like(theta) * k for k in range(K + 2 + args.expert_epochs)]
    n = args.ipc * args.classes
    images = torch.randn(n, 3, args.image_size, args.image_size, device=dev, requires_grad=True)
    labels = torch.randn(n, args.classes, device=dev, requires_grad=True)
    syn_lr = torch.tensor(0.01, device=dev, requires_grad=True)
    dsa = DSA() if args.dsa else None
    augment = (lambda x, seed: dsa(x, seed=seed)) if dsa else None
    return torch, dev, (lambda t, x: functional_forward(model, t, x)), traj, images, labels, syn_lr, augment


def _status_kib(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> int:
    """Reset the peak resident set size (Linux ``clear_refs`` 5) and return the current one, bytes.
    Without that interface: the peak so far (``ru_maxrss``), so the growth is measured over it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return 1024 * _status_kib("VmRSS")
    except (OSError, TypeError):
        return 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (``VmHWM``, else ``ru_maxrss``)."""
    hwm = _status_kib("VmHWM")
    return 1024 * (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def students_at_once(execution: str, K: int) -> int:
    return 1 if execution == "sequential" else K + 1


def child_plan(args, K: int, execution: str) -> dict:
    """The planner's estimates for every N (its bounded probe of one step) and the available memory."""
    from contra_ray.distill.memory import available_memory_bytes, estimate_unroll_bytes, probe_step_memory

    torch, dev, fwd, traj, images, labels, _, augment = setup(args, K)
    S = students_at_once(execution, K)
    step = probe_step_memory(fwd, traj[0], images, labels, args.batch_syn, augment, S)  # what the planner runs
    b = images.element_size()
    fixed = 2 * (images.numel() + labels.numel()) * b + 4 * S * traj[0].numel() * b
    est = {N: estimate_unroll_bytes(step, N, S, traj[0].numel(), b, fixed) for N in args.syn_steps}
    return {"available": available_memory_bytes(dev), "estimates": est, "graph_bytes": step.graph_bytes}


def child_run(args, K: int, execution: str, mode: str, N: int) -> dict:
    from contra_ray.distill.matching import accumulate_matching_gradients, make_plan

    torch, dev, fwd, traj, images, labels, syn_lr, augment = setup(args, K)
    n = images.shape[0]
    beta = 1.0 if K == 0 else args.beta
    # one tiny step first, so lazily loaded kernels and caches are not counted as the unroll's memory
    tiny = make_plan(0, 0, [0], n, 2, 1, beta, K, 1, 0, K + 1)
    accumulate_matching_gradients(tiny, lambda s, m: (traj[s], traj[s + m]), fwd, images, labels, syn_lr,
                                  args.expert_epochs, augment, unroll_memory=mode, student_execution=execution)
    images.grad = labels.grad = syn_lr.grad = None
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = reset_peak_rss()
    times, cpu_times = [], []
    for it in range(args.warmup + args.iterations):
        plan = make_plan(0, it, [0], n, args.batch_syn, N, beta, K, 1, 0, K + 1)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        accumulate_matching_gradients(plan, lambda s, m: (traj[s], traj[s + m]), fwd, images, labels, syn_lr,
                                      args.expert_epochs, augment, unroll_memory=mode, student_execution=execution)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if it >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        images.grad = labels.grad = syn_lr.grad = None
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss() - base
    return {"s_per_iter": sum(times) / len(times), "cpu_s_per_iter": sum(cpu_times) / len(cpu_times),
            "peak_bytes": peak}


def in_child(args, what: str, **kw) -> dict:
    """Run ``what`` ("plan" or "run") in a fresh Python process; returns its JSON answer."""
    job = {"what": what, "args": {k: v for k, v in vars(args).items() if k != "child"}, **kw}
    res = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"{what} {kw} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--syn-steps", type=int, nargs="+", default=[10, 20, 40, 80], help="student steps N to compare")
    p.add_argument("--modes", nargs="+", default=["full", "constant"], choices=["full", "constant"],
                   help="unroll_memory modes to run")
    p.add_argument("--max-full-N", type=int, default=None, help="skip full mode above this N (default: planner)")
    p.add_argument("--K", type=int, nargs="+", default=None,
                   help="concurrent segments (default: 0 on CPU, 3 5 on CUDA)")
    p.add_argument("--executions", nargs="+", default=None, choices=["sequential", "batched"],
                   help="student_execution values (default: sequential on CPU, both on CUDA)")
    p.add_argument("--beta", type=float, default=0.2, help="β for K > 0 (K = 0 uses β = 1)")
    p.add_argument("--ipc", type=int, default=10, help="images per class")
    p.add_argument("--classes", type=int, default=10, help="number of classes")
    p.add_argument("--batch-syn", type=int, default=100, help="synthetic batch size")
    p.add_argument("--expert-epochs", type=int, default=2, help="M")
    p.add_argument("--width", type=int, default=128, help="ConvNet-3 width")
    p.add_argument("--image-size", type=int, default=32, help="pixels")
    p.add_argument("--no-dsa", dest="dsa", action="store_false", help="no DSA augmentation in the student steps")
    p.add_argument("--iterations", type=int, default=2, help="timed iterations per configuration")
    p.add_argument("--warmup", type=int, default=0, help="untimed iterations first")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        job = json.loads(args.child)
        what, args = job.pop("what"), argparse.Namespace(**job.pop("args"))
        print(json.dumps(child_plan(args, **job) if what == "plan" else child_run(args, **job)))
        return
    cuda = args.device.startswith("cuda")
    args.K = args.K if args.K is not None else ([3, 5] if cuda else [0])
    args.executions = args.executions or (["sequential", "batched"] if cuda else ["sequential"])
    mib = 2**20
    print(f"ConvNet-3 width {args.width}, {args.image_size}px, {args.ipc * args.classes} images, batch "
          f"{args.batch_syn}, DSA {'on' if args.dsa else 'off'}, device {args.device}, {args.threads} thread(s), "
          f"{args.iterations} iteration(s) each; peak = {'max_memory_allocated' if cuda else 'peak RSS'} growth")
    rows = []
    for K in args.K:
        for execution in args.executions:
            plan = in_child(args, "plan", K=K, execution=execution)
            print(f"K={K} {execution}: one step's graph {plan['graph_bytes'] / mib:.0f} MiB (measured), "
                  f"{plan['available'] / mib:.0f} MiB available", flush=True)
            for mode in args.modes:
                for N in args.syn_steps:
                    est = plan["estimates"][str(N)][mode]
                    if mode == "full" and (est > 0.9 * plan["available"] or
                                           (args.max_full_N is not None and N > args.max_full_N)):
                        why = "over --max-full-N" if est <= 0.9 * plan["available"] else "planner: does not fit"
                        print(f"  skip full N={N}: estimate {est / mib:.0f} MiB ({why})", flush=True)
                        continue
                    r = in_child(args, "run", K=K, execution=execution, mode=mode, N=N)
                    rows.append({"K": K, "exec": execution, "mode": mode, "N": N, "est": est, **r})
                    print(f"  {mode:>8} N={N:>3}: {r['s_per_iter']:.2f} s/iter ({r['cpu_s_per_iter']:.2f} CPU s), "
                          f"peak {r['peak_bytes'] / mib:.0f} MiB", flush=True)
    print()
    print(f"{'K':>2} {'execution':>10} {'mode':>8} {'N':>4} {'s/iter':>8} {'CPU s':>8} {'peak MiB':>9} {'est MiB':>8} "
          f"{'peak/N=min':>10} {'CPU/full':>9} {'peak/full':>9}")
    for r in rows:
        same = [q for q in rows if (q["K"], q["exec"], q["mode"]) == (r["K"], r["exec"], r["mode"])]
        first = min(same, key=lambda q: q["N"])
        full = [q for q in rows if (q["K"], q["exec"], q["mode"], q["N"]) == (r["K"], r["exec"], "full", r["N"])]
        t_ratio = f"{r['cpu_s_per_iter'] / full[0]['cpu_s_per_iter']:.2f}" if full else "-"
        m_ratio = f"{r['peak_bytes'] / max(full[0]['peak_bytes'], 1):.2f}" if full else "-"
        print(f"{r['K']:>2} {r['exec']:>10} {r['mode']:>8} {r['N']:>4} {r['s_per_iter']:>8.2f} "
              f"{r['cpu_s_per_iter']:>8.2f} "
              f"{r['peak_bytes'] / mib:>9.0f} {r['est'] / mib:>8.0f} "
              f"{r['peak_bytes'] / max(first['peak_bytes'], 1):>10.2f} {t_ratio:>9} {m_ratio:>9}")
    if len(args.executions) > 1:
        print()
        print(f"{'K':>2} {'mode':>8} {'N':>4} {'batched/sequential time':>24} {'peak':>6}")
        for r in rows:
            seq = [q for q in rows
                   if q["exec"] == "sequential" and (q["K"], q["mode"], q["N"]) == (r["K"], r["mode"], r["N"])]
            if r["exec"] == "batched" and seq:
                print(f"{r['K']:>2} {r['mode']:>8} {r['N']:>4} {r['s_per_iter'] / seq[0]['s_per_iter']:>24.2f} "
                      f"{r['peak_bytes'] / max(seq[0]['peak_bytes'], 1):>6.2f}")


if __name__ == "__main__":
    main()
