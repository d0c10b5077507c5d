"""The public Python API: a distilled set as a researcher uses it outside contra_ray's own commands.

``contra_ray.load_distilled(path_or_uri)`` gives a :class:`Distilled`: the images in the model's input space
(as stored, what a network is trained on) and in pixel space (the inverse of the set's preprocessing), the hard
labels, the soft targets, the learned step size ``syn_lr``, the preprocessing to apply to real images and the
evaluation recipe (paper App. D; MTT ``evaluate_synset`` with DATM's soft labels). ``Distilled.dataset()`` is a
``torch.utils.data.Dataset``; :func:`train_on_distilled` trains any ``nn.Module`` on the set with its recipe and
reports its top-1 accuracy on a real split. The README's "Python API" section is an example a test runs.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from contra_ray.augment import dsa_if
from contra_ray.config import ConfigError, EvalConfig, config_from_dict
from contra_ray.data.preprocess import Preprocessor
from contra_ray.distill.artifact import ArtifactError, DistilledSet
from contra_ray.evaluate.training import EpochHook, train_module_and_test
from contra_ray.models import ModelSpec, build_model

__all__ = ["Distilled", "load_distilled", "train_on_distilled"]


class Distilled:
    """A distilled set ready to use: a read-only view of a :class:`~contra_ray.distill.artifact.DistilledSet`.

    Attributes:
        artifact: the underlying :class:`~contra_ray.distill.artifact.DistilledSet`.
        source: where it was loaded from (path or URI; ``""`` when built from an object).
        images: float32 ``[n, C, H, W]`` in the model's input space (normalized, ZCA-whitened when ``zca``).
        hard_labels: int64 ``[n]``: the class each image was initialized from (and the label in the
            hard-label protocol).
        syn_lr: the learned student step size α, the evaluation learning rate (MTT/DATM) unless the recipe
            sets ``eval.lr``.
        soft: whether the set's own labels are soft (DATM ``softmax(label_logits)``).
        classes: class ids in label order; ``class_names``: readable names (same order).
    """

    def __init__(self, artifact: DistilledSet, source: str = ""):
        self.artifact = artifact
        self.source = source
        self._pre: Preprocessor | None = None

    # ------------------------------------------------------------------ contents
    @property
    def images(self) -> torch.Tensor:
        return self.artifact.images

    @property
    def hard_labels(self) -> torch.Tensor:
        return self.artifact.hard_labels

    @property
    def label_logits(self) -> torch.Tensor:
        """float32 ``[n, num_classes]``: the learned label logits (DATM ``label_syn``; ``targets()`` is their
        softmax when ``soft``)."""
        return self.artifact.label_logits

    @property
    def syn_lr(self) -> float:
        return float(self.artifact.syn_lr)

    @property
    def soft(self) -> bool:
        return bool(self.artifact.soft)

    @property
    def num_classes(self) -> int:
        return self.artifact.num_classes

    @property
    def ipc(self) -> int:
        """Images per class."""
        return self.artifact.ipc

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.artifact.meta.get("classes", range(self.num_classes))]

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.artifact.meta.get("class_names", self.classes)]

    @property
    def meta(self) -> dict:
        """The artifact's description (model, dataset id, config, ...; see ``artifact.build_meta``)."""
        return self.artifact.meta

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return (f"Distilled({self.source or 'in memory'}: {n} images {c}x{h}x{w}, {self.num_classes} classes, "
                f"IPC {self.ipc}, {'soft' if self.soft else 'hard'} labels, syn_lr {self.syn_lr:.4g}, "
                f"zca={bool(self.meta.get('zca'))})")

    def targets(self) -> torch.Tensor:
        """float32 ``[n, num_classes]``, rows summing to 1: ``softmax(label_logits)`` when ``soft`` (DATM), else
        ``one_hot(hard_labels)``."""
        return self.artifact.targets()

    # ------------------------------------------------------------------ preprocessing
    @property
    def preprocessor(self) -> Preprocessor:
        """The :class:`~contra_ray.data.preprocess.Preprocessor` the set was made with (fitted on its train split):
        ``preprocessor(uint8 images)`` is the model's input space; see :meth:`preprocess`.

        Raises:
            ArtifactError: the stored preprocessor state is incomplete.
        """
        if self._pre is None:
            try:
                self._pre = Preprocessor.from_state_dict(self.artifact.preprocessor)
            except KeyError as e:
                raise ArtifactError(f"distilled set {self.source or ''}: invalid preprocessor state ({e})") from None
        return self._pre

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Real images -> the model's input space, as the set's own images are.

        Args:
            images: uint8 ``[N, C, H, W]`` (0..255), or float ``[N, C, H, W]`` in [0, 1] (``uint8 / 255``, what
                torchvision's ``ToTensor`` gives). ``C, H, W`` must be the set's.

        Returns:
            float32 ``[N, C, H, W]``: ``(x - mean) / std`` per channel, then ZCA when the set has it.

        Raises:
            TypeError: any other dtype. ValueError: a shape that does not fit the set.
        """
        if images.dtype == torch.uint8:
            return self.preprocessor(images)
        if images.is_floating_point():
            return self.preprocessor.from_unit(images)
        raise TypeError(f"preprocess: expected uint8 or float images, got {images.dtype}")

    def pixels(self) -> torch.Tensor:
        """The images in pixel space: float32 ``[n, C, H, W]`` in units of ``uint8 / 255``, the exact inverse of
        the preprocessing (:meth:`Preprocessor.to_pixels`: inverse ZCA via the stored whitening matrix, then
        ``x * std + mean``). NOT clamped: distilled pixels may lie outside [0, 1]; :meth:`pixels_uint8` clamps."""
        return self.preprocessor.to_pixels(self.images.float())

    def pixels_uint8(self) -> torch.Tensor:
        """uint8 ``[n, C, H, W]``: :meth:`pixels` clamped to [0, 1], times 255, rounded (what the PNG and
        Hugging Face exports hold; ``preprocess`` of it gives :attr:`images` back within 8-bit quantisation)."""
        return (self.pixels().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)

    # ------------------------------------------------------------------ recipe
    @property
    def eval_config(self) -> EvalConfig:
        """The evaluation recipe (``meta["eval"]``): epochs, batch size, momentum, weight decay, DSA, ``lr``
        (``None``: use :attr:`syn_lr`), runs, models, seed.

        Raises:
            ArtifactError: the meta has no valid recipe.
        """
        try:
            return config_from_dict({"eval": dict(self.meta.get("eval") or {})}, validate=False).eval
        except ConfigError as e:
            raise ArtifactError(f"distilled set {self.source or ''}: invalid eval recipe ({e})") from None

    @property
    def lr(self) -> float:
        """The learning rate its networks train with: the recipe's ``eval.lr`` if set, else :attr:`syn_lr`."""
        return float(self.eval_config.lr or self.syn_lr)

    def model_spec(self, network: str | None = None) -> ModelSpec:
        """The :class:`~contra_ray.models.ModelSpec` the set was distilled with, or of ``network`` (e.g.
        ``"resnet18"``) on the same data geometry."""
        spec = self.artifact.model_spec()
        return spec.for_network(network) if network else spec

    def build_model(self, network: str | None = None) -> nn.Module:
        """A freshly initialized network of :meth:`model_spec` (seed with ``torch.manual_seed`` first)."""
        return build_model(self.model_spec(network))

    # ------------------------------------------------------------------ data
    def dataset(self, hard_labels: bool = False) -> Dataset:
        """A ``torch.utils.data.Dataset`` of ``(image, target)``: image float32 ``[C, H, W]`` in the model's input
        space; target float32 ``[num_classes]`` (:meth:`targets`, the set's own labels) or, with
        ``hard_labels``, an int64 scalar class index."""
        y = self.hard_labels.clone() if hard_labels else self.targets()
        return TensorDataset(self.images.detach().clone(), y)

    def real_split(self, split: str = "test", data_root: str | None = None,
                   cache_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The real ``split`` of the data set the set was distilled from, as recorded in its config (decoded once
        into the cache), checked to be the data it was made for.

        Args:
            split: ``"test"`` (the whole test split) or ``"train"`` (the train images the set was distilled
                from: the ``data.train_per_class`` subset when the config has one).
            data_root, cache_dir: override the config's ``data.root`` / ``data.cache_dir``.

        Returns:
            ``(images uint8 [N, C, H, W], labels int64 [N])``; ``preprocess(images)`` is the model's input space.

        Raises:
            ArtifactError: the meta has no config. ArtifactMismatchError: the data differ from the set's (classes,
            geometry). FileNotFoundError: data missing. ValueError: unknown split.
        """
        from contra_ray.data.sources import load_split
        from contra_ray.evaluate.sets import check_artifact_matches, test_meta_for

        if "config" not in self.meta:
            raise ArtifactError(f"distilled set {self.source or ''}: meta has no 'config' (cannot find its data)")
        cfg = config_from_dict(self.meta["config"], validate=False)
        data = dataclasses.replace(cfg.data, root=data_root if data_root is not None else cfg.data.root,
                                   cache_dir=cache_dir if cache_dir is not None else cfg.data.cache_dir)
        real = load_split(data, split)
        check_artifact_matches(self.artifact, {k: v for k, v in test_meta_for(real, self.preprocessor).items()
                                               if k != "preprocessor_fingerprint"})
        return real.images, real.labels


def load_distilled(path: str | os.PathLike) -> Distilled:
    """Load a distilled set written by contra_ray (``distilled.safetensors``).

    Args:
        path: a local file, or a URI (``s3://bucket/runs/run/distilled.safetensors``; fetched into this node's
            mirror first, :mod:`contra_ray.common.storage`).

    Raises:
        ArtifactError: missing, unreadable, corrupt or not a contra_ray set (the message names ``path``).
    """
    return Distilled(DistilledSet.load(path), source=str(path))


def train_on_distilled(distilled: Distilled | DistilledSet | str | os.PathLike,
                       module: nn.Module | Callable[[], nn.Module], test_x: torch.Tensor, test_y: torch.Tensor, *,
                       hard_labels: bool = False, epochs: int | None = None, lr: float | None = None, seed: int = 0,
                       dsa: bool | None = None, device: str = "cpu", threads: int = 0,
                       on_epoch: EpochHook | None = None) -> float:
    """Train ``module`` on the distilled set with its recipe and return its top-1 accuracy on ``(test_x, test_y)``.

    The recipe is the set's ``meta["eval"]`` (paper App. D; MTT ``evaluate_synset`` with DATM's soft-label
    cross-entropy): SGD momentum 0.9, weight decay 5e-4, batch 256, ``eval.epochs`` epochs, one 0.1 decay half
    way, DSA on every batch, learning rate ``eval.lr`` or the learned ``syn_lr``
    (:func:`contra_ray.evaluate.training.train_module_and_test`, the loop ``python -m contra_ray.evaluate`` runs).

    Args:
        distilled: a :class:`Distilled`, a ``DistilledSet``, or a path / URI to load.
        module: the network (trained in place; its logits must be ``[batch, num_classes]``), or a function of
            no argument building it, called after ``torch.manual_seed(seed)`` (reproducible initialization).
        test_x: uint8 ``[N, C, H, W]`` real images (preprocessed here), or float32 already in the model's input
            space (``distilled.preprocess(...)``).
        test_y: int64 ``[N]`` labels in the set's class order.
        hard_labels: train on one-hot ``hard_labels`` instead of the set's own targets.
        epochs, lr, dsa: override the recipe's ``eval.epochs``, learning rate, ``eval.dsa``.
        seed: seeds initialization (when ``module`` is a builder), shuffling and DSA.
        device, threads, on_epoch: as :func:`contra_ray.evaluate.training.train_and_test`.

    Returns:
        Top-1 test accuracy in [0, 1].

    Raises:
        ArtifactError: ``distilled`` cannot be loaded. ValueError: empty test set, ``test_x``/``test_y`` lengths
        differ, or an epoch count / learning rate that is not positive.
    """
    if not isinstance(distilled, Distilled):
        distilled = Distilled(distilled) if isinstance(distilled, DistilledSet) else load_distilled(distilled)
    if test_x.shape[0] != test_y.shape[0]:
        raise ValueError(f"test_x has {test_x.shape[0]} images but test_y has {test_y.shape[0]} labels")
    ecfg = distilled.eval_config
    if epochs is not None:
        if epochs < 1:
            raise ValueError(f"epochs={epochs}: must be >= 1")
        ecfg.epochs = int(epochs)
    if dsa is not None:
        ecfg.dsa = bool(dsa)
    rate = distilled.lr if lr is None else float(lr)
    if not rate > 0:
        raise ValueError(f"lr={rate}: must be > 0")
    if test_x.dtype == torch.uint8:
        test_x = distilled.preprocess(test_x)
    targets = (torch.nn.functional.one_hot(distilled.hard_labels, distilled.num_classes).float() if hard_labels
               else distilled.targets())
    return train_module_and_test(module, distilled.images, targets, rate, ecfg, test_x, test_y.long(), seed,
                                 augment=dsa_if(ecfg.dsa), device=device, threads=threads, on_epoch=on_epoch)
