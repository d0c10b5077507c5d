"""Shape measures of a per-iteration curve (the matching loss, syn_lr), for the stability claims of the
paper's App. D / Fig. 5: "the matching loss frequently oscillates", "the learnable learning rates ... struggle to
converge to a stable value". Pure Python over a list of floats; ``contra_ray.report`` derives them from the
histories a run logged (``--metric loss_osc``, ...).
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["relative_oscillation", "path_ratio", "HISTORY_METRICS", "OSC_WINDOW"]

OSC_WINDOW = 11  # iterations in the centered moving average that the oscillation is measured around


def relative_oscillation(values: Sequence[float], window: int = OSC_WINDOW) -> float:
    """Oscillation amplitude relative to the level: ``sqrt(mean_t (v_t - m_t)^2) / mean_t |m_t|``, where ``m_t``
    is the centered moving average of ``window`` (odd) values around ``t``, over the ``t`` whose window fits
    (a trend is removed; only the iteration-to-iteration swings remain). Dimensionless: 0.10 means swings of
    about 10 % of the curve's level.

    Returns:
        The amplitude; ``nan`` for fewer than ``window`` values or a zero level.

    Raises:
        ValueError: ``window`` is not an odd number >= 3.
    """
    if window < 3 or window % 2 == 0:
        raise ValueError(f"window={window}: an odd number >= 3")
    v = [float(x) for x in values]
    h = window // 2
    if len(v) < window:
        return float("nan")
    dev, level = [], []
    run = sum(v[:window])
    for t in range(h, len(v) - h):
        if t > h:
            run += v[t + h] - v[t - h - 1]
        m = run / window
        dev.append((v[t] - m) ** 2)
        level.append(abs(m))
    mean_level = sum(level) / len(level)
    return math.sqrt(sum(dev) / len(dev)) / mean_level if mean_level > 0 else float("nan")


def path_ratio(values: Sequence[float]) -> float:
    """How directly a curve converges: its path length over its net change, ``sum_t |v_t - v_{t-1}| /
    |v_T - v_0|``. 1 for a monotone curve; 3 when it travels three times as far as it ends up moving.

    Returns:
        The ratio; ``nan`` for fewer than 2 values or no net change.
    """
    v = [float(x) for x in values]
    if len(v) < 2 or v[-1] == v[0]:
        return float("nan")
    return sum(abs(b - a) for a, b in zip(v, v[1:])) / abs(v[-1] - v[0])


#: metrics ``contra_ray.report`` derives from a finished run's logged per-iteration history: name -> (history,
#: function); a history ending in ``*`` stands for every logged metric with that prefix, and the value is the mean
#: of the function over them (``segment_loss_osc``: each concurrent segment's own Eq. 2 loss, ConTra runs only)
HISTORY_METRICS = {
    "loss_osc": ("loss", relative_oscillation),
    "segment_loss_osc": ("loss/start_*", relative_oscillation),
    "syn_lr_osc": ("syn_lr", relative_oscillation),
    "syn_lr_path": ("syn_lr", path_ratio),
}
