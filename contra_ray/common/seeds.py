"""Seed roles: every random stream of a run derives from (its seed, its role, its index).

Before, expert ``i`` and evaluation network ``i`` were both ``torch.manual_seed(i)``: an evaluation
network started from exactly the θ*_0 the synthetic set had been matched against (a flattering score).
Now each stream has a *role* and :func:`derive_seed` mixes (seed, role, index...) through
``numpy.random.SeedSequence`` (NumPy's recommended way to spawn independent streams), so no two roles,
and no two indices of one role, share a seed:

============== ============================= =====================================================
role           seed it derives from          what it seeds
============== ============================= =====================================================
expert         ``experts.seed``, expert id   expert initialization, sample order, DSA (App. B / MTT)
ranking_expert ``experts.seed``              the curriculum's difficulty-ranking expert (App. B)
subset         ``data.subset_seed``          the class-balanced train subset
zca_sample     ``data.subset_seed``          the train images ZCA is fitted on (``data.zca_samples``)
plan           ``distill.seed``, iteration   the iteration's :class:`~contra_ray.distill.matching.SegmentPlan`
synthetic_init ``distill.seed``              which real images initialize the synthetic set
init_pool      ``distill.seed``              the per-class sample of a streamed train set the
                                             initialization draws from (``distill.distiller.init_pool``)
periodic_eval  ``distill.seed``, iter, run   networks of the evaluations during distillation
monitor        ``distill.seed``              the forgetting monitor's mini-batches (§4.2)
eval           ``eval.seed``, run            the final evaluation networks (init, shuffling, DSA)
baseline       ``eval.seed``                 the random-real baseline's images
============== ============================= =====================================================
"""

from __future__ import annotations

import zlib

import numpy as np

__all__ = ["ROLES", "derive_seed"]

ROLES = ("expert", "ranking_expert", "subset", "plan", "synthetic_init", "periodic_eval", "monitor", "eval",
         "baseline", "zca_sample", "init_pool")


def derive_seed(seed: int, role: str, *index: int) -> int:
    """The seed of stream ``role`` (and ``index...``) of a run seeded ``seed``: an int in [0, 2**63).

    A pure function: ``SeedSequence([seed, crc32(role), *index]).generate_state(1, uint64) >> 1``, usable
    with ``torch.manual_seed``, ``torch.Generator.manual_seed`` and ``numpy.random.default_rng``.

    Args:
        seed: the run's seed for this stream (see the table in the module docstring), >= 0.
        role: one of :data:`ROLES`.
        index: further non-negative integers (expert id, iteration, run number).

    Raises:
        ValueError: unknown role, or a negative seed or index (names the value).
    """
    if role not in ROLES:
        raise ValueError(f"seed role {role!r}: unknown; known: {', '.join(ROLES)}")
    parts = [int(seed), *(int(i) for i in index)]
    if any(p < 0 for p in parts):
        raise ValueError(f"seed={seed}, index={index} for role {role!r}: seeds and indices must be >= 0")
    ss = np.random.SeedSequence([parts[0], zlib.crc32(role.encode()), *parts[1:]])
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))
