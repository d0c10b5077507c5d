"""Ray Tune sweeps of β, K, R and the ablations over ``tune_spaces/*.yaml`` (docs/SWEEPS.md).
CLI: ``python -m contra_ray.tune --space NAME``.
"""

from contra_ray.tune.sweep import SweepError, SweepSpec, TrialPoint, expand_space, load_space, run_sweep

from contra_ray.tune.sweep import main

__all__ = ["main", "SweepError", "SweepSpec", "TrialPoint", "expand_space", "load_space", "run_sweep"]
