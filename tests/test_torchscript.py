"""The TorchScript adapter on the one core: every row of issue 11's table, scripted and traced, decides like the
module API, and the folded frozen graph computes what the original did (float32 tolerance, see conftest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bnfold
from bnfold.backends.torchscript import fold_script, plan_script
from bnfold.core.graph import BATCH_STATISTICS
from bnfold.errors import InvalidInputError, NonFiniteStatisticsError, TrainingModeError
from conftest import assert_same_outputs, calibrated_by_training, script_or_trace
from helpers.reasons import without_names

HOW = ("script", "trace")


def _decisions(report: bnfold.FoldReport) -> dict[str, tuple[str, tuple[str, ...], str | None]]:
    return {e.name: (e.status, tuple(e.into), e.direction) for e in report.entries}


def _reasons(report: bnfold.FoldReport) -> dict[str, str]:
    return {e.name: e.reason or "" for e in report.left}


class Through(nn.Module):
    """conv -> op -> BN."""

    def __init__(self, op: nn.Module) -> None:
        super().__init__()
        self.conv, self.op, self.bn = nn.Conv2d(3, 6, 3), op, nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.op(self.conv(x)))


class NormThenLinear(nn.Module):
    """BN -> global pool -> flatten -> Linear: backward through a pool and a reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.pool, self.fc = nn.BatchNorm2d(5), nn.AdaptiveAvgPool2d(1), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.bn(x)), 1))


class NormThenConv(nn.Module):
    def __init__(self, padding_mode: str) -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


class Concatenated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.conv_b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 3, padding=1, bias=False), nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat([self.conv_a(x), self.conv_b(x)], 1))


class LinearNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(7, 5), nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class ConvNormNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.bn1(self.conv(x)))


class NormNormLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn1, self.bn2, self.fc = nn.BatchNorm1d(6), nn.BatchNorm1d(6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn2(self.bn1(x)))


class SecondReader(nn.Module):
    """conv -> BN with the conv's output read again; BN -> zero-padded conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.bn_in, self.padded = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y + self.padded(self.bn_in(x))


def _non_negative_scales(model: nn.Module) -> nn.Module:
    """Max pooling commutes with ``s * x + t`` only for ``s >= 0``: make every gamma positive."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.abs_()
    return model


# (model builder, input shape, expected decisions: norm -> (status, into, direction))
TABLE = {
    "conv -> AvgPool -> BN": (lambda: Through(nn.AvgPool2d(2)), (2, 3, 10, 10),
                              {"bn": ("folded", ("conv",), "forward")}),
    "conv -> MaxPool -> BN": (lambda: _non_negative_scales(Through(nn.MaxPool2d(2))), (2, 3, 10, 10),
                              {"bn": ("folded", ("conv",), "forward")}),
    "conv -> Upsample -> BN": (lambda: Through(nn.Upsample(scale_factor=2, mode="bilinear")), (2, 3, 6, 6),
                               {"bn": ("folded", ("conv",), "forward")}),
    "conv -> Dropout -> BN": (lambda: Through(nn.Dropout(0.3)), (2, 3, 6, 6),
                              {"bn": ("folded", ("conv",), "forward")}),
    "BN -> pool -> flatten -> Linear": (NormThenLinear, (4, 5, 3, 3), {"bn": ("folded", ("fc",), "backward")}),
    "BN -> reflect-padded conv": (lambda: NormThenConv("reflect"), (2, 3, 6, 6),
                                  {"bn": ("folded", ("conv",), "backward")}),
    "cat(conv_a, conv_b) -> BN": (Concatenated, (2, 3, 5, 5), {"bn": ("folded", ("conv_a", "conv_b"), "forward")}),
    "Linear -> BatchNorm1d": (LinearNorm, (8, 7), {"bn": ("folded", ("fc",), "forward")}),
    "conv -> BN -> BN": (ConvNormNorm, (2, 3, 6, 6),
                         {"bn1": ("folded", ("conv",), "forward"), "bn2": ("folded", ("conv",), "forward")}),
    "BN -> BN -> Linear": (NormNormLinear, (8, 6),
                           {"bn1": ("folded", ("fc",), "backward"), "bn2": ("folded", ("fc",), "backward")}),
    "second reader; zero-padded conv after": (SecondReader, (2, 3, 5, 5),
                                              {"bn": ("left", (), None), "bn_in": ("left", (), None)}),
    # A string padding: tracing records aten::_convolution_mode, scripting aten::conv<n>d.padding. "valid" and a
    # "same" of nothing to pad (1x1) take a backward fold; "same" around a larger kernel pads with zeros.
    "conv1d same -> BN; BN -> conv1d valid": (
        lambda: nn.Sequential(nn.Conv1d(3, 6, 3, padding="same"), nn.BatchNorm1d(6), nn.ReLU(), nn.BatchNorm1d(6),
                              nn.Conv1d(6, 4, 3, padding="valid")), (2, 3, 11),
        {"1": ("folded", ("0",), "forward"), "3": ("folded", ("4",), "backward")}),
    "conv2d same dilated grouped -> BN; BN -> conv2d same": (
        lambda: nn.Sequential(nn.Conv2d(4, 8, 3, padding="same", dilation=2, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding="same", groups=4)), (2, 4, 9, 9),
        {"1": ("folded", ("0",), "forward"), "3": ("left", (), None)}),
    "conv3d same even kernel -> BN; BN -> conv3d same 1x1x1": (
        lambda: nn.Sequential(nn.Conv3d(2, 4, 2, padding="same"), nn.BatchNorm3d(4), nn.ReLU(), nn.BatchNorm3d(4),
                              nn.Conv3d(4, 3, 1, padding="same")), (2, 2, 5, 5, 5),
        {"1": ("folded", ("0",), "forward"), "3": ("folded", ("4",), "backward")}),
}


