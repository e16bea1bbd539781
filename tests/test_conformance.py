"""One model, four formats, one answer: the same decisions, the same reasons, the same outputs.

Every small model below is folded through the module API, a traced TorchScript archive, a torch.export program and
an ONNX file. For each format the test asserts, norm by norm in execution order, the expected decision (forward,
backward, or left with a phrase of the core's reason), and that the folded model computes what the original did
(float32 tolerance, :data:`bnfold.verification.TOLERANCES`). For every norm left, the four formats' reasons must be
the same sentence once the names each format gives its layers and operations are taken out
(:func:`helpers.reasons.without_names`). The policies are checked the same way: a model in training mode is a
``TrainingModeError`` and NaN statistics are a ``NonFiniteStatisticsError`` in every format.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import bnfold
from bnfold.core.graph import BATCH_STATISTICS
from bnfold.report import FoldReport
from bnfold.verification import TOLERANCES
from conftest import calibrated_by_training
from helpers.cli import python_without
from helpers.reasons import without_names

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TOLERANCE = TOLERANCES[torch.float32]
FORWARD, BACKWARD = "forward", "backward"


@dataclass(frozen=True)
class Case:
    """A model, its input, and per norm (execution order) ``"forward"``, ``"backward"`` or a phrase of the reason."""

    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    expected: tuple[str, ...]
    positive_gamma: bool = False  # max pooling commutes with the norm only when every scale is >= 0


class _Sum(nn.Module):
    def __init__(self, conv: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.conv, self.norm = conv, norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.norm(y) + y  # the conv's output has a second reader


class _Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.norm = nn.BatchNorm2d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(torch.cat([self.a(x), self.b(x)], 1)))


class _Affine(nn.Module):
    """``x * scale + bias`` (or ``x / 2``, ``x - bias``) written in Python between two layers, with stored constants
    of one value per channel: the chain an exporter writes as ``Mul`` / ``Add`` / ``Div`` / ``Sub`` nodes."""

    def __init__(self, channels: int, rank: int, how: str) -> None:
        super().__init__()
        shape = (channels,) + (1,) * (rank - 2)
        self.scale = nn.Parameter(torch.rand(shape) + 0.5)
        self.bias = nn.Parameter(torch.randn(shape))
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "add":
            return x + self.bias
        if self.how == "sub-div":
            return (x - self.bias) / 2
        if self.how == "scalar-add":
            return 0.5 * x + 3.0
        if self.how == "div":
            return x / self.scale
        return x * self.scale + self.bias


class _Positional(nn.Module):
    """Adds a constant that varies over positions, not per channel: no per-channel affine map."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(8, 6, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class _Squeezed(nn.Module):
    """A 2-D convolution over (C, 1, T), squeezed to (N, C, T) and normalised with a 1-D norm (text recognisers)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 8, (4, 3)), nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x).squeeze(2)))


class _Crepe(nn.Module):
    """An audio pitch model's head: conv -> relu -> BN -> max pool, channels moved before time, flattened, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.classifier = nn.Conv2d(1, 8, (5, 1)), nn.BatchNorm2d(8), nn.Linear(8 * 4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(self.norm(torch.relu(self.conv(x))), (2, 1), (2, 1))
        return torch.sigmoid(self.classifier(x.permute(0, 2, 1, 3).reshape(-1, 8 * 4)))


