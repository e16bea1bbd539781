"""``bnfold.onnx.fold(path, merge_branches=True)``: the same branch merges as the module API, on ONNX files.

Exported models are folded and merged, checked in onnxruntime against the original (the ONNX backend's own
verification, at float32's tolerance), and the number of norms and convolutions left is compared with what
``bnfold.fold(module, merge_branches=True)`` leaves.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold import onnx as bnfold_onnx
from bnfold.core.graph import Geometry
from bnfold.onnx.adapter import conv_geometry
from conftest import calibrated_by_training, random_layer_scales, well_conditioned
from helpers.counting import conv_calls, count_batch_norm_calls
from helpers.merge_nets import net
from helpers.onnx_oracle import assert_same_outputs


def export(model: torch.nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, input_names=["x"], output_names=["y"], do_constant_folding=False,
                          dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    ops = [node.op_type for node in model.graph.node]
    return {op: ops.count(op) for op in ("BatchNormalization", "Conv", "Add")}


def test_exported_blocks_merge_like_the_module_api() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = calibrated_by_training(net(), x)
    exported = export(model, x[:1])
    plain = bnfold_onnx.fold(exported)
    merged = bnfold_onnx.fold(exported, merge_branches=True)
    assert op_counts(plain.model) == {"BatchNormalization": 3, "Conv": 8, "Add": 8}
    assert op_counts(merged.model) == {"BatchNormalization": 0, "Conv": 4, "Add": 0}
    report = merged.report
    assert_same_outputs(exported, merged.model)
    assert [m.status for m in report.merges] == ["merged"] * 4 and plain.report.merges == []
    assert report.left == [] and report.parameters_after < plain.report.parameters_after
    module = bnfold.fold(model, x, merge_branches=True)
    assert count_batch_norm_calls(module, [x]) == 0 and conv_calls(module, x) == 4 + 1  # + the classifier


def test_the_preview_lists_the_merges_the_fold_makes_and_leaves_the_model_alone(tmp_path: Path) -> None:
    """bnfold.onnx.plan and bnfold.plan, of a ModelProto or a file, with merge_branches=True: the merges of the real
    fold of a copy, unverified, not applied; the model and the file as they were."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    exported = export(calibrated_by_training(net(), x), x[:1])
    before = exported.SerializeToString()
    path = tmp_path / "net.onnx"
    path.write_bytes(before)
    report = bnfold_onnx.fold(exported, merge_branches=True).report
    assert [m.status for m in report.merges] == ["merged"] * 4 and report.verification is not None
    for preview in (bnfold_onnx.plan(exported, merge_branches=True), bnfold.plan(exported, merge_branches=True),
                    bnfold_onnx.plan(path, merge_branches=True), bnfold.plan(path, merge_branches=True)):
        assert preview.merges == report.merges and preview.entries == report.entries
        assert preview.parameters_after == report.parameters_after
        assert not preview.applied and preview.verification is None
    assert exported.SerializeToString() == before and path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["net.onnx"]
    assert bnfold_onnx.plan(exported).merges == []


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0"])
def test_timm_models_merge_in_onnx_as_far_as_with_the_module(name: str) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = well_conditioned(timm.create_model(name, num_classes=10), x)
    exported = export(model, x[:1])
    merged = bnfold_onnx.fold(exported, merge_branches=True)
    assert_same_outputs(exported, merged.model)
    module = bnfold.fold(model, x, merge_branches=True)
    counts = op_counts(merged.model)
    assert counts["BatchNormalization"] == count_batch_norm_calls(module, [x]) == 0
    assert counts["Conv"] + 1 == conv_calls(module, x)  # the classifier is a Gemm in ONNX


