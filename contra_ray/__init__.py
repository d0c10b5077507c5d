"""contra_ray: dataset distillation by concurrent trajectory matching (ConTra) on PyTorch and Ray.

One package per pipeline stage: :mod:`contra_ray.data` → :mod:`contra_ray.experts` →
:mod:`contra_ray.distill` → :mod:`contra_ray.evaluate`, plus :mod:`contra_ray.analyze` (Eq. 7) and
:mod:`contra_ray.tune` (sweeps); :mod:`contra_ray.pipeline` runs the stages in order. Shared:
:mod:`contra_ray.config`, :mod:`contra_ray.models`, :mod:`contra_ray.augment`, :mod:`contra_ray.tracking`,
:mod:`contra_ray.plots`, :mod:`contra_ray.common`. Ray and MLflow enter only in each stage's ``remote``
module, ``tune`` and ``tracking`` (docs/ARCHITECTURE.md).
"""

from contra_ray import _compat

__version__ = "0.1.0"

_compat.install()
