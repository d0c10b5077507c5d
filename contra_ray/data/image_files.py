"""Image files: decoding them to 8-bit RGB and checking ImageFolder trees (the rules every loader shares).

:func:`decode_images` decodes files as torchvision's ``ImageFolder`` default loader does
(``PIL.Image.convert("RGB")``), refusing images whose samples are not 8-bit; :func:`check_split_classes`
refuses ImageFolder splits that list different classes; :func:`list_split` lists one split of a tree after
that check. Used by :mod:`contra_ray.data.sources` and :mod:`contra_ray.data.imagenet`.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

__all__ = ["decode_images", "check_split_classes", "find_classes", "list_image_folder", "list_split", "split_dir",
           "differences", "undecodable", "NOT_8BIT"]

# PIL modes whose samples are not 8-bit (16/32-bit integer, float): PIL's convert("RGB") clips them to
# 0..255 instead of scaling, so they are refused rather than silently flattened
NOT_8BIT = ("I", "F")


def split_dir(root: Path, split: str) -> Path:
    """``root/train`` for ``split="train"``, else ``root/test`` or (without it) ``root/val``.

    Raises:
        FileNotFoundError: ``root`` is not a directory, or the split's folder is missing (names both).
    """
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={str(root)!r}: no such directory")
    names = ("train",) if split == "train" else ("test", "val")
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise FileNotFoundError(f"data.root={str(root)!r}: no {' or '.join(n + '/' for n in names)} folder in {root} "
                            f"(an ImageFolder root needs train/ and test/ or val/ subfolders)")


def _names(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


def differences(missing: list[str], extra: list[str], lacks: str = "lacks", has: str = "has extra",
                sep: str = " and ") -> str:
    """``"lacks ['b'] and has extra ['d']"``, leaving out an empty side (``"lacks ['b']"``, not ``"... extra []"``)."""
    parts = [f"{lacks} {_names(missing)}" if missing else "", f"{has} {_names(extra)}" if extra else ""]
    return sep.join(p for p in parts if p)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def find_classes(directory: str | os.PathLike) -> list[str]:
    """The class folders of an ImageFolder split, sorted: torchvision's ``find_classes`` without hidden
    folders (``.ipynb_checkpoints``, ``.git``, ``.Trash-1000``: a name starting with ``.`` is never a class).

    Raises:
        FileNotFoundError: the directory holds no (visible) folder (names it).
    """
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not _hidden(e.name))
    if not classes:
        raise FileNotFoundError(f"{directory}: no class folders (an ImageFolder split holds one folder of images "
                                "per class; hidden folders, whose names start with '.', are skipped)")
    return classes


def list_image_folder(folder: str | os.PathLike):
    """``torchvision.datasets.ImageFolder`` listing of one split (``loader`` returns the path), without hidden
    entries: folders and files whose names start with ``.`` (macOS ``._x.jpg``, ``.ipynb_checkpoints``) are
    neither classes nor images.

    Raises:
        FileNotFoundError: no class folders; a class folder without image files (names the folder's path
            and the image extensions looked for).
    """
    folder = Path(folder)

    class _VisibleFolder(ImageFolder):
        def find_classes(self, directory):
            classes = find_classes(directory)
            return classes, {c: i for i, c in enumerate(classes)}

    def visible_image(path: str) -> bool:
        rel = Path(os.path.relpath(path, folder))
        return path.lower().endswith(IMG_EXTENSIONS) and not any(_hidden(part) for part in rel.parts)

    listing = _VisibleFolder(str(folder), loader=lambda p: p, is_valid_file=visible_image, allow_empty=True)
    counts = np.bincount(np.asarray(listing.targets, dtype=np.int64), minlength=len(listing.classes))
    empty = [c for c, n in zip(listing.classes, counts) if n == 0]
    if empty:
        more = f" ({len(empty)} empty class folders: {_names(empty)})" if len(empty) > 1 else ""
        raise FileNotFoundError(f"{folder / empty[0]}: class folder holds no image files ({', '.join(IMG_EXTENSIONS)})"
                                f"{more}; add its images or remove the folder from every split")
    return listing


def list_split(root: Path, split: str):
    """``(folder, listing)``: the folder of ``split`` in the ImageFolder tree ``root`` (:func:`split_dir`) and
    its :func:`list_image_folder` listing, after :func:`check_split_classes`.

    Raises:
        FileNotFoundError / ValueError: as :func:`split_dir`, :func:`check_split_classes` and
            :func:`list_image_folder`.
    """
    folder = split_dir(root, split)
    check_split_classes(root)
    return folder, list_image_folder(folder)


def check_split_classes(root: str | os.PathLike) -> None:
    """Check that ``root/train`` and ``root/test`` (or ``root/val``) hold the same class folders.

    ``ImageFolder`` numbers classes by their sorted folder names within each split, so a test split
    without class ``b`` (train ``a, b, c``; test ``a, c``) would label its ``c`` images 1, which the
    model reads as ``b``. Nothing is checked when either split folder is missing. Hidden folders (``.x``)
    are not classes (:func:`find_classes`).

    Raises:
        ValueError: the class lists differ; names both folders, both lists, and the classes the test split
            lacks / has in excess (an empty side is left out).
        FileNotFoundError: a split without class folders (names it).
    """
    root = Path(root)
    train = root / "train"
    test = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not train.is_dir() or test is None:
        return
    a, b = find_classes(train), find_classes(test)
    if a != b:
        missing, extra = [c for c in a if c not in b], [c for c in b if c not in a]
        raise ValueError(f"data.root={str(root)!r}: the splits list different classes: {train} has {len(a)} "
                         f"{_names(a)}, {test} has {len(b)} {_names(b)}; {test.name}/ {differences(missing, extra)}. "
                         "Labels are indices into each split's sorted class folders, so test images would be "
                         "scored as other classes; give every split the same class folders")


def undecodable(path: str, e: BaseException) -> str:
    """The one line for an image file whose header opened but whose pixels cannot be decoded (a truncated or
    corrupt file): names the file and the decoder's reason."""
    return (f"{path}: image data cannot be decoded, the file is truncated or corrupt ({' '.join(str(e).split())}); "
            "replace it with a complete copy or remove it")


