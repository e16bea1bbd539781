"""Property tests: any conv / transposed conv / linear followed by a BN folds to the same outputs."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnfold
from bnfold.verification import TOLERANCES, compare_outputs
from conftest import assert_same_outputs, randomize_norms

CONVS = {1: (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d),
         3: (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d)}


@st.composite
def conv_bn_models(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor, torch.dtype]:
    dims = draw(st.sampled_from([1, 2, 3]))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2, 3]))
    depthwise = draw(st.booleans())
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = in_channels if depthwise else groups * draw(st.integers(1, 3))
    if depthwise:
        groups = in_channels
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 1))
    bias = draw(st.booleans())
    affine = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    conv_cls, transposed_cls, bn_cls = CONVS[dims]
    if transposed:
        output_padding = draw(st.integers(0, stride - 1)) if stride > 1 else 0
        conv = transposed_cls(in_channels, out_channels, kernel, stride=stride, padding=padding, groups=groups,
                              dilation=dilation, bias=bias, output_padding=output_padding if output_padding < dilation else 0)
    else:
        padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
        conv = conv_cls(in_channels, out_channels, kernel, stride=stride, padding=padding, groups=groups,
                        dilation=dilation, bias=bias, padding_mode=padding_mode)
    model = nn.Sequential(conv, bn_cls(out_channels, affine=affine), nn.ReLU())
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = randomize_norms(model, seed).to(dtype).eval()
    spatial = (draw(st.integers(5, 7)),) * dims  # >= the widest dilated kernel (5)
    x = torch.randn((2, in_channels) + spatial, dtype=dtype)
    return model, x, dtype


@settings(max_examples=80, deadline=None)
@given(conv_bn_models())
def test_conv_then_bn_folds_exactly(case: tuple[nn.Module, torch.Tensor, torch.dtype]) -> None:
    model, x, dtype = case
    folded = bnfold.fold(model)
    assert bnfold.report_for(folded).folded[0].into == ("0",)
    assert isinstance(folded[1], nn.Identity)
    with torch.no_grad():
        comparison = compare_outputs(model(x), folded(x), TOLERANCES[dtype])
    assert comparison.passed, comparison.worst()


@settings(max_examples=40, deadline=None)
@given(
    in_features=st.integers(1, 8),
    out_features=st.integers(1, 8),
    bias=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_then_bn1d_folds_exactly(in_features: int, out_features: int, bias: bool, affine: bool, seed: int) -> None:
    torch.manual_seed(seed)
    model = randomize_norms(nn.Sequential(nn.Linear(in_features, out_features, bias=bias),
                                          nn.BatchNorm1d(out_features, affine=affine)), seed).eval()
    x = torch.randn(5, in_features)
    folded = bnfold.fold(model, x)
    assert isinstance(folded[1], nn.Identity)
    assert_same_outputs(model, folded, x)  # checked here, independently of fold()'s own verification
