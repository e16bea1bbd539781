"""Reductions over the spans of one joined numpy array: ``values[bounds[i]:bounds[i + 1]]`` for each ``i``.

A model has hundreds of norms of a few hundred channels each. Their maps are joined into one array so that a check
or a bound is one numpy call per model rather than one per norm: on arrays that small, the cost of a call is its
overhead, not its arithmetic. Empty spans are allowed (a norm of zero channels).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def span_counts(mask: np.ndarray, bounds: Sequence[int]) -> list[int]:
    """How many entries of each span of the boolean ``mask`` are true."""
    running = np.concatenate(([0], np.cumsum(mask, dtype=np.int64)))
    edges = np.asarray(bounds, dtype=np.int64)
    return [int(n) for n in running[edges[1:]] - running[edges[:-1]]]


def span_max_abs(values: np.ndarray, bounds: Sequence[int]) -> list[float]:
    """``max |span|`` of each span (0 for an empty one; NaN where the span holds a NaN)."""
    edges = np.asarray(bounds, dtype=np.int64)
    starts, stops = edges[:-1], edges[1:]
    largest = np.zeros(len(starts), dtype=np.float64)
    filled = starts < stops
    if filled.any():  # reduceat runs each start to the next one given: empty spans must not be given
        largest[filled] = np.maximum.reduceat(np.abs(values), starts[filled])
    return [float(v) for v in largest]


def span_all_finite(values: np.ndarray, bounds: Sequence[int]) -> list[bool]:
    """Whether every entry of each span is finite."""
    return [count == 0 for count in span_counts(~np.isfinite(values), bounds)]
