"""ONNX patterns from real exporters (issue 11, item 6), the CLI's ONNX options, and what makes the ONNX fold fast.

* levit's ``MatMul -> Flatten -> BatchNormalization -> Reshape``: a linear layer over the last axis of (B, T, C),
  flattened to (B*T, C) for a BatchNorm1d and reshaped back, folds forward into the MatMul;
* the dynamo exporter (``optimize=False``) gives a bias-less conv the bias ``Expand(CastLike(0, x), Shape(W))``:
  a constant whose computation reads the activation ``x`` for its element type only, so the conv folds;
* ``--eval`` / ``--input-shape`` on ONNX files: an error, or honoured;
* a model read from a file is folded in place, and weights no fold touches are never decoded.

Outputs are compared in onnxruntime with the float32 tolerance of ``test_onnx`` (1e-4 relative to the largest
output): a correct fold moves these one- or two-layer graphs by a few float32 roundings, a wrong one by order 1.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import bnfold.onnx as bo
from bnfold.errors import InvalidInputError
from helpers.onnx_cases import FLOAT32_TOLERANCE, Builder, bn_count

B, T, C_IN, C = 2, 5, 8, 6


def levit(flatten_axis: int = 2, bias: bool = False) -> onnx.ModelProto:
    """x (B, T, C_IN) @ W (C_IN, C) [+ b] -> Flatten -> BatchNormalization -> Reshape to (B, T, C)."""
    b = Builder(7 + bias)
    b.node("MatMul", ["x", b.weight("W", (C_IN, C))], ["m"], "matmul")
    out = "m"
    if bias:
        b.node("Add", ["m", b.const("bias", b.rng.normal(size=C))], ["a"], "add")
        out = "a"
    b.node("Flatten", [out], ["f"], "flatten", axis=flatten_axis)
    channels = C if flatten_axis == 2 else T * C
    b.bn("bn", "f", "n", channels)
    b.node("Shape", [out], ["s"], "shape")
    b.node("Reshape", ["n", "s"], ["y"], "reshape")
    return b.model([("x", [B, T, C_IN])], [("y", [B, T, C])])


@pytest.mark.parametrize("bias", [False, True])
def test_levit_matmul_flatten_bn_reshape_folds_into_the_matmul(bias: bool) -> None:
    model = levit(bias=bias)
    result = bo.fold(model)
    entry = result.report.entries[0]
    assert bn_count(result.model) == 0 and entry.status == "folded", result.report.entries
    assert entry.direction == "forward" and entry.into == ("matmul",)
    check = bo.verify(model, result.model, seed=1)
    assert check.passed and check.max_relative <= FLOAT32_TOLERANCE, str(check)
    onnx.checker.check_model(result.model, full_check=True)


def test_flatten_that_mixes_tokens_into_channels_is_left() -> None:
    """Flatten(axis=1) of (B, T, C) is (B, T*C): the norm's T*C channels are not the MatMul's C columns."""
    result = bo.fold(levit(flatten_axis=1))
    assert bn_count(result.model) == 1 and not result.report.folded, result.report.entries


def test_levit_block_exported_from_torch() -> None:
    torch = pytest.importorskip("torch")

    class LinearNorm(torch.nn.Module):  # timm levit's LinearNorm: bn(linear(x).flatten(0, 1)).reshape_as(...)
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(C_IN, C, bias=False)
            self.bn = torch.nn.BatchNorm1d(C)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.linear(x)
            return self.bn(x.flatten(0, 1)).reshape_as(x)

    torch.manual_seed(0)
    module = LinearNorm().train()
    with torch.no_grad():
        for _ in range(3):  # realistic running statistics
            module(torch.randn(4, T, C_IN))
    module.eval()
    buffer = io.BytesIO()
    x = torch.randn(B, T, C_IN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), buffer, dynamo=False, do_constant_folding=False, input_names=["x"])
    model = onnx.load_from_string(buffer.getvalue())
    assert bn_count(model) == 1
    result = bo.fold(model)
    assert bn_count(result.model) == 0 and result.report.entries[0].direction == "forward"
    got = bo.verification.run(result.model, {"x": x.numpy()})
    expected = module(x).detach().numpy()
    assert np.max(np.abs(next(iter(got.values())) - expected)) <= FLOAT32_TOLERANCE * np.max(np.abs(expected))


def dynamo_style_conv(castlike_of_activation: bool = False) -> onnx.ModelProto:
    """Conv whose bias is ``Expand(CastLike(0, x), Shape(W)[:1])``, as torch.onnx's dynamo exporter writes it
    without optimisation; with ``castlike_of_activation`` the cast value itself is computed from ``x``."""
    b = Builder(3)
    b.weight("W", (4, 3, 3, 3))
    b.node("Shape", ["W"], ["w_shape"], "shape", start=0, end=1)
    if castlike_of_activation:
        b.node("ReduceMax", ["x"], ["zero"], "not_a_constant", keepdims=0)
    else:
        b.nodes.append(helper.make_node("Constant", [], ["zero"], name="zero",
                                        value=numpy_helper.from_array(np.array(0, np.int64))))
    b.node("CastLike", ["zero", "x"], ["zero_like"], "castlike")
    b.node("Expand", ["zero_like", "w_shape"], ["bias"], "expand")
    b.node("Conv", ["x", "W", "bias"], ["c"], "conv")
    b.bn("bn", "c", "y", 4)
    model = b.model([("x", [1, 3, 8, 8])], [("y", [1, 4, 6, 6])], opset=17)
    return model


def test_conv_with_a_bias_computed_from_castlike_of_the_input_folds() -> None:
    model = dynamo_style_conv()
    result = bo.fold(model)
    assert bn_count(result.model) == 0 and result.report.entries[0].into == ("conv",), result.report.entries
    assert [n.op_type for n in result.model.graph.node] == ["Conv"], "the bias computation is left behind"
    weights = [t for t in result.model.graph.initializer if tuple(t.dims) == (4, 3, 3, 3)]
    assert len(weights) == 1 and weights[0].name == "W", "a weight read only by Shape was copied, not updated"
    check = bo.verify(model, result.model, seed=1)
    assert check.passed and check.max_relative <= FLOAT32_TOLERANCE, str(check)


def test_castlike_of_a_computed_value_is_not_a_constant() -> None:
    """Only CastLike's *second* input is read for its type: a bias computed from x's values must stay."""
    result = bo.fold(dynamo_style_conv(castlike_of_activation=True))
    assert bn_count(result.model) == 1, result.report.entries
    assert "not a constant" in result.report.left[0].reason, result.report.left[0].reason


def test_dynamo_export_without_optimisation_folds_every_norm() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")  # torch.onnx's dynamo exporter needs it
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 5, 3, bias=True), torch.nn.BatchNorm2d(5),
    ).train()
    with torch.no_grad():
        for _ in range(3):
            module(torch.randn(4, 3, 8, 8))
    module.eval()
    x = torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (x,), dynamo=True, optimize=False)
    model = program.model_proto
    assert bn_count(model) == 2
    assert any(n.op_type == "CastLike" for n in model.graph.node), "the exporter no longer writes CastLike biases"
    result = bo.fold(model)
    assert bn_count(result.model) == 0 and len(result.report.folded) == 2, result.report.entries
    got = next(iter(bo.verification.run(result.model, {model.graph.input[0].name: x.numpy()}).values()))
    expected = module(x).detach().numpy()
    assert np.max(np.abs(got - expected)) <= FLOAT32_TOLERANCE * np.max(np.abs(expected))


# -- the CLI's ONNX options -----------------------------------------------------------------------------------
def dynamic_batch_flatten() -> onnx.ModelProto:
    """Conv -> BN -> Reshape(x, [2, 64]): runs only with a batch of 2, and its input's batch is dynamic."""
    b = Builder(11)
    b.node("Conv", ["x", b.weight("W", (4, 3, 1, 1))], ["c"], "conv")
    b.bn("bn", "c", "n", 4)
    b.inits.append(numpy_helper.from_array(np.array([2, 64], np.int64), "target"))
    b.node("Reshape", ["n", "target"], ["y"], "reshape")
    model = b.model([("x", ["batch", 3, 4, 4])], [("y", [2, 64])])
    return model


