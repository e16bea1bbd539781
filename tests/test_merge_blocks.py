"""Branch merges block by block (``bnfold.backends.block_merges``): in models torch.fx cannot trace as a whole, and
with ``merge_branches="blocks"`` in models it can, whose class is to be kept.

Checked on hand-written models against the unmerged model's outputs, against the whole-graph merge (the same
convolutions and norms left), and on what stays as it was: the model's class, the modules outside the merged blocks,
the attributes a model's own loop reads, copies and pickles.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import fx, nn

import bnfold
from bnfold.errors import InvalidInputError
from conftest import assert_same_outputs, calibrated_by_training
from helpers.counting import conv_calls, count_batch_norm_calls
from helpers.merge_nets import RepBlock, RepDw, net


class DataDependent(nn.Module):
    """A forward torch.fx cannot trace (a branch on a value), around a block it can."""

    def __init__(self) -> None:
        super().__init__()
        self.block = RepBlock(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.block(x)
        return -self.block(x)


def test_a_block_of_a_model_fx_cannot_trace_merges_and_the_model_keeps_its_class() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8).abs()
    model = calibrated_by_training(DataDependent(), x)
    merged = bnfold.fold(model, x, merge_branches=True)
    assert type(merged) is DataDependent and isinstance(merged.block, fx.GraphModule)
    assert conv_calls(merged, x) == 1 and count_batch_norm_calls(merged, [x]) == 0
    assert_same_outputs(model, merged, x)
    assert_same_outputs(model, merged, -x)  # the other path of the untraceable forward calls the same block
    report = bnfold.report_for(merged)
    (entry,) = report.merges
    assert (entry.status, entry.region, entry.into) == ("merged", "block", "block.kxk.0")
    assert entry.layers == ("block.scale.0",) and entry.identities == ("block.identity",)
    assert any(note.startswith("DataDependent was not merged as a whole, torch.fx cannot trace it (TraceError")
               for note in report.notes)
    assert any("block by block, inside 1 module(s)" in note and note.endswith(": block") for note in report.notes)
    identity = next(e for e in report.entries if e.name == "block.identity")
    assert (identity.status, identity.direction, identity.into) == ("folded", "merge", ("block.kxk.0",))
    assert report.left == []
    assert report.to_dict()["merges"][0]["region"] == "block"
    preview = bnfold.plan(model, x, merge_branches=True)  # folds and merges a copy, as fold() does
    assert preview.merges == report.merges and not preview.applied
    assert type(model.block) is RepBlock  # the model itself is untouched


class SumsInItsOwnCode(nn.Module):
    """The sum of the branches is in the code torch.fx cannot trace: nothing to merge it in."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.a(x) + self.b(x)
        return self.a(x)


def test_a_sum_in_code_fx_cannot_trace_is_not_merged_and_the_notes_say_why() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8).abs()
    model = calibrated_by_training(SumsInItsOwnCode(), x)
    merged = bnfold.fold(model, x, merge_branches=True)
    assert type(merged) is SumsInItsOwnCode and type(merged.a) is nn.Sequential  # nothing replaced
    report = bnfold.report_for(merged)
    assert report.merges == [] and len(report.folded) == 2
    assert any(note.startswith("SumsInItsOwnCode was not merged as a whole, torch.fx cannot") for note in report.notes)
    assert_same_outputs(model, merged, x)


class Sneaky(nn.Module):
    """Traces into a graph without its residual (``torch.jit.isinstance`` is False for a torch.fx Proxy)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = RepBlock(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if torch.jit.isinstance(x, torch.Tensor):
            out = out + x
        return out


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sneaky = Sneaky()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.head(self.sneaky(x))
        return self.head(x)


def test_a_block_whose_trace_is_not_what_it_computes_is_looked_into() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8).abs()
    model = calibrated_by_training(Outer(), x)
    merged = bnfold.fold(model, x, merge_branches=True)
    assert type(merged.sneaky) is Sneaky and isinstance(merged.sneaky.inner, fx.GraphModule)
    assert [(e.status, e.region) for e in bnfold.report_for(merged).merges] == [("merged", "sneaky.inner")]
    notes = bnfold.report_for(merged).notes
    assert any("Sneaky (sneaky: its torch.fx trace is not what it computes" in note for note in notes)
    assert_same_outputs(model, merged, x)


class Layer(nn.Module):
    """What a model's loop reads besides calling it (ultralytics' ``m.f`` and ``m.i``)."""

    def __init__(self, block: nn.Module, source: int, index: int) -> None:
        super().__init__()
        self.block, self.f, self.i = block, source, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Looping(nn.Module):
    """Loops over its layers as ultralytics' models do, keeping outputs in a list."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(Layer(RepBlock(3, 8, stride=2), -1, 0), Layer(RepBlock(8, 8), -1, 1),
                                    Layer(RepDw(8), -1, 2))
        self.bn = nn.BatchNorm2d(8)  # after the last merged block: folds once it is one convolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs: list[torch.Tensor] = []
        for layer in self.layers:
            x = layer(x if layer.f == -1 else outputs[layer.f])
            outputs.append(x)
        last, *_ = self.bn(outputs[-1]).chunk(1)  # unpacks a Proxy: torch.fx cannot trace it (nor ultralytics')
        return last


