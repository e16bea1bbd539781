"""torch.export programs fold like the nn.Module they were exported from: the same decisions, equal outputs.

Every fold test exports a model with realistic statistics (three train-mode passes), plans it (dry run), folds it,
and checks that the dry run and the fold decide alike, that each decision equals the module API's on the same
model (unit names are the modules' paths in both), and that the folded program computes the original's outputs to
float32 precision (conftest.assert_same_outputs).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

import bnfold
from bnfold import NonFiniteStatisticsError, TrainingModeError
from bnfold.backends.exported import fold_exported, plan_exported, to_graph
from bnfold.core.graph import BATCH_STATISTICS, OP, ZERO_PADDED_BORDER
from bnfold.errors import InvalidInputError
from bnfold.report import FOLDED, FoldReport
from conftest import assert_same_outputs, calibrated_by_training

NORM_OPS = (torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit_no_training.default)


def _decisions(report: FoldReport) -> dict[str, tuple[str, tuple[str, ...], str | None]]:
    return {e.name: (e.status, tuple(e.into), e.direction) for e in report.entries}


def _norm_nodes(program: torch.export.ExportedProgram) -> int:
    return sum(n.target in NORM_OPS for n in program.graph.nodes)


def _export(model: nn.Module, x: torch.Tensor, **options: object) -> torch.export.ExportedProgram:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, (x,), **options)  # type: ignore[arg-type]


def fold_and_check(model: nn.Module, x: torch.Tensor) -> FoldReport:
    """Export ``model``, plan and fold the program; assert the checks of the module docstring; return the report."""
    program = _export(model, x)
    graph_before = str(program.graph)
    state_before = {k: v.clone() for k, v in program.state_dict.items()}
    dry = plan_exported(program)
    assert not dry.applied and str(program.graph) == graph_before  # a dry run folds nothing
    folded, report = fold_exported(program)
    assert report.applied and _decisions(report) == _decisions(dry)
    assert report.parameters_after == dry.parameters_after == sum(p.numel() for p in folded.parameters())
    assert _decisions(report) == _decisions(bnfold.plan(model, x))  # the module API's decisions
    assert _norm_nodes(folded) == len(report.left)
    assert_same_outputs(program.module(), folded.module(), x)
    assert str(program.graph) == graph_before  # the input program is untouched
    assert all(torch.equal(v, program.state_dict[k]) for k, v in state_before.items())
    return report


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------- the table of issue 11


@pytest.mark.parametrize("between", [nn.AvgPool2d(2), nn.MaxPool2d(2), nn.Upsample(scale_factor=2),
                                     nn.Upsample(scale_factor=2, mode="bilinear"), nn.Dropout(0.3)],
                         ids=["avg_pool", "max_pool", "upsample_nearest", "upsample_bilinear", "dropout"])
def test_a_norm_after_a_commuting_op_folds_forward_through_it(between: nn.Module) -> None:
    torch.manual_seed(0)
    x = _x(2, 3, 8, 8)
    model = calibrated_by_training(nn.Sequential(nn.Conv2d(3, 6, 3), between, nn.BatchNorm2d(6)), x)
    with torch.no_grad():
        model[2].weight.abs_()  # max pooling commutes only with non-negative scales
    report = fold_and_check(model, x)
    assert _decisions(report) == {"2": (FOLDED, ("0",), "forward")}


def test_a_norm_before_flatten_and_linear_folds_backward() -> None:
    torch.manual_seed(0)
    x = _x(4, 3, 6, 6)
    model = calibrated_by_training(nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 5),
    ), x)
    report = fold_and_check(model, x)
    assert _decisions(report) == {"3": (FOLDED, ("5",), "backward")}


def test_a_norm_before_a_reflect_padded_conv_folds_backward_through_the_pad_op() -> None:
    torch.manual_seed(0)
    x = _x(2, 3, 8, 8)
    model = calibrated_by_training(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect"),
    ), x)
    graph = to_graph(_export(model, x).module()).graph
    assert [n.op.kind for n in graph.nodes if n.kind == OP and n.op is not None] == ["other", "pad"]  # relu, pad
    report = fold_and_check(model, x)
    assert _decisions(report) == {"2": (FOLDED, ("3",), "backward")}


class Concatenated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 2, 3, bias=False), nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat([self.a(x), self.b(x)], dim=1))


def test_a_norm_after_a_concatenation_of_convs_folds_into_both() -> None:
    torch.manual_seed(0)
    x = _x(2, 3, 8, 8)
    report = fold_and_check(calibrated_by_training(Concatenated(), x), x)
    assert _decisions(report) == {"bn": (FOLDED, ("a", "b"), "forward")}


def test_linear_then_batchnorm1d_folds() -> None:
    torch.manual_seed(0)
    x = _x(8, 6)
    model = calibrated_by_training(nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5)), x)
    report = fold_and_check(model, x)
    assert _decisions(report) == {"1": (FOLDED, ("0",), "forward")}
    assert report.parameters_removed == 2 * 5 - 5  # gamma, beta gone; a bias added


def test_chains_fold_completely() -> None:
    torch.manual_seed(0)
    x = _x(4, 3, 6, 6)
    forward = calibrated_by_training(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)), x)
    assert _decisions(fold_and_check(forward, x)) == {
        "1": (FOLDED, ("0",), "forward"), "2": (FOLDED, ("0",), "forward")}
    y = _x(8, 5)
    backward = calibrated_by_training(nn.Sequential(nn.BatchNorm1d(5), nn.BatchNorm1d(5), nn.Linear(5, 3)), y)
    assert _decisions(fold_and_check(backward, y)) == {
        "0": (FOLDED, ("2",), "backward"), "1": (FOLDED, ("2",), "backward")}


class SecondReader(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.pre, self.zero_padded = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.bn(y) + y
        return self.zero_padded(self.pre(z))


def test_a_conv_with_a_second_reader_and_a_zero_padded_conv_leave_their_norms_with_the_cores_reasons() -> None:
    torch.manual_seed(0)
    x = _x(2, 3, 6, 6)
    report = fold_and_check(calibrated_by_training(SecondReader(), x), x)
    reasons = {e.name: e.reason or "" for e in report.left}
    assert set(reasons) == {"bn", "pre"} and not report.folded
    assert "the output of 'conv' is also used by the operation aten.add" in reasons["bn"]
    assert reasons["pre"].endswith("the layer after it, 'zero_padded', cannot absorb it exactly: it pads its input "
                                   f"with zeros (padding=(1, 1)): {ZERO_PADDED_BORDER}")


class LinearNorm(nn.Module):
    """timm's LeViT block: a BatchNorm1d over the tokens of every image, reshaped back with ``reshape_as``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


