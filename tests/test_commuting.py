"""The commuting table checked against the maths: every op bnfold looks through must satisfy
``op(s * x + t) == s * op(x) + t`` per channel, and the ops it refuses must really break it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnfold.backends.capture import capture_forward
from bnfold.backends.modules import to_graph
from bnfold.core import commuting
from bnfold.layers import DEFAULT_REGISTRY
from bnfold.verification import TOLERANCES

GEN = torch.Generator().manual_seed(7)
X = torch.randn(2, 3, 7, 7, dtype=torch.float64, generator=GEN)


class Op(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


PASSING: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "dropout eval": lambda x: F.dropout(x, 0.5, training=False),
    "dropout2d eval": lambda x: F.dropout2d(x, 0.5, False),
    "avg_pool": lambda x: F.avg_pool2d(x, 3, 2),
    "avg_pool ceil": lambda x: F.avg_pool2d(x, 2, 2, 0, True),
    "avg_pool padded, not counted": lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False),
    "adaptive_avg_pool": lambda x: F.adaptive_avg_pool2d(x, (3, 2)),
    "mean spatial": lambda x: x.mean((2, 3)),
    "mean keepdim": lambda x: torch.mean(x, dim=-1, keepdim=True),
    "interpolate nearest": lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
    "interpolate bilinear": lambda x: F.interpolate(x, size=(5, 11), mode="bilinear", align_corners=False),
    "interpolate bicubic aligned": lambda x: F.interpolate(x, scale_factor=1.7, mode="bicubic", align_corners=True),
    "flatten keeps channels": lambda x: torch.flatten(x, 2),
    "reshape (N, C, HW)": lambda x: x.reshape(x.shape[0], 3, -1),
    "view to (N, 1, C, H, W)": lambda x: x.view(2, 1, 3, 7, 7),
    "permute": lambda x: x.permute(0, 2, 3, 1),
    "transpose": lambda x: x.transpose(1, 3),
    "contiguous": lambda x: x.contiguous(),
    "squeeze of a size-1 axis after the channels": lambda x: x.reshape(2, 3, 1, 49).squeeze(2),
    "unsqueeze before the channels": lambda x: x.unsqueeze(1),
    "unsqueeze at the end": lambda x: torch.unsqueeze(x, -1),
}
SPREAD = {  # each channel's values spread over several features of one axis: (outer, inner)
    "flatten(1)": (lambda x: torch.flatten(x, 1), (1, 49)),
    "reshape (N, C*H, W)": (lambda x: x.reshape(2, -1, 7), (1, 7)),
    "channels last, flattened": (lambda x: x.reshape(2, 3, 49).transpose(1, 2).reshape(2, 147), (49, 1)),
}
NEEDS_NON_NEGATIVE = {
    "max_pool": lambda x: F.max_pool2d(x, 2),
    "max_pool padded": lambda x: F.max_pool2d(x, 3, 1, 1),
    "adaptive_max_pool": lambda x: F.adaptive_max_pool2d(x, 2),
}
REFUSED = {
    "dropout training": lambda x: F.dropout(x, 0.5, training=True),
    "avg_pool counting zero padding": lambda x: F.avg_pool2d(x, 3, 1, 1),
    "avg_pool divisor_override": lambda x: F.avg_pool2d(x, 2, divisor_override=3),
    "mean over channels": lambda x: x.mean(1),
    "reshape mixes channels": lambda x: x.reshape(2, 7, 3, 7),
    "relu": torch.relu,
    "sum spatial": lambda x: x.sum((2, 3)),
}


def _site_and_passage(fn: Callable[[torch.Tensor], torch.Tensor]) -> commuting.Passage | str:
    module = Op(fn)
    flow, _ = capture_forward(module, (X,), DEFAULT_REGISTRY)
    graph = to_graph(module, flow, DEFAULT_REGISTRY)
    ops = [node for node in graph.nodes if node.kind == "op"]
    assert ops, "the op was not recorded"
    axis, layout = 1, (1, 1)
    for node in ops:  # the ops one after the other, as the planner follows them
        if not commuting.may_commute(node):
            return "not a commuting kind"
        passage = commuting.passage(node, graph.nodes[node.inputs[0]].shape, axis, layout)
        if isinstance(passage, str):
            return passage
        axis, layout = passage.axis, (passage.outer, passage.inner)
    return passage


def _affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[axis] = -1
    return x * scale.reshape(shape) + shift.reshape(shape)


def _commutes(fn: Callable[[torch.Tensor], torch.Tensor], scale: torch.Tensor, shift: torch.Tensor, out_axis: int) -> bool:
    torch.manual_seed(0)  # the same dropout mask on both sides where there is one
    left = fn(_affine(X, scale, shift, 1))
    torch.manual_seed(0)
    right = _affine(fn(X), scale, shift, out_axis)
    return bool(torch.allclose(left, right, rtol=0, atol=TOLERANCES[torch.float64]))


SCALE = torch.tensor([1.5, -0.7, 0.3], dtype=torch.float64)
SHIFT = torch.tensor([0.4, -1.2, 2.0], dtype=torch.float64)


@pytest.mark.parametrize("name", list(PASSING))
def test_ops_looked_through_commute(name: str) -> None:
    passage = _site_and_passage(PASSING[name])
    assert isinstance(passage, commuting.Passage), passage
    assert not passage.needs_non_negative_scale
    assert _commutes(PASSING[name], SCALE, SHIFT, passage.axis)


@pytest.mark.parametrize("name", list(NEEDS_NON_NEGATIVE))
def test_max_pooling_commutes_only_with_non_negative_scales(name: str) -> None:
    passage = _site_and_passage(NEEDS_NON_NEGATIVE[name])
    assert isinstance(passage, commuting.Passage) and passage.needs_non_negative_scale
    assert _commutes(NEEDS_NON_NEGATIVE[name], SCALE.abs(), SHIFT, passage.axis)
    assert not _commutes(NEEDS_NON_NEGATIVE[name], SCALE, SHIFT, passage.axis)


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_ops_really_do_not_commute(name: str) -> None:
    passage = _site_and_passage(REFUSED[name])
    assert isinstance(passage, str)
    fn = REFUSED[name]
    out = fn(X)
    # A per-channel map can only come out on an axis that still has the 3 channels; on every such axis it must
    # fail to commute (where none is left, as after a mean over channels, nothing could carry the 3 scales).
    axes = [axis for axis in range(out.dim()) if out.shape[axis] == 3]
    for axis in axes:
        assert not _commutes(fn, SCALE, SHIFT, axis), axis


@pytest.mark.parametrize("name", list(SPREAD))
def test_reshapes_that_spread_channels_say_which_feature_is_whose(name: str) -> None:
    fn, layout = SPREAD[name]
    passage = _site_and_passage(fn)
    assert isinstance(passage, commuting.Passage), passage
    assert (passage.outer, passage.inner) == layout
    outer, inner = layout  # feature f of the axis belongs to channel (f // inner) % 3
    expanded_scale = SCALE.repeat_interleave(inner).repeat(outer)
    expanded_shift = SHIFT.repeat_interleave(inner).repeat(outer)
    left = fn(_affine(X, SCALE, SHIFT, 1))
    right = _affine(fn(X), expanded_scale, expanded_shift, passage.axis)
    assert torch.allclose(left, right, rtol=0, atol=TOLERANCES[torch.float64])
