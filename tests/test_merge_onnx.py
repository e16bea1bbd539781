"""``bnfold.onnx.fold(path, merge_branches=True)``: the same branch merges as the module API, on ONNX files.

Exported models are folded and merged, checked in onnxruntime against the original (the ONNX backend's own
verification, at float32's tolerance), and the number of norms and convolutions left is compared with what
``bnfold.fold(module, merge_branches=True)`` leaves.
"""

from __future__ import annotations

import io
import warnings

import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold import onnx as bnfold_onnx
from bnfold.core.graph import Geometry
from bnfold.onnx.merges import conv_geometry
from conftest import calibrated_by_training
from helpers.counting import count_batch_norm_calls
from test_merge_modules import conv_calls, net


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
    assert report.verification is not None and report.verification["passed"]
    assert [m.status for m in report.merges] == ["merged"] * 4 and plain.report.merges == []
    assert report.left == [] and report.parameters_after < plain.report.parameters_after
    module = bnfold.fold(model, x, merge_branches=True)
    assert count_batch_norm_calls(module, [x]) == 0 and conv_calls(module, x) == 4 + 1  # + the classifier


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0"])
def test_timm_models_merge_in_onnx_as_far_as_with_the_module(name: str) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = timm.create_model(name, num_classes=10)
    with torch.no_grad():  # gammas near 1: a random deep network that stays well conditioned in float32
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(1 + 0.2 * torch.randn(module.num_features))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + torch.randn(x.shape))
    model.eval()
    merged = bnfold_onnx.fold(export(model, x[:1]), merge_branches=True)
    assert merged.report.verification is not None and merged.report.verification["passed"]
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
    merged = bnfold_onnx.fold(_two_conv_graph((1, 1)), merge_branches=True)
    assert op_counts(merged.model) == {"BatchNormalization": 0, "Conv": 1, "Add": 0}
    assert merged.model.graph.node[0].output[0] == "y"  # the merged conv writes the graph output
    assert merged.report.verification is not None and merged.report.verification["passed"]
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
    assert conv_geometry(lower, (4, 4, 2, 2), None) is None  # unknown input shape: unknown geometry


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
    merged = bnfold_onnx.fold(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                              merge_branches=True)
    assert [node.op_type for node in merged.model.graph.node] == ["Gemm", "Relu"]
    assert merged.report.verification is not None and merged.report.verification["passed"]
    assert [(m.into, m.layers) for m in merged.report.merges] == [("head", ("head_dist",))]
