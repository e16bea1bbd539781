"""One rule for what counts as a linear combination (bnfold.core.arithmetic), and the four formats agreeing on it.

The adapters state what they read of an addition, subtraction, product or division; the core decides. Before the
rule was one, the module adapter refused to merge ``a(x) + b(x) + n(x) + self.zero`` over the all-zero buffer
("adds the constant 'zero'") while TorchScript, torch.export and ONNX merged it; and the ONNX adapter took a zero
constant that broadcasts the sum to a larger batch for the number 0, so that the merged model lost the broadcast
(its verification refused the fold). The cross-format tests below run each case through the four formats and compare
every format's merge decisions with the others' and its outputs with the original model's.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import bnfold
from bnfold.core.arithmetic import linear_combination
from bnfold.core.graph import Operand
from bnfold.report import FoldReport
from bnfold.verification import TOLERANCES
from conftest import calibrated_by_training
from helpers.cli import python_without

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TOLERANCE = TOLERANCES[torch.float32]
OUT = (1, 4, 8, 8)


# ------------------------------------------------------------------------------------------------ the rule


def test_an_all_zero_constant_added_where_it_does_not_broadcast_is_the_number_0() -> None:
    facts = linear_combination("add", [Operand(input=0, shape=OUT), Operand(constant="zero", shape=(4, 1, 1),
                                                                            zero=True)], shape=OUT)
    assert facts.kind == "add"
    assert facts.attributes["operands"] == (Operand(input=0), Operand(number=0.0))
    assert facts.attributes["scalars"] == (0.0,)


def test_a_constant_that_broadcasts_the_sum_makes_it_no_linear_combination() -> None:
    larger = (2, 4, 8, 8)
    assert linear_combination("add", [Operand(input=0, shape=OUT), Operand(constant="zero", shape=larger, zero=True)],
                              shape=larger).kind == "other"
    # the output's shape unknown: the computed operand's stands for it
    assert linear_combination("sub", [Operand(input=0, shape=OUT), Operand(constant="c", shape=larger)]).kind == "other"


def test_computed_terms_of_different_shapes_are_no_sum_of_branches() -> None:
    operands = [Operand(input=0, shape=OUT), Operand(input=1, shape=(1, 4, 1, 1))]
    assert linear_combination("add", operands, shape=OUT).kind == "other"
    # a product of two computed tensors (a gate) stays a product: the planners say why it is no scale
    assert linear_combination("mul", operands, shape=OUT).kind == "mul"


def test_a_scale_that_broadcasts_the_scaled_tensor_is_no_scale() -> None:
    assert linear_combination("mul", [Operand(input=0, shape=OUT), Operand(constant="g", shape=(4, 1, 1))],
                              shape=OUT).kind == "mul"
    assert linear_combination("mul", [Operand(input=0, shape=OUT), Operand(constant="g", shape=(3, 4, 1, 1))],
                              shape=(3, 4, 8, 8)).kind == "other"


def test_without_shapes_a_zero_constant_stays_a_constant() -> None:
    facts = linear_combination("add", [Operand(input=0), Operand(constant="zero", shape=(4, 1, 1), zero=True)])
    assert facts.attributes["operands"][1] == Operand(constant="zero", shape=(4, 1, 1))


@pytest.mark.parametrize("alpha", [True, None, "2", object()])
def test_an_alpha_that_is_no_number_makes_it_other(alpha: object) -> None:
    assert linear_combination("add", [Operand(input=0), Operand(input=1)], alpha=alpha).kind == "other"


# ------------------------------------------------------------------------------------ the formats agree


class _ZeroIdentity(nn.Module):
    """A re-parameterisable block whose missing identity branch is a stored zero (the case the module adapter
    refused while the other three merged)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.n = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.register_buffer("zero", torch.zeros(4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) + self.n(x) + self.zero


class _BroadcastZero(nn.Module):
    """A zero that broadcasts the sum to a batch of 2 (the case the ONNX adapter merged away, changing the output
    shape): only the sum of the branches is a linear combination of them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.register_buffer("zero", torch.zeros(2, 4, 8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) + self.zero


Run = Callable[[nn.Module, torch.Tensor], tuple[FoldReport, Callable[[torch.Tensor], Any]]]


def _module(model: nn.Module, x: torch.Tensor) -> tuple[FoldReport, Callable[[torch.Tensor], Any]]:
    folded = bnfold.fold(model, x, merge_branches=True)
    return bnfold.report_for(folded), folded


def _torchscript(model: nn.Module, x: torch.Tensor) -> tuple[FoldReport, Callable[[torch.Tensor], Any]]:
    from bnfold.backends.torchscript import fold_script

    folded, report = fold_script(torch.jit.trace(model, (x,)), example_inputs=x, merge_branches=True)
    return report, folded


def _exported(model: nn.Module, x: torch.Tensor) -> tuple[FoldReport, Callable[[torch.Tensor], Any]]:
    from bnfold.backends.exported import fold_exported

    folded, report = fold_exported(torch.export.export(model, (x,)), merge_branches=True)
    return report, folded.module()


def _onnx(model: nn.Module, x: torch.Tensor) -> tuple[FoldReport, Callable[[torch.Tensor], Any]]:
    import bnfold.onnx as bnfold_onnx

    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, input_names=["x"], output_names=["y"], do_constant_folding=False,
                      dynamo=False)
    result = bnfold_onnx.fold(onnx.load_from_string(buffer.getvalue()), merge_branches=True, verify=False)
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    return result.report, lambda t: torch.from_numpy(session.run(None, {"x": t.numpy()})[0])


FORMATS: dict[str, Run] = {"module": _module, "torchscript": _torchscript, "exported": _exported, "onnx": _onnx}


@pytest.mark.parametrize(("build", "merged"), [(_ZeroIdentity, (2, 1, 0)), (_BroadcastZero, (2, 0, 0))],
                         ids=["zero-identity", "broadcast-zero"])
def test_every_format_merges_the_same_terms_and_computes_the_same(build: Callable[[], nn.Module],
                                                                  merged: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(OUT)
    model = calibrated_by_training(build(), x)
    with torch.no_grad():
        expected = model(x)
    decisions = {}
    for fmt, run in FORMATS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report, folded = run(model, x)
            with torch.no_grad():
                got = folded(x)
        assert got.shape == expected.shape, fmt
        assert torch.allclose(got, expected, rtol=TOLERANCE, atol=TOLERANCE), fmt
        # per block: merged or left, how many layers and identity branches went into one, how many terms stayed
        decisions[fmt] = [(e.status, len(e.layers) + (e.into is not None), len(e.identities), len(e.kept))
                          for e in report.merges]
    assert decisions["module"] == [("merged", *merged)]
    assert all(found == decisions["module"] for found in decisions.values()), decisions


def test_the_rule_and_the_merge_rounds_import_without_torch_or_numpy() -> None:
    code = (
        "from bnfold.core import arithmetic, merge_rounds\n"
        "from bnfold.core.graph import Operand\n"
        "facts = arithmetic.linear_combination('add', [Operand(input=0), Operand(input=1)])\n"
        "assert facts.kind == 'add', facts\n"
    )
    done = python_without(code, "torch", "numpy")
    assert done.returncode == 0, done.stderr