def test_a_tensor_read_only_for_its_shape_is_not_a_second_use() -> None:
    """``reshape_as(y)`` reads y's shape, not its values: the linear output still feeds only the norm."""
    torch.manual_seed(0)
    x = _x(2, 5, 4)
    report = fold_and_check(calibrated_by_training(LinearNorm(), x), x)
    assert _decisions(report) == {"bn": (FOLDED, ("linear",), "forward")}


def test_nan_statistics_raise_in_plan_and_fold() -> None:
    x = _x(2, 3, 6, 6)
    model = calibrated_by_training(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), x)
    model[1].running_var[2] = float("nan")
    program = _export(model, x)
    for attempt in (lambda: plan_exported(program), lambda: fold_exported(program)):
        with pytest.raises(NonFiniteStatisticsError, match="'1' has NaN or infinite values in its running variance"):
            attempt()


def test_a_program_exported_in_training_mode_raises() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    program = _export(model.train(), _x(2, 1, 3, 3))
    for attempt in (lambda: plan_exported(program), lambda: fold_exported(program)):
        with pytest.raises(TrainingModeError, match=r"call model.eval\(\) before torch.export.export"):
            attempt()


def test_a_single_norm_in_batch_statistics_mode_is_left_with_the_shared_reason() -> None:
    torch.manual_seed(0)
    x = _x(2, 3, 6, 6)
    model = calibrated_by_training(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False),
    ), x)
    report = fold_and_check(model, x)
    assert _decisions(report)["1"] == (FOLDED, ("0",), "forward")
    assert [e.name for e in report.left] == ["3"] and BATCH_STATISTICS in (report.left[0].reason or "")


