"""Pairing by dataflow: what folds, what is left alone (and the reason says why), on small graphs.

Every case that folds is also run and compared with the unfolded model; every case that must not fold checks
the reason, so a rule that silently stops matching fails here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import bnfold
from conftest import assert_same_outputs, bn_count, randomize_norms


def _prepared(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_norms(model, seed).eval()


def _entry(report: bnfold.FoldReport, name: str) -> bnfold.NormEntry:
    return next(e for e in report.entries if e.name == name)


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + x)


class Branches(nn.Module):
    """conv_a feeds its BN only; conv_b's output feeds its BN and a side branch; a concat feeds bn_cat."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 1)
        self.bn_a = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(3, 4, 1)
        self.bn_b = nn.BatchNorm2d(4)
        self.bn_cat = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn_a(self.conv_a(x))
        b_raw = self.conv_b(x)
        b = self.bn_b(b_raw)
        cat = self.bn_cat(torch.cat([a, b], dim=1))
        return cat + torch.cat([b_raw, b_raw], dim=1)


def test_residual_block_folds_and_matches() -> None:
    model = _prepared(Residual())
    folded = bnfold.fold(model)
    report = bnfold.report_for(folded)
    assert [(e.name, e.into) for e in report.folded] == [("bn1", ("conv1",)), ("bn2", ("conv2",))]
    assert bn_count(folded) == 0 and isinstance(folded.bn1, nn.Identity)
    assert folded.conv1.bias is not None
    assert_same_outputs(model, folded, X)


def test_branches_fold_only_where_the_conv_output_has_no_other_use() -> None:
    model = _prepared(Branches())
    report = bnfold.plan(model)
    assert _entry(report, "bn_a").status == "folded"
    left_b = _entry(report, "bn_b")
    assert left_b.status == "left" and "output of 'conv_b' is also used by" in left_b.reason
    left_cat = _entry(report, "bn_cat")
    assert left_cat.status == "left" and "cat" in left_cat.reason
    folded = bnfold.fold(model)
    assert isinstance(folded.bn_a, nn.Identity) and isinstance(folded.bn_b, nn.BatchNorm2d)
    assert_same_outputs(model, folded, X)


class ConvTwice(nn.Module):
    def __init__(self, second_bn: bool) -> None:
        super().__init__()
        self.second_bn = second_bn
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        z = self.conv(y)
        return self.bn(z) if self.second_bn else z


def test_conv_called_twice_each_time_followed_by_the_same_bn_folds() -> None:
    model = _prepared(ConvTwice(second_bn=True))
    folded = bnfold.fold(model)
    assert bnfold.report_for(folded).folded[0].into == ("conv",)
    assert_same_outputs(model, folded, X)


def test_conv_called_twice_but_followed_by_bn_once_is_left_alone() -> None:
    # torch.fx's fuse gets this wrong: it folds into the conv, changing the second call's output too.
    model = _prepared(ConvTwice(second_bn=False))
    report = bnfold.plan(model)
    entry = _entry(report, "bn")
    assert entry.status == "left" and "also called at another site" in entry.reason
    assert_same_outputs(model, bnfold.fold(model), X)


class SharedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 1)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv1(x)) + self.bn(self.conv2(x))


def test_bn_called_after_two_different_convs_is_left_alone() -> None:
    entry = _entry(bnfold.plan(_prepared(SharedBN())), "bn")
    assert entry.status == "left" and "several sites with different layers" in entry.reason


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.sum() > 0:  # control flow on tensor values: torch.fx cannot trace this
            return self.head(y)
        return self.head(-y)


def test_untraceable_model_folds_with_example_inputs() -> None:
    model = _prepared(DataDependent())
    with pytest.raises(bnfold.CaptureError, match="Pass example_inputs"):
        bnfold.fold(model)
    folded = bnfold.fold(model, X)
    report = bnfold.report_for(folded)
    assert report.capture == "forward pass" and len(report.folded) == 1
    assert_same_outputs(model, folded, X)
    assert any("one forward pass" in note for note in report.notes)
    assert_same_outputs(model, folded, X)


class FunctionalWeightUse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + F.conv2d(x, self.conv.weight)


