"""What every stage receives from the data stage: train/test splits preprocessed once (:class:`PreparedData`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from contra_ray.common import storage
from contra_ray.config import Config
from contra_ray.data.imagenet import in_memory, read_class_names, share_streamed
from contra_ray.data.preprocess import fit_preprocessor
from contra_ray.data.sources import load_split
from contra_ray.models import ModelSpec


@dataclasses.dataclass
class PreparedData:
    """Data every stage needs, preprocessed once: float32 images in the model's input space.

    For a streamed set (``data.in_memory`` false, the ImageNet default) ``train_x`` / ``test_x`` are lazy
    :class:`contra_ray.data.disk_images.PreprocessedImages` views: indexing or splitting them reads and
    preprocesses just those rows, so experts, the distiller's initialization and evaluation stream the set
    batch by batch through the same code.
    """

    train: object  # data.ImageSet
    test: object  # data.ImageSet
    preprocessor: object  # data.Preprocessor
    train_x: torch.Tensor  # float32 [N, C, H, W] (or a lazy view of it)
    test_x: torch.Tensor  # float32 [N_test, C, H, W] (or a lazy view of it)
    spec: ModelSpec


def prepare_data(cfg: Config, with_test: bool = True) -> PreparedData:
    """Load the train (subset) and test splits, fit or load the cached preprocessor, apply it.

    A streamed set is published to :meth:`Config.data_cache_location` when there is one
    (:func:`contra_ray.data.imagenet.share_streamed`: skipped when already there), so Ray tasks on nodes that do
    not share ``data.cache_dir`` fill their own copy from it.

    Raises:
        ConfigError: IPC or batch_syn too large for the data (:meth:`Config.validate_data`).
        FileNotFoundError: dataset missing (see :func:`contra_ray.data.load_split`).
        StorageError: the data cache location is not writable.
    """
    location = cfg.data_cache_location()
    if location is not None and not in_memory(cfg.data):  # before hours of decoding, not after
        storage.check_writable("data.shared_cache" if cfg.data.shared_cache else "output_dir (its data-cache)",
                               location)
    train = load_split(cfg.data, "train")
    cfg.validate_data(train.num_classes, int(train.class_counts().min()))
    test = load_split(cfg.data, "test") if with_test else None
    if location is not None:  # in-memory sets are skipped (they reach workers through Ray's object store)
        share_streamed([s for s in (train, test) if s is not None], location)
    pre = fit_preprocessor(train, cfg.data)
    spec = cfg.model_spec(train.num_classes, train.image_size, train.channels)
    return PreparedData(train, test, pre, pre(train.images), pre(test.images) if with_test else None, spec)


def streamed_locations(cfg: Config) -> dict[str, str]:
    """The locations every node must reach for a streamed set (``{}`` for an in-memory one, which reaches Ray
    workers through the object store): ``data.shared_cache`` (:meth:`Config.data_cache_location`, from which each
    node fills its own ``data.cache_dir``) when there is one, else ``data.cache_dir`` itself. For
    :func:`contra_ray.common.raycluster.check_locations_on_nodes`."""
    if in_memory(cfg.data):
        return {}
    location = cfg.data_cache_location()
    return {"data.shared_cache": location} if location else {"data.cache_dir": cfg.data.cache_dir}


def class_names(cfg: Config, classes: list[str]) -> list[str]:
    """Readable names of ``classes`` (ids as stored in an artifact): the first synonym in ``words.txt``
    (or ``LOC_synset_mapping.txt``) under ``data.root`` for ``tiny-imagenet`` / ``imagenet``, else ``classes``."""
    if cfg.data.dataset not in ("tiny-imagenet", "imagenet") or not cfg.data.root:
        return list(classes)
    root = Path(cfg.data.root).expanduser()
    names = next((root / n for n in ("words.txt", "LOC_synset_mapping.txt") if (root / n).is_file()), None)
    return read_class_names(names, list(classes), required=False) if names else list(classes)