def test_a_fold_that_would_overflow_float32_is_left_with_the_reason() -> None:
    x = _x(2, 3, 6, 6)
    model = calibrated_by_training(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), x)
    with torch.no_grad():
        model[0].weight.mul_(1e10)
        model[1].weight.fill_(1e30)
        model[1].running_var.fill_(1e-30)  # scale ~ 1e30 / sqrt(eps) ~ 3e32: the folded weight exceeds 3.4e38
    program = _export(model, x)
    folded, report = fold_exported(program)
    assert not report.folded and "folding would overflow float32" in (report.left[0].reason or "")
    assert plan_exported(program).entries == report.entries  # the dry run does the arithmetic, as for a module
    assert _norm_nodes(folded) == 1


# --------------------------------------------------------------------------------- every layer form


LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6)), (2, 3, 11)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 4, 2), nn.BatchNorm3d(4)), (2, 2, 5, 5, 5)),
    "grouped": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, groups=4, bias=False), nn.BatchNorm2d(8)), (2, 4, 7, 7)),
    "transposed, grouped": (lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6)),
                            (2, 4, 5, 5)),
    "padding='same'": (lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1, padding="same")), (2, 3, 5, 5)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_every_layer_form_folds(name: str) -> None:
    build, shape = LAYERS[name]
    torch.manual_seed(0)
    x = _x(*shape)
    report = fold_and_check(calibrated_by_training(build(), x), x)
    assert len(report.folded) == 1 and not report.left


def test_a_shared_weight_is_left_with_the_reason() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) + self.conv(x * 2)

    x = _x(2, 3, 4, 4)
    program = _export(calibrated_by_training(Shared(), x), x)
    folded, report = fold_exported(program)
    assert len(report.left) == 1 and "'conv.weight' of the layer 'conv' is also read by another node" in (
        report.left[0].reason or "")
    assert_same_outputs(program.module(), folded.module(), x)


def test_a_linear_on_3d_input_and_a_conv_on_an_unbatched_input_are_left_with_the_axis_reason() -> None:
    x = _x(2, 16, 4)  # (batch, tokens, features): the norm normalises the 16 tokens, the linear layer's features
    tokens = calibrated_by_training(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(16)), x)
    report = fold_and_check(tokens, x)
    assert "'0' has 4 output channels but the norm has 16" in (report.left[0].reason or "")
    y = _x(3, 10)  # (channels, length): the norm's axis 1 is the length (8 after the conv), not the conv's channels
    unbatched = calibrated_by_training(nn.Sequential(nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8)), y)
    program = _export(unbatched, y)
    folded, report = fold_exported(program)
    assert "has its channels on axis 0 of a 2-D output but the norm normalises axis 1" in (report.left[0].reason or "")
    assert_same_outputs(program.module(), folded.module(), y)


def test_a_linear_with_a_vector_weight_leaves_the_norm_with_the_channel_reason() -> None:
    """``F.linear`` accepts a 1-D weight ``(in,)``: its input channels are its only size, not a crash."""
    class VectorWeight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.w = nn.BatchNorm1d(4), nn.Parameter(torch.randn(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(self.bn(x), self.w)

    x = _x(2, 4, 8)
    program = _export(calibrated_by_training(VectorWeight(), x), x)
    folded, report = fold_exported(program)
    assert len(report.left) == 1 and "'linear' after it has 8 input channels but the norm has 4" in (
        report.left[0].reason or "")
    assert_same_outputs(program.module(), folded.module(), x)


def test_a_decomposed_program_folds_into_convolution_nodes_and_names_run_decompositions_for_addmm() -> None:
    """``run_decompositions`` turns conv2d into aten.convolution (with a transposed flag) and batch_norm into
    ``_native_batch_norm_legit_no_training`` + ``getitem 0``; linear becomes addmm, which is left with a hint."""
    x = _x(2, 4, 5, 5)
    model = calibrated_by_training(nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3, bias=False),
        nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 9 * 9, 3), nn.BatchNorm1d(3),
    ), x)
    program = _export(model, x).run_decompositions()
    assert any(n.target == NORM_OPS[1] for n in program.graph.nodes)
    folded, report = fold_exported(program)
    assert _decisions(report)["1"] == (FOLDED, ("0",), "forward") and _decisions(report)["3"] == (FOLDED, ("2",), "forward")
    assert [e.name for e in report.left] == ["6"] and "before run_decompositions()" in (report.left[0].reason or "")
    assert_same_outputs(model, folded.module(), x)
    assert report.parameters_removed == 2 * (6 + 4) - 4


