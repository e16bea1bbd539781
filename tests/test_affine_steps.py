"""Norms folded through the model's own per-channel affine ops, and squeezes judged on their axes (issue 19).

An exporter writes a layer's bias as a separate ``Add`` (PP-OCRv4's ``ConvTranspose -> Add -> BatchNormalization``);
Python code writes ``x * scale + bias`` or ``x / 2``. Such an op is ``y = a * x + b`` per channel: bnfold keeps it
and folds the norm through it (:mod:`bnfold.core.apply`). The ONNX graphs here have a dynamic batch and width, so
shape inference gives no shapes: what decides is the ops' attributes and the constants' shapes alone.

Outputs are compared in float32 with the tolerance of ``test_onnx`` (1e-4 relative to the largest output): a
correct fold moves these two- or three-op graphs by a few float32 roundings, a wrong one by order 1.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import bnfold
import bnfold.onnx as bo
from bnfold.verification import TOLERANCES
from conftest import calibrated_by_training
from helpers.onnx_cases import FLOAT32_TOLERANCE, Builder, bn_count

ort = pytest.importorskip("onnxruntime")
C = 6


def _dynamic(b: Builder, opset: int = 13) -> onnx.ModelProto:
    return b.model([("x", ["N", 3, 4, "W"])], [("y", ["N", C, "H", "W2"])], opset=opset)


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _same(model: onnx.ModelProto, folded: onnx.ModelProto, shape: tuple[int, ...] = (2, 3, 4, 9)) -> None:
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    expected, actual = _outputs(model, x), _outputs(folded, x)
    assert float(np.abs(actual - expected).max() / np.abs(expected).max()) <= FLOAT32_TOLERANCE


def _squeezed(opset: int) -> onnx.ModelProto:
    """Conv over (3, 4, W) with a (4, 3) kernel -> (C, 1, W') -> Squeeze(axes=[2]) -> a 1-D BatchNormalization."""
    b = Builder(opset)
    b.node("Conv", ["x", b.weight("W", (C, 3, 4, 3)), b.const("bias", b.rng.normal(size=C))], ["c"], "conv")
    if opset < 13:
        b.node("Squeeze", ["c"], ["s"], "squeeze", axes=[2])
    else:
        b.node("Squeeze", ["c", b.const("axes", np.array([2]))], ["s"], "squeeze")
        b.inits[-1] = onnx.numpy_helper.from_array(np.array([2], dtype=np.int64), "axes")
    b.bn("bn", "s", "y", C)
    return b.model([("x", ["N", 3, 4, "W"])], [("y", ["N", C, "W2"])], opset=opset)


@pytest.mark.parametrize("opset", [11, 13], ids=["axes attribute", "axes input"])
def test_a_squeeze_after_the_channel_axis_is_decided_from_its_axes(opset: int) -> None:
    model = _squeezed(opset)
    result = bo.fold(model, verify=False)
    entry = result.report.entries[0]
    assert entry.status == "folded" and entry.direction == "forward" and entry.into == ("conv",), entry
    assert bn_count(result.model) == 0
    _same(model, result.model)


def _between(op: str, constant: np.ndarray | None, *, transposed: bool = False, first: bool = False) -> onnx.ModelProto:
    """(Conv or ConvTranspose) -> ``op`` with a constant -> BatchNormalization -> Relu."""
    b = Builder(7)
    if transposed:
        b.node("ConvTranspose", ["x", b.weight("W", (3, C, 2, 2))], ["c"], "conv", strides=[2, 2])
    else:
        b.node("Conv", ["x", b.weight("W", (C, 3, 3, 3))], ["c"], "conv")
    operands = ["c", b.const("k", constant)] if constant is not None else ["c"]
    b.node(op, operands[::-1] if first else operands, ["a"], "op")
    b.bn("bn", "a", "n", C)
    b.node("Relu", ["n"], ["y"], "relu")
    return _dynamic(b)


PER_CHANNEL = np.linspace(0.5, 2.0, C).reshape(1, C, 1, 1)


@pytest.mark.parametrize(("op", "constant", "transposed", "first"), [
    ("Add", PER_CHANNEL - 1.0, True, False),   # PP-OCRv4 det: the ConvTranspose's bias as an Add
    ("Add", PER_CHANNEL.reshape(C, 1, 1), False, True),
    ("Sub", PER_CHANNEL, False, False),
    ("Sub", PER_CHANNEL, False, True),         # c - x: a factor -1
    ("Mul", PER_CHANNEL, False, False),
    ("Mul", np.array(-0.5), False, True),
    ("Div", PER_CHANNEL, False, False),
    ("Div", np.array(3.0), False, False),
    ("Neg", None, False, False),
], ids=["convtranspose add", "c + x", "x - c", "c - x", "x * c", "-0.5 * x", "x / c", "x / 3", "-x"])
def test_a_per_channel_constant_between_a_layer_and_its_norm_is_folded_through(
    op: str, constant: np.ndarray | None, transposed: bool, first: bool
) -> None:
    model = _between(op, constant, transposed=transposed, first=first)
    result = bo.fold(model, verify=False)
    entry = result.report.entries[0]
    assert entry.status == "folded" and entry.direction == "forward", entry
    assert bn_count(result.model) == 0
    assert any(node.op_type == op for node in result.model.graph.node)  # the op stays; the norm went through it
    _same(model, result.model)


@pytest.mark.parametrize(("op", "constant", "first", "reason"), [
    ("Add", np.ones((1, C, 5, 5)), False, "varies over positions"),
    ("Add", np.ones((1, 1, 1, 5)), False, "varies along axis 3"),
    ("Div", PER_CHANNEL, True, "divides by the tensor"),
    ("Mul", np.array([1.0, 0.0, 2.0, 1.0, 1.0, 1.0]).reshape(1, C, 1, 1), False, "by 0"),
], ids=["positional", "along the width", "c / x", "a factor 0"])
def test_constants_that_are_no_per_channel_map_are_refused_with_the_reason(
    op: str, constant: np.ndarray, first: bool, reason: str
) -> None:
    model = _between(op, constant, first=first)
    result = bo.fold(model, verify=False)
    entry = result.report.entries[0]
    assert entry.status == "left" and reason in (entry.reason or ""), entry
    assert bn_count(result.model) == 1
    if op != "Add" or constant.shape[-1] != 5:  # a (5, 5) constant fixes the input size
        _same(model, result.model)


# ------------------------------------------------------------------------------------------ nn.Module, torch.fx


class _Scaled(nn.Module):
    def __init__(self, layer: nn.Module, channels: int, shape: tuple[int, ...], norm: nn.Module) -> None:
        super().__init__()
        self.layer, self.norm = layer, norm
        self.scale = nn.Parameter(torch.rand(shape) + 0.5)
        self.bias = nn.Parameter(torch.randn(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm((self.layer(x) * self.scale + self.bias) / 2))


@pytest.mark.parametrize(("model", "shape"), [
    (lambda: _Scaled(nn.Conv2d(3, C, 3), C, (C, 1, 1), nn.BatchNorm2d(C)), (2, 3, 8, 8)),
    (lambda: _Scaled(nn.Linear(4, C), C, (C,), nn.BatchNorm1d(C)), (5, 4)),
], ids=["conv (C, 1, 1)", "linear (C,)"])
def test_modules_fold_through_scale_and_shift_without_example_inputs(model, shape) -> None:
    """torch.fx without example inputs knows no shapes: a convolution's rank comes from its kernel, a linear
    layer's channels are the last axis, counted from the end like the constant's."""
    torch.manual_seed(0)
    module = model()
    x = torch.randn(shape)
    calibrated_by_training(module, x)
    folded = bnfold.fold(module)
    entry = bnfold.report_for(folded).entries[0]
    assert entry.status == "folded" and entry.direction == "forward", entry
    with torch.no_grad():
        expected, actual = module(x), folded(x)
    assert float((actual - expected).abs().max() / expected.abs().max()) <= TOLERANCES[torch.float32]


def test_a_spread_norm_folds_into_a_linear_layer_with_the_scale_repeated_per_feature() -> None:
    """BN2d(8) -> flatten of (8, 4, 4) -> Linear(128): the Linear's input column ``f`` is scaled by ``s[f // 16]``
    and its bias gets ``W @ t`` expanded the same way (checked against that formula, not only on outputs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(128, 5))
    x = torch.randn(4, 3, 4, 4)
    calibrated_by_training(model, x)
    norm, linear = model[2], model[4]
    scale = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).detach().double()
    shift = norm.bias.detach().double() - norm.running_mean.double() * scale
    weight = linear.weight.detach().double() * scale.repeat_interleave(16)
    bias = linear.bias.detach().double() + linear.weight.detach().double() @ shift.repeat_interleave(16)
    folded = bnfold.fold(model, x)
    assert isinstance(folded[2], nn.Identity)
    assert torch.allclose(folded[4].weight.double(), weight, rtol=1e-6, atol=1e-7)
    assert torch.allclose(folded[4].bias.double(), bias, rtol=1e-6, atol=1e-6)


def test_without_shapes_a_flatten_before_a_linear_asks_for_example_inputs() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(128, 5))
    calibrated_by_training(model, torch.randn(4, 3, 4, 4))
    entry = bnfold.plan(model).entries[0]
    assert entry.status == "left" and "example_inputs" in (entry.reason or ""), entry