class _Mixing(nn.Module):
    """A reshape that mixes channels: (N, 8, 4) read as (N, 4, 8) before a Linear of 8 features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.fc = nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(torch.relu(self.conv(x))).reshape(x.shape[0], 4, 8))


def _seq(*layers: nn.Module) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(*layers)


CASES: dict[str, Case] = {
    "conv-avgpool-bn": Case(_seq(nn.Conv2d(3, 8, 3), nn.AvgPool2d(2), nn.BatchNorm2d(8), nn.ReLU()), (2, 3, 12, 12), (FORWARD,)),
    "conv-maxpool-bn": Case(_seq(nn.Conv2d(3, 8, 3), nn.MaxPool2d(2), nn.BatchNorm2d(8), nn.ReLU()), (2, 3, 12, 12), (FORWARD,),
                            positive_gamma=True),
    "conv-upsample-bn": Case(_seq(nn.Conv2d(3, 8, 3), nn.Upsample(scale_factor=2.0), nn.BatchNorm2d(8), nn.ReLU()),
                             (2, 3, 8, 8), (FORWARD,)),
    "conv-dropout-bn": Case(_seq(nn.Conv2d(3, 8, 3), nn.Dropout(0.3), nn.BatchNorm2d(8), nn.ReLU()), (2, 3, 8, 8), (FORWARD,)),
    "bn-flatten-linear": Case(
        _seq(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 5)),
        (2, 3, 8, 8), (BACKWARD,)),
    "bn-reflect-conv": Case(_seq(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")),
                            (2, 3, 8, 8), (BACKWARD,)),
    "cat-bn": Case(_Cat, (2, 3, 8, 8), (FORWARD,)),
    "linear-bn1d": Case(_seq(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)), (4, 6), (FORWARD,)),
    "conv-bn-bn": Case(_seq(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.BatchNorm2d(8), nn.ReLU()), (2, 3, 8, 8),
                       (FORWARD, FORWARD)),
    "bn-bn-linear": Case(_seq(nn.ReLU(), nn.BatchNorm1d(6), nn.BatchNorm1d(6), nn.Linear(6, 3)), (4, 6), (BACKWARD, BACKWARD)),
    "second-reader": Case(lambda: _Sum(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), (2, 3, 8, 8), ("also used by",)),
    "bn-zero-padded-conv": Case(_seq(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3, padding=1)), (2, 3, 8, 8),
                                ("pads its input",)),
    # A string padding (traced: aten::_convolution_mode): "same" pads with zeros unless the kernel is 1x1.
    "conv-same-bn": Case(_seq(nn.Conv2d(3, 8, 4, padding="same"), nn.BatchNorm2d(8), nn.ReLU()), (2, 3, 8, 8),
                         (FORWARD,)),  # (no dilation: onnxruntime runs no dilated auto_pad=SAME_UPPER)
    "bn-valid-conv": Case(_seq(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3, padding="valid")), (2, 3, 8, 8),
                          (BACKWARD,)),
    "bn-same-1x1-conv": Case(_seq(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 8, 1, padding="same")), (2, 3, 8, 8),
                             (BACKWARD,)),
    "bn-same-conv": Case(_seq(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 8, (3, 5), padding="same", groups=2)),
                         (2, 4, 8, 8), ("pads its input",)),
    # Constants of one value per channel (or one value) between a layer and its norm: folded through (issue 19).
    "convtranspose-add-bn": Case(_seq(nn.ConvTranspose2d(3, 8, 2, 2, bias=False), _Affine(8, 4, "add"),
                                      nn.BatchNorm2d(8), nn.ReLU()), (2, 3, 6, 6), (FORWARD,)),
    "conv-scale-shift-bn": Case(_seq(nn.Conv2d(3, 8, 3), _Affine(8, 4, "scale-shift"), nn.BatchNorm2d(8), nn.ReLU()),
                                (2, 3, 8, 8), (FORWARD,)),
    "conv-sub-div-bn": Case(_seq(nn.Conv2d(3, 8, 3), _Affine(8, 4, "sub-div"), nn.BatchNorm2d(8), nn.ReLU()),
                            (2, 3, 8, 8), (FORWARD,)),
    "linear-div-bn1d": Case(_seq(nn.Linear(6, 5), _Affine(5, 2, "div"), nn.BatchNorm1d(5), nn.ReLU()), (4, 6),
                            (FORWARD,)),
    "bn-scalar-linear": Case(_seq(nn.ReLU(), nn.BatchNorm1d(6), _Affine(6, 2, "scalar-add"), nn.Linear(6, 3)), (4, 6),
                             (BACKWARD,)),
    "bn-scale-shift-linear": Case(_seq(nn.ReLU(), nn.BatchNorm1d(6), _Affine(6, 2, "scale-shift"), nn.Linear(6, 3)),
                                  (4, 6), (BACKWARD,)),
    "conv-positional-add-bn": Case(_seq(nn.Conv2d(3, 8, 3), _Positional(), nn.BatchNorm2d(8), nn.ReLU()), (2, 3, 8, 8),
                                   ("varies over positions",)),
    # Squeezes that keep the channel axis, and norms whose channels a reshape spreads over a Linear's features.
    "conv-squeeze-bn1d": Case(_Squeezed, (2, 3, 4, 10), (FORWARD,)),
    "bn-flatten-linear-spatial": Case(
        _seq(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)),
        (2, 3, 4, 4), (BACKWARD,)),
    "bn-maxpool-permute-reshape-linear": Case(_Crepe, (3, 1, 12, 1), (BACKWARD,), positive_gamma=True),
    "bn-reshape-mixing-linear": Case(_Mixing, (2, 3, 6), ("mixes the values of different channels",)),
}


def _prepared(case: Case) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = case.build()
    x = torch.randn(case.shape)
    calibrated_by_training(model, x)
    if case.positive_gamma:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.data.abs_()
    return model, x


# ------------------------------------------------------------------------------------------------ the formats


def _module(model: nn.Module, x: torch.Tensor) -> tuple[FoldReport, Callable[[torch.Tensor], Any]]:
    folded = bnfold.fold(model, x)
    return bnfold.report_for(folded), folded


def _torchscript(model: nn.Module, x: torch.Tensor) -> tuple[FoldReport, Callable[[torch.Tensor], Any]]:
    from bnfold.backends.torchscript import fold_script

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (x,), check_trace=False)  # a train-mode model changes its statistics
    folded, report = fold_script(traced, example_inputs=x)
    return report, folded


def _exported(model: nn.Module, x: torch.Tensor) -> tuple[FoldReport, Callable[[torch.Tensor], Any]]:
    from bnfold.backends.exported import fold_exported

    program = torch.export.export(model, (x,))
    folded, report = fold_exported(program, example_inputs=x)
    return report, folded.module()


def _onnx_model(model: nn.Module, x: torch.Tensor) -> Any:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, input_names=["x"], output_names=["y"], do_constant_folding=False,
                          dynamo=False, training=torch.onnx.TrainingMode.PRESERVE)
    return onnx.load_from_string(buffer.getvalue())


def _onnx(model: nn.Module, x: torch.Tensor) -> tuple[FoldReport, Callable[[torch.Tensor], Any]]:
    import bnfold.onnx as bnfold_onnx

    result = bnfold_onnx.fold(_onnx_model(model, x), verify=False)
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    return result.report, lambda t: torch.from_numpy(session.run(None, {"x": t.numpy()})[0])


FORMATS = {"module": _module, "torchscript": _torchscript, "exported": _exported, "onnx": _onnx}


def _decisions(report: FoldReport) -> list[str]:
    return [entry.direction or "" if entry.status == "folded" else f"left: {entry.reason}" for entry in report.entries]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", CASES)
def test_every_format_decides_and_computes_the_same(name: str, fmt: str) -> None:
    case = CASES[name]
    model, x = _prepared(case)
    with torch.no_grad():
        expected = model(x)
    report, run = FORMATS[fmt](model, x)
    decisions = _decisions(report)
    assert len(decisions) == len(case.expected), decisions
    for decision, want in zip(decisions, case.expected, strict=True):
        if want in (FORWARD, BACKWARD):
            assert decision == want, decisions
        else:
            assert decision.startswith("left") and want in decision, decisions
    with torch.no_grad():
        actual = run(x)
    error = float((actual - expected).abs().max() / expected.abs().max())
    assert error <= TOLERANCE, error


def _batch_statistics() -> tuple[nn.Module, torch.Tensor]:
    """A norm that keeps no running statistics (it normalises with the batch's own) after one that folds."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    x = torch.randn(2, 3, 8, 8)
    return calibrated_by_training(model, x), x


def _one_norm_in_training_mode() -> tuple[nn.Module, torch.Tensor]:
    """conv -> BN -> BN with the second norm alone in training mode."""
    model, x = _prepared(CASES["conv-bn-bn"])
    model[2].train()
    model[2].momentum = 0.1  # see test_a_model_in_training_mode_is_refused_in_every_format
    return model, x


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_norm_using_batch_statistics_is_left_with_the_same_reason(fmt: str) -> None:
    model, x = _batch_statistics()
    report, run = FORMATS[fmt](model, x)
    first, second = _decisions(report)
    assert first == FORWARD and second.startswith("left") and BATCH_STATISTICS in second, (first, second)
    assert "track_running_stats=True" in second, second  # the remedy
    with torch.no_grad():
        expected, actual = model(x), run(x)
    assert float((actual - expected).abs().max() / expected.abs().max()) <= TOLERANCE


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_norm_in_training_mode_inside_an_eval_model_is_left_with_the_same_reason(fmt: str) -> None:
    model, x = _one_norm_in_training_mode()
    with torch.no_grad():
        expected = model(x.clone())  # computed first: the train-mode norm would update its statistics
    report, run = FORMATS[fmt](model, x)
    first, second = _decisions(report)
    assert first == FORWARD and second.startswith("left") and BATCH_STATISTICS in second, (first, second)
    assert "call model.eval()" in second, second  # the remedy
    with torch.no_grad():
        actual = run(x)
    assert float((actual - expected).abs().max() / expected.abs().max()) <= TOLERANCE


REFUSALS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    **{name: (lambda case=case: _prepared(case)) for name, case in CASES.items()
       if any(want not in (FORWARD, BACKWARD) for want in case.expected)},
    "batch-statistics": _batch_statistics,
    "one-norm-in-training-mode": _one_norm_in_training_mode,
}
"""Every model of this file that leaves a norm, built afresh for each format (a traced train-mode norm updates its
statistics)."""


