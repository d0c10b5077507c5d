"""``python -m contra_ray.data prepare``: FFCV ``.beton`` files of a data set for ``experts.loader=ffcv``."""

from __future__ import annotations

import argparse
import time

from contra_ray.common import storage
from contra_ray.common.cli import check_folder, cli_entry, cli_error, interrupted
from contra_ray.config import DATASETS, ConfigError, config_from_dict, default_cache_dir
from contra_ray.data.ffcv_beton import beton_cache, beton_name, is_remote, publish_beton, write_beton
from contra_ray.data.sources import load_split

__all__ = ["main"]


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """``python -m contra_ray.data prepare ...``: write FFCV ``.beton`` files of a data set (see
    :func:`contra_ray.data.ffcv_beton.write_beton`), each with its dataset id and content hash in a JSON beside it.

    ``--out`` may be a URI (``s3://``, ``gs://``): each file is written into this node's copy folder
    (:func:`~contra_ray.data.ffcv_beton.beton_cache`, where an expert run on this node finds it) and published
    there, its JSON last (:func:`~contra_ray.data.ffcv_beton.publish_beton`).

    Exit status: 0 done; 2 invalid input, checked before any work (``--out`` a file, not writable, or a URI of
    an unknown scheme or not writable, a ``--cache-dir`` that cannot be written, missing or damaged data); 1 a
    failure of the machine during the work (one ``error: <path>: <cause>`` line, e.g. disk full, or the URI
    refusing an upload); 130 Ctrl-C (each ``.beton`` is written atomically, so a rerun writes the unfinished
    ones again)."""
    p = argparse.ArgumentParser(prog="python -m contra_ray.data", description="data utilities")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("prepare", help="write FFCV .beton files (+ dataset id and content hash in a JSON) for "
                                       "experts.loader=ffcv")
    q.add_argument("--dataset", required=True, choices=DATASETS, help="data.dataset")
    q.add_argument("--root", default=None, help="data.root (dataset folder, tarball or ImageFolder root)")
    q.add_argument("--resolution", type=int, default=None,
                   help="data.resolution (tiny-imagenet / imagenet; default: native, 64 for imagenet)")
    q.add_argument("--mode", choices=("raw", "jpeg"), default="raw", help="raw: exact pixels; jpeg: lossy, smaller")
    q.add_argument("--out", required=True, help="folder or URI (s3://...) for the .beton files (experts.ffcv_dir)")
    q.add_argument("--splits", default="train", help="comma-separated splits (train, test); default train")
    q.add_argument("--cache-dir", default=default_cache_dir(), help="data.cache_dir (decoded images)")
    q.add_argument("--train-per-class", type=int, default=None, help="data.train_per_class (class-balanced subset)")
    q.add_argument("--subset-seed", type=int, default=0, help="data.subset_seed")
    q.add_argument("--workers", type=int, default=1, help="FFCV writer processes")
    args = p.parse_args(argv)
    try:
        cfg = config_from_dict({"data": {"dataset": args.dataset, "root": args.root, "resolution": args.resolution,
                                         "cache_dir": args.cache_dir, "train_per_class": args.train_per_class,
                                         "subset_seed": args.subset_seed}}).data
        if not args.out.strip():
            raise ConfigError(f"--out={args.out!r}: give the folder or URI for the .beton files")
        storage.check_location("--out", args.out)  # before any work: a scheme we open (or a path)
        remote = is_remote(args.out)
        if remote:  # and a location that takes a write
            try:
                storage.check_writable("--out", args.out)
            except storage.StorageError as e:
                raise ConfigError(str(e)) from None
            check_folder(str(storage.local_mirror(args.out)), "--out (its local copy)")
        else:  # a path, or file://: written in place
            args.out = str(storage.local_mirror(args.out)) if storage.is_uri(args.out) else args.out
            check_folder(args.out, "--out")
        check_folder(cfg.cache_dir, "--cache-dir")
        print(f"{'split':<6} {'images':>9} {'content hash':<17} {'seconds':>8}  file")
        for split in [s for s in args.splits.split(",") if s]:
            t0 = time.time()
            data = load_split(cfg, split)
            out = beton_cache(args.out, beton_name(data.dataset_id, args.mode)) if remote else args.out
            path = write_beton(data, out, args.mode, num_workers=args.workers)
            if remote:
                try:
                    path = publish_beton(path, args.out)
                except storage.StorageError as e:  # during the work: exit 1
                    return cli_error(e, 1)
            print(f"{split:<6} {len(data):>9} {data.content_hash:<17} {time.time() - t0:>8.1f}  {path}", flush=True)
    except (ConfigError, FileNotFoundError, ValueError, ImportError, TimeoutError) as e:
        return cli_error(e)
    except KeyboardInterrupt:
        return interrupted(f"interrupted: the .beton files listed above are complete in {args.out}; rerunning the "
                           "same command writes every split again (decoded images stay cached)")
    return 0
