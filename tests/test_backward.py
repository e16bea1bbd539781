"""Folds beyond conv -> BN: a BN into the layers after it, chains, and folds through ops that commute with it.

Each case that folds is compared with the unfolded model; each case that must not fold checks the reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from conftest import assert_same_outputs, bn_count, randomize_norms


def _prepared(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_norms(model, seed).eval()


def _entry(report: bnfold.FoldReport, name: str) -> bnfold.NormEntry:
    return next(e for e in report.entries if e.name == name)


GEN = torch.Generator().manual_seed(3)
X = torch.randn(2, 4, 9, 9, generator=GEN)
V = torch.randn(5, 6, generator=GEN)


def _fold_and_check(model: nn.Module, x: torch.Tensor, *, expect: dict[str, tuple[str, tuple[str, ...]]]) -> nn.Module:
    """Fold with and without example inputs (fx shapes on / off), check decisions and outputs."""
    folded = bnfold.fold(model, x)
    report = bnfold.report_for(folded)
    for name, (direction, into) in expect.items():
        entry = _entry(report, name)
        assert (entry.status, entry.direction, entry.into) == ("folded", direction, into), entry
    assert_same_outputs(model, folded, x)
    return folded


def test_bn_before_linear_folds_backward() -> None:
    model = _prepared(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(6), nn.Linear(6, 3)))
    folded = _fold_and_check(model, V, expect={"1": ("backward", ("2",))})
    assert bn_count(folded) == 0


def test_bn_before_linear_without_bias_gets_one() -> None:
    model = _prepared(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(6), nn.Linear(6, 3, bias=False)))
    folded = _fold_and_check(model, V, expect={"1": ("backward", ("2",))})
    assert folded[2].bias is not None and model[2].bias is None


def test_bn_feeding_two_linears_folds_into_both() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(6)
            self.head_a = nn.Linear(6, 3)
            self.head_b = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.bn(torch.relu(x))
            return self.head_a(y), self.head_b(y)

    model = _prepared(TwoHeads())
    _fold_and_check(model, V, expect={"bn": ("backward", ("head_a", "head_b"))})


def test_bn_whose_output_also_feeds_something_else_is_left_alone() -> None:
    class Leaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(6)
            self.head = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.bn(torch.relu(x))
            return self.head(y), y.sum(1)

    entry = _entry(bnfold.plan(_prepared(Leaky()), V), "bn")
    assert entry.status == "left" and "not only to conv or linear layers" in entry.reason


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_bn_before_conv_with_padding_that_copies_values_folds(padding_mode: str) -> None:
    model = _prepared(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3, padding=1, padding_mode=padding_mode)))
    _fold_and_check(model, X, expect={"1": ("backward", ("2",))})


@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 1), (1, 2)])
def test_bn_before_unpadded_conv_folds(stride: int, dilation: int) -> None:
    model = _prepared(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, stride=stride, dilation=dilation)))
    _fold_and_check(model, X, expect={"1": ("backward", ("2",))})


def test_bn_before_zero_padded_conv_is_left_with_the_reason() -> None:
    model = _prepared(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3, padding=1)))
    entry = _entry(bnfold.plan(model, X), "1")
    assert entry.status == "left"
    assert "pads its input with zeros" in entry.reason and "relu" in entry.reason.lower()
    assert_same_outputs(model, bnfold.fold(model, X), X)


@pytest.mark.parametrize("groups", [2, 4])
def test_bn_before_grouped_and_depthwise_conv_folds(groups: int) -> None:
    model = _prepared(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 8, 3, groups=groups, padding_mode="reflect", padding=1)))
    _fold_and_check(model, X, expect={"1": ("backward", ("2",))})


def test_bn_before_conv1d_and_conv3d_folds() -> None:
    seq = _prepared(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4), nn.Conv1d(4, 3, 3, groups=1)))
    _fold_and_check(seq, torch.randn(2, 4, 10, generator=GEN), expect={"1": ("backward", ("2",))})
    vol = _prepared(nn.Sequential(nn.ReLU(), nn.BatchNorm3d(4), nn.Conv3d(4, 2, 2, groups=2)))
    _fold_and_check(vol, torch.randn(2, 4, 5, 5, 5, generator=GEN), expect={"1": ("backward", ("2",))})


def test_bn_before_transposed_conv_is_left_with_the_reason() -> None:
    model = _prepared(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 3, 3)))
    entry = _entry(bnfold.plan(model, X), "1")
    assert entry.status == "left" and "transposed convolution" in entry.reason


def test_forward_fold_is_preferred_when_both_are_possible() -> None:
    model = _prepared(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1)))
    _fold_and_check(model, X, expect={"1": ("forward", ("0",))})


def test_chain_bn_bn_linear_folds_completely_in_the_right_order() -> None:
    # The two maps do not commute (s1 s2 x + s2 t1 + t2 vs s1 s2 x + s1 t2 + t1): order matters.
    model = _prepared(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(6), nn.BatchNorm1d(6), nn.Linear(6, 3)))
    folded = _fold_and_check(model, V, expect={"1": ("backward", ("3",)), "2": ("backward", ("3",))})
    assert bn_count(folded) == 0
    folded_without_shapes = bnfold.fold(model)
    assert bn_count(folded_without_shapes) == 0
    assert_same_outputs(model, folded_without_shapes, V)


def test_chain_conv_bn_bn_and_linear_on_both_sides() -> None:
    model = _prepared(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.BatchNorm1d(6), nn.Linear(6, 4), nn.BatchNorm1d(4)))
    folded = _fold_and_check(
        model, V, expect={"1": ("forward", ("0",)), "3": ("backward", ("4",)), "5": ("forward", ("4",))}
    )
    assert bn_count(folded) == 0


def test_fused_activation_blocks_the_backward_fold() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    model = _prepared(nn.Sequential(nn.ReLU(), timm_layers.BatchNormAct2d(4, act_layer=nn.SiLU), nn.Conv2d(4, 3, 1)))
    entry = _entry(bnfold.plan(model, X), "1")
    assert entry.status == "left" and "applies its activation (SiLU)" in entry.reason


def test_linear_after_batchnorm1d_on_3d_input_is_left() -> None:
    # BatchNorm1d on (N, C, L) normalises axis 1; a Linear reads the last axis: they do not meet.
    model = _prepared(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(5), nn.Linear(5, 3)))
    entry = _entry(bnfold.plan(model, torch.randn(2, 5, 5)), "1")
    assert entry.status == "left" and "axis" in entry.reason


# ---------------------------------------------------------------------------------------- through commuting ops


class Through(nn.Module):
    """conv -> op -> BN (forward) and BN -> op -> consumer (backward), with one op from the commuting list."""

    def __init__(self, op: nn.Module, channels: int = 4, head: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, channels, 3)
        self.op = op
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()
        self.bn_in = nn.BatchNorm2d(channels)
        self.op_in = op
        self.head = head if head is not None else nn.Conv2d(channels, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.op(self.conv(x))))
        return self.head(self.op_in(self.bn_in(y)))


COMMUTING_MODULES = {
    "identity": nn.Identity(),
    "dropout": nn.Dropout(0.3),
    "dropout2d": nn.Dropout2d(0.3),
    "avg_pool": nn.AvgPool2d(2),
    "avg_pool_padded_excluded": nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
    "adaptive_avg_pool": nn.AdaptiveAvgPool2d((2, 3)),
    "upsample_nearest": nn.Upsample(scale_factor=2, mode="nearest"),
    "upsample_bilinear": nn.Upsample(scale_factor=1.5, mode="bilinear", align_corners=False),
}


@pytest.mark.parametrize("name", list(COMMUTING_MODULES))
def test_fold_through_commuting_module(name: str) -> None:
    model = _prepared(Through(COMMUTING_MODULES[name]))
    folded = _fold_and_check(model, X, expect={"bn": ("forward", ("conv",)), "bn_in": ("backward", ("head",))})
    assert bn_count(folded) == 0


def test_fold_through_max_pool_needs_non_negative_scales() -> None:
    model = _prepared(Through(nn.MaxPool2d(2)))
    with torch.no_grad():
        model.bn.weight.abs_()
        model.bn_in.weight.abs_()
        model.bn_in.weight[0] = -0.5
    report = bnfold.plan(model, X)
    assert _entry(report, "bn").status == "folded"
    entry = _entry(report, "bn_in")
    assert entry.status == "left" and "1 of its channels have a negative weight" in entry.reason
    assert_same_outputs(model, bnfold.fold(model, X), X)


def test_avg_pool_counting_zero_padding_is_not_looked_through() -> None:
    model = _prepared(Through(nn.AvgPool2d(3, stride=1, padding=1)))
    entry = _entry(bnfold.plan(model, X), "bn")
    assert entry.status == "left" and "count_include_pad=True" in entry.reason
    assert_same_outputs(model, bnfold.fold(model, X), X)


class PooledHead(nn.Module):
    """conv -> BN -> ReLU -> BN -> global pool -> flatten -> dropout -> Linear: the classifier-head pattern."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.conv = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.bn_head = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn_head(F.relu(self.bn(self.conv(x))))
        if self.functional:
            pooled = y.mean((2, 3))
            return self.fc(F.dropout(pooled, 0.2, self.training))
        return self.fc(self.drop(torch.flatten(self.pool(y), 1)))


