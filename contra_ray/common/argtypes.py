"""``argparse`` types shared by every command line: a bad number is a usage error (exit 2, no traceback)
that names the flag and the value, before any work starts."""

from __future__ import annotations

import argparse
import math

__all__ = ["positive_int", "non_negative_int", "positive_float", "non_negative_float"]


def _number(s: str, cast, what: str, ok) -> int | float:
    try:
        v = cast(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
    return v


def positive_int(s: str) -> int:
    """An integer >= 1."""
    return _number(s, int, "a positive integer", lambda v: v >= 1)


def non_negative_int(s: str) -> int:
    """An integer >= 0."""
    return _number(s, int, "a non-negative integer", lambda v: v >= 0)


def positive_float(s: str) -> float:
    """A finite number > 0."""
    return _number(s, float, "a positive number", lambda v: math.isfinite(v) and v > 0)


def non_negative_float(s: str) -> float:
    """A finite number >= 0."""
    return _number(s, float, "a non-negative number", lambda v: math.isfinite(v) and v >= 0)
