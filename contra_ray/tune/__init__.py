"""Ray Tune sweeps of β, K, R and the ablations over ``tune_spaces/*.yaml`` (docs/SWEEPS.md): the space
(:mod:`.space`), expert stores (:mod:`.stores`), the trial side (:mod:`.trial`), the driver (:mod:`.sweep`).
CLI: ``python -m contra_ray.tune --space NAME``.
"""

from contra_ray.tune.space import SweepError, SweepSpec, TrialPoint, expand_space, load_space
from contra_ray.tune.sweep import run_sweep

__all__ = ["main", "SweepError", "SweepSpec", "TrialPoint", "expand_space", "load_space", "run_sweep"]


def __getattr__(name: str):
    if name == "main":  # the CLI, imported only when asked for: importing the stage does not load it
        from contra_ray.tune.cli import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
