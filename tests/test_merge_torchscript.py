"""``fold_script(..., merge_branches=True)`` and ``bnfold fold x.ts --merge-branches``: the same branch merges as the
module API, on frozen TorchScript graphs.

Traced (and scripted) re-parameterisable models are folded and merged, and checked against the module API on the
same model: the same blocks merged into the same layers, the same norm decisions and parameter counts, as many
batch norms and convolutions left in the graph as the module computes, and outputs within float32's fold
tolerance (``TOLERANCES[float32]`` = 1e-4, the tolerance every float32 fold is held to; see
``bnfold/verification.py``). A merge moves the float32 rounding of the branch sums from the activations into the
weights (the kernel sum is rounded once from float64), so a merged model differs from the original by float32
rounding propagated through the network's depth: tens of ulps (2^-23 ~ 1.2e-7 each) on these well conditioned
models, far below the tolerance, while a wrong kernel placement or a lost identity branch is off by the order of
the activations themselves. The TorchScript result and the module API's merged model use the same constants, so
they agree to within a few ulps of each other (``_SAME_ARITHMETIC``).
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import bnfold
from bnfold.backends.modules import geometry, layer_rule
from bnfold.backends.torchscript import fold_script, freeze, to_graph
from bnfold.core.graph import Operand
from bnfold.layers import DEFAULT_REGISTRY
from bnfold.report import FoldReport
from bnfold.verification import compare_outputs
from conftest import (
    assert_same_outputs,
    calibrated_by_training,
    random_layer_scales,
    script_or_trace,
    well_conditioned,
)
from helpers.cli import bnfold_cli
from helpers.counting import conv_calls, count_batch_norm_calls
from helpers.merge_nets import (
    Differences,
    Residual,
    Twice,
    Unmergeable,
    net,
)

_CONV_KINDS = frozenset({"aten::_convolution", "aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::linear"})
_SAME_ARITHMETIC = 2e-6
"""The module API's merged model and the TorchScript one hold equal constants and run the same kernels: any
difference is accumulation order inside a kernel, a few float32 ulps of the largest output (16 ulps ~ 2e-6)."""


def _trace(model: nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(model, x)


def _kinds(module: torch.jit.ScriptModule) -> Counter[str]:
    return Counter(node.kind() for node in module.graph.nodes())


def _norms_and_convs(module: torch.jit.ScriptModule) -> tuple[int, int]:
    kinds = _kinds(module)
    return kinds["aten::batch_norm"], sum(kinds[k] for k in _CONV_KINDS)


def _round_trip(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(module, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer)


def _merged(report: FoldReport) -> set[tuple[str | None, tuple[str, ...], tuple[str, ...]]]:
    return {(m.into, m.layers, m.identities) for m in report.merges if m.status == "merged"}


def _decisions(report: FoldReport) -> dict[str, tuple[str, tuple[str, ...], str | None]]:
    return {e.name: (e.status, tuple(e.into), e.direction) for e in report.entries}


@torch.no_grad()
# ---------------------------------------------------------------------------------------------- the facts


@pytest.mark.parametrize(("layer", "shape", "how"), [
    (nn.Conv2d(4, 6, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=False), (1, 4, 9, 9), "trace"),
    (nn.Conv2d(4, 6, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=False), (1, 4, 9, 9), "script"),
    (nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=4), (1, 4, 9, 9), "script"),
    (nn.Conv1d(4, 4, 4, padding="same"), (1, 4, 9), "script"),
    (nn.Conv2d(4, 4, 3, padding="valid"), (1, 4, 9, 9), "script"),
    (nn.Conv3d(4, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), groups=2), (1, 4, 3, 8, 8), "trace"),
    (nn.Conv3d(4, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), groups=2), (1, 4, 3, 8, 8), "script"),
    (nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1), (1, 4, 8, 8), "trace"),
    (nn.Linear(4, 3), (2, 4), "trace"),
    (nn.Linear(4, 3), (2, 4), "script"),
])
def test_layer_geometry_is_what_the_module_adapter_reads(layer: nn.Module, shape: tuple[int, ...], how: str) -> None:
    x = torch.randn(shape)
    scripted = torch.jit.script(layer.eval()) if how == "script" else _trace(layer.eval(), x)
    (unit,) = to_graph(freeze(scripted), (x,)).graph.units.values()
    rule, _ = layer_rule(layer, DEFAULT_REGISTRY)
    assert unit.layer is not None and unit.layer.geometry is not None
    assert unit.layer.geometry == geometry(layer, rule)


def test_sums_are_add_ops_and_other_additions_are_not() -> None:
    class Sums(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            a = y + x  # a sum of two tensors of one shape
            b = torch.add(a, x, alpha=2)  # a scaled operand: an add the planner refuses to merge
            c = b + 0  # a constant 0: counts for nothing
            d = c + x.mean(1, keepdim=True)  # a broadcast: no branch sum
            x.add_(1.0)  # writes into the model input, which others read: no sum
            return d * x

    x = torch.randn(1, 3, 4, 4)
    graph = to_graph(freeze(_trace(Sums().eval(), x)), (x.clone(),)).graph
    adds = [(n.label, n.op.kind, n.op.attributes) for n in graph.nodes if n.op is not None and "add" in n.label]
    two = (Operand(input=0), Operand(input=1))
    assert adds == [
        ("the operation aten::add", "add", {"alpha": 1, "scalars": (), "operands": two}),
        ("the operation aten::add", "add", {"alpha": 2, "scalars": (), "operands": two}),
        ("the operation aten::add", "add", {"alpha": 1, "scalars": (0,), "operands": (Operand(input=0),
                                                                                     Operand(number=0.0))}),
        ("the operation aten::add", "other", {}),
        ("the operation aten::add_", "other", {}),
    ]


# ------------------------------------------------------------------------------------------------ merges


class Listed(nn.Module):
    """MobileOne's layout: branches in an ``nn.ModuleList`` and an ``nn.ModuleDict``, which the scripted call stack
    skips (it names called modules only)."""

    def __init__(self) -> None:
        super().__init__()
        self.kxk = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)) for _ in range(2)])
        self.extra = nn.ModuleDict({"scale": nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.extra["scale"](x)
        for branch in self.kxk:
            out = out + branch(x)
        return out


@pytest.mark.parametrize("how", ["trace", "script"])
def test_layers_in_module_lists_are_named_by_their_module_path(how: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    model = calibrated_by_training(Listed(), x)
    scripted = script_or_trace(model, x, how)
    merged, report = fold_script(scripted, example_inputs=x, merge_branches=True)
    module_report = bnfold.report_for(bnfold.fold(model, x, merge_branches=True))
    assert _decisions(report) == _decisions(module_report)
    assert {e.name for e in report.entries} == {"kxk.0.1", "kxk.1.1", "extra.scale.1"}
    assert _merged(report) == _merged(module_report) == {("kxk.0.0", ("extra.scale.0", "kxk.1.0"), ())}
    assert_same_outputs(model, merged, x)



@pytest.mark.parametrize("how", ["trace", "script"])
def test_hand_written_blocks_merge_like_the_module_api(how: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = calibrated_by_training(net(), x)
    scripted = script_or_trace(model, x, how)
    merged, report = fold_script(scripted, example_inputs=x, merge_branches=True)
    module = bnfold.fold(model, x, merge_branches=True)
    module_report = bnfold.report_for(module)
    assert _norms_and_convs(merged) == (count_batch_norm_calls(module, [x]), conv_calls(module, x)) == (0, 5)
    assert _merged(report) == _merged(module_report) and len(report.merges) == 4
    assert _decisions(report) == _decisions(module_report)
    assert report.parameters_after == module_report.parameters_after
    assert_same_outputs(model, merged, x)
    assert_same_outputs(model, _round_trip(merged), x)


@pytest.mark.parametrize("how", ["trace", "script"])
def test_the_preview_lists_the_merges_the_fold_makes_and_leaves_the_module_alone(how: str) -> None:
    """bnfold.plan(merge_branches=True) folds and merges a copy: the real fold's merges, unverified, not applied."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    scripted = script_or_trace(calibrated_by_training(net(), x), x, how)
    graph, state = str(scripted.graph), {k: v.clone() for k, v in scripted.state_dict().items()}
    preview = bnfold.plan(scripted, x, merge_branches=True)
    _, report = fold_script(scripted, example_inputs=x, merge_branches=True)
    assert preview.merges == report.merges and len(_merged(report)) == 4
    assert preview.entries == report.entries and preview.parameters_after == report.parameters_after
    assert not preview.applied and preview.verification is None
    assert str(scripted.graph) == graph and all(torch.equal(v, state[k]) for k, v in scripted.state_dict().items())
    assert bnfold.plan(scripted, x).merges == []


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "repvit_m0_9", "fastvit_t8", "repghostnet_100"])
def test_timm_models_merge_as_far_as_with_the_module_api(name: str) -> None:
    """fastvit_t8: RepMixer's ``x + gamma * (mixer(x) - norm(x))`` (a difference and a layer scale); repghostnet_100:
    ghost modules whose sum is added to the shortcut (split sums). Layer scales of order 1: timm starts them at
    1e-5, where a wrong coefficient would hide in the rounding."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = random_layer_scales(well_conditioned(timm.create_model(name, num_classes=10), x))
    x = x[:1]
    traced = _trace(model, x)
    merged, report = fold_script(traced, example_inputs=x, merge_branches=True)
    module = bnfold.fold(model, x, merge_branches=True)
    module_report = bnfold.report_for(module)

    norms, convs = _norms_and_convs(merged)
    assert norms == count_batch_norm_calls(module, [x]) == 0
    plain_norms, plain_convs = _norms_and_convs(fold_script(traced, example_inputs=x)[0])
    assert convs == conv_calls(module, x) <= plain_convs
    if name == "repghostnet_100":  # each of the 32 ghost modules sums one conv and a norm of its input (16 of them
        assert plain_norms == 32  # plus the shortcut): the merges take the norms
    else:
        assert convs < plain_convs
    assert _merged(report) == _merged(module_report) and _merged(report)
    assert len(report.merges) == len(module_report.merges)  # and as many blocks left (named as each graph names them)
    assert [len(m.kept) for m in report.merges] == [len(m.kept) for m in module_report.merges]  # the same splits
    assert _decisions(report) == _decisions(module_report)
    assert report.parameters_after == module_report.parameters_after
    assert_same_outputs(model, merged, x)
    reloaded = _round_trip(merged)
    with torch.no_grad():
        assert torch.equal(reloaded(x), merged(x))
        comparison = compare_outputs(module(x), merged(x), _SAME_ARITHMETIC)
    assert comparison.passed, comparison.worst()
    untouched = Counter(node.kind() for node in traced.inlined_graph.nodes())  # the caller's module is not changed
    assert untouched["aten::batch_norm"] == count_batch_norm_calls(model, [x]) > 0


@pytest.mark.parametrize("name", ["resnet18"])
def test_a_model_without_branches_to_merge_is_unchanged_by_the_option(name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = calibrated_by_training(getattr(torchvision.models, name)(num_classes=10), x)
    traced = _trace(model, x)
    plain, plain_report = fold_script(traced, example_inputs=x)
    merged, report = fold_script(traced, example_inputs=x, merge_branches=True)
    assert [n.kind() for n in merged.graph.nodes()] == [n.kind() for n in plain.graph.nodes()]
    with torch.no_grad():
        assert torch.equal(plain(x), merged(x))
    assert report.entries == plain_report.entries and report.parameters_after == plain_report.parameters_after
    module_report = bnfold.report_for(bnfold.fold(model, x, merge_branches=True))
    assert [m.status for m in report.merges] == [m.status for m in module_report.merges] == ["left"] * 8



# ---------------------------------------------------------------- differences, scales and split sums


class Spellings(nn.Module):
    """Differences, negations and scales as tracing and scripting write them (``aten::sub`` / ``rsub`` / ``neg`` /
    ``mul``, a number, a 0-d constant, a frozen parameter), and in-place products into a conv's fresh output: one
    whose result is what is read next (``fresh``), and one written as a statement (``read``), after which a scripted
    graph still reads the value before the write (a trace records the value after it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.gamma = nn.Parameter(torch.randn(4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        fresh = self.conv(x).mul_(self.gamma)
        read = self.conv(x)
        read.mul_(self.gamma)
        return torch.stack([y * 0.5, 1 - y, -y, y.sub(x, alpha=2), self.gamma * y, fresh, read])


def _arithmetic(module: torch.jit.ScriptModule, x: torch.Tensor) -> list[tuple[str, str, tuple[Operand, ...] | None]]:
    graph = to_graph(freeze(module), (x,)).graph
    return [(n.label.removeprefix("the operation aten::"), n.op.kind, n.op.attributes.get("operands"))
            for n in graph.nodes if n.op is not None
            and n.label.split("::")[-1].rstrip("_") in ("add", "sub", "rsub", "mul", "neg")]


@pytest.mark.parametrize("how", ["trace", "script"])
def test_differences_negations_and_scales_are_sub_and_mul_with_their_operands(how: str) -> None:
    x = torch.randn(1, 4, 5, 5)
    module = script_or_trace(Spellings().eval(), x, how)
    tensor, gamma = Operand(input=0), Operand(constant="%self.gamma", shape=(4, 1, 1))
    minus_one = ("neg", "mul", (tensor, Operand(number=-1.0)))
    one_minus = [("rsub", "sub", (Operand(number=1.0), tensor))] if how == "trace" else [  # 1 - y
        minus_one, ("add", "add", (tensor, Operand(number=1.0)))]
    assert _arithmetic(module, x) == [
        ("mul_", "mul", (tensor, gamma)),
        ("mul_", "mul", (tensor, gamma)) if how == "trace" else ("mul_", "other", None),
        ("mul", "mul", (tensor, Operand(number=0.5))),
        *one_minus,
        *([minus_one] if how == "trace" else []),  # a script reuses -y
        ("sub", "sub", (tensor, Operand(input=1))),
        ("mul", "mul", (gamma, tensor)),
    ]
    graph = to_graph(freeze(module), (x,)).graph
    (scaled,) = [n for n in graph.nodes if n.op is not None and n.op.kind == "sub"
                 and n.op.attributes.get("operands") == (tensor, Operand(input=1))]
    assert scaled.op is not None and scaled.op.attributes["alpha"] == 2


@pytest.mark.parametrize("how", ["trace", "script"])
def test_repmixer_merges_into_one_depthwise_conv(how: str) -> None:
    """FastViT's RepMixer, ``x + gamma * (mixer(x) - norm(x))``, is one depthwise convolution, as with the module
    API: no subtraction, product or layer scale is left in the graph."""
    fastvit = pytest.importorskip("timm.models.fastvit")
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 12)
    model = random_layer_scales(well_conditioned(fastvit.RepMixer(8), x))
    merged, report = fold_script(script_or_trace(model, x, how), example_inputs=x, merge_branches=True)
    module_report = bnfold.report_for(bnfold.fold(model, x, merge_branches=True))
    assert _merged(report) == _merged(module_report) == {
        ("mixer.conv_kxk.0.conv", ("mixer.conv_scale.conv",), ("input", "mixer.identity", "norm.identity"))}
    assert _decisions(report) == _decisions(module_report)
    assert report.parameters_after == module_report.parameters_after
    kinds = _kinds(merged)
    assert _norms_and_convs(merged) == (0, 1)
    assert not any(kinds[k] for k in ("aten::sub", "aten::mul", "aten::add", "aten::add_"))
    assert not any("gamma" in value.debugName() for value in merged.graph.inputs())
    assert_same_outputs(model, merged, x)
    assert_same_outputs(model, _round_trip(merged), x)


@pytest.mark.parametrize("how", ["trace", "script"])
@pytest.mark.parametrize("shortcut", [True, False])
def test_a_sum_with_a_residual_merges_the_terms_of_one_tensor(how: str, shortcut: bool) -> None:
    """``dw3(x) + dw1(x) + bn(x) + y``: the terms of ``x`` merge into ``dw3``, ``y`` stays added to its output."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    model = calibrated_by_training(Residual(shortcut), x)
    merged, report = fold_script(script_or_trace(model, x, how), example_inputs=x, merge_branches=True)
    module = bnfold.fold(model, x, merge_branches=True)
    module_report = bnfold.report_for(module)
    (merge,) = report.merges
    assert (merge.status, merge.into, merge.layers, merge.identities) == ("merged", "dw3.0", ("dw1.0",), ("bn",))
    conv = "aten::_convolution" if how == "trace" else "aten::conv2d"
    assert len(merge.kept) == 1
    if shortcut:
        assert merge.kept == (f"'shortcut.0' ({conv})",)
    else:
        assert merge.kept[0].endswith(" = aten::repeat")
    assert _merged(report) == _merged(module_report) and _decisions(report) == _decisions(module_report)
    assert _norms_and_convs(merged) == (count_batch_norm_calls(module, [x]), conv_calls(module, x)) == (0, 2 + shortcut)
    assert report.parameters_after == module_report.parameters_after
    assert_same_outputs(model, merged, x)
    assert_same_outputs(model, _round_trip(merged), x)


@pytest.mark.parametrize("how", ["trace", "script"])
def test_differences_negations_and_scales_merge_like_the_module_api(how: str) -> None:
    """``(a - b) * gamma - (-c - bn) * 0.5 + x * beta``: one convolution, as with the module API."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    model = calibrated_by_training(Differences(), x)
    merged, report = fold_script(script_or_trace(model, x.clone(), how), example_inputs=x.clone(),
                                 merge_branches=True)
    module_report = bnfold.report_for(bnfold.fold(model, x.clone(), merge_branches=True))
    assert _merged(report) == _merged(module_report) == {("a", ("b", "c"), ("bn", "input"))}
    assert _norms_and_convs(merged) == (0, 1)
    assert_same_outputs(model, merged, x.clone())


@pytest.mark.parametrize("how", ["trace", "script"])
def test_products_that_are_no_per_channel_constant_are_left_with_their_reason(how: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8)
    conv = "aten::_convolution" if how == "trace" else "aten::conv2d"
    split = "; merging only the terms that read one tensor would remove no layer or norm"
    for model, reasons in (
        (Unmergeable().eval(), [
            f"one of its terms is the operation aten::mul, a product of 'b' ({conv}) and the operation "
            f"aten::sigmoid: a non-constant multiplier{split}",
            f"one of its terms is the operation aten::mul, which multiplies by '%self.positions' of shape (4, 8, 8): "
            f"the scale is not per channel{split}",
        ]),
        (Twice().eval(), [f"it adds the output of 'a' ({conv}) to itself{split}"]),
    ):
        module = script_or_trace(model, x, how)
        merged, report = fold_script(module, example_inputs=x, merge_branches=True)
        assert [m.reason for m in report.merges] == reasons
        assert _kinds(merged) == _kinds(fold_script(module, example_inputs=x)[0])  # nothing rewritten
        assert_same_outputs(model, merged, x)


class ChannelScale(nn.Module):
    """A scale per channel (``scale``) and one of a single axis that is not the channels' (``wrong``, along the
    width): the latter is no per-channel scale of the merged layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.register_buffer("scale", torch.randn(4, 1, 1))
        self.register_buffer("wrong", torch.randn(1, 1, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) * self.scale + self.c(x) * self.wrong


def test_a_scale_along_another_axis_is_left_with_its_reason() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    model = ChannelScale().eval()
    merged, report = fold_script(_trace(model, x), example_inputs=x, merge_branches=True)
    (left,) = report.merges
    assert left.status == "left" and left.reason is not None
    assert "'%self.wrong'" in left.reason and "not per channel" in left.reason
    assert_same_outputs(model, merged, x)


class Strides(nn.Module):
    """A 3x3 stride-2 and a 5x5 stride-1 kernel with outputs of one size (on 8x8): a sum no single kernel computes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(4, 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


class ReadElsewhere(nn.Module):
    """A 3x3 and a 1x1 that would merge, but the 1x1's output is also read by another op."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.b(x)
        return torch.relu(self.a(x) + b) * torch.sigmoid(b)


def test_blocks_that_must_not_merge_are_left_with_the_planners_reason() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8)
    for model, reason in (
        (Strides().eval(), "different strides: 'a' has (2, 2), 'b' has (1, 1)"),
        (ReadElsewhere().eval(), "the output of 'b' (aten::_convolution) is also used by the operation aten::sigmoid; "
                                 "merging only the terms that read one tensor would remove no layer or norm"),
    ):
        traced = _trace(model, x)
        merged, report = fold_script(traced, example_inputs=x, merge_branches=True)
        assert [(m.status, m.reason) for m in report.merges] == [("left", reason)]
        assert _kinds(merged) == _kinds(fold_script(traced, example_inputs=x)[0])  # nothing rewritten
        assert_same_outputs(model, merged, x)
    # the module API leaves the same blocks, with the same reason where the two graphs name things alike
    assert [m.reason for m in bnfold.report_for(bnfold.fold(Strides().eval(), x, merge_branches=True)).merges] == [
        "different strides: 'a' has (2, 2), 'b' has (1, 1)"]
    (left,) = bnfold.report_for(bnfold.fold(ReadElsewhere().eval(), x, merge_branches=True)).merges
    assert left.reason is not None and left.reason.startswith("the output of module 'b' (Conv2d) is also used by")


class InPlace(nn.Module):
    """``out += ...`` into a conv's fresh output is a sum; ``x += ...`` into a tensor another name still reads is not:
    the mutation is part of what the model computes (``seen`` is ``x`` after it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.a(x)
        out += self.b(x)
        x = torch.relu(out)
        seen = x
        x += self.c(x)  # the scripted graph reads the old value's name, `seen`, after this write
        return x * seen


@pytest.mark.parametrize("how", ["trace", "script"])
def test_in_place_sums_merge_only_into_tensors_nobody_else_reads(how: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8)
    model = InPlace().eval()
    scripted = script_or_trace(model, x, how)
    merged, report = fold_script(scripted, example_inputs=x, merge_branches=True)
    assert ("a", ("b",), ()) in _merged(report)
    assert_same_outputs(model, merged, x)
    if how == "script":  # the write into `seen` stays
        assert _merged(report) == {("a", ("b",), ())} and _norms_and_convs(merged) == (0, 2)


def test_without_example_inputs_blocks_still_merge() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = calibrated_by_training(net(), x)
    merged, report = fold_script(_trace(model, x), merge_branches=True)
    assert len(_merged(report)) == 4 and _norms_and_convs(merged) == (0, 5)
    assert_same_outputs(model, merged, x)


# ---------------------------------------------------------------------------------------------- command line


def test_the_command_line_merges_a_torchscript_file(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = well_conditioned(timm.create_model("repvgg_a0", num_classes=10), x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(_trace(model, x[:1]), str(tmp_path / "repvgg.ts"))
    source = tmp_path / "repvgg.ts"
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    shape = ["--input-shape", "1,3,64,64"]
    plain = bnfold_cli("fold", "repvgg.ts", *shape, "-o", "folded.ts", cwd=tmp_path)
    done = bnfold_cli("fold", "repvgg.ts", "--merge-branches", *shape, "-o", "merged.ts", "--json", cwd=tmp_path)
    assert plain.returncode == 0 and done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["format"] == "torchscript" and payload["written_file_check"]["passed"]
    assert [m["status"] for m in payload["report"]["merges"]] == ["merged"] * 22
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        written, folded = torch.jit.load(str(tmp_path / "merged.ts")), torch.jit.load(str(tmp_path / "folded.ts"))
    assert _norms_and_convs(written) == (0, 22 + 1)  # one conv per block, and the classifier
    assert _norms_and_convs(folded)[1] > 23
    assert_same_outputs(model, written, x[:1])
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded.ts", "merged.ts", "repvgg.ts"]