def bnfold_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "bnfold", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_cli_onnx_eval_and_inspect_input_shape_are_errors(tmp_path: Path) -> None:
    source = tmp_path / "m.onnx"
    onnx.save(dynamic_batch_flatten(), source)
    for command in (["fold", str(source), "-o", str(tmp_path / "f.onnx"), "--eval"], ["inspect", str(source), "--eval"],
                    ["inspect", str(source), "--input-shape", "2,3,4,4"]):
        done = bnfold_cli(*command)
        assert done.returncode == 2, (command, done.stderr)
        assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr, done.stderr
        assert ("--eval" if "--eval" in command else "--input-shape") in done.stderr
    assert not (tmp_path / "f.onnx").exists()


def test_cli_onnx_input_shape_is_honoured(tmp_path: Path) -> None:
    source, target = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(dynamic_batch_flatten(), source)
    without = bnfold_cli("fold", str(source), "-o", str(target))
    # batch 1 cannot run: bad input (2), not "the outputs differ" (1); the option to use, no runtime internals
    assert without.returncode == 2 and "does not run on example inputs" in without.stderr, without.stderr
    assert "--input-shape" in without.stderr and "inputs=" not in without.stderr
    assert "ONNXRuntimeError" not in without.stderr and "Traceback" not in without.stderr
    assert not target.exists()
    done = bnfold_cli("fold", str(source), "-o", str(target), "--input-shape", "2,3,4,4")
    assert done.returncode == 0, done.stderr
    assert bn_count(onnx.load(target)) == 0
    assert bnfold_cli("verify", str(source), str(target), "--input-shape", "2,3,4,4").returncode == 0
    wrong = bnfold_cli("fold", str(source), "-o", str(tmp_path / "g.onnx"), "--input-shape", "2,5,4,4")
    assert wrong.returncode == 2 and "does not fit graph input 'x'" in wrong.stderr, wrong.stderr


