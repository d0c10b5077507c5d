"""DD-Ranking's scores of a distilled set, as pure functions of test accuracies (no training here).

Definitions (Li et al., 2025, "DD-Ranking: Rethinking the Evaluation of Dataset Distillation"; reference
implementation ``ddranking`` 0.2.0, repository NUS-HPC-AI-Lab/DD-Ranking):

* hard-label recovery ``HLR = Acc(real, hard) − Acc(syn, hard)`` and improvement over random
  ``IOR = Acc(syn, any) − Acc(random, any)`` (the same label recipe on both sides), combined as the
  Label-Robust Score ``LRS = (e^α − e^−1) / (e − e^−1)`` with ``α = w·IOR − (1 − w)·HLR``, ``w = 0.5``:
  ``ddranking/metrics/soft_label.py``, ``LabelRobustScoreSoft.compute_metrics`` (``hlr``, ``ior``, ``alpha``,
  ``lrs``; ``lrs_lambda=0.5``); ``ddranking/metrics/hard_label.py``, ``LabelRobustScoreHard.compute_metrics``
  computes the same with hard labels on both sides.
* Augmentation-Robust Score ``ARS = (e^β − e^−1) / (e − e^−1)`` with ``β = γ·(syn − random with augmentation)
  + (1 − γ)·(syn − random without augmentation)``, ``γ = 0.5``: ``ddranking/metrics/aug_robust.py``,
  ``AugmentationRobustScore.compute_metrics`` (``with_aug_score``, ``without_aug_score``, ``beta``, ``ars``;
  ``ars_lambda=0.5``).

Accuracies are fractions in [0, 1], so HLR, IOR, α and β lie in [−1, 1] and LRS, ARS in [0, 1]. As the
reference does, the scores are computed per evaluation run (run r of every set trained with the same seed)
and then averaged (mean and population std over runs, ``np.mean`` / ``np.std``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

__all__ = ["ARS_GAMMA", "LRS_WEIGHT", "Scores", "augmentation_robust_score", "dd_ranking_scores",
           "hard_label_recovery", "improvement_over_random", "label_robust_score", "robust_score"]

LRS_WEIGHT = 0.5  #: w of LRS (``lrs_lambda`` default of ``LabelRobustScoreSoft.compute_metrics``)
ARS_GAMMA = 0.5  #: γ of ARS (``ars_lambda`` default of ``AugmentationRobustScore.compute_metrics``)


def _check(name: str, value: float, low: float = 0.0, high: float = 1.0) -> float:
    value = float(value)
    if not (low <= value <= high):  # NaN fails too
        raise ValueError(f"{name}={value!r}: expected a number in [{low}, {high}]")
    return value


def robust_score(x: float) -> float:
    """``(e^x − e^−1) / (e − e^−1)``: maps x in [−1, 1] monotonically onto [0, 1] (0 at −1, 1 at 1).

    Raises:
        ValueError: x outside [−1, 1] or NaN.
    """
    x = _check("x", x, -1.0, 1.0)
    return (math.exp(x) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def hard_label_recovery(acc_real_hard: float, acc_syn_hard: float) -> float:
    """HLR = Acc(real, hard) − Acc(syn, hard), fractions in [0, 1]. Raises: ValueError (out of range)."""
    return _check("acc_real_hard", acc_real_hard) - _check("acc_syn_hard", acc_syn_hard)


def improvement_over_random(acc_syn: float, acc_random: float) -> float:
    """IOR = Acc(syn) − Acc(random real) under the same label recipe, fractions. Raises: ValueError."""
    return _check("acc_syn", acc_syn) - _check("acc_random", acc_random)


def label_robust_score(hlr: float, ior: float, weight: float = LRS_WEIGHT) -> float:
    """LRS = robust_score(α), α = weight·IOR − (1 − weight)·HLR. Raises: ValueError (weight outside [0, 1],
    HLR or IOR outside [−1, 1])."""
    w = _check("weight", weight)
    return robust_score(w * _check("ior", ior, -1, 1) - (1 - w) * _check("hlr", hlr, -1, 1))


def augmentation_robust_score(with_aug: float, without_aug: float, gamma: float = ARS_GAMMA) -> float:
    """ARS = robust_score(β), β = γ·with_aug + (1 − γ)·without_aug, where ``with_aug`` and ``without_aug`` are
    Acc(syn) − Acc(random) trained with and without augmentation. Raises: ValueError (out of range)."""
    g = _check("gamma", gamma)
    return robust_score(g * _check("with_aug", with_aug, -1, 1) + (1 - g) * _check("without_aug", without_aug, -1, 1))


@dataclasses.dataclass(frozen=True)
class Scores:
    """Per-run DD-Ranking scores (lists, one entry per evaluation run) and their weights.

    Attributes:
        hlr, ior, lrs: hard-label recovery, improvement over random, Label-Robust Score per run.
        ars_with_aug, ars_without_aug, ars: syn − random with / without augmentation, ARS per run.
        weight, gamma: w of LRS and γ of ARS.
    """

    hlr: list[float]
    ior: list[float]
    lrs: list[float]
    ars_with_aug: list[float]
    ars_without_aug: list[float]
    ars: list[float]
    weight: float
    gamma: float

    def summary(self) -> dict[str, tuple[float, float]]:
        """``{name: (mean, population std)}`` over runs, names ``hlr, ior, lrs, ars_with_aug,
        ars_without_aug, ars`` (fractions, as the per-run values)."""
        names = ("hlr", "ior", "lrs", "ars_with_aug", "ars_without_aug", "ars")
        return {n: (float(np.mean(getattr(self, n))), float(np.std(getattr(self, n)))) for n in names}


def dd_ranking_scores(acc_real_hard: float, syn_hard: Sequence[float], syn: Sequence[float],
                      random: Sequence[float], syn_aug: Sequence[float], random_aug: Sequence[float],
                      syn_no_aug: Sequence[float], random_no_aug: Sequence[float], weight: float = LRS_WEIGHT,
                      gamma: float = ARS_GAMMA) -> Scores:
    """HLR, IOR, LRS and ARS of every evaluation run (module docstring), accuracies as fractions.

    Args:
        acc_real_hard: the full-data accuracy Acc(real, hard) (one number for every run).
        syn_hard: Acc(syn, hard) per run.
        syn, random: Acc(syn, recipe) and Acc(random real, recipe) per run under the set's own label recipe
            and augmentation (IOR).
        syn_aug, random_aug, syn_no_aug, random_no_aug: the same two sets trained with and without
            augmentation (ARS).
        weight, gamma: w of LRS and γ of ARS, in [0, 1].

    Raises:
        ValueError: the sequences differ in length or are empty, or a value is out of range.
    """
    seqs = (syn_hard, syn, random, syn_aug, random_aug, syn_no_aug, random_no_aug)
    runs = {len(s) for s in seqs}
    if len(runs) != 1 or 0 in runs:
        raise ValueError(f"dd_ranking_scores: every accuracy list needs the same number (> 0) of runs, got "
                         f"{[len(s) for s in seqs]}")
    hlr = [hard_label_recovery(acc_real_hard, a) for a in syn_hard]
    ior = [improvement_over_random(a, b) for a, b in zip(syn, random)]
    with_aug = [improvement_over_random(a, b) for a, b in zip(syn_aug, random_aug)]
    without_aug = [improvement_over_random(a, b) for a, b in zip(syn_no_aug, random_no_aug)]
    return Scores(hlr=hlr, ior=ior, lrs=[label_robust_score(h, i, weight) for h, i in zip(hlr, ior)],
                  ars_with_aug=with_aug, ars_without_aug=without_aug,
                  ars=[augmentation_robust_score(a, b, gamma) for a, b in zip(with_aug, without_aug)],
                  weight=float(weight), gamma=float(gamma))
