"""Stage 4, evaluation: fresh networks trained on a distilled set with its recipe, top-1 test accuracy mean ±
std over runs (paper App. D; MTT ``evaluate_synset``), other architectures too; runs as Ray tasks
(:mod:`.remote`). CLI: ``python -m contra_ray.evaluate --artifact PATH``.
"""

from contra_ray.evaluate.remote import evaluate_runs
from contra_ray.evaluate.sets import (
    EvalSet,
    check_artifact_matches,
    evaluate_sets,
    format_cross_architecture,
    format_table,
    test_meta_for,
)
from contra_ray.evaluate.training import (
    evaluation_seeds,
    lr_schedule,
    random_real_set,
    summarize,
    train_and_test,
    train_module_and_test,
)

__all__ = ["main", "EvalSet", "check_artifact_matches", "evaluate_sets", "format_cross_architecture", "evaluate_runs",
           "evaluation_seeds", "format_table", "lr_schedule", "random_real_set", "summarize", "test_meta_for",
           "train_and_test", "train_module_and_test"]


def __getattr__(name: str):
    if name == "main":  # the CLI, imported only when asked for: importing the stage does not load it
        from contra_ray.evaluate.cli import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