def _two_conv_graph(strides: tuple[int, int]) -> onnx.ModelProto:
    generator = torch.Generator().manual_seed(0)
    inits = [numpy_helper.from_array(torch.randn(4, 4, k, k, generator=generator).numpy(), f"w{k}") for k in (3, 1)]
    nodes = [
        helper.make_node("Conv", ["x", "w3"], ["a"], name="conv3", pads=[1, 1, 1, 1], strides=[strides[0]] * 2),
        helper.make_node("Conv", ["x", "w1"], ["b"], name="conv1", strides=[strides[1]] * 2),
        helper.make_node("Add", ["a", "b"], ["y"], name="sum"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_hand_built_graph_merges_or_says_why_not() -> None:
    original = _two_conv_graph((1, 1))
    merged = bnfold_onnx.fold(original, merge_branches=True)
    assert op_counts(merged.model) == {"BatchNormalization": 0, "Conv": 1, "Add": 0}
    assert merged.model.graph.node[0].output[0] == "y"  # the merged conv writes the graph output
    assert_same_outputs(original, merged.model)
    left = bnfold_onnx.fold(_two_conv_graph((1, 2)), merge_branches=True)
    assert op_counts(left.model)["Conv"] == 2
    (entry,) = left.report.merges
    assert entry.status == "left" and entry.reason == "different strides: 'conv3' has (1, 1), 'conv1' has (2, 2)"


def test_conv_geometry_reads_pads_and_auto_pad() -> None:
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[0, 1, 2, 3], dilations=[1, 2], group=2)
    assert conv_geometry(node, (4, 2, 3, 3), None) == Geometry((3, 3), (1, 1), ((0, 2), (1, 3)), (1, 2), 2)
    same = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])
    # input 8: output 4, total padding (4 - 1) * 2 + 4 - 8 = 2 for a 4-wide kernel: 1 before, 1 after
    assert conv_geometry(same, (4, 4, 4, 4), (1, 4, 8, 8)).padding == ((1, 1), (1, 1))  # type: ignore[union-attr]
    lower = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_LOWER")
    assert conv_geometry(lower, (4, 4, 2, 2), (1, 4, 8, 8)).padding == ((1, 0), (1, 0))  # type: ignore[union-attr]
    # at stride 1 the total is dilation * (kernel - 1) whatever the input's size
    assert conv_geometry(lower, (4, 4, 2, 2), None).padding == ((1, 0), (1, 0))  # type: ignore[union-attr]
    assert conv_geometry(same, (4, 4, 4, 4), None) is None  # strided, unknown input shape: unknown geometry