# -------------------------------------------------------------------------- programs and their files


def test_the_folded_program_saves_loads_and_keeps_its_dynamic_batch() -> None:
    x = _x(2, 3, 8, 8)
    model = calibrated_by_training(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4), nn.Flatten(),
        nn.Linear(4, 3)), x)
    batch = torch.export.Dim("batch", min=2, max=16)
    folded, report = fold_exported(_export(model, x, dynamic_shapes=({0: batch},)))
    # the reshape is checked on symbolic shapes: the backward fold through flatten holds for every batch size
    assert _decisions(report) == {"1": (FOLDED, ("0",), "forward"), "4": (FOLDED, ("6",), "backward")}
    assert not report.notes
    buffer = io.BytesIO()
    torch.export.save(folded, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    assert_same_outputs(model, loaded.module(), _x(5, 3, 8, 8))
    assert [(int(r.lower), int(r.upper)) for r in loaded.range_constraints.values()] == [(2, 16)]


def test_without_example_inputs_the_error_says_what_to_pass() -> None:
    x = _x(2, 3, 4, 4)
    program = _export(nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)).eval(), x)
    program.example_inputs = None
    with pytest.raises(InvalidInputError, match="example_inputs="):
        fold_exported(program)
    assert len(plan_exported(program).folded) == 1  # a dry run needs no inputs
    folded, report = fold_exported(program, example_inputs=x)
    assert len(report.folded) == 1


# ------------------------------------------------------------------------------------------ real models


REAL = {
    "torchvision resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32)),
    "torchvision mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), (2, 3, 32, 32)),
    "timm resnet18d": (lambda: timm.create_model("resnet18d", num_classes=10), (2, 3, 32, 32)),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_models_fold_as_many_norms_as_the_module_api(name: str) -> None:
    build, shape = REAL[name]
    torch.manual_seed(0)
    x = _x(*shape)
    model = calibrated_by_training(build(), x)
    report = fold_and_check(model, x)  # includes: every decision equals the module API's
    assert report.folded and not report.left


# ------------------------------------------------------------------------------------------------- CLI


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    source = str(Path(bnfold.__file__).resolve().parents[1])
    path = os.pathsep.join([source, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    environment = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "bnfold", *args], cwd=cwd, capture_output=True, text=True,
                          env=environment, timeout=300)


def test_cli_inspect_plans_without_folding_and_a_training_mode_program_exits_2(tmp_path: Path) -> None:
    x = _x(2, 3, 6, 6)
    model = calibrated_by_training(Concatenated(), x)
    torch.export.save(_export(model, x), tmp_path / "eval.pt2")
    torch.export.save(_export(Concatenated().train(), x), tmp_path / "train.pt2")
    inspected = _cli("inspect", str(tmp_path / "eval.pt2"), "--json", cwd=tmp_path)
    assert inspected.returncode == 0, inspected.stderr
    payload = json.loads(inspected.stdout)
    assert payload["applied"] is False and payload["capture"] == "torch.export graph"
    assert [(e["name"], e["status"], e["into"]) for e in payload["entries"]] == [("bn", FOLDED, ["a", "b"])]
    out = tmp_path / "out.pt2"
    refused = _cli("fold", str(tmp_path / "train.pt2"), "-o", str(out), cwd=tmp_path)
    assert refused.returncode == 2 and not out.exists()
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "training mode" in lines[0], refused.stderr
