"""Per-norm reductions made on all norms joined (:mod:`bnfold.segments`, :class:`bnfold.core.apply.NormMaps`) give
what one reduction per norm gives, and the fold that uses them writes the same weights bit for bit."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnfold
from bnfold.backends.modules import TorchNumerics, _count_negatives
from bnfold.core.apply import check_statistics
from bnfold.segments import span_all_finite, span_counts, span_max_abs
from conftest import randomize_norms

_values = st.floats(allow_nan=True, allow_infinity=True, width=32)
_spans = st.lists(st.lists(_values, max_size=6), max_size=8)  # empty spans included


def _joined(spans: list[list[float]]) -> tuple[np.ndarray, list[int]]:
    bounds = [0]
    for span in spans:
        bounds.append(bounds[-1] + len(span))
    return np.array([v for span in spans for v in span], dtype=np.float64), bounds


@settings(max_examples=200, deadline=None)
@given(_spans)
def test_span_reductions_equal_one_reduction_per_span(spans: list[list[float]]) -> None:
    values, bounds = _joined(spans)
    for span, count, largest, finite in zip(spans, span_counts(values < 0, bounds), span_max_abs(values, bounds),
                                            span_all_finite(values, bounds), strict=True):
        array = np.array(span, dtype=np.float64)
        assert count == int(np.count_nonzero(array < 0))
        assert finite == bool(np.isfinite(array).all())
        expected = float(np.abs(array).max(initial=0.0))
        assert largest == expected or (np.isnan(largest) and np.isnan(expected))


@settings(max_examples=100, deadline=None)
@given(_spans)
def test_negative_counts_of_tensors(spans: list[list[float]]) -> None:
    tensors = [torch.tensor(span, dtype=torch.float32) for span in spans]
    assert _count_negatives(tensors) == [int((t < 0).sum()) for t in tensors]


def test_torch_segment_checks_see_what_a_cast_overflowed() -> None:
    """A float64 value beyond float16's range is inf once cast; the joined check names the span that holds it."""
    numerics = TorchNumerics()
    values = torch.tensor([1.0, -2.0, 1e6, 3.0], dtype=torch.float64).to(torch.float16)
    assert numerics.segment_finite(values, [0, 2, 3, 4]) == [True, False, True]
    assert numerics.segment_max_abs(torch.tensor([1.0, -2.0, 5.0]), [0, 2, 2, 3]) == [2.0, 0.0, 5.0]


def test_norm_maps_are_the_per_norm_maps() -> None:
    torch.manual_seed(0)
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1),
                                          nn.BatchNorm2d(6)).eval(), 0)
    from bnfold.backends.modules import ModuleWeights
    from bnfold.core.apply import scale_shift
    from bnfold.layers import DEFAULT_REGISTRY

    access = ModuleWeights(model, DEFAULT_REGISTRY)
    maps = check_statistics(["1", "3"], access)
    assert list(maps) == ["1", "3"] and len(maps) == 2 and maps.get("2") is None
    for norm in ("1", "3"):
        scale, shift = scale_shift(access.statistics(norm), access.numerics)
        assert torch.equal(maps[norm][0], scale) and torch.equal(maps[norm][1], shift)
        assert maps.largest_scale(norm) == float(scale.abs().max())
        start, stop = maps.spans[norm]
        assert torch.equal(maps.cast(model[0].weight).scale[start:stop], scale.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_joined_in_place_fold_writes_what_the_per_norm_fold_writes(dtype: torch.dtype) -> None:
    """``fold(inplace=True)`` without inputs multiplies in place with the joined casts; with inputs (verified, so
    undoable bit for bit) it computes each norm's new tensors one by one. Both must write the same values."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize_norms(tv.models.resnet18().eval(), 0).to(dtype)
    joined = bnfold.fold(copy.deepcopy(model), inplace=True)
    per_norm = bnfold.fold(copy.deepcopy(model), torch.randn(1, 3, 32, 32, dtype=dtype), inplace=True)
    a, b = joined.state_dict(), per_norm.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
