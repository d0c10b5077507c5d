"""Stage 2, experts: networks trained on the real data, their parameters saved every epoch (expert
trajectories), in curriculum order at low IPC (paper App. B); many at once as Ray tasks
(:mod:`contra_ray.experts.remote`), stored by :class:`ExpertStore`.
"""

from contra_ray.experts.curriculum import CurriculumOrder, SampleOrder, ShuffledOrder, difficulty_from_first_correct
from contra_ray.experts.store import ExpertStore, ExpertStoreError, PartialExpert
from contra_ray.experts.training import EpochStats, first_correct_epoch, train_expert

__all__ = ["CurriculumOrder", "EpochStats", "ExpertStore", "ExpertStoreError", "PartialExpert", "SampleOrder",
           "ShuffledOrder", "difficulty_from_first_correct", "first_correct_epoch", "train_expert"]