def test_two_gemms_reading_one_input_merge_into_one() -> None:
    """RepViT's classifier sums two heads of one feature vector: one Gemm (transB=1, any alpha / beta) after."""
    generator = torch.Generator().manual_seed(0)
    inits = [numpy_helper.from_array(torch.randn(3, 5, generator=generator).numpy(), name) for name in ("wa", "wb")]
    inits += [numpy_helper.from_array(torch.randn(3, generator=generator).numpy(), name) for name in ("ba", "bb")]
    nodes = [
        helper.make_node("Gemm", ["x", "wa", "ba"], ["a"], name="head", transB=1),
        helper.make_node("Gemm", ["x", "wb", "bb"], ["b"], name="head_dist", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Add", ["a", "b"], ["s"], name="sum"),
        helper.make_node("Relu", ["s"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    merged = bnfold_onnx.fold(original, merge_branches=True)
    assert [node.op_type for node in merged.model.graph.node] == ["Gemm", "Relu"]
    assert_same_outputs(original, merged.model)
    assert [(m.into, m.layers) for m in merged.report.merges] == [("head", ("head_dist",))]


# ------------------------------------------------------------------ differences, scales and split sums


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def test_exported_repmixer_is_one_conv() -> None:
    """x + gamma * (mixer(x) - norm(x)) as the exporter writes it (Sub, Mul by a (C, 1, 1) initializer, Add)."""
    fastvit = pytest.importorskip("timm.models.fastvit")
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 12)
    model = calibrated_by_training(fastvit.RepMixer(8), x)
    with torch.no_grad():
        model.layer_scale.gamma.copy_(0.5 * torch.randn(8, 1, 1))
    exported = export(model, x[:1])
    assert {"Sub", "Mul"} <= set(op_types(exported))
    merged = bnfold_onnx.fold(exported, merge_branches=True)
    assert op_types(merged.model) == ["Conv"] and merged.model.graph.node[0].output[0] == "y"
    assert [i.name for i in merged.model.graph.initializer if "gamma" in i.name] == []  # the scale went into it
    report = merged.report
    assert_same_outputs(exported, merged.model)
    (entry,) = report.merges
    assert entry.status == "merged" and len(entry.identities) == 3 and entry.kept == ()


@pytest.mark.parametrize("name", ["fastvit_t8", "repghostnet_100"])
def test_fastvit_and_repghostnet_merge_in_onnx_as_far_as_with_the_module(name: str) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = random_layer_scales(well_conditioned(timm.create_model(name, num_classes=10), x))
    exported = export(model, x[:1])
    merged = bnfold_onnx.fold(exported, merge_branches=True)
    assert_same_outputs(exported, merged.model)
    module = bnfold.fold(model, x, merge_branches=True)
    counts = op_counts(merged.model)
    assert counts["BatchNormalization"] == count_batch_norm_calls(module, [x]) == 0
    assert counts["Conv"] + 1 == conv_calls(module, x)  # the classifier is a Gemm in ONNX
    module_blocks = sorted((m.into, m.status, len(m.kept)) for m in bnfold.report_for(module).merges
                           if m.status == "merged")
    onnx_merged = [m for m in merged.report.merges if m.status == "merged"]
    assert len(onnx_merged) == len(module_blocks)
    assert sorted(len(m.kept) for m in onnx_merged) == sorted(kept for _, _, kept in module_blocks)
    assert "Sub" not in op_types(merged.model)


def _combination_graph(gamma_shape: tuple[int, ...], residual: bool) -> onnx.ModelProto:
    """``-(conv3(x) - conv1(x)) * gamma + Neg(... )`` plus, optionally, the graph input ``r`` added as a residual."""
    generator = torch.Generator().manual_seed(0)
    inits = [numpy_helper.from_array(torch.randn(4, 4, k, k, generator=generator).numpy(), f"w{k}") for k in (3, 1)]
    inits.append(numpy_helper.from_array(torch.randn(*gamma_shape, generator=generator).numpy(), "gamma"))
    nodes = [
        helper.make_node("Relu", ["x"], ["xr"], name="relu"),
        helper.make_node("Conv", ["xr", "w3"], ["a"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["xr", "w1"], ["b"], name="conv1"),
        helper.make_node("Sub", ["a", "b"], ["d"], name="difference"),
        helper.make_node("Neg", ["d"], ["n"], name="negate"),
        helper.make_node("Mul", ["n", "gamma"], ["s"], name="scale"),
        helper.make_node("Add", ["s", "xr"], ["t"], name="identity"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])]
    if residual:
        nodes.append(helper.make_node("Add", ["t", "r"], ["y"], name="residual"))
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 4, 8, 8]))
    else:
        nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("residual", [False, True])
def test_hand_built_differences_negations_scales_and_residuals_merge(residual: bool) -> None:
    original = _combination_graph((1, 4, 1, 1), residual)
    merged = bnfold_onnx.fold(original, merge_branches=True)
    assert op_types(merged.model) == ["Relu", "Conv"] + (["Add"] if residual else [])
    assert merged.model.graph.node[-1].output[0] == "y"
    if residual:
        assert list(merged.model.graph.node[-1].input)[1] == "r"
    assert_same_outputs(original, merged.model)
    (entry,) = merged.report.merges
    assert (entry.into, entry.layers, entry.identities) == ("conv3", ("conv1",), ("input",))
    assert entry.kept == (("the graph input 'r'",) if residual else ())


@pytest.mark.parametrize(("shape", "reason"), [
    ((1, 1, 1, 4), "'scale' (Mul) multiplies by 'gamma' of shape (1, 1, 1, 4): the scale is not per channel of "
                   "'conv3' (4 channels on axis 1)"),
    ((4, 8, 8), None),  # several values per channel: the product bounds the tree (below)
])
def test_hand_built_scales_that_are_not_per_channel_are_left(shape: tuple[int, ...], reason: str | None) -> None:
    original = _combination_graph(shape, False)
    merged = bnfold_onnx.fold(original, merge_branches=True)
    if reason is not None:
        (entry,) = merged.report.merges
        assert entry.status == "left" and entry.reason == reason
        assert op_types(merged.model) == op_types(original)  # nothing changed (so nothing to verify)
    else:  # the negated difference inside the product merges on its own (sign -1); the sum with the input has no
        # layer term
        assert op_types(merged.model) == ["Relu", "Conv", "Mul", "Add"]
        assert_same_outputs(original, merged.model)
