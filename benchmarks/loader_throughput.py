"""Images/s of expert training input (shuffled batches of preprocessed float32 images) on the real
CIFAR-10 JPEGs: the in-memory loader, FFCV (raw and JPEG .beton) and a torchvision ImageFolder DataLoader.

    python benchmarks/loader_throughput.py --images 5000 --epochs 3 --workers 2

Every loader serves the same ``--images`` training images (a class-balanced subset of the CIFAR-10 JPEG
train split; the verified tarball from ../shared is decoded once into --cache-dir), in batches of
``--batch-size``, preprocessed to float32 (``/255``, per-channel mean/std) on the CPU. No model runs:
this is the input side of :func:`contra_ray.experts.train_expert` alone.

* memory: :class:`contra_ray.experts.TensorBatchLoader` over the preprocessed tensor (decoded once; the
  rate is indexing a tensor).
* ffcv-raw / ffcv-jpeg: :class:`contra_ray.data.ffcv_beton.FFCVBatchLoader` (one FFCV Loader per epoch over
  the epoch's indices, ``--workers`` threads; jpeg decodes every image every epoch). The .beton is written
  first (time reported apart).
* torchvision: ``ImageFolder`` + ``Subset`` of the same files, ``ToTensor`` + ``Normalize``,
  ``DataLoader(shuffle=True, num_workers=--workers)`` (PIL-decodes every JPEG every epoch).

Epoch 1 (FFCV: Loader construction and numba compilation; torchvision: worker start-up) is reported
apart from the mean of the later epochs (FFCV reuses the epoch-1 Loader: same epoch size).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=5000, help="training images served per epoch (class-balanced)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per loader (the first is reported apart)")
    p.add_argument("--batch-size", type=int, default=256, help="experts.batch_size")
    p.add_argument("--workers", type=int, default=2, help="FFCV threads / DataLoader workers (the task's CPUs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    p.add_argument("--cache-dir", default=os.environ.get("CONTRA_RAY_CACHE", str(Path.home() / ".cache/contra_ray")),
                   help="decoded-image cache (data.cache_dir)")
    p.add_argument("--out", default=None, help="folder for the .beton files (default: a temporary folder)")
    p.add_argument("--skip", default="",
                   help="comma-separated loaders to skip (memory, ffcv-raw, ffcv-jpeg, torchvision)")
    args = p.parse_args(argv)

    import torch

    from contra_ray.config import DataConfig
    from contra_ray.data.loaders import TensorBatchLoader
    from contra_ray.data.preprocess import fit_preprocessor
    from contra_ray.data.sources import ImageSet, content_hash, imagefolder_root, load_split
    from contra_ray.experts.curriculum import ShuffledOrder

    torch.set_num_threads(args.threads)
    cfg = DataConfig(dataset="cifar10-jpeg", cache_dir=args.cache_dir, zca=False)
    full = load_split(cfg, "train")
    idx = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))[:args.images].sort().values
    train = ImageSet(full.images[idx].contiguous(), full.labels[idx].contiguous(), full.classes,
                     f"cifar10-jpeg/train[bench{args.images}]", content_hash(full.images[idx], full.labels[idx]))
    pre = fit_preprocessor(train, cfg)
    order, skip = ShuffledOrder(len(train)), set(args.skip.split(","))
    rows = []

    def timed(name: str, epoch_batches, note="") -> None:
        gen = torch.Generator().manual_seed(1)
        secs = []
        for e in range(args.epochs):
            t0 = time.perf_counter()
            n = 0
            for x, y in epoch_batches(order.epoch_indices(e, gen)):
                assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
                n += len(y)
            secs.append(time.perf_counter() - t0)
            assert n == len(train), (name, n)
        later = secs[1:] or secs
        rows.append((name, len(train) / secs[0], len(train) * len(later) / sum(later),
                     note() if callable(note) else note))
        print(f"  {name}: epoch 1 {secs[0]:.2f} s, later {sum(later) / len(later):.2f} s/epoch", flush=True)

    if "memory" not in skip:
        mem = TensorBatchLoader(pre(train.images), train.labels, args.batch_size)
        timed("memory", mem.batches, "decoded + preprocessed once")

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="contra_ray-bench-"))
    for mode in ("raw", "jpeg"):
        if f"ffcv-{mode}" in skip:
            continue
        from contra_ray.data.ffcv_beton import FFCVBatchLoader, write_beton

        t0 = time.perf_counter()
        path = write_beton(train, out, mode=mode, num_workers=args.workers)
        written = time.perf_counter() - t0
        size = path.stat().st_size / 2**20
        ff = FFCVBatchLoader(path, pre, args.batch_size, num_workers=args.workers, timeout_s=300)
        timed(f"ffcv-{mode}", ff.batches,
              lambda size=size, written=written, ff=ff: f".beton {size:.0f} MiB written in {written:.1f} s; "
                                                        f"{len(ff.construct_s)} Loader built in "
                                                        f"{sum(ff.construct_s):.1f} s")

    if "torchvision" not in skip:
        import torchvision.transforms as T
        from torch.utils.data import DataLoader, Subset
        from torchvision.datasets import ImageFolder

        folder = imagefolder_root(Path(args.cache_dir) / "cifar10-jpeg") / "train"
        tf = T.Compose([T.ToTensor(), T.Normalize(pre.mean.tolist(), pre.std.tolist())])
        ds = Subset(ImageFolder(str(folder), transform=tf), idx.tolist())

        def tv_batches(indices):  # DataLoader draws its own shuffle; same images, same batch size
            return iter(DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                   persistent_workers=False))

        timed("torchvision", tv_batches, "ImageFolder + DataLoader, PIL decode per epoch")

    print(f"\nexpert training input, CIFAR-10 JPEG train subset: {len(train)} images 32x32, batch {args.batch_size}, "
          f"{args.workers} workers, {args.epochs} epochs, torch threads {args.threads}")
    print(f"{'loader':<12} {'epoch 1 img/s':>14} {'later img/s':>12}  note")
    for name, first, later, note in rows:
        print(f"{name:<12} {first:>14,.0f} {later:>12,.0f}  {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
