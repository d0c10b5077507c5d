"""Module names of the flat layout before version 0.2 (``contra_ray.artifact``, ``contra_ray.matching``, ...),
still importable: each resolves to the module that now holds its code, with a :class:`DeprecationWarning`.
Keeps users' imports working after the move to one package per stage.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: old module name (under ``contra_ray.``) -> its home now
MOVED = {
    "analysis": "analyze.correlation", "argtypes": "common.argtypes", "artifact": "distill.artifact",
    "checkpoint": "distill.checkpoint", "disk_images": "data.disk_images", "distiller": "distill.distiller",
    "distributed": "distill.remote", "expert_store": "experts.store", "experts_ray": "experts.remote",
    "ffcv_data": "data.ffcv_beton", "fileio": "common.fileio", "image_files": "data.image_files",
    "imagenet_data": "data.imagenet", "loop": "distill.loop", "matching": "distill.matching",
    "memory": "distill.memory", "raycluster": "common.raycluster", "seeds": "common.seeds",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self):
        self._specs = {}

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, old = fullname.partition(".")
        if prefix != "contra_ray" or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = "contra_ray." + MOVED[spec.name.split(".", 1)[1]]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        self._specs[new] = module.__spec__  # importlib sets __spec__ to the alias's; restored below
        return module

    def exec_module(self, module):
        module.__spec__ = self._specs[module.__name__]  # the module is the new one, already executed


def install() -> None:
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
