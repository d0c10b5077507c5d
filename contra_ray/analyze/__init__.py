"""Analysis: Pearson correlation of segment losses (paper Eq. 7, the heatmaps of Fig. 2/3) and the live
forgetting monitor. CLI: ``python -m contra_ray.analyze correlation``.
"""

from contra_ray.analyze.correlation import ForgettingMonitor, pearson_matrix, reference_expert_id, segment_loss_eval

from contra_ray.analyze.cli import main

__all__ = ["main", "ForgettingMonitor", "pearson_matrix", "reference_expert_id", "segment_loss_eval"]
