"""Checkpoint save and load time and the per-iteration overhead: a run on a local S3 server vs a local folder.

    python benchmarks/storage_s3_vs_local.py --repeats 7 --iterations 6
    python benchmarks/storage_s3_vs_local.py --syn-steps 5 --iterations 8   # shorter iterations on busy cores

Everything in one run, at the README main job's sizes (preset ``cifar10_ipc1_cpu``: CIFAR-10, IPC 1, 32x32,
soft labels, ConvNet width 128, K = 3, N = 20): moto's S3-compatible server is started on 127.0.0.1 (the
tests' ``start_s3_server``), a real :class:`~contra_ray.distill.distiller.Distiller` is built from the preset
on random images of the right shape and random-walk expert trajectories (checkpoint size and iteration time
do not depend on their values), and

* **save**: :meth:`LocalCheckpoints.save` of the run's final-size state (``Distiller.state_dict()`` after
  one step, so the optimizers hold their momentum, a history of ``distill.iterations`` entries per metric
  and the config) into a local folder vs with ``location=s3://...`` (written into the node-local mirror,
  then published, manifest last; from the third save on the oldest checkpoint is deleted too, keep = 2);
* **load**: a fresh :class:`LocalCheckpoints` and ``load()``; for S3 the mirror is emptied first, so every
  repeat lists and fetches the published checkpoints, then validates (sha256) and loads the newest;
* **per iteration**: three runs of :func:`~contra_ray.distill.loop.run_loop` side by side, with checkpoints
  where ``run_distillation`` puts them for ``output_dir`` a local folder and ``s3://...``, and without
  checkpoints (the floor). They advance one iteration each in turn (rotating the order), each call ending
  in its final save, so every timed iteration of the first two carries one checkpoint as with
  ``distill.checkpoint_every=1``, and a change in the load of the shared cores hits all three alike; the
  first iteration is warm-up. The overhead is the median over rounds of (iteration with checkpoint -
  floor); the saves inside the loop are also timed on their own, the steadier number when the cores are
  busy. ``--syn-steps`` shortens the iterations (the checkpoint does not depend on N).

Times are medians. The S3 server is moto on the loopback interface, on the same cores: its own request
handling is included, the network latency and bandwidth of a real object store are not (each of the few
requests per save or load costs a round trip there), so the S3 column is not a prediction for real S3.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _Trajectories:
    """Expert trajectories in memory: random walks from the model's initialization (what the Distiller reads)."""

    def __init__(self, spec, num_experts: int, epochs: int):
        import torch

        from contra_ray.models import build_model, flat_params

        g = torch.Generator().manual_seed(0)
        self.expert_ids = list(range(num_experts))
        self.traj = {}
        for i in self.expert_ids:
            torch.manual_seed(i)
            theta = flat_params(build_model(spec))
            steps = 0.01 * torch.randn(epochs, theta.numel(), generator=g)
            self.traj[i] = torch.cat([theta[None], theta[None] + steps.cumsum(0)])

    def params(self, expert_id: int, epoch: int):
        return self.traj[expert_id][epoch]


def _config(args, output_dir: str, name: str, checkpoint_every: int, syn_steps: int = 0):
    from contra_ray.config import load_config

    distill = {"iterations": args.iterations, "checkpoint_every": checkpoint_every}
    if syn_steps:
        distill["syn_steps"] = syn_steps
    return load_config(args.preset, {"name": name, "output_dir": output_dir, "threads": args.threads,
                                     "tracking": {"enabled": False}, "distill": distill})


