"""Analysis: Pearson correlation of segment losses (paper Eq. 7, the heatmaps of Fig. 2/3) and the live
forgetting monitor. CLI: ``python -m contra_ray.analyze correlation``.
"""

from contra_ray.analyze.correlation import pearson_matrix, triangle_summary
from contra_ray.distill.monitor import ForgettingMonitor, segment_loss_eval
from contra_ray.experts.store import reference_expert_id

__all__ = ["main", "ForgettingMonitor", "pearson_matrix", "reference_expert_id", "segment_loss_eval",
           "triangle_summary"]


def __getattr__(name: str):
    if name == "main":  # the CLI, imported only when asked for: importing the stage does not load it
        from contra_ray.analyze.cli import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
