"""contra_ray: dataset distillation by concurrent trajectory matching (ConTra) on PyTorch and Ray.

One package per pipeline stage: :mod:`contra_ray.data` → :mod:`contra_ray.experts` →
:mod:`contra_ray.distill` → :mod:`contra_ray.evaluate`, plus :mod:`contra_ray.analyze` (Eq. 7) and
:mod:`contra_ray.tune` (sweeps); :mod:`contra_ray.pipeline` runs the stages in order. Shared:
:mod:`contra_ray.config`, :mod:`contra_ray.models`, :mod:`contra_ray.augment`, :mod:`contra_ray.tracking`,
:mod:`contra_ray.plots`, :mod:`contra_ray.common`. Ray and MLflow enter only in each stage's ``remote``
module, ``tune`` and ``tracking`` (docs/ARCHITECTURE.md).

The Python API for a distilled set (:mod:`contra_ray.api`), imported when first used, so ``import contra_ray``
stays cheap: :func:`load_distilled`, :class:`Distilled`, :func:`train_on_distilled`. Exports to other
tools' formats: ``python -m contra_ray.export`` (:mod:`contra_ray.export`).
"""

from contra_ray import _compat

__version__ = "0.1.0"

_compat.install()

__all__ = ["Distilled", "load_distilled", "train_on_distilled", "__version__"]
_API = ("Distilled", "load_distilled", "train_on_distilled")


def __getattr__(name: str):
    if name in _API:  # torch and the stages load on first use, not at `import contra_ray`
        from contra_ray import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