def decode_images(files: list[str], desc: str = "decoding") -> torch.Tensor:
    """Decode image files into one uint8 RGB ``[N, 3, H, W]`` tensor (no resizing), 8 bits per channel.

    Every file's mode is read (PIL header) and the image converted as torchvision's ``ImageFolder``
    default loader does, ``PIL.Image.convert("RGB")``: grayscale (``1``, ``L``) is replicated to three
    channels, alpha (``LA``, ``RGBA``, ``PA``) is dropped (not composited), palettes (``P``) are expanded,
    ``CMYK`` / ``YCbCr`` / ``LAB`` are converted by PIL. So the channel count never depends on which file
    comes first. Files whose samples are not 8-bit (modes ``I``, ``I;16*``, ``F``: PIL would clip them to
    255, not scale them) are refused. 16-bit-per-channel RGB(A) PNGs, which PIL itself opens as 8-bit
    ``RGB``/``RGBA`` keeping the high byte, are decoded exactly as PIL does.

    8-bit ``L`` / ``RGB`` JPEGs and PNGs (no transparency chunk) are decoded with
    ``torchvision.io.decode_image`` (``ImageReadMode.RGB``) on the file bytes, bit-identical to PIL and
    2.5x faster; everything else with PIL.

    Raises:
        ValueError: no files; an image whose size differs from the first image's (names both files); an
            image whose mode is not 8-bit or cannot be converted to RGB (names the file and its mode); a file
            whose pixels cannot be decoded, e.g. a truncated JPEG (names the file).
    """
    try:  # deprecated in torchvision 0.29 (superseded by TorchCodec); PIL is the fallback
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:
        decode_image = ImageReadMode = None

    if not files:
        raise ValueError("no image files to decode")
    try:
        with Image.open(files[0]) as im:
            w, h = im.size
    except Exception as e:  # noqa: BLE001 - PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ValueError(f"{files[0]}: not a readable image ({e})") from None
    out = torch.empty(len(files), 3, h, w, dtype=torch.uint8)
    tv_mode = ImageReadMode.RGB if decode_image is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io warns on every call
        for i, path in enumerate(tqdm(files, desc=desc, unit="img", mininterval=1.0, leave=False,
                                      disable=len(files) < 1000)):
            out[i] = _decode_one(path, decode_image, tv_mode, files[0], (h, w))
    return out


def _decode_one(path: str, decode_image, tv_mode, first: str, hw: tuple[int, int]) -> torch.Tensor:
    """One file -> uint8 ``[3, H, W]`` (see :func:`decode_images`)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        im = Image.open(io.BytesIO(raw))  # reads the header only
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ValueError(f"{path}: not a readable image ({e})") from None
    with im:
        if im.mode.startswith(NOT_8BIT):
            raise ValueError(f"{path}: image mode {im.mode!r} is not 8 bits per channel; PIL's convert('RGB') would "
                             f"clip its values to 0..255 instead of scaling them. Convert the file to 8-bit RGB "
                             f"or grayscale first")
        img = None
        fast = (decode_image is not None and im.format in ("JPEG", "PNG") and im.mode in ("L", "RGB")
                and "transparency" not in im.info)
        if fast:
            try:
                img = decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=tv_mode)
            except RuntimeError:
                img = None
            if img is not None and (img.dtype != torch.uint8 or img.shape[0] != 3):
                img = None  # e.g. a 16-bit PNG: PIL's reading is the reference
        if img is None:
            try:
                im.load()  # the pixels: a truncated or corrupt file fails here
            except (ValueError, OSError, SyntaxError) as e:
                raise ValueError(undecodable(path, e)) from None
            try:
                rgb = im.convert("RGB")
            except (ValueError, OSError) as e:
                raise ValueError(f"{path}: image mode {im.mode!r} cannot be converted to RGB ({e})") from None
            img = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)
    if tuple(img.shape[1:]) != hw:
        raise ValueError(f"{path}: image is {img.shape[2]}x{img.shape[1]} (WxH) but {first} is {hw[1]}x{hw[0]}; "
                         f"all images of a data set must share one size (nothing is resized)")
    return img
