"""Stage 1, data: real image sets in (CIFAR-10/100, the CIFAR-10 JPEG tarball, ImageFolder trees, Tiny
ImageNet, ImageNet), decoded once into a cache, preprocessed (mean/std, ZCA), served to every stage as
:class:`PreparedData`; batch loaders (tensors, streamed, FFCV). CLI: ``python -m contra_ray.data prepare``.
"""

from contra_ray.data.prepare import PreparedData, class_names, prepare_data
from contra_ray.data.sources import ImageSet, Preprocessor, content_hash, fit_preprocessor, load_split, real_images_per_class

from contra_ray.data.sources import main

__all__ = ["main", "ImageSet", "Preprocessor", "PreparedData", "class_names", "content_hash", "fit_preprocessor", "load_split",
           "prepare_data", "real_images_per_class"]
