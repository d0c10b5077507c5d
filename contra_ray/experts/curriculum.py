"""Sample orders for expert training: the usual reshuffle and the easy-to-hard curriculum of paper App. B
(pacing h(e), Eq. 12), ranked by a plain ranking expert's first-correct epoch.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class SampleOrder(Protocol):
    """Which training samples an epoch visits, in visiting order (paper App. B)."""

    def epoch_indices(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        """Indices into the train set, int64 ``[n_e]``, for epoch ``epoch`` (0-based).

        ``generator`` (CPU) is the only source of randomness, so a seeded generator gives a reproducible
        order; it is advanced, so consecutive epochs differ.
        """
        ...


class ShuffledOrder:
    """All ``n`` training indices, reshuffled every epoch (``torch.randperm``; MTT's ``shuffle=True``).

    Raises:
        ValueError: ``n < 1``.
    """

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"ShuffledOrder needs at least one sample, got n={n}")
        self.n = int(n)

    def epoch_indices(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        """A random permutation of ``0..n-1``, int64 ``[n]``."""
        return torch.randperm(self.n, generator=generator)


class CurriculumOrder:
    """Easy-to-hard curriculum (paper App. B, Eq. 12).

    Epoch ``e`` (0-based) visits the ``ceil(h(e) * N)`` easiest samples, shuffled, with the linear pacing
    function ``h(e) = min(1, λ + (1 - λ) e / γ)``: a fraction ``λ`` of the data at epoch 0, all of it from
    epoch ``γ`` on.

    Args:
        difficulty_rank: int64 ``[N]``, a permutation of ``0..N-1``; ``difficulty_rank[i]`` is the rank of
            sample ``i`` (0 = easiest), e.g. from :func:`difficulty_from_first_correct`.
        lam: λ, initial fraction of the training set, in (0, 1] (``experts.curriculum_lambda``).
        gamma: γ >= 1, epoch from which the whole set is used (``experts.curriculum_gamma``).

    Raises:
        ValueError: ``difficulty_rank`` is not a permutation of ``0..N-1``, or ``lam``/``gamma`` out of range.
    """

    def __init__(self, difficulty_rank: torch.Tensor, lam: float, gamma: int):
        rank = torch.as_tensor(difficulty_rank).long().flatten()
        n = rank.numel()
        if n < 1 or not torch.equal(torch.sort(rank).values, torch.arange(n)):
            raise ValueError(f"difficulty_rank must be a permutation of 0..N-1 (N={n})")
        if not 0 < lam <= 1:
            raise ValueError(f"experts.curriculum_lambda={lam!r}: λ must be in (0, 1]")
        if gamma < 1:
            raise ValueError(f"experts.curriculum_gamma={gamma!r}: γ must be >= 1")
        self.lam, self.gamma, self.n = float(lam), int(gamma), n
        self.easiest_first = torch.argsort(rank)  # sample indices sorted from easiest to hardest

    def pacing(self, epoch: int) -> float:
        """h(e), the fraction of the ordered train set used in epoch ``epoch`` (Eq. 12)."""
        return min(1.0, self.lam + (1.0 - self.lam) * epoch / self.gamma)

    def size(self, epoch: int) -> int:
        """``ceil(h(e) * N)``, the number of samples visited in epoch ``epoch`` (rounded to 1e-6 first, so
        float error in ``h`` cannot add a sample)."""
        return min(self.n, max(1, math.ceil(round(self.pacing(epoch) * self.n, 6))))

    def epoch_indices(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        """The ``size(epoch)`` easiest sample indices in random order, int64 ``[size(epoch)]``."""
        chosen = self.easiest_first[: self.size(epoch)]
        return chosen[torch.randperm(chosen.numel(), generator=generator)]


def difficulty_from_first_correct(first_correct_epoch: torch.Tensor) -> torch.Tensor:
    """Difficulty rank of each sample from the epoch it was first classified correctly (paper App. B).

    Samples classified correctly earlier are easier; ties are broken by sample index (lower = easier).

    Args:
        first_correct_epoch: int ``[N]``, per sample the first epoch at which the model classified it
            correctly; samples never classified correctly must carry a value larger than any epoch (as
            :func:`first_correct_epoch` does).

    Returns:
        int64 ``[N]``, a permutation of ``0..N-1``: ``rank[i]`` = difficulty rank of sample ``i``, 0 = easiest.

    Raises:
        ValueError: not one-dimensional, or negative entries.
    """
    fc = torch.as_tensor(first_correct_epoch).long()
    if fc.dim() != 1:
        raise ValueError(f"first_correct_epoch must be 1-D [N], got shape {tuple(fc.shape)}")
    if fc.numel() and int(fc.min()) < 0:
        raise ValueError(f"first_correct_epoch has a negative entry ({int(fc.min())}); mark never-correct "
                         "samples with a value larger than any epoch instead")
    order = torch.sort(fc, stable=True).indices  # stable: ties keep index order
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return rank


