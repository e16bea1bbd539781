"""``fold_exported(program, merge_branches=True)`` and ``bnfold fold x.pt2 --merge-branches``: the branch merges of
the module API, on torch.export programs.

Every model is exported with realistic statistics (train-mode passes), folded and merged, and compared with what
``bnfold.fold(module, x, merge_branches=True)`` does to the module it was exported from: the same blocks merged into
the same layers (the core's merge planner decides on both), the same merged weights bit for bit (the core's
arithmetic computes both), as many norms and convolutions left, and the unmerged program's outputs within float32's
fold tolerance (``TOLERANCES[float32]``, 1e-4 relative). float32 and not float64, because a ``.pt2`` is run as it
was exported; the merged kernel is summed in float64 and rounded once, so it differs from the branches only by the
reordered float32 accumulation of the convolution, which is far below that tolerance on a network whose norms keep
activations well scaled (the timm models get gammas near 1 for that, as in test_merge_onnx).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from torch import fx, nn

import bnfold
from bnfold.backends import exported_merges
from bnfold.backends.exported import fold_exported, op_name, to_graph
from bnfold.backends.modules import geometry
from bnfold.backends.pt2_safety import load_exported
from bnfold.core.graph import Operand
from bnfold.layers import CONV_RULE
from bnfold.report import MERGED
from conftest import assert_same_outputs, calibrated_by_training, random_layer_scales, well_conditioned
from helpers.cli import bnfold_cli
from helpers.merge_nets import Differences, Residual, net

_CONVS = frozenset({"conv1d", "conv2d", "conv3d", "convolution", "linear"})
_NORMS = frozenset({"batch_norm", "_native_batch_norm_legit_no_training"})


def _export(model: nn.Module, x: torch.Tensor, **options: object) -> torch.export.ExportedProgram:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, (x,), **options)  # type: ignore[arg-type]


def _count(program: torch.export.ExportedProgram, names: frozenset[str]) -> int:
    return sum(op_name(node) in names for node in program.graph.nodes)


def _merges(report: bnfold.FoldReport) -> list[tuple[str, str | None, tuple[str, ...], tuple[str, ...]]]:
    """The merge entries without the block names (those are each graph's node names)."""
    return sorted((m.status, m.into, m.layers, m.identities) for m in report.merges)


def _module_counts(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Norms and convolution / linear calls of a module, counted on its own export (the same ops as the program)."""
    program = _export(model, x)
    return _count(program, _NORMS), _count(program, _CONVS)


def merge_and_check(model: nn.Module, x: torch.Tensor) -> tuple[torch.export.ExportedProgram, bnfold.FoldReport]:
    """Export ``model``, fold and merge the program; assert what the module docstring says; return both."""
    program = _export(model, x)
    graph_before = str(program.graph)
    state_before = {k: v.clone() for k, v in program.state_dict.items()}
    merged, report = fold_exported(program, merge_branches=True)
    module = bnfold.fold(model, x, merge_branches=True)
    module_report = bnfold.report_for(module)
    assert _merges(report) == _merges(module_report)
    assert {e.name: (e.status, e.into, e.direction) for e in report.entries} == {
        e.name: (e.status, e.into, e.direction) for e in module_report.entries}
    assert (_count(merged, _NORMS), _count(merged, _CONVS)) == _module_counts(module, x)
    module_state = module.state_dict()
    for entry in report.merges:
        if entry.status == MERGED:  # the same arithmetic: the merged layer's weights equal the module API's
            assert entry.into is not None
            for tensor in ("weight", "bias"):
                assert torch.equal(merged.state_dict[f"{entry.into}.{tensor}"], module_state[f"{entry.into}.{tensor}"])
    assert_same_outputs(program.module(), merged.module(), x)
    # the state_dict and the graph signature hold what the graph reads, and nothing else
    signature = merged.graph_signature
    read = set(signature.inputs_to_parameters.values()) | set(signature.inputs_to_buffers.values())
    assert read == set(merged.state_dict)
    assert report.parameters_after == sum(p.numel() for p in merged.parameters())
    assert str(program.graph) == graph_before  # the input program is untouched
    assert all(torch.equal(v, program.state_dict[k]) for k, v in state_before.items())
    return merged, report


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------ blocks


def test_every_branch_kind_merges_as_with_the_module_api() -> None:
    x = _x(1, 3, 16, 16)
    model = calibrated_by_training(net(), _x(2, 3, 16, 16))
    merged, report = merge_and_check(model, x)
    assert [m.status for m in report.merges] == [MERGED] * 4
    assert _count(merged, _NORMS) == 0 and _count(merged, _CONVS) == 4 + 1  # a conv per block, and the classifier
    assert not any(op_name(node) in ("add", "add_") for node in merged.graph.nodes)
    entries = {e.name: e for e in report.entries}
    assert (entries["1.identity"].direction, entries["1.identity"].into) == ("merge", ("1.kxk.0",))
    assert entries["3.bn"].into == ("3.conv.0",)  # folded into the merged conv in the round after the merge
    assert not any(key.startswith(("0.scale", "1.identity", "3.conv1")) for key in merged.state_dict)


def test_the_preview_lists_the_merges_the_fold_makes_and_leaves_the_program_alone() -> None:
    """bnfold.plan(merge_branches=True) folds and merges a copy: the real fold's merges, unverified, not applied."""
    x = _x(1, 3, 16, 16)
    program = _export(calibrated_by_training(net(), _x(2, 3, 16, 16)), x)
    graph, state = str(program.graph), {k: v.clone() for k, v in program.state_dict.items()}
    preview = bnfold.plan(program, merge_branches=True)
    _, report = fold_exported(program, merge_branches=True)
    assert preview.merges == report.merges and [m.status for m in report.merges] == [MERGED] * 4
    assert preview.entries == report.entries and preview.parameters_after == report.parameters_after
    assert not preview.applied and preview.verification is None
    assert str(program.graph) == graph and all(torch.equal(v, program.state_dict[k]) for k, v in state.items())
    assert bnfold.plan(program).merges == []


def test_a_decomposed_program_merges_its_convolution_nodes_and_tuple_valued_norms() -> None:
    x = _x(1, 3, 16, 16)
    program = _export(calibrated_by_training(net(), _x(2, 3, 16, 16)), x).run_decompositions()
    assert {op_name(node) for node in program.graph.nodes} >= {"convolution", "_native_batch_norm_legit_no_training"}
    merged, report = fold_exported(program, merge_branches=True)
    assert [(m.status, m.into, m.layers, m.identities) for m in report.merges] == [
        (MERGED, "0.kxk.0", ("0.scale.0",), ()), (MERGED, "1.kxk.0", ("1.scale.0",), ("1.identity",)),
        (MERGED, "2.kxk.0", ("2.scale.0",), ("2.identity",)), (MERGED, "3.conv.0", ("3.conv1",), ("input",))]
    names = [op_name(node) for node in merged.graph.nodes]
    assert names.count("convolution") == 4 and "getitem" not in names and _count(merged, _NORMS) == 0
    assert_same_outputs(program.module(), merged.module(), x)


def test_without_the_option_nothing_merges() -> None:
    x = _x(1, 3, 16, 16)
    program = _export(calibrated_by_training(net(), _x(2, 3, 16, 16)), x)
    folded, report = fold_exported(program)
    assert report.merges == [] and _count(folded, _CONVS) == 9 and _count(folded, _NORMS) == 3


class Dilated(nn.Module):
    """A 3x3 and a dilated 3x3 of one input (same output shape), summed: not one kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.a(x) + self.b(x))


class Scaled(nn.Module):
    """``torch.add(a, b, alpha=2)``: a sum of branches only with alpha 1."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(self.a(x), self.b(x), alpha=2)


class RowScaled(nn.Module):
    """``(a(x) + b(x)) * g`` with ``g`` of one value per row (shape (1, 1, H, 1)): not a scale per channel."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.g = nn.Parameter(torch.randn(1, 1, 8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a(x) + self.b(x)) * self.g


class Gated(nn.Module):
    """``a(x) - b(x) * sigmoid(x)``: a product by a computed tensor (a gate), no constant scale."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) - self.b(x) * torch.sigmoid(x)


@pytest.mark.parametrize(("make", "reason"), [
    (Dilated, "different dilations: 'a.0' has (1, 1), 'b.0' has (2, 2)"),
    (Scaled, "scales an operand by alpha=2"),
])
def test_a_block_that_must_not_merge_is_left_with_the_planners_reason(make: Callable[[], nn.Module],
                                                                      reason: str) -> None:
    x = _x(2, 4, 8, 8)
    model = calibrated_by_training(make(), x)
    merged, report = merge_and_check(model, x)
    (entry,) = report.merges
    assert entry.status == "left" and entry.reason is not None and entry.reason.endswith(reason)
    (module_entry,) = bnfold.report_for(bnfold.fold(model, x, merge_branches=True)).merges
    assert module_entry.reason is not None and module_entry.reason.endswith(reason)  # an op is named per format
    assert _count(merged, _CONVS) == 2 and any(op_name(node) == "add" for node in merged.graph.nodes)


@pytest.mark.parametrize(("make", "reason"), [
    (RowScaled, "multiplies by 'g' of shape (1, 1, 8, 1): the scale is not per channel of 'a' (4 channels on axis 1)"),
    (Gated, "a non-constant multiplier; merging only the terms that read one tensor would remove no layer or norm"),
])
def test_a_product_that_is_no_per_channel_constant_is_left_with_the_planners_reason(
        make: Callable[[], nn.Module], reason: str) -> None:
    x = _x(2, 4, 8, 8)
    model = calibrated_by_training(make(), x)
    merged, report = merge_and_check(model, x)
    (entry,) = report.merges
    assert entry.status == "left" and entry.reason is not None and entry.reason.endswith(reason)
    assert "aten.mul (%mul)" in entry.reason  # the product, named as the program calls it
    assert _count(merged, _CONVS) == 2 and any(op_name(node) == "mul" for node in merged.graph.nodes)


class Broadcast(nn.Module):
    """A 1x1 conv's (N, C, 1, 1) output added to a 3x3 conv's (N, C, H, W): a broadcast, not a sum of branches."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x.mean((2, 3), keepdim=True))


def test_an_add_is_a_sum_for_the_planner_only_of_same_shaped_tensors() -> None:
    x = _x(1, 4, 6, 6)
    kinds = {node.label: node.op.kind for node in to_graph(_export(Broadcast().eval(), x).module()).graph.nodes
             if node.op is not None and "aten.add" in node.label}
    assert list(kinds.values()) == ["other"]
    scaled = to_graph(_export(Scaled().eval(), x).module()).graph
    (add,) = [node.op for node in scaled.nodes if node.op is not None and node.op.kind == "add"]
    assert add.attributes == {"alpha": 2, "scalars": (), "operands": (Operand(input=0), Operand(input=1))}


class BroadcastArithmetic(nn.Module):
    """Differences and products that broadcast or promote a term: none is a linear combination of its terms."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.wide = nn.Parameter(torch.randn(1, 4, 6, 6))
        self.register_buffer("g64", torch.randn(4, 1, 1, dtype=torch.float64))
        self.g = nn.Parameter(torch.randn(4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, pooled = self.a(x), self.b(x.mean((2, 3), keepdim=True))
        broadcast_difference = y - pooled  # (N, 4, 6, 6) - (N, 4, 1, 1)
        broadcast_product = pooled * self.wide  # the scaled term grows to (N, 4, 6, 6)
        promoted = y * self.g64  # float32 * float64 -> float64
        return broadcast_difference + broadcast_product + promoted.float() + y * self.g


def test_differences_and_products_that_broadcast_or_promote_their_term_are_other_ops() -> None:
    graph = to_graph(_export(BroadcastArithmetic().eval(), _x(1, 4, 6, 6)).module()).graph
    kinds = [(node.label.split(" (")[0], node.op.kind) for node in graph.nodes
             if node.op is not None and node.label.startswith(("the operation aten.sub", "the operation aten.mul"))]
    assert kinds == [("the operation aten.sub", "other"), ("the operation aten.mul", "other"),
                     ("the operation aten.mul", "other"), ("the operation aten.mul", "mul")]
    (scale,) = [node.op for node in graph.nodes if node.op is not None and node.op.kind == "mul"]
    assert scale.attributes == {"operands": (Operand(input=0), Operand(input=1, constant="g", shape=(4, 1, 1)))}


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Conv2d(4, 4, (3, 5), padding="same", dilation=(1, 2), groups=2),
    nn.Conv2d(4, 4, 3, padding="valid"), nn.Conv1d(4, 4, 5, padding=2), nn.Conv3d(2, 2, 3, padding=(0, 1, 1)),
    nn.ConvTranspose2d(4, 4, 3, stride=2),
], ids=["strided", "same", "valid", "conv1d", "conv3d", "transposed"])
def test_conv_geometry_is_read_as_the_module_api_reads_it(conv: nn.Module) -> None:
    x = _x(1, conv.in_channels, *([8] * (conv.weight.dim() - 2)))
    (unit,) = [u for u in to_graph(_export(conv.eval(), x).module()).graph.units.values()]
    assert unit.layer is not None and unit.layer.geometry == geometry(conv, CONV_RULE)


# -------------------------------------------------------------------------------------------- timm models


@pytest.mark.parametrize("name", ["mobileone_s0", "repvgg_a0", "repvit_m0_9"])
def test_timm_models_merge_to_the_module_apis_norm_and_conv_counts(name: str) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    x = _x(2, 3, 64, 64)
    model = well_conditioned(timm.create_model(name, num_classes=10), x)
    merged, report = merge_and_check(model, x[:1])
    assert report.left == [] and _count(merged, _NORMS) == 0
    assert sum(m.status == MERGED for m in report.merges) > 10


def test_resnet18_is_unchanged_by_the_option() -> None:
    x = _x(1, 3, 32, 32)
    model = calibrated_by_training(torchvision.models.resnet18(num_classes=10), _x(2, 3, 32, 32))
    program = _export(model, x)
    plain, plain_report = fold_exported(program)
    merged, report = fold_exported(program, merge_branches=True)
    assert str(merged.graph) == str(plain.graph)
    assert merged.state_dict.keys() == plain.state_dict.keys()
    assert all(torch.equal(merged.state_dict[k], v) for k, v in plain.state_dict.items())
    assert [e for e in report.entries] == plain_report.entries
    assert len(report.merges) == 8 and all(m.status == "left" and m.reason for m in report.merges)  # the residuals
    module_reasons = sorted(m.reason or "" for m in bnfold.report_for(bnfold.fold(model, x, merge_branches=True)).merges)
    assert len(module_reasons) == 8


# ------------------------------------------------------------------------------------------------- files


def test_the_merged_program_saves_loads_safely_and_keeps_its_dynamic_batch(tmp_path: Path) -> None:
    x = _x(2, 3, 16, 16)
    model = calibrated_by_training(net(), x)
    batch = torch.export.Dim("batch", min=1, max=8)
    merged, report = fold_exported(_export(model, x, dynamic_shapes=({0: batch},)), merge_branches=True)
    assert [m.status for m in report.merges] == [MERGED] * 4 and not report.notes
    torch.export.save(merged, tmp_path / "merged.pt2")
    loaded = load_exported(tmp_path / "merged.pt2")  # bnfold's own checks: nothing in it would run code
    assert isinstance(loaded.module(), fx.GraphModule) and _count(loaded, _CONVS) == 5
    assert_same_outputs(model, loaded.module(), _x(5, 3, 16, 16))


class InPlace(nn.Module):
    """``h.add_(conv(h))``: an in-place sum of a branch and its input; with ``view``, a view of ``h`` read after it
    (which sees the sum at run time, through the shared storage)."""

    def __init__(self, view: bool) -> None:
        super().__init__()
        self.a, self.view = nn.Conv2d(4, 4, 3, padding=1), view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x)
        flat = h.view(-1) if self.view else None
        out = h.add_(self.a(h))
        return out * 2 if flat is None else out * flat.view(out.shape)


def test_an_in_place_add_merges_only_where_no_view_of_the_overwritten_tensor_is_read() -> None:
    torch.manual_seed(0)
    x = _x(1, 4, 6, 6)
    program = _export(InPlace(view=False).eval(), x)
    merged, report = fold_exported(program, merge_branches=True)
    assert [(m.status, m.into, m.identities) for m in report.merges] == [(MERGED, "a", ("input",))]
    assert_same_outputs(program.module(), merged.module(), x)
    model = InPlace(view=True).eval()
    program = _export(model, x)
    left, report = fold_exported(program, merge_branches=True)
    assert report.merges == [] and _count(left, _CONVS) == 1  # not a sum the planner may take apart
    assert_same_outputs(program.module(), left.module(), x)


class ZeroBuffer(nn.Module):
    """Two branches and a stored all-zero tensor, summed (the ``identity = 0`` of a block without an identity
    branch, kept as a buffer): the zero counts for nothing, as the scalar 0 does."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.register_buffer("zero", torch.zeros(1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.zero + self.b(x) + 0


def test_a_stored_zero_and_a_scalar_zero_count_for_nothing_in_a_sum() -> None:
    torch.manual_seed(0)
    x = _x(1, 4, 6, 6)
    program = _export(ZeroBuffer().eval(), x)
    merged, report = fold_exported(program, merge_branches=True)
    assert [(m.status, m.into, m.layers) for m in report.merges] == [(MERGED, "a", ("b",))]
    assert set(merged.state_dict) == {"a.weight", "a.bias"}  # the zero is read by nothing any more
    assert_same_outputs(program.module(), merged.module(), x)


def test_cli_merges_a_pt2_file_and_leaves_the_input_as_it_was(tmp_path: Path) -> None:
    x = _x(2, 3, 16, 16)
    model = calibrated_by_training(net(), x)
    source = tmp_path / "net.pt2"
    torch.export.save(_export(model, x[:1]), source)
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    done = bnfold_cli("fold", "net.pt2", "--merge-branches", "-o", "merged.pt2", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert [m["status"] for m in payload["report"]["merges"]] == [MERGED] * 4
    assert payload["report"]["verification"]["passed"] and payload["written_file_check"]["passed"]
    written = load_exported(tmp_path / "merged.pt2")
    assert _count(written, _NORMS) == 0 and _count(written, _CONVS) == 5
    assert_same_outputs(model, written.module(), x[:1])
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.pt2", "net.pt2"]


# ------------------------------------------------------------------ differences, scales and split sums


@pytest.mark.parametrize(("name", "blocks"), [("fastvit_t8", 10), ("repghostnet_100", 16)])
def test_fastvit_and_repghostnet_merge_to_the_module_apis_norm_and_conv_counts(name: str, blocks: int) -> None:
    """fastvit_t8: every RepMixer, ``x + gamma * (mixer(x) - norm(x))``, becomes one depthwise convolution;
    repghostnet_100: each second ghost module's sum merges with the shortcut kept added to it (a split). As the
    module API does it: no norm left, as many convolutions, the same merged weights; layer scales of order 1 (timm
    starts them at 1e-5, where a wrong coefficient would hide in the rounding)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    x = _x(2, 3, 64, 64)
    model = random_layer_scales(well_conditioned(timm.create_model(name, num_classes=10), x))
    merged, report = merge_and_check(model, x[:1])
    assert report.left == [] and _count(merged, _NORMS) == 0
    merged_blocks = [m for m in report.merges if m.status == MERGED]
    if name == "fastvit_t8":
        mixers = [m for m in merged_blocks if "norm.identity" in "".join(m.identities)]
        assert len(mixers) == blocks and all(m.kept == () for m in mixers)
        assert not any(key.endswith("token_mixer.layer_scale.gamma") for key in merged.state_dict)
        assert not any(op_name(node) == "sub" for node in merged.graph.nodes)  # one per RepMixer before
    else:
        split = [m for m in merged_blocks if m.kept]
        assert len(split) == blocks and all("ghost2" in (m.into or "") for m in split)
        assert all(m.status == MERGED for m in report.merges)


def test_repmixer_becomes_one_depthwise_convolution() -> None:
    fastvit = pytest.importorskip("timm.models.fastvit")
    torch.manual_seed(0)
    x = _x(2, 8, 12, 12)
    model = random_layer_scales(calibrated_by_training(fastvit.RepMixer(8), x))
    merged, report = merge_and_check(model, x)
    (merge,) = report.merges
    assert (merge.status, merge.into, merge.layers, merge.kept) == (
        MERGED, "mixer.conv_kxk.0.conv", ("mixer.conv_scale.conv",), ())
    assert merge.identities == ("input", "mixer.identity", "norm.identity")
    assert [n.op for n in merged.module().graph.nodes if n.op != "get_attr"] == [
        "placeholder", "call_module", "call_function", "output"]  # the guards, one convolution
    assert set(merged.state_dict) == {"mixer.conv_kxk.0.conv.weight", "mixer.conv_kxk.0.conv.bias"}


class Spellings(nn.Module):
    """A difference, a reversed difference, negations and scales (by a number, a parameter, a buffer) in the
    in-place forms the adapter accepts: each on a tensor of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gamma = nn.Parameter(torch.randn(1, 4, 1, 1))
        self.register_buffer("beta", torch.randn(4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(x)
        first = (self.a(x) - self.b(x)).mul_(self.gamma)  # sub, then mul_ on the difference
        second = torch.rsub(self.bn(x), self.c(x).neg_()) * 0.5  # (-c - bn) * 0.5: rsub, neg_, a number
        third = torch.neg(x * self.beta)  # -(x * beta)
        return (first - second).sub_(third)


def test_differences_negations_and_scales_merge_as_with_the_module_api() -> None:
    torch.manual_seed(0)
    x = _x(2, 4, 8, 8)
    merged, report = merge_and_check(calibrated_by_training(Spellings(), x), x)
    (merge,) = report.merges
    assert merge.status == MERGED and {merge.into, *merge.layers} == {"a", "b", "c"}
    assert merge.identities == ("bn", "input") and merge.kept == ()
    assert _count(merged, _CONVS) == 1 and _count(merged, _NORMS) == 0
    assert set(merged.state_dict) == {"a.weight", "a.bias"}  # gamma, beta, b, c and bn are read by nothing


class LiftedScale(nn.Module):
    """A layer scale written as a tensor literal in ``forward``: a lifted constant of the program, read through
    ``lift_fresh_copy`` and a ``view``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.a(x) + self.b(x)) * torch.tensor([0.5, -1.5, 2.0, 0.25]).view(4, 1, 1)