@pytest.mark.parametrize("with_inputs", [False, True], ids=["fx", "forward-pass"])
def test_layer_whose_weight_is_read_elsewhere_is_left_alone(with_inputs: bool) -> None:
    model = _prepared(FunctionalWeightUse())
    report = bnfold.plan(model, X if with_inputs else None)
    entry = _entry(report, "bn")
    assert entry.status == "left" and "conv.weight" in entry.reason and "read directly" in entry.reason


def test_tied_weights_are_left_alone() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1))
    model[2].weight = model[0].weight
    entry = _entry(bnfold.plan(_prepared(model)), "1")
    assert entry.status == "left" and "shares its parameter" in entry.reason


def test_layer_with_parametrization_is_left_alone() -> None:
    conv = parametrizations.weight_norm(nn.Conv2d(3, 4, 1))
    model = _prepared(nn.Sequential(conv, nn.BatchNorm2d(4)))
    assert parametrize.is_parametrized(model[0])
    entry = _entry(bnfold.plan(model), "1")
    assert entry.status == "left" and "parametrizations" in entry.reason


def test_layer_with_old_style_weight_norm_hook_is_left_alone() -> None:
    conv = torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 1))
    entry = _entry(bnfold.plan(_prepared(nn.Sequential(conv, nn.BatchNorm2d(4)))), "1")
    assert entry.status == "left" and "hooks" in entry.reason


class StandardizedConv(nn.Conv2d):
    """Weight-standardised conv: folding a scale into its weight would be undone by the standardisation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class PlainSubclass(nn.Conv2d):
    """A subclass that keeps forward: folds like a Conv2d."""


class MyBN(nn.BatchNorm2d):
    """A BN subclass that keeps forward: folds like BatchNorm2d."""


def test_subclass_overriding_forward_is_left_alone_and_plain_subclass_folds() -> None:
    # The ReLU keeps the first BN from folding into the conv after it (see test_backward.py for that direction).
    model = _prepared(
        nn.Sequential(StandardizedConv(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), PlainSubclass(4, 4, 1), MyBN(4))
    )
    report = bnfold.plan(model)
    left = _entry(report, "1")
    assert left.status == "left" and "overrides forward" in left.reason
    assert _entry(report, "4").status == "folded"
    folded = bnfold.fold(model)
    assert type(folded[3]) is PlainSubclass and isinstance(folded[4], nn.Identity)
    assert_same_outputs(model, folded, X)


def test_bn_without_running_stats_is_left_alone() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    entry = _entry(bnfold.plan(model), "1")
    assert entry.status == "left" and "track_running_stats=False" in entry.reason


def test_bn_never_called_is_reported() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.unused = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    entry = _entry(bnfold.plan(Unused().eval()), "unused")
    assert entry.status == "left" and "never called" in entry.reason


def test_bn_whose_input_is_a_model_input_is_left_alone() -> None:
    model = _prepared(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 3)))
    entry = _entry(bnfold.plan(model), "0")
    assert entry.status == "left" and "model input" in entry.reason


def test_hooks_on_bn_are_respected() -> None:
    model = _prepared(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    model[1].register_forward_hook(lambda module, args, output: output * 2)
    entry = _entry(bnfold.plan(model), "1")
    assert entry.status == "left" and "forward hooks" in entry.reason


def test_chain_conv_bn_bn_folds_completely() -> None:
    model = _prepared(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.ReLU()))
    folded = bnfold.fold(model)
    assert [e.into for e in bnfold.report_for(folded).folded] == [("0",), ("0",)]
    assert bn_count(folded) == 0
    assert_same_outputs(model, folded, X)


def test_same_bn_registered_under_two_names_is_replaced_everywhere() -> None:
    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
            self.alias = self.block[1]  # e.g. a `self.norm = self.layers[-1]` shortcut

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.alias(self.block[0](x))  # called under its second name

    model = _prepared(Aliased())
    folded = bnfold.fold(model)
    assert isinstance(folded.block[1], nn.Identity) and isinstance(folded.alias, nn.Identity)
    assert_same_outputs(model, folded, X)
    with_inputs = bnfold.fold(model, X)  # fx with shapes; same names
    assert isinstance(with_inputs.alias, nn.Identity)
    from bnfold.backends.capture import capture_forward
    from bnfold.layers import DEFAULT_REGISTRY

    flow, _ = capture_forward(model, (X,), DEFAULT_REGISTRY)
    assert {s.name for s in flow.sites if s.kind == "module"} == {"block.0", "block.1"}


def test_a_forward_pass_gives_a_parameter_read_first_in_a_call_a_site_of_its_own_before_the_call() -> None:
    """A layer scale read in forward code: its site comes before the call's, and both keep their own index."""
    from bnfold.backends.capture import capture_forward
    from bnfold.layers import DEFAULT_REGISTRY

    class LayerScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.gamma = nn.Parameter(torch.ones(1, 4, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) * self.gamma

    flow, _ = capture_forward(_prepared(LayerScale()), (X,), DEFAULT_REGISTRY)
    assert [site.index for site in flow.sites] == list(range(len(flow.sites)))
    (product,) = [site for site in flow.sites if site.kind == "op"]
    assert [flow.sites[i].name for i in product.inputs] == ["bn", "gamma"]
    assert flow.sites[-1].inputs == [product.index] and product.users == [flow.sites[-1].index]


def test_linear_then_batchnorm1d_needs_2d_activations() -> None:
    mlp = _prepared(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)))
    x2 = torch.randn(4, 6)
    report = bnfold.plan(mlp)
    assert _entry(report, "1").status == "folded" and any("assuming 2-D" in n for n in report.notes)
    assert not bnfold.plan(mlp, x2).notes  # with example inputs the rank is checked, nothing assumed
    assert_same_outputs(mlp, bnfold.fold(mlp, x2), x2)

    # (N, L, F) with L == F: BatchNorm1d normalises axis 1 (L), the Linear's channels are on the last axis.
    seq = _prepared(nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5)))
    x3 = torch.randn(2, 5, 5)
    entry = _entry(bnfold.plan(seq, x3), "1")
    assert entry.status == "left" and "3-D output" in entry.reason