def _left_without_names(build: Callable[[], tuple[nn.Module, torch.Tensor]]) -> dict[str, list[str]]:
    """Per format, the reasons of the norms left (execution order), with the names taken out."""
    reasons = {}
    for fmt, fold in FORMATS.items():
        report, _ = fold(*build())
        reasons[fmt] = [without_names(entry.reason or "") for entry in report.left]
    return reasons


@pytest.mark.parametrize("name", REFUSALS)
def test_every_format_leaves_a_norm_with_the_same_sentence(name: str) -> None:
    reasons = _left_without_names(REFUSALS[name])
    assert reasons["module"] and all(reason for reason in reasons["module"]), reasons
    for fmt, theirs in reasons.items():
        assert theirs == reasons["module"], (fmt, theirs, reasons["module"])


def test_names_taken_out_leave_the_rules_apart() -> None:
    """Taking the names out cannot make different refusals look alike: each model's module reasons differ from every
    other model's."""
    sentences = {}
    for name, build in REFUSALS.items():
        report = bnfold.plan(*build())
        sentences[name] = tuple(without_names(entry.reason or "") for entry in report.left)
    assert len(set(sentences.values())) == len(sentences), sentences


@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_statistics_are_refused_in_every_format(fmt: str) -> None:
    model, x = _prepared(CASES["conv-dropout-bn"])
    model[2].running_var[0] = float("nan")
    with pytest.raises(bnfold.NonFiniteStatisticsError):
        FORMATS[fmt](model, x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_model_in_training_mode_is_refused_in_every_format(fmt: str) -> None:
    model, x = _prepared(CASES["conv-avgpool-bn"])
    model.train()
    model[2].momentum = 0.1  # a cumulative average (momentum=None) makes torch.export trip on the batch counter
    with pytest.raises(bnfold.TrainingModeError):
        FORMATS[fmt](model, x)


def test_the_core_imports_without_torch_or_numpy() -> None:
    code = (
        "from bnfold.core import apply, commuting, graph, plan\n"
        "g = graph.Graph(method='test')\n"
        "g.add_unit('conv', graph.LAYER, 'Conv', layer=graph.LayerFacts(4, 3, 1))\n"
        "g.add_unit('bn', graph.NORM, 'BN', norm=graph.NormFacts(4))\n"
        "x = g.add_node(graph.INPUT, 'a model input')\n"
        "c = g.add_node(graph.LAYER, 'conv', [x.index], unit='conv')\n"
        "b = g.add_node(graph.NORM, 'bn', [c.index], unit='bn')\n"
        "g.add_node(graph.OUTPUT, 'the model output', [b.index])\n"
        "p = plan.make_plan(g)\n"
        "assert [(f.norm, f.layers, f.direction) for f in p.folds] == [('bn', ('conv',), 'forward')], p\n"
    )
    done = python_without(code, "torch", "numpy")
    assert done.returncode == 0, done.stderr


def test_numpy_arrays_fold_like_tensors() -> None:
    """The core's arithmetic gives the same numbers on numpy arrays as on tensors (ONNX uses the former)."""
    from bnfold.backends.modules import TorchNumerics
    from bnfold.core.apply import LayerTensors, Statistics, folded_backward, folded_forward, scale_shift
    from bnfold.onnx.adapter import NumpyNumerics

    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(6, 2, 3, 3, generator=generator), torch.randn(6, generator=generator)
    stats = [torch.randn(6, generator=generator), torch.rand(6, generator=generator) + 0.5]
    for numerics, convert in ((TorchNumerics(), lambda t: t), (NumpyNumerics(), lambda t: t.numpy())):
        s, t = scale_shift(Statistics(convert(stats[0]), convert(stats[1]), 1e-5), numerics)
        tensors = LayerTensors(convert(weight), convert(bias), out_axis=0, groups=3)
        forward = folded_forward(tensors, s, t, numerics)
        backward = folded_backward(LayerTensors(convert(weight), convert(bias), out_axis=0, groups=1), s[:2], t[:2], numerics)
        if numerics.__class__.__name__ == "TorchNumerics":
            reference = [np.asarray(a) for a in (*forward, *backward)]
        else:
            for got, want in zip((*forward, *backward), reference, strict=True):
                # the same float32 products; float64 bias sums may differ in order, so within one float32 rounding
                np.testing.assert_allclose(got, want, rtol=float(np.finfo(np.float32).eps), atol=0)