def test_a_scale_by_a_lifted_constant_merges_and_leaves_the_program() -> None:
    torch.manual_seed(0)
    x = _x(1, 4, 8, 8)
    program = _export(LiftedScale().eval(), x)
    assert program.constants  # the literal
    merged, report = fold_exported(program, merge_branches=True)
    assert [(m.status, m.into, m.layers, m.identities) for m in report.merges] == [(MERGED, "a", ("b",), ("input",))]
    assert not merged.constants and set(merged.state_dict) == {"a.weight", "a.bias"}
    assert [op_name(n) for n in merged.graph.nodes if n.op == "call_function"] == ["conv2d"]
    assert_same_outputs(program.module(), merged.module(), x)


def test_an_in_place_scale_of_the_tensor_the_branches_read_merges_where_its_reads_come_first() -> None:
    """``x.mul_(beta)`` after the branches read ``x``: the program says which reads see which value (later reads
    read the ``mul_`` node), so the product is the identity branch scaled by ``beta``; the module API, whose fx
    graph does not say it, keeps the product as a term."""
    torch.manual_seed(0)
    x = _x(2, 4, 8, 8)
    model = calibrated_by_training(Differences(overwrite_input=True), x)
    program = _export(model, x)
    merged, report = fold_exported(program, merge_branches=True)
    (merge,) = report.merges
    assert merge.status == MERGED and merge.identities == ("bn", "input") and merge.kept == ()
    assert _count(merged, _CONVS) == 1
    assert_same_outputs(program.module(), merged.module(), x)