def test_input_shape_in_the_library() -> None:
    model = dynamic_batch_flatten()
    result = bo.fold(model, input_shape=(2, 3, 4, 4))
    assert result.report.verification is not None and result.report.verification["passed"]
    assert bo.verify(model, result.model, input_shape={"x": [2, 3, 4, 4]}).passed
    with pytest.raises(InvalidInputError, match="does not fit"):
        bo.fold(model, input_shape=(2, 3, 4))
    with pytest.raises(InvalidInputError, match="name no graph input"):
        bo.fold(model, input_shape={"image": (2, 3, 4, 4)})


# -- speed: what is not done -----------------------------------------------------------------------------------
def big_unfolded_gemm() -> onnx.ModelProto:
    """Conv -> BN (folds) -> Flatten -> Gemm with a weight no fold touches."""
    b = Builder(5)
    b.node("Conv", ["x", b.weight("W", (4, 3, 1, 1))], ["c"], "conv")
    b.bn("bn", "c", "n", 4)
    b.node("Relu", ["n"], ["r"], "relu")
    b.node("Flatten", ["r"], ["f"], "flatten")
    b.node("Gemm", ["f", b.weight("G", (64, 32))], ["y"], "gemm")
    return b.model([("x", [1, 3, 4, 4])], [("y", [1, 32])])


def test_weights_no_fold_touches_are_not_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[str] = []
    real = numpy_helper.to_array

    def spy(tensor: onnx.TensorProto, *args: object, **kwargs: object) -> np.ndarray:
        decoded.append(tensor.name)
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(numpy_helper, "to_array", spy)
    result = bo.fold(big_unfolded_gemm(), verify=False)
    assert len(result.report.folded) == 1
    assert "W" in decoded and "G" not in decoded, decoded


def test_a_file_is_folded_in_place_and_verified_against_itself(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """fold(path) folds the model it read without copying it, and onnxruntime runs the original from its file;
    the file is not modified. A caller's ModelProto is still copied (test_onnx checks it is left unchanged)."""
    source = tmp_path / "m.onnx"
    onnx.save(big_unfolded_gemm(), source)
    before = source.read_bytes()
    copies: list[bool] = []
    sessions: list[object] = []
    fold_graph, session = bo.fold_graph, bo.verification.session

    def fold_spy(*args: object, **kwargs: object) -> object:
        copies.append(bool(kwargs.get("copy", True)))
        return fold_graph(*args, **kwargs)  # type: ignore[arg-type]

    def session_spy(model: object, *args: object, **kwargs: object) -> object:
        sessions.append(model)
        return session(model, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(bo, "fold_graph", fold_spy)
    monkeypatch.setattr(bo.verification, "session", session_spy)
    result = bo.fold(source)
    assert result.report.verification is not None and result.report.verification["passed"]
    assert copies == [False], "fold(path) copied the model it had just read"
    assert sessions[0] == str(source) and sessions[1] is result.model
    assert source.read_bytes() == before
    assert bn_count(result.model) == 0
    bo.fold(onnx.load(source))
    assert copies == [False, True]


def test_data_size_counts_tensor_bytes_without_serialising() -> None:
    model = big_unfolded_gemm()
    expected = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert bo.io.data_size(model) == expected
    assert 0 < model.ByteSize() - expected < 1024  # the graph itself is small beside its tensors
