"""The extension API: users teach bnfold their own layers, and unknown norm-like layers are left alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.layers import LayerRegistry, NormStatistics
from conftest import assert_same_outputs, calibrated_by_training, randomize_norms

GEN = torch.Generator().manual_seed(11)


class ChannelLastLinear(nn.Module):
    """y = x @ kernel + offset, with the weight stored (in, out): output channels on axis 1, unlike nn.Linear."""

    def __init__(self, features_in: int, features_out: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(features_in, features_out, generator=GEN))
        self.offset = nn.Parameter(torch.randn(features_out, generator=GEN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.kernel + self.offset


class Scale(nn.Module):
    """A frozen per-channel affine (as left behind by some quantisation / pruning tools)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("gain", torch.rand(channels, generator=GEN) + 0.5)
        self.register_buffer("offset", torch.randn(channels, generator=GEN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain.reshape(1, -1, 1, 1) + self.offset.reshape(1, -1, 1, 1)


def _scale_statistics(module: nn.Module) -> NormStatistics:
    zeros = torch.zeros_like(module.gain)
    return NormStatistics(mean=zeros, var=torch.ones_like(module.gain), eps=0.0, gamma=module.gain, beta=module.offset)


def test_registered_linear_layer_absorbs_norms_on_both_sides() -> None:
    registry = LayerRegistry()
    bnfold.register_layer(ChannelLastLinear, out_axis=1, activation_channel_dim=-1, weight_name="kernel",
                          bias_name="offset", registry=registry)
    model = randomize_norms(nn.Sequential(
        nn.ReLU(), nn.BatchNorm1d(6), ChannelLastLinear(6, 4), nn.BatchNorm1d(4), nn.ReLU()
    )).eval()
    x = torch.randn(5, 6, generator=GEN)
    folded = bnfold.fold(model, x, registry=registry)
    report = bnfold.report_for(folded)
    assert [(e.name, e.direction, e.into) for e in report.folded] == [("3", "forward", ("2",)), ("1", "backward", ("2",))]
    assert_same_outputs(model, folded, x)
    # Without the rule the same model folds nothing: the layer is unknown.
    assert not bnfold.plan(model, x).folded


def test_registered_norm_layer_folds_and_is_replaced() -> None:
    registry = LayerRegistry()
    bnfold.register_norm(Scale, _scale_statistics, depends_on_training=False, registry=registry)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Scale(4), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8, generator=GEN)
    folded = bnfold.fold(model, x, registry=registry)
    assert isinstance(folded[1], nn.Identity)
    assert bnfold.report_for(folded).folded[0].kind == "Scale"
    assert_same_outputs(model, folded, x)


def test_unknown_batch_norm_subclass_is_left_alone_with_the_reason() -> None:
    class ClampedBN(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).clamp(-1, 1)

    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), ClampedBN(4))).eval()
    x = torch.randn(2, 3, 8, 8, generator=GEN)
    entry = bnfold.plan(model, x).entries[0]
    assert entry.status == "left" and "overrides forward" in entry.reason and "register_norm" in entry.reason
    assert_same_outputs(model, bnfold.fold(model, x), x)


def test_unknown_norm_act_like_module_is_not_treated_as_batch_norm() -> None:
    timm_layers = __import__("pytest").importorskip("timm.layers")

    class MyNormAct(timm_layers.BatchNormAct2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), MyNormAct(4))).eval()
    x = torch.randn(2, 3, 8, 8, generator=GEN)
    entry = bnfold.plan(model, x).entries[0]
    assert entry.status == "left" and "overrides forward" in entry.reason
    assert_same_outputs(model, bnfold.fold(model, x), x)


def test_default_registry_is_untouched_by_a_private_registry() -> None:
    before = (len(bnfold.DEFAULT_REGISTRY.layers), len(bnfold.DEFAULT_REGISTRY.norms))
    bnfold.register_layer(ChannelLastLinear, out_axis=1, weight_name="kernel", bias_name="offset", registry=LayerRegistry())
    assert (len(bnfold.DEFAULT_REGISTRY.layers), len(bnfold.DEFAULT_REGISTRY.norms)) == before


class _StaticSamePadConv(nn.Conv2d):
    """smp's Conv2dStaticSamePadding in miniature: a Conv2d subclass whose own forward pads, then calls F.conv2d."""

    def __init__(self, *args: object, pad: int = 1, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.static_padding = nn.ZeroPad2d(pad) if pad else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _ScaledConv(nn.Conv2d):
    """A subclass that really computes something else: bnfold must not fold into it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias) * 2 + 1


def test_a_layer_that_computes_in_its_own_code_is_read_from_that_code() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9)
    model = nn.Sequential(
        _StaticSamePadConv(3, 6, 3, groups=3, bias=False), nn.BatchNorm2d(6), nn.ReLU(),  # forward: exact
        nn.BatchNorm2d(6), _StaticSamePadConv(6, 4, 3, pad=0),  # backward: no padding anywhere, exact
        nn.ReLU(), nn.BatchNorm2d(4), _StaticSamePadConv(4, 4, 3, pad=1),  # backward through zero padding: left
        _ScaledConv(4, 4, 1), nn.BatchNorm2d(4),  # computes "* 2 + 1" after its conv: left
    )
    calibrated_by_training(model, x)
    folded = bnfold.fold(model, x)
    report = bnfold.report_for(folded)
    decisions = {e.name: (e.status, e.direction, e.reason or "") for e in report.entries}
    assert decisions["1"][:2] == ("folded", "forward") and decisions["3"][:2] == ("folded", "backward")
    assert decisions["6"][0] == "left" and "before the convolution" in decisions["6"][2]
    assert decisions["9"][0] == "left" and "overrides forward" in decisions["9"][2]
    assert report.parameters_before - report.parameters_after == bnfold.plan(model, x).parameters_removed
    assert folded[0].bias is not None and isinstance(folded[0], _StaticSamePadConv)
    assert_same_outputs(model, folded, x)


def test_smp_efficientnet_encoder_folds_through_its_same_padding_convs() -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    model = smp.FPN("efficientnet-b0", encoder_weights=None, classes=2)
    x = torch.randn(2, 3, 64, 64)
    calibrated_by_training(model, x)
    report = bnfold.report_for(bnfold.fold(model, x))  # verified against the original on x
    left = {e.name: e.reason for e in report.left}
    # the stem norm `_bn1` is defined but never called by smp's encoder forward; every norm that runs folds
    assert set(left) == {"encoder._bn1"} and "never called" in left["encoder._bn1"]
    assert len(report.folded) == 48