def _distiller(cfg, store, per_class: int):
    """The preset's Distiller on random preprocessed images: ``per_class`` per class (the pool it picks from)."""
    import torch

    from contra_ray.augment import dsa_if
    from contra_ray.distill.distiller import Distiller

    classes, size = 10, 32  # CIFAR-10
    spec = cfg.model_spec(classes, size, 3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(classes * per_class, 3, size, size, generator=g)
    y = torch.arange(classes).repeat_interleave(per_class)
    return Distiller(cfg, store, spec, x, y, augment=dsa_if(cfg.distill.dsa), device="cpu")


def _time(fn, repeats: int, before=None) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls (``before()`` runs untimed before each)."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _save_load(args, state: dict, root: Path, location: str | None) -> tuple[float, float, int]:
    """Median save and load seconds for one storage, and the size of ``state.pt`` in bytes."""
    from contra_ray.distill.checkpoint import LocalCheckpoints

    ck = LocalCheckpoints(root, location=location)
    iterations = iter(range(1, 10**6))

    def save():
        i = next(iterations)  # the manifest's iteration is the state's, as in a run
        ck.save({**state, "distiller": {**state["distiller"], "iteration": i}}, i)

    save()  # warm-up (the first S3 request initializes the AWS SDK)
    saving = _time(save, args.repeats)
    newest_dir = max(ck.root.glob("iter_*"))
    size = (newest_dir / "state.pt").stat().st_size
    newest = int(newest_dir.name[len("iter_"):])

    def load():
        got = LocalCheckpoints(root, location=location).load(log=lambda line: sys.exit(line))
        if got is None or int(got["distiller"]["iteration"]) != newest:
            sys.exit(f"{location or root}: load() did not return the newest checkpoint ({newest})")

    empty = (lambda: shutil.rmtree(root, ignore_errors=True)) if location else None  # fetch every time
    if empty is not None:
        empty()
    load()  # warm-up
    return saving, _time(load, args.repeats, before=empty), size


def bench_save_load(args, state: dict, tmp: Path, bucket: str) -> dict:
    from contra_ray.common import storage

    out = {}
    out["save_local"], out["load_local"], out["state_bytes"] = _save_load(args, state, tmp / "ck-local", None)
    out["save_s3"], out["load_s3"], _ = _save_load(args, state, storage.local_mirror(f"{bucket}/ck"),
                                                   f"{bucket}/ck")
    return out


def bench_iterations(args, store, tmp: Path, bucket: str) -> dict:
    """Three runs side by side, one iteration of each in turn (the order rotating), so that a change in the
    load of the shared cores hits all three alike; the overhead is the median of the per-round differences."""
    from contra_ray.common import storage
    from contra_ray.distill.checkpoint import LocalCheckpoints
    from contra_ray.distill.loop import run_loop

    class TimedCheckpoints(LocalCheckpoints):
        saves: list[float]

        def save(self, state, iteration, metrics=None):
            t0 = time.perf_counter()
            try:
                return super().save(state, iteration, metrics)
            finally:
                self.saves.append(time.perf_counter() - t0)

    runs = {}
    for kind, output_dir, every in (("none", str(tmp / "runs"), 0), ("local", str(tmp / "runs"), 1),
                                    ("s3", f"{bucket}/runs", 1)):
        cfg = _config(args, output_dir, f"iter-{kind}", every, args.syn_steps)
        ck = None
        if every:  # as run_distillation builds them
            ck = TimedCheckpoints(cfg.run_dir() / "checkpoints",
                                  location=storage.join(cfg.run_location(), "checkpoints"))
            ck.saves = []
        runs[kind] = (cfg, _distiller(cfg, store, args.per_class), ck)
    times: dict[str, list[float]] = {kind: [] for kind in runs}
    kinds = list(runs)
    for it in range(args.iterations):
        for kind in kinds[it % 3:] + kinds[:it % 3]:
            cfg, distiller, ck = runs[kind]
            cfg.distill.iterations = it + 1  # one more iteration, then the final save: one checkpoint each
            t0 = time.perf_counter()
            run_loop(distiller, cfg, checkpoints=ck, resume=False, progress=None)
            times[kind].append(time.perf_counter() - t0)
    out = {}
    for kind, (_, _, ck) in runs.items():
        out[f"iter_{kind}"] = statistics.median(times[kind][1:])  # the first iteration is warm-up
        if ck is not None:
            out[f"loopsave_{kind}"] = statistics.median(ck.saves[1:])
            out[f"overhead_{kind}"] = statistics.median(t - f for t, f in zip(times[kind][1:], times["none"][1:]))
            out[f"nsaves_{kind}"] = len(ck.saves) - 1
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cifar10_ipc1_cpu", help="the sizes (default: the README main job's)")
    p.add_argument("--repeats", type=int, default=7, help="timed saves and loads per storage (median)")
    p.add_argument("--iterations", type=int, default=6,
                   help="distillation iterations per loop (the first is not timed)")
    p.add_argument("--per-class", type=int, default=10, help="random images per class the set is initialized from")
    p.add_argument("--syn-steps", type=int, default=0,
                   help="student steps N of the timed loops (0: the preset's); the checkpoint does not depend on "
                        "it, a smaller N only makes the iterations (the floor) shorter")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on shared cores 2 threads can be several times slower)")
    args = p.parse_args()
    if args.iterations < 2 or args.repeats < 1:
        p.error("--iterations must be >= 2 and --repeats >= 1")

    sys.path.insert(0, str(ROOT / "tests"))
    import torch

    from contra_ray.config import load_config
    from helpers import S3_ENV, make_bucket, start_s3_server

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="contra_ray-bench-s3-"))
    os.environ.update(S3_ENV)
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    os.environ["CONTRA_RAY_MIRROR"] = str(tmp / "mirror")
    proc, endpoint = start_s3_server()
    try:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        bucket = make_bucket(endpoint, "bench")
        cfg = _config(args, str(tmp / "runs"), "state", 1, args.syn_steps)  # N: not in the checkpoint
        preset = load_config(args.preset)
        d = preset.distill
        store = _Trajectories(cfg.model_spec(10, 32, 3), cfg.experts.num_experts, cfg.experts.epochs)
        distiller = _distiller(cfg, store, args.per_class)
        metrics = distiller.step()  # the optimizers get their momentum buffers, as in a running job
        full = d.iterations  # the history at the end of the preset's run
        state = {"distiller": distiller.state_dict(), "history": {k: [v] * full for k, v in metrics.items()},
                 "config": cfg.to_dict()}
        res = bench_save_load(args, state, tmp, bucket)
        res.update(bench_iterations(args, store, tmp, bucket))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"preset {args.preset}: IPC {d.ipc}, 10 classes, 3x32x32, soft labels {d.soft_labels}, "
          f"ConvNet width {cfg.model.width}, K {d.K}, N {d.syn_steps}, batch_syn {d.batch_syn}; "
          f"state.pt {res['state_bytes'] / 1024:.0f} KiB (history of {full} iterations)")
    n = f"N {args.syn_steps} instead of {d.syn_steps}" if args.syn_steps else f"N {d.syn_steps}"
    print(f"{args.threads} torch thread(s); medians of {args.repeats} saves/loads and of "
          f"{args.iterations - 1} iterations per loop ({n}, {res['nsaves_s3']} checkpoints per loop); "
          f"S3: moto server at {endpoint}")
    rows = [("checkpoint save (s)", res["save_local"], res["save_s3"]),
            ("checkpoint load, S3 mirror emptied (s)", res["load_local"], res["load_s3"]),
            ("save inside the loop (s per checkpoint)", res["loopsave_local"], res["loopsave_s3"]),
            ("s/iteration, checkpoint every iteration", res["iter_local"], res["iter_s3"]),
            ("s/iteration, no checkpoints (floor)", res["iter_none"], res["iter_none"]),
            ("s/iteration - floor (median per round)", res["overhead_local"], res["overhead_s3"])]
    print(f"{'':<42} {'local':>9} {'S3':>9} {'S3/local':>9}")
    for name, local, s3 in rows:
        ratio = f"{s3 / local:>9.2f}" if local > 0 and s3 > 0 and "floor)" not in name else f"{'-':>9}"
        print(f"{name:<42} {local:>9.4f} {s3:>9.4f} {ratio}")
    every = preset.distill.checkpoint_every
    if every:
        share = {k: 100 * res[f"loopsave_{k}"] / every / res["iter_none"] for k in ("local", "s3")}
        print(f"at the preset's checkpoint_every={every}: checkpoints cost {share['local']:.2f}% (local) and "
              f"{share['s3']:.2f}% (S3) of a floor iteration of this run ({n})")
    print("caveat: moto on the loopback interface, on the same cores: its request handling is included, the "
          "network latency and bandwidth of a real object store are not")


if __name__ == "__main__":
    main()
