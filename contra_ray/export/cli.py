"""``python -m contra_ray.export ARTIFACT --format mtt|imagefolder|hf --out DIR``: a distilled set in another
tool's format (:mod:`contra_ray.export.formats`).

Exit status: 0 written; 2 invalid input, one ``error: ...`` line and nothing written (a missing or corrupt
artifact, an unknown format, an ``--out`` that is a file or a non-empty folder or not local, ``hf`` without
the ``datasets`` package); 1 a failure of the machine while writing (disk full: one line, the partial
temporary folder removed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from contra_ray.api import load_distilled
from contra_ray.common import storage
from contra_ray.common.cli import cli_entry, cli_error
from contra_ray.distill.artifact import ArtifactError
from contra_ray.export.formats import FORMATS, HF_HINT, check_exportable, export_set

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are ONE ``error: ...`` line and exit status 2 (no usage block)."""

    def error(self, message: str):
        raise SystemExit(cli_error(message))


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m contra_ray.export`` argument parser."""
    p = _Parser(prog="python -m contra_ray.export",
                description="Write a distilled set in another tool's format: mtt (MTT/DATM images_best.pt, "
                            "labels_best.pt, lr_best.pt; DD-Ranking reads them), imagefolder (8-bit PNGs per class "
                            "+ labels.json / soft_labels.pt with the soft labels), hf (Hugging Face datasets "
                            f"save_to_disk; needs {HF_HINT}).")
    p.add_argument("artifact", metavar="ARTIFACT",
                   help="distilled set written by contra_ray (.safetensors; local path or s3:// URI)")
    p.add_argument("--format", required=True, choices=FORMATS, help="output format")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (created; must not exist or be empty)")
    return p


def _have_datasets() -> bool:
    """Whether Hugging Face ``datasets`` imports (a folder named ``datasets`` on the path does not count)."""
    try:
        import datasets  # heavy: only for --format hf
    except ImportError:
        return False
    return hasattr(datasets, "load_from_disk")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (module docstring)."""
    args = build_parser().parse_args(argv)
    if storage.is_uri(args.out):
        return cli_error(f"--out={args.out!r}: a local folder is expected (export, then copy it)")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        return cli_error(f"--out={args.out!r}: is a file, expected a folder")
    if out.is_dir() and any(out.iterdir()):
        return cli_error(f"--out={args.out!r}: folder is not empty (choose a new one)")
    if args.format == "hf" and not _have_datasets():
        return cli_error(f"--format=hf needs the Hugging Face datasets package: {HF_HINT}")
    try:
        distilled = load_distilled(args.artifact)
    except ArtifactError as e:
        return cli_error(f"ARTIFACT={args.artifact!r}: {e}")
    try:
        check_exportable(distilled, args.format)
    except ValueError as e:  # an image layout the format cannot hold (e.g. 4-channel images as PNG)
        return cli_error(f"--format={args.format}: {e}")
    export_set(distilled, args.format, out)
    print(f"exported {len(distilled)} images ({distilled.num_classes} classes, "
          f"{'soft' if distilled.soft else 'hard'} labels) as {args.format} to {out}", flush=True)
    return 0
