"""contra_ray: dataset distillation by concurrent trajectory matching (ConTra) on PyTorch and Ray.

Core (plain PyTorch): :mod:`contra_ray.matching` (Eq. 1, 2, 8), :mod:`contra_ray.models`,
:mod:`contra_ray.augment` (DSA), :mod:`contra_ray.data`. Edges: :mod:`contra_ray.experts` (Ray tasks),
:mod:`contra_ray.distill`, :mod:`contra_ray.evaluate`, :mod:`contra_ray.pipeline`, :mod:`contra_ray.tracking`.
"""

__version__ = "0.1.0"