def _calibrated(build, shape: tuple[int, ...]) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(*shape)
    model = build()
    model = calibrated_by_training(model, x)
    if isinstance(model, Through) and isinstance(model.op, nn.MaxPool2d):
        _non_negative_scales(model)  # calibration draws new gammas
    return model, x


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("row", list(TABLE))
def test_each_row_of_the_table_decides_like_the_module_api_and_keeps_the_outputs(row: str, how: str) -> None:
    build, shape, expected = TABLE[row]
    model, x = _calibrated(build, shape)
    scripted = script_or_trace(model, x, how)
    before = {k: v.clone() for k, v in scripted.state_dict().items()}

    planned = plan_script(scripted, example_inputs=x)
    folded, report = fold_script(scripted, example_inputs=x)

    assert _decisions(report) == expected
    assert _decisions(planned) == expected and planned.applied is False and report.applied is True
    assert _decisions(bnfold.plan(model, x)) == expected  # the module API's answer is the target
    module_reasons = _reasons(bnfold.plan(model, x))
    assert list(_reasons(report)) == list(module_reasons)
    # a reason names its neighbours as each format shows them: the same sentence once the names are out
    assert [without_names(r) for r in _reasons(report).values()] == [without_names(r) for r in module_reasons.values()]
    assert len(folded.graph.findAllNodes("aten::batch_norm")) == len(report.left)
    assert_same_outputs(scripted, folded, x)
    assert all(torch.equal(v, scripted.state_dict()[k]) for k, v in before.items())  # the input is untouched


@pytest.mark.parametrize("how", HOW)
def test_a_second_reader_and_a_zero_padded_conv_are_left_with_the_cores_reasons(how: str) -> None:
    model, x = _calibrated(SecondReader, (2, 3, 5, 5))
    reasons = _reasons(fold_script(script_or_trace(model, x, how), example_inputs=x)[1])
    assert "the output of 'conv' is also used by" in reasons["bn"]
    assert "'padded', cannot absorb it exactly: it pads its input with zeros" in reasons["bn_in"]


PRODUCERS = {
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Conv2d(8, 8, 3, groups=4, bias=False), nn.BatchNorm2d(8)), (2, 3, 9, 9)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6)), (2, 3, 11)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 4, 2), nn.BatchNorm3d(4)), (2, 2, 5, 5, 5)),
    "transposed, grouped": (lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6)),
                            (2, 4, 5, 5)),
}


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("name", list(PRODUCERS))
def test_every_producer_kind_absorbs_the_norm_after_it(name: str, how: str) -> None:
    build, shape = PRODUCERS[name]
    model, x = _calibrated(build, shape)
    scripted = script_or_trace(model, x, how)
    folded, report = fold_script(scripted)  # no example inputs: channels-first layers need no shapes
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(report.folded) == norms and not report.left
    assert not folded.graph.findAllNodes("aten::batch_norm")
    assert_same_outputs(scripted, folded, x)
    expected_removed = sum(2 * m.num_features for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    added = sum(m.out_channels for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd) and m.bias is None)
    assert report.parameters_removed == expected_removed - added