@pytest.fixture
def looping() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    return calibrated_by_training(Looping(), x), x


def test_merged_blocks_keep_the_attributes_the_models_loop_reads_through_copies_and_pickles(
    looping: tuple[nn.Module, torch.Tensor],
) -> None:
    model, x = looping
    merged = bnfold.fold(model, x, merge_branches=True)
    assert type(merged) is Looping
    layers = list(merged.layers)
    assert all(isinstance(layer, fx.GraphModule) for layer in layers)
    assert [(layer.f, layer.i) for layer in layers] == [(-1, 0), (-1, 1), (-1, 2)]
    assert conv_calls(merged, x) == 3 and count_batch_norm_calls(merged, [x]) == 0  # the last norm folded too
    for other in (copy.deepcopy(merged), _pickled(merged)):
        assert [(layer.f, layer.i) for layer in other.layers] == [(-1, 0), (-1, 1), (-1, 2)]
        assert_same_outputs(model, other, x)
    report = bnfold.report_for(merged)
    assert [e.region for e in report.merges] == ["layers.0", "layers.1", "layers.2"]
    assert report.left == []
    assert next(e for e in report.entries if e.name == "bn").into == ("layers.2.block.conv.0",)


def _pickled(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_blocks_keep_a_traceable_models_class_and_merge_as_far_as_its_whole_graph() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = calibrated_by_training(net(), x)
    whole = bnfold.fold(model, x, merge_branches=True)
    blocks = bnfold.fold(model, x, merge_branches="blocks")
    assert isinstance(whole, fx.GraphModule) and type(blocks) is nn.Sequential
    assert [type(m).__name__ for m in blocks][:4] == ["RepBlock"] * 3 + ["RepDw"]  # GraphModules named by class
    assert all(isinstance(m, fx.GraphModule) for m in list(blocks)[:4])
    assert all(type(a) is type(b) for a, b in zip(list(blocks)[4:], list(model)[4:], strict=True))
    assert conv_calls(blocks, x) == conv_calls(whole, x) == 5
    assert count_batch_norm_calls(blocks, [x]) == count_batch_norm_calls(whole, [x]) == 0
    assert_same_outputs(model, blocks, x)
    assert blocks.state_dict().keys() == whole.state_dict().keys()
    assert bnfold.report_for(blocks).left == []
    assert bnfold.plan(model, x, merge_branches="blocks").merges == bnfold.report_for(blocks).merges


def test_a_block_called_twice_is_left_with_the_reason() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = RepBlock(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(self.block(x))

    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    model = calibrated_by_training(nn.Sequential(Twice()), x)
    merged = bnfold.fold(model, x, merge_branches="blocks")
    assert type(merged[0]) is Twice  # the block traced: its graph calls RepBlock's layers twice, the planner refuses
    assert {(e.region, e.status) for e in bnfold.report_for(merged).merges} == {("0", "left")}
    assert all("is also called at another site" in e.reason for e in bnfold.report_for(merged).merges)

    class Caller(nn.Module):
        def __init__(self, block: nn.Module) -> None:
            super().__init__()
            self.block = block

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # untraceable: the block is found on its own, and called twice
                return self.block(self.block(x))
            return x

    caller = calibrated_by_training(Caller(RepBlock(4, 4)), x.abs())
    merged = bnfold.fold(caller, x.abs(), merge_branches=True)
    report = bnfold.report_for(merged)
    assert report.merges == [] and type(merged.block) is RepBlock
    assert "no branches were merged inside block (RepBlock): it is called 2 times in one forward pass" in report.notes
    assert_same_outputs(caller, merged, x.abs())


def test_a_block_with_forward_hooks_is_not_replaced() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8).abs()
    model = calibrated_by_training(DataDependent(), x)
    seen: list[int] = []
    model.block.register_forward_hook(lambda module, args, output: seen.append(1))
    merged = bnfold.fold(model, x, merge_branches=True)
    assert type(merged.block) is RepBlock
    assert any("it has forward hooks" in note for note in bnfold.report_for(merged).notes)


def test_blocks_need_example_inputs_and_the_option_is_checked() -> None:
    model = net().eval()
    with pytest.raises(InvalidInputError, match="needs example_inputs"):
        bnfold.fold(model, merge_branches="blocks")
    with pytest.raises(InvalidInputError, match="merge_branches must be"):
        bnfold.fold(model, torch.randn(1, 3, 16, 16), merge_branches="graph")  # type: ignore[arg-type]
