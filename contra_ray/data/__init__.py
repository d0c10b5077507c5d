"""Stage 1, data: real image sets in (CIFAR-10/100, the CIFAR-10 JPEG tarball, ImageFolder trees, Tiny
ImageNet, ImageNet), decoded once into a cache, preprocessed (mean/std, ZCA), served to every stage as
:class:`PreparedData`; batch loaders (tensors, streamed, FFCV). CLI: ``python -m contra_ray.data prepare``.

Modules: :mod:`~contra_ray.data.sources` (:func:`load_split`, :class:`ImageSet`), :mod:`~contra_ray.data.imagenet`
(Tiny ImageNet / ImageNet), :mod:`~contra_ray.data.image_files` (decoding, ImageFolder trees),
:mod:`~contra_ray.data.cache` (decoded-image caches), :mod:`~contra_ray.data.disk_images` (streamed sets),
:mod:`~contra_ray.data.preprocess` (:class:`Preprocessor`), :mod:`~contra_ray.data.prepare` (:class:`PreparedData`),
:mod:`~contra_ray.data.loaders`, :mod:`~contra_ray.data.ffcv_beton`, :mod:`~contra_ray.data.cli`.
"""

from contra_ray.data.prepare import PreparedData, class_names, prepare_data
from contra_ray.data.preprocess import Preprocessor, fit_preprocessor, real_images_per_class
from contra_ray.data.sources import ImageSet, content_hash, load_split

__all__ = ["main", "ImageSet", "Preprocessor", "PreparedData", "class_names", "content_hash", "fit_preprocessor",
           "load_split", "prepare_data", "real_images_per_class"]


def __getattr__(name: str):
    if name == "main":  # the CLI, imported only when asked for: importing the stage does not load it
        from contra_ray.data.cli import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