class OverwrittenInput(nn.Module):
    """``x.mul_(gamma)`` on the program's input: not a tensor of its own, so no scale of a term."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.gamma = nn.Parameter(torch.randn(4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) + x.mul_(self.gamma)


def test_an_in_place_product_that_overwrites_an_input_is_no_scale() -> None:
    x = _x(1, 4, 6, 6)
    graph = to_graph(_export(OverwrittenInput().eval(), x.clone()).module()).graph
    assert [n.op.kind for n in graph.nodes if n.op is not None and "aten.mul_" in n.label] == ["other"]


@pytest.mark.parametrize("shortcut", [True, False])
def test_a_sum_with_a_residual_merges_the_terms_of_one_tensor_and_saves(shortcut: bool, tmp_path: Path) -> None:
    """RepGhost's second ghost module: ``dw3(x) + dw1(x) + bn(x)`` merges into ``dw3``, the shortcut ``y`` (a
    convolution of the block input, or a ``repeat`` of it) stays added to its output in a new ``aten.add``; the
    program saves and loads back through bnfold's checks."""
    torch.manual_seed(0)
    x = _x(2, 4, 8, 8)
    model = calibrated_by_training(Residual(shortcut), x)
    merged, report = merge_and_check(model, x)
    (merge,) = report.merges
    assert (merge.status, merge.into, merge.layers, merge.identities) == (MERGED, "dw3.0", ("dw1.0",), ("bn",))
    assert len(merge.kept) == 1
    graph = merged.module().graph
    (add,) = [n for n in graph.nodes if op_name(n) in ("add", "add_")]
    assert op_name(add.args[0]) == "conv2d" and add.args[0].args[1].target == "dw3.0.weight"
    assert op_name(add.args[1]) == ("conv2d" if shortcut else "repeat")
    torch.export.save(merged, tmp_path / "merged.pt2")
    loaded = load_exported(tmp_path / "merged.pt2")
    assert _count(loaded, _CONVS) == 2 + shortcut and _count(loaded, _NORMS) == 0
    assert_same_outputs(model, loaded.module(), x)


def test_a_split_whose_kept_terms_cannot_be_told_is_left_with_its_weights_as_they_were(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every check comes before the merged weights are written: a block left at the last check computes what it
    computed (a merge written into the layer without the graph's rewrite would count the other branches twice)."""
    torch.manual_seed(0)
    x = _x(2, 4, 8, 8)
    program = _export(calibrated_by_training(Residual(True), x), x)
    monkeypatch.setattr(exported_merges, "_kept_terms", lambda *args: None)
    merged, report = fold_exported(program, merge_branches=True)
    plain, _ = fold_exported(program)
    (entry,) = report.merges
    assert entry.status == "left" and entry.reason == "bnfold cannot tell which nodes the terms left after the merge are"
    assert torch.equal(merged.state_dict["dw3.0.weight"], plain.state_dict["dw3.0.weight"])
    assert_same_outputs(program.module(), merged.module(), x)