@pytest.mark.parametrize("functional", [False, True])
def test_bn_folds_through_pool_and_flatten_into_the_classifier(functional: bool) -> None:
    model = _prepared(PooledHead(functional))
    folded = _fold_and_check(model, X, expect={"bn": ("forward", ("conv",)), "bn_head": ("backward", ("fc",))})
    assert bn_count(folded) == 0


def test_flatten_needs_shapes_to_be_looked_through() -> None:
    model = _prepared(PooledHead(functional=False))
    entry = _entry(bnfold.plan(model), "bn_head")  # no example inputs: the flatten cannot be checked
    assert entry.status == "left" and "pass example_inputs" in entry.reason


class LinearNorm(nn.Module):
    """timm LeViT's pattern: Linear on (B, N, C), BatchNorm1d over C on the flattened (B*N, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 5, bias=False)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


def test_linear_then_flatten_then_batchnorm1d_folds() -> None:
    model = _prepared(LinearNorm())
    _fold_and_check(model, torch.randn(2, 7, 6, generator=GEN), expect={"bn": ("forward", ("linear",))})


def test_reshape_that_mixes_channels_is_not_looked_through() -> None:
    class Mixing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # (N, 4, 2, 2) -> (N, 2, 2, 4): the last axis has 4 entries, but they are not the 4 channels
            return self.fc(self.bn(torch.relu(x)).reshape(x.shape[0], 2, 2, 4))

    model = _prepared(Mixing())
    entry = _entry(bnfold.plan(model, torch.randn(2, 4, 2, 2, generator=GEN)), "bn")
    assert entry.status == "left" and "mixes the values of different channels" in (entry.reason or ""), entry.reason


def test_permute_moves_the_channel_axis() -> None:
    class ChannelsLast(nn.Module):
        """conv (channels on axis 1) -> permute to NHWC -> Linear over channels (axis -1)."""

        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.bn(torch.relu(x)).permute(0, 2, 3, 1))

    model = _prepared(ChannelsLast())
    _fold_and_check(model, X, expect={"bn": ("backward", ("fc",))})


def test_fold_through_ops_on_a_forward_pass_capture() -> None:
    """Data-dependent control flow: the path conv -> pool -> BN is learnt from one watched forward pass."""

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3)
            self.pool = nn.AvgPool2d(2)
            self.bn = nn.BatchNorm2d(4)
            self.bn_head = nn.BatchNorm1d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn(self.pool(self.conv(x))))
            if y.sum() > 0:
                y = y * 2
            return self.fc(self.bn_head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)))

    model = _prepared(Branchy())
    folded = _fold_and_check(model, X, expect={"bn": ("forward", ("conv",)), "bn_head": ("backward", ("fc",))})
    assert bnfold.report_for(folded).capture == "forward pass"
    assert bn_count(folded) == 0


# ------------------------------------------------------------------------------------------- through concatenation


class Mixed(nn.Module):
    """MixNet's mixed convolution: split channels, one conv per split with its own kernel, concatenate, BN."""

    def __init__(self, extra_use: bool = False) -> None:
        super().__init__()
        self.extra_use = extra_use
        self.convs = nn.ModuleList([nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 5, 5, padding=2, bias=False)])
        self.pool = nn.AvgPool2d(1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.convs[0](x[:, :2]), self.convs[1](x[:, 2:])]
        y = self.bn(self.pool(torch.cat(outs, dim=1)))
        return y + outs[0].mean() if self.extra_use else y


def test_bn_after_concatenated_convs_folds_into_each_share() -> None:
    model = _prepared(Mixed())
    folded = _fold_and_check(model, X, expect={"bn": ("forward", ("convs.0", "convs.1"))})
    assert bn_count(folded) == 0 and folded.convs[1].bias is not None
    no_shapes = bnfold.fold(model)
    assert bn_count(no_shapes) == 0
    assert_same_outputs(model, no_shapes, X)


def test_concatenated_conv_output_used_elsewhere_is_left() -> None:
    model = _prepared(Mixed(extra_use=True))
    entry = _entry(bnfold.plan(model, X), "bn")
    assert entry.status == "left" and "also used by" in entry.reason
    assert_same_outputs(model, bnfold.fold(model, X), X)


def test_concatenation_with_a_passthrough_input_is_left() -> None:
    class DenseLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(torch.cat([x, self.conv(x)], 1))

    entry = _entry(bnfold.plan(_prepared(DenseLike()), X), "bn")
    assert entry.status == "left" and "model input" in entry.reason