class FunctionalValid(nn.Module):
    """``F.conv2d(..., padding="valid")``: a string padding outside ``nn.Conv2d`` (traced: aten::_convolution_mode)."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, channels, 3, 3) / 5)
        self.bias = nn.Parameter(torch.randn(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, self.weight, self.bias, padding="valid")


@pytest.mark.parametrize("how", HOW)
def test_string_padded_convs_fold_and_the_folded_archive_loads_from_a_fresh_path(how: str, tmp_path: Path) -> None:
    model, x = _calibrated(lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding="same"), nn.BatchNorm2d(6), nn.ReLU(),
                                                 nn.BatchNorm2d(6), FunctionalValid(6, 4)), (2, 3, 8, 8))
    folded, report = fold_script(script_or_trace(model, x, how), example_inputs=x)
    assert _decisions(report) == {"1": ("folded", ("0",), "forward"), "3": ("folded", ("4",), "backward")}
    path = tmp_path / "fresh" / "folded.pt"
    path.parent.mkdir()
    torch.jit.save(folded, str(path))
    loaded = torch.jit.load(str(path))
    layer = "aten::_convolution_mode" if how == "trace" else "aten::conv2d"
    assert len(loaded.graph.findAllNodes(layer)) == 2 and not loaded.graph.findAllNodes("aten::batch_norm")
    assert_same_outputs(model, loaded, x)


def test_the_dry_run_changes_nothing_and_reports_what_the_fold_does() -> None:
    model, x = _calibrated(ConvNormNorm, (2, 3, 6, 6))
    scripted = script_or_trace(model, x, "script")
    graph_before = str(scripted.inlined_graph)
    state_before = {k: v.clone() for k, v in scripted.state_dict().items()}
    planned = plan_script(scripted, example_inputs=x)
    assert str(scripted.inlined_graph) == graph_before and len(scripted.inlined_graph.findAllNodes("aten::batch_norm")) == 2
    assert all(torch.equal(v, scripted.state_dict()[k]) for k, v in state_before.items())
    folded_report = fold_script(scripted, example_inputs=x)[1]
    assert planned.applied is False and planned.entries == folded_report.entries
    assert planned.parameters_after == folded_report.parameters_after


@pytest.mark.parametrize("how", HOW)
def test_a_reshape_without_example_inputs_is_refused_with_the_cores_hint(how: str) -> None:
    class Reshaped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x).flatten(2))

    model, x = _calibrated(Reshaped, (2, 3, 4, 4))
    scripted = script_or_trace(model, x, how)
    without = plan_script(scripted)
    assert "pass example_inputs" in _reasons(without)["bn"]
    folded, report = fold_script(scripted, example_inputs=x)
    assert _decisions(report) == {"bn": ("folded", ("conv",), "forward")}
    assert_same_outputs(scripted, folded, x)


@pytest.mark.parametrize("how", HOW)
def test_nan_statistics_raise_non_finite_statistics_error(how: str) -> None:
    model, x = _calibrated(ConvNormNorm, (2, 3, 6, 6))
    scripted = script_or_trace(model, x, how)
    scripted.bn2.running_var[1] = float("nan")
    with pytest.raises(NonFiniteStatisticsError, match="bn2"):
        fold_script(scripted, example_inputs=x)
    with pytest.raises(NonFiniteStatisticsError, match="bn2"):
        plan_script(scripted, example_inputs=x)


def test_a_model_in_training_mode_raises_training_mode_error() -> None:
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)))
    with pytest.raises(TrainingModeError, match=r"call \.eval\(\)"):
        fold_script(scripted)
    with pytest.raises(TrainingModeError):
        plan_script(scripted)


def test_an_nn_module_is_refused_with_the_right_function_to_call() -> None:
    with pytest.raises(InvalidInputError, match="bnfold.fold"):
        fold_script(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).eval())  # type: ignore[arg-type]


@pytest.mark.parametrize("how", HOW)
def test_a_norm_with_batch_statistics_inside_an_eval_model_is_left_with_the_shared_reason(how: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4))
    model, x = _calibrated(lambda: model, (2, 3, 4, 4))
    scripted = script_or_trace(model, x, how)
    folded, report = fold_script(scripted, example_inputs=x)
    assert BATCH_STATISTICS in _reasons(report)["1"]
    assert _decisions(report)["3"] == ("folded", ("2",), "forward")
    assert_same_outputs(scripted, folded, x)


def test_a_fold_that_would_overflow_float32_is_left_with_the_reason() -> None:
    model = LinearNorm()
    with torch.no_grad():
        model.fc.weight.fill_(1e7)
        model.bn.weight.fill_(1e30)
        model.bn.running_var.zero_()  # finite statistics, but gamma / sqrt(eps) times the weight exceeds float32
    model.eval()
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    scripted = script_or_trace(model, x, "script")
    folded, report = fold_script(scripted, example_inputs=x)
    assert _decisions(report) == {"bn": ("left", (), None)}
    assert "would overflow float32" in _reasons(report)["bn"]
    assert len(folded.graph.findAllNodes("aten::batch_norm")) == 1


def _zoo_model(name: str) -> nn.Module:
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=10)
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=10)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_050"])
def test_real_models_fold_as_many_norms_as_the_module_api(name: str, how: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = calibrated_by_training(_zoo_model(name), x)
    scripted = script_or_trace(model, x, how)
    folded, report = fold_script(scripted, example_inputs=x)
    module_report = bnfold.plan(model, x)
    assert _decisions(report) == _decisions(module_report)  # the same norms, into the same layers, the same way
    assert len(report.folded) > 0
    assert not folded.graph.findAllNodes("aten::batch_norm") or module_report.left
    assert_same_outputs(scripted, folded, x)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bnfold", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ}, timeout=300)


def test_cli_inspect_on_an_archive_is_a_dry_run_and_training_mode_exits_2(tmp_path: Path) -> None:
    model, x = _calibrated(lambda: Through(nn.AvgPool2d(2)), (1, 3, 10, 10))
    archive = tmp_path / "model.ts"
    torch.jit.save(script_or_trace(model, x, "script"), str(archive))
    before = archive.read_bytes()
    result = _cli("inspect", str(archive), "--input-shape", "1,3,10,10", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["applied"] is False and report["summary"]["folded"] == 1
    assert report["entries"][0]["into"] == ["conv"] and report["entries"][0]["direction"] == "forward"
    assert archive.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.ts"]

    training = tmp_path / "training.ts"
    torch.jit.save(torch.jit.script(Through(nn.AvgPool2d(2)).train()), str(training))
    refused = _cli("fold", str(training), "-o", str(tmp_path / "out.ts"), "--input-shape", "1,3,10,10", cwd=tmp_path)
    assert refused.returncode == 2 and "error:" in refused.stderr and "training mode" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "out.ts").exists()


def test_a_module_frozen_before_the_fold_counts_its_constants_as_parameters() -> None:
    """``torch.jit.freeze`` turns weights into constants: the report counts those (it read ``0 -> -N`` before), and
    a fold of it and of the module it was frozen from remove the same elements (norms' statistics included)."""
    model, x = _calibrated(ConvNormNorm, (2, 3, 6, 6))
    scripted = script_or_trace(model, x, "trace")
    frozen = torch.jit.freeze(scripted, optimize_numerics=False)  # no conv + BN folding by freeze itself
    assert len(frozen.graph.findAllNodes("aten::batch_norm")) == 2 and not list(frozen.parameters())
    weights = sum(t.numel() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())
    unfrozen, report = fold_script(scripted, example_inputs=x)[1], fold_script(frozen, example_inputs=x)[1]
    planned = plan_script(frozen, example_inputs=x)
    assert report.parameters_before == planned.parameters_before == weights
    removed = unfrozen.parameters_removed + unfrozen.buffers_before - unfrozen.buffers_after
    assert report.parameters_removed == planned.parameters_removed == removed > 0
    assert report.buffers_before == report.buffers_after == 0


def test_constants_merged_by_freezing_do_not_block_a_fold() -> None:
    """Freezing merges equal constants (a zero conv bias and a fresh norm's zero beta): each fold gets new ones."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[0].bias.zero_()
        model[2].bias.zero_()
        model[1].running_var.fill_(0.5)
        model[3].running_mean.fill_(0.25)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    scripted = script_or_trace(model, x, "script")
    folded, report = fold_script(scripted, example_inputs=x)
    assert _decisions(report) == {"1": ("folded", ("0",), "forward"), "3": ("folded", ("2",), "forward")}
    assert_same_outputs(scripted, folded, x)


def test_a_norm_inside_control_flow_is_reported_and_left() -> None:
    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.bn_inner = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            if bool(y.sum() > 0):
                y = self.bn_inner(y)
            return y

    model, x = _calibrated(Branching, (2, 3, 4, 4))
    scripted = script_or_trace(model, x, "script")
    folded, report = fold_script(scripted, example_inputs=x)
    assert _decisions(report)["bn"] == ("folded", ("conv",), "forward")  # its output's readers are not touched
    assert "control flow" in _reasons(report)["bn_inner"]
    assert_same_outputs(scripted, folded, x)