def test_a_norm_left_after_an_assumed_rank_has_no_note_saying_it_folded() -> None:
    """The 2-D assumption is noted while a fold is tried; a fold refused after it must not leave the note behind."""

    class TwoRoutes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.fc(x) * 2) + self.bn(self.fc(x) + 1)  # two routes: the forward fold is refused

    report = bnfold.plan(_prepared(TwoRoutes()))  # no example inputs: the rank is assumed
    assert _entry(report, "bn").status == "left"
    assert not any("'bn' folded" in note for note in report.notes)


class ShapeRead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        batch, channels = y.shape[0], y.size(1)  # metadata reads do not depend on values: not a use
        return self.bn(y).reshape(batch, channels, -1).mean(-1) * y.dim()


@pytest.mark.parametrize("with_inputs", [False, True], ids=["fx", "forward-pass"])
def test_shape_reads_are_not_uses(with_inputs: bool) -> None:
    model = _prepared(ShapeRead())
    folded = bnfold.fold(model, X if with_inputs else None)
    assert isinstance(folded.bn, nn.Identity)
    assert_same_outputs(model, folded, X)


def test_forward_pass_capture_sees_in_place_ops_on_the_conv_output() -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            y.relu_()  # the BN sees relu(conv(x)): not foldable
            if x.sum() > -1e9:  # untraceable by fx
                return self.bn(y)
            return y

    entry = _entry(bnfold.plan(_prepared(InPlace()), X), "bn")
    assert entry.status == "left" and "relu_" in entry.reason


def test_a_conv_on_an_unbatched_input_is_not_paired_with_a_norm_on_axis_1() -> None:
    # Conv1d on (C, L) = (3, 10) gives (4, 8): its channels on axis 0. BatchNorm1d reads that as (N=4, C=8).
    model = _prepared(nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(8)))
    x = torch.randn(3, 10)
    entry = _entry(bnfold.plan(model, x), "1")
    assert entry.status == "left" and "unbatched" in (entry.reason or ""), entry.reason
    assert_same_outputs(model, bnfold.fold(model, x), x)
