"""Stage 3, distillation: synthetic images, soft labels and syn_lr learned by concurrent trajectory matching
(paper Algorithm 1, Eq. 8): plans and matching (:mod:`.matching`), the unroll's memory plan (:mod:`.memory`),
the synthetic state (:mod:`.distiller`), the one loop (:mod:`.loop`), checkpoints, the distilled-set file
(:mod:`.artifact`) and the Ray Train edge (:mod:`.remote`). CLI: ``python -m contra_ray.distill``.
"""

from contra_ray.distill.artifact import ArtifactError, ArtifactMismatchError, DistilledSet
from contra_ray.distill.distiller import DistillationDiverged, Distiller, InitReport
from contra_ray.distill.loop import run_distillation, run_loop
from contra_ray.distill.matching import SegmentPlan, make_plan

__all__ = ["main", "ArtifactError", "ArtifactMismatchError", "DistillationDiverged", "DistilledSet", "Distiller",
           "InitReport", "SegmentPlan", "make_plan", "run_distillation", "run_loop"]


def __getattr__(name: str):
    if name == "main":  # the CLI, imported only when asked for: importing the stage does not load it
        from contra_ray.distill.cli import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
