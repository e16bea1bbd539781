"""ONNX backend: one hand-built graph per rule and per leave-alone reason, folded and compared in onnxruntime.

Every case states how many BatchNormalization nodes must remain, and for those that remain, a phrase the reason
must contain. The comparison uses the float32 tolerance of the PyTorch side, 1e-4 relative to the output's
largest magnitude: a correct fold moves outputs by a few float32 roundings (~1e-7 relative here, these graphs are
one or two layers deep), while a wrong one (a missing shift, a scale on the wrong axis, a forgotten alpha/beta)
moves them by order 1, so the test can fail only for a real error.

The cases and their builder live in ``tests/helpers/onnx_cases.py`` (``benchmarks/onnx_peers.py`` uses them too).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold.onnx as bo
from bnfold.core.graph import BATCH_STATISTICS, ZERO_PADDED_BORDER
from bnfold.errors import NonFiniteStatisticsError, OriginalRunError, TrainingModeError, VerificationError
from helpers.cli import python_without
from helpers.onnx_cases import (
    CASES,
    F16,
    F32,
    FLOAT32_TOLERANCE,
    Builder,
    bn_count,
    non_finite_statistics,
    training_mode,
)


@pytest.mark.parametrize("name", list(CASES))
def test_case(name: str) -> None:
    case = CASES[name]()
    onnx.checker.check_model(case.model, full_check=True)
    original_bytes = case.model.SerializeToString()
    result = bo.fold(case.model)
    folded, report = result.model, result.report

    assert case.model.SerializeToString() == original_bytes, "fold() modified the caller's model"
    assert bn_count(folded) == case.left
    assert len(report.left) == case.left and report.applied and report.capture == "onnx graph"
    if case.reason:
        assert case.reason in report.left[0].reason, report.left[0].reason
    if case.note:
        assert any(case.note in n for n in report.notes), report.notes
    onnx.checker.check_model(folded, full_check=True)
    onnx.shape_inference.infer_shapes(folded, strict_mode=True)
    assert folded.ir_version == case.model.ir_version
    assert list(folded.opset_import) == list(case.model.opset_import)
    assert report.parameters_after <= report.parameters_before or case.note

    if report.folded:
        tolerance = 1e-2 if name.startswith("fp16") else FLOAT32_TOLERANCE
        check = bo.verify(case.model, folded, seed=1)  # fresh inputs, independent of fold()'s own check
        assert check.passed and check.tolerance == tolerance, str(check)
        assert report.verification is not None and report.verification["passed"]
        used = {n for node in folded.graph.node for n in node.input}
        assert all(t.name in used for t in folded.graph.initializer), "unused initializer left behind"


def test_directions_and_targets() -> None:
    report = bo.fold(CASES["backward_convs_pads0"]().model).report
    assert report.entries[0].direction == "backward" and report.entries[0].into == ("conv1", "conv2")
    report = bo.fold(CASES["matmul_add_2d"]().model).report
    assert report.entries[0].direction == "forward" and report.entries[0].into == ("matmul",)  # its Add: its bias
    report = bo.fold(CASES["chain_conv_bn_bn"]().model).report
    assert [e.into for e in report.entries] == [("conv",), ("conv",)]


def test_forward_keeps_output_name_and_drops_stale_value_info() -> None:
    case = CASES["chain_conv_bn_bn"]()
    case.model.graph.value_info.extend(
        [helper.make_tensor_value_info(n, F32, [1, 6, 6, 6]) for n in ("c", "d")]
    )
    folded = bo.fold(case.model).model
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert folded.graph.node[0].output[0] == "y"
    assert not folded.graph.value_info  # 'c' and 'd' no longer exist
    assert {t.name for t in folded.graph.initializer} == {"W", "conv_bias_bnfold"}


def test_shared_weight_is_copied_not_scaled_twice() -> None:
    case = CASES["shared_weight"]()
    folded = bo.fold(case.model).model
    conv1, conv2 = folded.graph.node
    assert conv1.input[1] != conv2.input[1]


def test_plan_is_a_dry_run() -> None:
    case = CASES["chain_conv_bn_bn"]()
    report = bo.plan(case.model)
    assert not report.applied and len(report.folded) == 2 and report.verification is None
    assert report.parameters_after < report.parameters_before
    assert bn_count(case.model) == 2


def _one_op(op_type: str, output: str) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node(op_type, ["x"], [output])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_verify_names_each_output_that_cannot_be_compared() -> None:
    """A missing or reshaped output is a problem naming it, a NaN one is not finite: as on the PyTorch side."""
    original = _one_op("Identity", "y")
    missing = bo.verify(original, _one_op("Identity", "z"))
    assert missing.problems == ["output 'y' is missing in the folded model"] and not missing.passed
    assert missing.to_dict()["outputs"] == [] and missing.worst() == missing.problems[0]
    reshaped = bo.verify(original, _one_op("Flatten", "y"))
    assert reshaped.problems == ["output 'y' has shape [1, 2, 3] vs [1, 6]"] and not reshaped.passed
    nan = bo.verify(original, _one_op("Log", "y"))  # the log of the negative random inputs
    assert not nan.passed and not nan.judged and nan.not_finite[0].startswith("output 'y' of the folded model holds NaN")
    same = bo.verify(original, _one_op("Identity", "y"))
    assert same.passed and [o["path"] for o in same.to_dict()["outputs"]] == ["y"] and same.worst_output == "y"


def test_verification_catches_a_wrong_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnfold import affine

    real = affine.forward_bias
    monkeypatch.setattr(affine, "forward_bias", lambda bias, scale, shift: real(bias, scale, shift * 0))
    with pytest.raises(VerificationError, match="output 'y'"):
        bo.fold(CASES["conv2d"]().model)


def test_tolerances_match_the_pytorch_side() -> None:
    torch = pytest.importorskip("torch")
    from bnfold.verification import TOLERANCES as TORCH_TOLERANCES

    mapping = {
        torch.float32: F32,
        torch.float64: TensorProto.DOUBLE,
        torch.float16: F16,
        torch.bfloat16: TensorProto.BFLOAT16,
    }
    assert {mapping[k]: v for k, v in TORCH_TOLERANCES.items()} == bo.TOLERANCES


def test_import_without_torch() -> None:
    code = (
        "import bnfold.onnx as bo\n"
        "from helpers.onnx_cases import CASES\n"
        "r = bo.fold(CASES['conv2d']().model)\n"
        "assert r.report.verification['passed'] and 'torch' not in [m for m in sys.modules if sys.modules[m]]\n"
    )
    done = python_without(code, "torch")
    assert done.returncode == 0, done.stderr


def test_rejects_what_is_not_a_model() -> None:
    from bnfold.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="ModelProto"):
        bo.fold(42)  # type: ignore[arg-type]


def test_bfloat16_weights_are_rounded_once() -> None:
    """onnxruntime's CPU provider has no bfloat16 Conv, so this checks the arithmetic directly: the folded
    weight is ``W * s`` computed in float64 and rounded once to bfloat16, and the dtypes are kept."""
    case = CASES["conv2d_bias_groups"]()
    bf16 = helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)
    for tensor in case.model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(bf16), tensor.name))
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in case.model.graph.initializer}
    result = bo.fold(case.model, verify=False)
    assert result.report.verification is None and bn_count(result.model) == 0
    folded = {t.name: t for t in result.model.graph.initializer}
    assert all(t.data_type == TensorProto.BFLOAT16 for t in folded.values())
    scale = values["bn.scale"] / np.sqrt(values["bn.var"] + np.float64(np.float32(1e-3)))
    shift = values["bn.B"] - values["bn.mean"] * scale
    expected_w = (values["W"] * scale[:, None, None, None]).astype(bf16)
    expected_b = (values["bias"] * scale + shift).astype(bf16)
    np.testing.assert_array_equal(numpy_helper.to_array(folded["W"]), expected_w)
    np.testing.assert_array_equal(numpy_helper.to_array(folded["bias"]), expected_b)


def test_gemm_backward_with_trans_a_is_left() -> None:
    b = Builder(98)
    b.bn("bn", "a", "n", 5)
    b.node("Gemm", ["n", b.weight("B", (5, 6))], ["y"], "gemm", transA=1)
    model = b.model([("a", [5, 5])], [("y", [5, 6])])
    report = bo.plan(model)
    assert "transA=1" in report.left[0].reason and "comes from the graph input 'a'" in report.left[0].reason


def test_verification_reports_a_model_onnxruntime_cannot_run() -> None:
    b = Builder(99)
    b.node("Conv", ["x", b.weight("W", (6, 3, 3, 3))], ["c"], "conv")
    b.bn("bn", "c", "n", 6)
    b.nodes.append(helper.make_node("Mystery", ["n"], ["y"], name="custom", domain="com.example"))
    model = b.model([("x", [1, 3, 6, 6])], [("y", [1, 6, 4, 4])])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    # bad input (the command line's exit 2), not a failed verification: the fold was never judged
    with pytest.raises(OriginalRunError, match="original model does not run.*Mystery.*verify=False") as caught:
        bo.fold(model)
    assert not isinstance(caught.value, VerificationError)
    assert "Mystery" not in caught.value.cli_message and "verify=False" not in caught.value.cli_message
    assert bn_count(bo.fold(model, verify=False).model) == 0


def test_non_finite_statistics_are_an_error() -> None:
    """A norm the plan would fold, with an infinite running variance: folding would hide invalid outputs."""
    model = non_finite_statistics().model
    with pytest.raises(NonFiniteStatisticsError, match="'bn' has NaN or infinite values in its running variance"):
        bo.fold(model)
    with pytest.raises(NonFiniteStatisticsError):
        bo.plan(model)


def test_whole_model_in_training_mode() -> None:
    with pytest.raises(TrainingModeError, match="model.eval"):
        bo.fold(training_mode(eval_neighbour=False).model)


# -- the same answer as the module API (issue 11's table) ----------------------------------------------------------
# Each model is exported from PyTorch (eval mode, norm statistics calibrated by train-mode passes) and folded both
# ways: the decisions (folded / left, direction, in graph order) must be the module API's, and the folded ONNX model
# must reproduce the original in onnxruntime within the float32 tolerance (fold() verifies; checked again below).


def _table_model(name: str) -> tuple[object, object]:
    import torch
    from torch import nn

    class Two(nn.Module):
        def __init__(self, first: nn.Module, second: nn.Module) -> None:
            super().__init__()
            self.a, self.b = first, second

    class Cat(Two):
        def __init__(self) -> None:
            super().__init__(nn.Conv2d(3, 4, 3), nn.Conv2d(3, 5, 3))
            self.bn = nn.BatchNorm2d(9)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(torch.cat([self.a(x), self.b(x)], 1))

    class SecondReader(Two):
        def __init__(self) -> None:
            super().__init__(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return self.b(y) + torch.relu(y)

    conv = lambda: nn.Conv2d(3, 6, 3)  # noqa: E731
    image = (2, 3, 12, 12)
    models: dict[str, tuple[nn.Module, tuple[int, ...]]] = {
        "avg_pool": (nn.Sequential(conv(), nn.AvgPool2d(2), nn.BatchNorm2d(6)), image),
        "max_pool": (nn.Sequential(conv(), nn.MaxPool2d(2), nn.BatchNorm2d(6)), image),
        "upsample": (nn.Sequential(conv(), nn.Upsample(scale_factor=2, mode="bilinear"), nn.BatchNorm2d(6)), image),
        "dropout": (nn.Sequential(conv(), nn.Dropout(0.3), nn.BatchNorm2d(6)), image),
        "bn_flatten_linear": (nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3, 5)), (4, 3, 1, 1)),
        "bn_reflect_conv": (nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 6, 3, padding=1,
                                                                            padding_mode="reflect")), image),
        "cat": (Cat(), image),
        "linear_bn1d": (nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7)), (4, 5)),
        "conv_bn_bn": (nn.Sequential(conv(), nn.BatchNorm2d(6), nn.BatchNorm2d(6)), image),
        "bn_bn_linear": (nn.Sequential(nn.ReLU(), nn.BatchNorm1d(5), nn.BatchNorm1d(5), nn.Linear(5, 3)), (4, 5)),
        "second_reader": (SecondReader(), image),
        "bn_zero_padded_conv": (nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 6, 3, padding=1)), image),
        "batch_statistics": (nn.Sequential(conv(), nn.BatchNorm2d(6, track_running_stats=False), nn.ReLU(),
                                           nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4)), image),
    }
    module, shape = models[name]
    return module, shape


TABLE = {
    "avg_pool": "forward", "max_pool": "forward", "upsample": "forward", "dropout": "forward",
    "bn_flatten_linear": "backward", "bn_reflect_conv": "backward", "cat": "forward", "linear_bn1d": "forward",
    "conv_bn_bn": "forward", "bn_bn_linear": "backward", "second_reader": "left", "bn_zero_padded_conv": "left",
    "batch_statistics": "left",
}


def export_calibrated(module: object, shape: tuple[int, ...], seed: int = 0, positive: bool = False) -> onnx.ModelProto:
    """``module`` with norm statistics calibrated by train-mode passes, in eval mode, exported by the TorchScript
    exporter (no constant folding, so the graph keeps what the module computes). ``positive``: every norm weight
    made positive (a max pooling commutes with the norm only then)."""
    import io
    import warnings

    import torch

    from conftest import calibrated_by_training

    torch.manual_seed(seed)
    x = torch.randn(*shape)
    calibrated_by_training(module, x)
    if positive:
        for norm in module.modules():
            if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm) and norm.weight is not None:
                norm.weight.data = norm.weight.data.abs()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), buffer, input_names=["x"], output_names=["y"], do_constant_folding=False,
                          dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("name", list(TABLE))
def test_same_answer_as_the_module_api(name: str) -> None:
    torch = pytest.importorskip("torch")
    import bnfold

    module, shape = _table_model(name)
    model = export_calibrated(module, shape, positive=name == "max_pool")
    expected = {e.name: e for e in bnfold.plan(module, torch.randn(*shape)).entries}
    result = bo.fold(model)
    got = {e.name.strip("/").rpartition("/")[0].replace("/", "."): e for e in result.report.entries}
    assert got.keys() == expected.keys()
    for key, mine in got.items():
        theirs = expected[key]
        assert (mine.status, mine.direction, len(mine.into)) == (theirs.status, theirs.direction, len(theirs.into)), (
            mine, theirs)
    directions = [e.direction or e.status for e in result.report.entries]
    assert TABLE[name] in directions, directions
    assert bn_count(result.model) == len(result.report.left)
    if result.report.folded:
        check = bo.verify(model, result.model, seed=3)
        assert check.passed and check.max_relative < FLOAT32_TOLERANCE, str(check)


def test_left_reasons_are_the_cores() -> None:
    pytest.importorskip("torch")
    reasons = {name: bo.plan(export_calibrated(*_table_model(name))).left[0].reason
               for name in ("second_reader", "bn_zero_padded_conv", "batch_statistics")}
    assert "is also used by" in reasons["second_reader"]
    assert reasons["bn_zero_padded_conv"].endswith(
        f"cannot absorb it exactly: it pads its input with zeros (padding=(1, 1)): {ZERO_PADDED_BORDER}")
    assert BATCH_STATISTICS in reasons["batch_statistics"]


def test_dry_run_folds_nothing() -> None:
    pytest.importorskip("torch")
    model = export_calibrated(*_table_model("conv_bn_bn"))
    before = model.SerializeToString()
    report = bo.plan(model)
    assert not report.applied and len(report.folded) == 2 and model.SerializeToString() == before


def test_overflow_is_left_with_the_reason() -> None:
    """A float16 conv whose norm scales by 1e5: the folded weight would be infinite in float16."""
    case = CASES["fp16_conv"]()
    for tensor in case.model.graph.initializer:
        if tensor.name == "bn.scale":  # s = 6e4 / sqrt(var + eps) times weights of order 1 exceeds float16's 65504
            tensor.CopyFrom(numpy_helper.from_array(np.full(tensor.dims, 6e4, np.float16), tensor.name))
    report = bo.fold(case.model, verify=False).report
    assert report.left and "overflow" in report.left[0].reason, report.entries


def test_cli_on_onnx_files_imports_no_torch(tmp_path: object) -> None:
    """inspect / fold / verify on .onnx files: the ONNX path of the CLI never imports torch (seconds saved)."""
    import os
    from pathlib import Path

    folder = Path(str(tmp_path))
    source, target = folder / "m.onnx", folder / "f.onnx"
    onnx.save(CASES["chain_conv_bn_bn"]().model, source)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent / "src"), env.get("PYTHONPATH", "")])
    for command, code in ((["inspect", str(source), "--json"], 0), (["fold", str(source), "-o", str(target)], 0),
                          (["verify", str(source), str(target)], 0), (["inspect", str(folder / "no.onnx")], 2)):
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "bnfold", *command], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == code, done.stderr[-2000:]
        imported = [line for line in done.stderr.splitlines() if line.rstrip().endswith(" torch")]
        assert not imported, command
    assert bn_count(onnx.load(target)) == 0
