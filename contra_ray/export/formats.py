"""Writers of a distilled set in other tools' formats, each into a folder created whole (a temporary sibling
folder renamed into place: a reader never sees half an export, a failed one leaves nothing).

* ``mtt``: the MTT / DATM trio read by their ``evaluation.py`` and DD-Ranking's evaluators
  (``torch.load`` of ``images_best.pt``, ``labels_best.pt``, ``lr_best.pt``), written as DATM's
  ``distill/DATM.py`` saves them: ``image_syn.cpu()`` float32 ``[n, C, H, W]`` in the space the network
  takes (normalized, ZCA-whitened when the set has ZCA: MTT/DATM save the whitened tensor, their
  ``images_zca_*.pt`` being the inverse); ``label_syn.cpu()``: for a soft-label set DATM's learned label
  LOGITS float32 ``[n, num_classes]`` (DATM's ``SoftCrossEntropy`` and its ``evaluation.py`` apply
  ``softmax`` to them, which gives this set's ``targets()``), for a hard-label set MTT's int64 class
  indices ``[n]``; ``syn_lr.detach().cpu()``: a float32 0-d tensor (MTT saved ``syn_lr.item()``, a Python
  float; ``float(torch.load(...))`` reads either, DD-Ranking calls ``.item()`` on a tensor).
* ``imagefolder``: torchvision ``ImageFolder`` tree of 8-bit PNGs in pixel space (``Distilled.pixels_uint8``:
  clamped to [0, 1], rounded), one folder per class named so that ``sorted()`` gives the class order, file
  ``<index in the set, zero-padded to 5 digits or more>.png``; ``labels.json`` (every file's soft and hard label) and
  ``soft_labels.pt`` (float32 ``[n, num_classes]`` in ``ImageFolder(root).samples`` order, DD-Ranking's
  ``labels[idx]`` for an image folder).
* ``hf``: Hugging Face ``datasets.Dataset.save_to_disk``: columns ``image`` (PNG, as the image folder),
  ``label`` (``ClassLabel``, hard), ``soft_label`` (float32 list of ``num_classes``), rows in set order.

Every export also holds ``contra_ray_export.json``: the source, classes, ``syn_lr``, the evaluation recipe,
the model spec and the preprocessing a consumer must apply to real images (mean/std, whether ZCA).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from contra_ray.api import Distilled
from contra_ray.common.fileio import atomic_write

__all__ = ["FORMATS", "HF_HINT", "check_exportable", "class_dirs", "export_set", "imagefolder_order", "write_hf",
           "write_imagefolder", "write_mtt"]

FORMATS = ("mtt", "imagefolder", "hf")
HF_HINT = "pip install 'contra_ray[hf]'"
EXPORT_JSON = "contra_ray_export.json"
_BAD_NAMES = {"", ".", ".."}


def class_dirs(classes: list[str]) -> list[str]:
    """Folder name of each class such that ``sorted()`` of the names (what torchvision's ``find_classes`` does)
    is the class order: the class ids themselves when they already sort that way and are usable folder names,
    else ``<index>_<id>`` with the index zero-padded (``/`` and NUL in an id become ``_``)."""
    names = [str(c) for c in classes]
    plain = (len(set(names)) == len(names) and sorted(names) == names
             and all(n not in _BAD_NAMES and "/" not in n and "\0" not in n and not n.startswith(".") for n in names))
    if plain:
        return names
    width = len(str(max(len(names) - 1, 0)))
    return [f"{i:0{width}d}_" + n.replace("/", "_").replace("\0", "_") for i, n in enumerate(names)]


def imagefolder_order(distilled: Distilled) -> list[int]:
    """Indices of the set's images in the order torchvision's ``ImageFolder`` lists the exported files (class
    folders sorted, then file names sorted: set order within a class)."""
    hard = distilled.hard_labels.tolist()
    return sorted(range(len(hard)), key=lambda i: (hard[i], i))


def _summary(distilled: Distilled, fmt: str, files: dict[str, str]) -> dict:
    pre = distilled.preprocessor
    return {
        "format": f"contra_ray.export/{fmt}/1",
        "source": distilled.source,
        "num_images": len(distilled), "num_classes": distilled.num_classes, "ipc": distilled.ipc,
        "image_shape": list(distilled.images.shape[1:]),
        "classes": distilled.classes, "class_names": distilled.class_names,
        "soft_labels": distilled.soft, "syn_lr": distilled.syn_lr,
        "eval": distilled.meta.get("eval"), "model": distilled.meta.get("model"),
        "dataset_id": distilled.meta.get("dataset_id"), "method": distilled.meta.get("method"),
        "preprocessing": {
            "pixels": "uint8 / 255", "mean": pre.mean.tolist(), "std": pre.std.tolist(), "zca": bool(pre.zca),
            "zca_eps": float(pre.zca_eps),
            "note": "model input = (pixels - mean) / std per channel, then ZCA (kornia ZCAWhitening, fitted on "
                    f"{distilled.meta.get('dataset_id')}) when zca; the whitening matrix is in the source "
                    "artifact (contra_ray.load_distilled(source).preprocess)"},
        "files": files,
    }


def _write_json(path: Path, doc: dict) -> None:
    atomic_write(path, json.dumps(doc, indent=1) + "\n")


def write_mtt(distilled: Distilled, folder: Path) -> None:
    """The MTT / DATM trio into ``folder`` (module docstring); ``torch.load`` reads each file back exactly."""
    soft = distilled.soft
    labels = distilled.label_logits.detach().float().contiguous().clone() if soft else \
        distilled.hard_labels.detach().long().contiguous().clone()
    tensors = {"images_best.pt": distilled.images.detach().float().contiguous().clone(),
               "labels_best.pt": labels,
               "lr_best.pt": torch.tensor(distilled.syn_lr, dtype=torch.float32)}
    for name, t in tensors.items():
        atomic_write(folder / name, lambda tmp, t=t: torch.save(t, tmp))
    _write_json(folder / EXPORT_JSON, _summary(distilled, "mtt", {
        "images_best.pt": "float32 [n, C, H, W] in the model's input space (DATM/MTT image_syn)",
        "labels_best.pt": ("float32 [n, num_classes] label logits (DATM label_syn; softmax gives the soft labels)"
                           if soft else "int64 [n] class indices (MTT label_syn)"),
        "lr_best.pt": "float32 0-d tensor: the learned syn_lr (DATM)"}))


def _png(chw: np.ndarray) -> Image.Image:
    if chw.shape[0] == 1:
        return Image.fromarray(chw[0], mode="L")
    if chw.shape[0] == 3:
        return Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0)), mode="RGB")
    raise ValueError(f"images with {chw.shape[0]} channels cannot be PNG files (1 or 3)")


def check_exportable(distilled: Distilled, fmt: str) -> None:
    """Refuse what format ``fmt`` cannot hold, before anything is written.

    Raises:
        ValueError: unknown ``fmt``; images of other than 1 or 3 channels as PNG (``imagefolder``, ``hf``).
    """
    if fmt not in WRITERS:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    c = int(distilled.images.shape[1])
    if fmt in ("imagefolder", "hf") and c not in (1, 3):
        raise ValueError(f"images with {c} channels cannot be PNG files (1 or 3)")


def write_imagefolder(distilled: Distilled, folder: Path) -> None:
    """PNGs in a torchvision ``ImageFolder`` tree plus ``labels.json`` and ``soft_labels.pt`` (module docstring)."""
    pixels = distilled.pixels_uint8().numpy()
    dirs = class_dirs(distilled.classes)
    hard = distilled.hard_labels.tolist()
    targets = distilled.targets()
    order = imagefolder_order(distilled)
    width = max(5, len(str(len(hard) - 1)))  # file names sort as numbers
    files = []
    for i in order:
        rel = f"{dirs[hard[i]]}/{i:0{width}d}.png"
        img = _png(pixels[i])
        atomic_write(folder / rel, lambda tmp, img=img: img.save(tmp, format="PNG"))
        files.append({"file": rel, "index": i, "label": hard[i], "soft_label": targets[i].tolist()})
    atomic_write(folder / "soft_labels.pt", lambda tmp: torch.save(targets[order].contiguous().clone(), tmp))
    _write_json(folder / "labels.json", {"classes": distilled.classes, "class_dirs": dirs, "files": files})
    _write_json(folder / EXPORT_JSON, _summary(distilled, "imagefolder", {
        "<class dir>/<index>.png": "8-bit PNG in pixel space (the set's images, inverse-preprocessed, clamped to "
                                   "[0, 1], rounded); grayscale sets as mode L",
        "labels.json": "per file (ImageFolder order): index in the set, hard label, soft label (probabilities)",
        "soft_labels.pt": "float32 [n, num_classes] soft labels, rows in torchvision ImageFolder(root).samples order"}))


def write_hf(distilled: Distilled, folder: Path) -> None:
    """``datasets.Dataset.save_to_disk(folder)`` (module docstring); read back with ``datasets.load_from_disk``.

    Raises:
        ImportError: ``datasets`` is not installed (:data:`HF_HINT`).
    """
    import datasets  # optional extra [hf]; heavy

    k = distilled.num_classes
    list_type = getattr(datasets, "List", None) or datasets.Sequence
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=distilled.classes),
                                  "soft_label": list_type(datasets.Value("float32"), length=k)})
    pixels = distilled.pixels_uint8().numpy()
    columns = {"image": [_png(p) for p in pixels], "label": distilled.hard_labels.tolist(),
               "soft_label": distilled.targets().tolist()}
    summary = _summary(distilled, "hf", {"(datasets.save_to_disk)": "columns image (8-bit PNG, pixel space), "
                                         "label (ClassLabel, hard), soft_label (float32 [num_classes])"})
    info = datasets.DatasetInfo(description=json.dumps(summary), features=features)
    datasets.Dataset.from_dict(columns, features=features, info=info).save_to_disk(str(folder))
    _write_json(folder / EXPORT_JSON, summary)


WRITERS = {"mtt": write_mtt, "imagefolder": write_imagefolder, "hf": write_hf}


def export_set(distilled: Distilled, fmt: str, out: str | os.PathLike) -> Path:
    """Write ``distilled`` in format ``fmt`` to the folder ``out``, which must not exist or be empty: everything is
    written into a temporary sibling folder that is then renamed to ``out``.

    Raises:
        ValueError: :func:`check_exportable`; ``out`` is a file or a non-empty folder.
        ImportError: ``fmt == "hf"`` without ``datasets``.
        OSError: the folder cannot be written (nothing is left behind).
    """
    check_exportable(distilled, fmt)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: {'is a file' if not out.is_dir() else 'not empty'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.mkdir()
        WRITERS[fmt](distilled, tmp)
        os.replace(tmp, out)  # rename(2) replaces an empty folder
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
