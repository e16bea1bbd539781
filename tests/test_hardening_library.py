"""Hardening of the library API (issue 12, part C): range of folded weights, threads, unusual modules, capture
on a wrong graph, verification of non-finite or badly conditioned outputs, and op names in reasons.

Every test builds a model whose failure mode is the one named, with seeded weights, and checks the outcome that a
user relies on (outputs, the report's reason, the error type and message), so each would fail on the old code.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import bnfold
import bnfold.onnx as bo
from bnfold.backends.exported import fold_exported
from bnfold.backends.torchscript import fold_script
from bnfold.errors import BnfoldError, InvalidInputError, NonFiniteOutputError, VerificationError
from bnfold.verification import TOLERANCES, compare_outputs, verify
from conftest import assert_same_outputs, calibrated_by_training

# ----------------------------------------------------------------------------- 1. folds that overflow their dtype


def _overflowing(dtype: torch.dtype, gamma: float, var: float) -> nn.Module:
    """Conv -> BN -> ReLU whose scale gamma / sqrt(var) exceeds ``dtype``'s range once multiplied into the weight.

    eps is 0 so the scale is exactly gamma / sqrt(var); the conv weights are ~0.5, so the folded weight is about
    half the scale.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=0.0), nn.ReLU()).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.rand_like(model[0].weight) * 0.5 + 0.25)
        model[0].bias.zero_()
        model[1].weight.fill_(gamma)
        model[1].bias.zero_()
        model[1].running_mean.zero_()
        model[1].running_var.fill_(var)
    return model.to(dtype)


FLOAT16_OVERFLOW = (torch.float16, 300.0, 1e-6)  # scale 3e5 > 65504, the largest float16
RANGE_CASES = [
    FLOAT16_OVERFLOW,
    (torch.bfloat16, 1e36, 1e-6),  # scale 1e39 > 3.4e38
    (torch.float32, 1e30, 1e-45),  # a subnormal variance: scale ~2.7e52
]


@pytest.mark.parametrize(("dtype", "gamma", "var"), RANGE_CASES, ids=lambda v: str(v))
def test_a_fold_that_would_overflow_its_dtype_is_left_with_the_reason(dtype: torch.dtype, gamma: float, var: float) -> None:
    model = _overflowing(dtype, gamma, var)
    name = str(dtype).removeprefix("torch.")
    for report in (bnfold.plan(model), bnfold.report_for(bnfold.fold(model))):
        (entry,) = report.entries
        assert entry.status == "left", report
        assert f"folding would overflow {name}" in (entry.reason or "")
        assert "folded weight" in (entry.reason or "")
    folded = bnfold.fold(model)
    assert isinstance(folded[1], nn.BatchNorm2d)
    assert torch.isfinite(folded[0].weight).all()
    assert torch.equal(folded[0].weight, model[0].weight)  # left exactly as it was


def test_an_overflowing_float16_fold_leaves_the_model_finite_and_equal() -> None:
    model = _overflowing(*FLOAT16_OVERFLOW)
    x = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 1e-3).half()
    with torch.no_grad():
        expected = model(x)
    assert torch.isfinite(expected).all()  # the original computes the norm on small activations: no overflow
    folded = bnfold.fold(model, x)  # verified on x as well
    with torch.no_grad():
        actual = folded(x)
    assert torch.isfinite(actual).all()
    assert torch.equal(actual, expected)  # nothing was folded, so bit-identical
    assert bnfold.report_for(folded).verification["passed"]


def test_in_a_chain_only_the_overflowing_norm_stays_and_the_rest_still_folds() -> None:
    """Conv -> BN (fine) -> BN (would overflow float16) -> ReLU, and a second branch that folds normally."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4, eps=0.0), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    ).eval()
    with torch.no_grad():
        model[2].weight.fill_(3000.0)  # scale 3e6: any conv weight above 0.02 overflows float16
        model[2].running_var.fill_(1e-6)
        model[2].running_mean.zero_()
        model[2].bias.zero_()
    model = model.half()
    report = bnfold.plan(model)
    status = {e.name: e.status for e in report.entries}
    assert status == {"1": "folded", "2": "left", "5": "folded"}
    folded = bnfold.fold(model, inplace=False)
    assert isinstance(folded[2], nn.BatchNorm2d) and isinstance(folded[1], nn.Identity)
    assert all(torch.isfinite(p).all() for p in folded.parameters())


def test_inplace_fold_without_verification_also_refuses_the_overflow() -> None:
    """The in-place multiply path checks the largest product before touching the weight."""
    model = _overflowing(*FLOAT16_OVERFLOW)
    before = model[0].weight.detach().clone()
    folded = bnfold.fold(model, inplace=True, verify=False)
    assert folded is model
    assert torch.equal(model[0].weight, before)
    assert bnfold.report_for(model).entries[0].status == "left"


def test_torchscript_and_export_folds_leave_an_overflowing_norm() -> None:
    model = _overflowing(*FLOAT16_OVERFLOW)
    x = (torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 1e-3).half()
    _, report = fold_script(torch.jit.trace(model, x), example_inputs=x)
    assert [e.status for e in report.entries] == ["left"]
    assert "folding would overflow float16" in (report.entries[0].reason or "")
    # float32 (a scale beyond float32's range) for torch.export, whose CPU float16 convolution support varies
    program = torch.export.export(_overflowing(torch.float32, 1e30, 1e-45), (x.float(),))
    _, exported_report = fold_exported(program)
    assert [e.status for e in exported_report.entries] == ["left"]
    assert "folding would overflow float32" in (exported_report.entries[0].reason or "")


def _onnx_conv_bn(scale: float, data_type: int) -> onnx.ModelProto:
    dtype = helper.tensor_dtype_to_np_dtype(data_type)
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.random((4, 3, 3, 3)) * 0.5 + 0.25).astype(dtype), "w"),
        numpy_helper.from_array(np.zeros(4, dtype), "b"),
        numpy_helper.from_array(np.full(4, scale, dtype), "gamma"),
        numpy_helper.from_array(np.zeros(4, dtype), "beta"),
        numpy_helper.from_array(np.zeros(4, dtype), "mean"),
        numpy_helper.from_array(np.full(4, 1e-6, dtype), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn", epsilon=0.0),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", data_type, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", data_type, [1, 4, 6, 6])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnx_fold_leaves_a_norm_whose_fold_would_overflow_float16() -> None:
    model = _onnx_conv_bn(300.0, TensorProto.FLOAT16)
    result = bo.fold(model, verify=False)
    (entry,) = result.report.entries
    assert entry.status == "left"
    assert "folding would overflow float16" in (entry.reason or "")
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "BatchNormalization"]
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert np.isfinite(weights["w"].astype(np.float64)).all()
    # the same graph with a harmless scale folds: the check is not a blanket refusal of float16
    assert bo.fold(_onnx_conv_bn(2.0, TensorProto.FLOAT16), verify=False).report.entries[0].status == "folded"


# ---------------------------------------------------------------------------- 3. meta, compiled, inference mode


def _conv_bn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5))
    return calibrated_by_training(model, torch.randn(8, 3, 8, 8))


def test_a_model_on_the_meta_device_gets_a_typed_error_saying_how_to_load_it() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    for call in (bnfold.fold, bnfold.plan):
        with pytest.raises(InvalidInputError) as caught:
            call(model)
        message = str(caught.value)
        assert "meta device" in message and "to_empty" in message and "load_state_dict" in message


def test_a_compiled_module_gets_a_typed_error_saying_to_fold_before_compiling() -> None:
    compiled = torch.compile(_conv_bn())
    with pytest.raises(InvalidInputError, match=r"_orig_mod") as caught:
        bnfold.fold(compiled, torch.randn(1, 3, 8, 8))
    assert "before compiling" in str(caught.value)
    folded = bnfold.fold(compiled._orig_mod)  # the fix the message gives works
    assert bnfold.report_for(folded).entries[0].status == "folded"


def test_a_model_folded_under_inference_mode_can_be_trained_afterwards() -> None:
    model = _conv_bn()
    model[0].weight.requires_grad_(False)  # a frozen layer stays frozen; its new bias follows the weight
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        folded = bnfold.fold(model, x)
    for parameter in folded.parameters():
        assert not parameter.is_inference()
    assert folded[0].weight.requires_grad is False and folded[0].bias.requires_grad is False
    assert folded[4].weight.requires_grad is True
    folded.train()
    folded(x).square().mean().backward()
    assert folded[4].weight.grad is not None and torch.isfinite(folded[4].weight.grad).all()
    with torch.inference_mode():
        bnfold.fold(model, x, inplace=True)
    model(x).sum().backward()  # in place too: the swapped-in tensors are normal tensors
    assert not model[0].weight.is_inference()


# ---------------------------------------------------------------------------------- 5. non-finite outputs


class _Constant(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0 + self.value


def test_two_all_nan_outputs_are_not_reported_as_passed() -> None:
    x = torch.randn(3, 4)
    result = verify(_Constant(float("nan")), _Constant(float("nan")), x)
    assert not result.passed and not result.judged
    assert "NaN" in str(result) and "could not be made" in str(result)
    assert "NOT POSSIBLE" in str(result)


def test_nan_in_the_folded_output_only_fails_and_inf_at_the_same_places_counts_as_equal() -> None:
    a = torch.tensor([1.0, float("inf"), -float("inf"), 2.0])
    same = compare_outputs(a, a.clone(), TOLERANCES[torch.float32])
    assert same.passed and same.judged
    flipped = compare_outputs(a, torch.tensor([1.0, -float("inf"), -float("inf"), 2.0]), TOLERANCES[torch.float32])
    assert not flipped.passed
    finite_differs = compare_outputs(a, torch.tensor([1.0, float("inf"), -float("inf"), 3.0]), 1e-4)
    assert finite_differs.judged and not finite_differs.passed  # the finite rest is still compared
    nan_candidate = compare_outputs(torch.ones(3), torch.tensor([1.0, float("nan"), 1.0]), 1e-4)
    assert not nan_candidate.passed and "folded model holds NaN" in nan_candidate.worst()


def test_fold_says_the_reference_output_is_nan_with_a_typed_error() -> None:
    model = _conv_bn()
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteOutputError) as caught:
        bnfold.fold(model, x)
    assert isinstance(caught.value, BnfoldError) and not isinstance(caught.value, VerificationError)
    assert "output is NaN" in str(caught.value) and "inputs" in str(caught.value)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteOutputError):
        bnfold.fold(model, x, inplace=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # rolled back
    assert isinstance(model[1], nn.BatchNorm2d)


def test_fold_passes_a_model_whose_output_is_infinite_in_the_same_places() -> None:
    """inf is a value: a model that saturates to +inf the same way before and after the fold is verified."""

    class Saturating(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _conv_bn()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.body(x)
            return torch.cat([y, torch.full_like(y[:, :1], float("inf"))], dim=1)

    model = Saturating().eval()
    folded = bnfold.fold(model, torch.randn(2, 3, 8, 8))
    assert bnfold.report_for(folded).verification["passed"]
    assert_same_outputs(model, folded, torch.randn(2, 3, 8, 8))


# ---------------------------------------------------------------------------------------------- 2. threads


class _Branchy(nn.Module):
    """A residual block whose forward depends on a tensor value when ``dynamic`` (torch.fx cannot trace it)."""

    def __init__(self, width: int, dynamic: bool) -> None:
        super().__init__()
        self.dynamic = dynamic
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width),
        )
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = F.relu(y + self.body(y))
        if self.dynamic and bool(y.mean() > -1e9):  # value-dependent control flow: watched forward pass
            y = y * 1.0
        return self.head(y.mean((2, 3)))


def test_folds_from_four_threads_at_once_all_succeed_and_are_correct() -> None:
    """torch.fx patches nn.Module.__call__ process-wide while tracing: without bnfold's lock, a model run in one
    thread during another thread's trace fails with a CaptureError about a module 'not installed as a submodule'."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    models = [calibrated_by_training(_Branchy(width, dynamic), x) for width, dynamic in ((8, False), (12, True), (16, False), (6, True))]
    calls = [
        (lambda model=model: bnfold.fold(model, x)) if index % 2 else (lambda model=model: bnfold.fold(model))
        for index, model in enumerate(models)
    ]
    for _ in range(3):  # a few rounds: the interleaving differs from run to run
        results = _run_at_once(calls)
        for model, folded in zip(models, results, strict=True):
            assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 0
            assert_same_outputs(model, folded, x)


def test_fold_plan_and_merges_from_four_threads_at_once_on_fresh_copies_are_correct() -> None:
    """Issue 19: merges trace the folded model with torch.fx again; without the lock around them, a fold in another
    thread failed with 'module is not installed as a submodule'. Four fresh copies of one traceable model, each
    folded another way (with merges, without inputs, after a plan, with inputs), all at once."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    base = calibrated_by_training(_Branchy(8, False), x)
    models = [copy.deepcopy(base) for _ in range(4)]

    def plan_then_fold(model: nn.Module) -> nn.Module:
        bnfold.plan(model, x)
        return bnfold.fold(model, x)

    calls = [
        lambda: bnfold.fold(models[0], x, merge_branches=True),
        lambda: bnfold.fold(models[1]),
        lambda: plan_then_fold(models[2]),
        lambda: bnfold.fold(models[3], x),
    ]
    for _ in range(3):
        for folded in _run_at_once(calls):
            assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 0
            assert_same_outputs(base, folded, x)


def _run_at_once(calls: list[Callable[[], nn.Module]]) -> list[nn.Module]:
    """Run each call in its own thread, all released together; re-raise the first failure."""
    barrier = threading.Barrier(len(calls))
    results: dict[int, nn.Module] = {}
    failures: list[BaseException] = []

    def work(index: int) -> None:
        try:
            barrier.wait()
            results[index] = calls[index]()
        except BaseException as error:  # noqa: BLE001 - re-raised below, in the test's thread
            failures.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return [results[i] for i in range(len(calls))]


# ------------------------------------------------------------------------------------- 7. op names in reasons


class _OpsAfterLayers(nn.Module):
    """Four norms, each after an op a user writes in a different way, none of which it can fold through.

    ``dynamic`` adds value-dependent control flow, so the dataflow comes from the watched forward pass, whose op
    callables (``TensorBase.add``, ``_VariableFunctionsClass.cat``) differ from torch.fx's (``operator.add``).
    """

    def __init__(self, dynamic: bool) -> None:
        super().__init__()
        self.dynamic = dynamic
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.bn_sum, self.bn_cat, self.bn_pool = nn.BatchNorm2d(4), nn.BatchNorm2d(8), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 4)
        self.bn_flat = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.dynamic and bool(x.sum() > -1e9):
            x = x * 1.0
        a, b = self.a(x), self.b(x)
        summed = self.bn_sum(a + b)
        joined = self.bn_cat(torch.cat([a * 2, b], dim=1))
        pooled = self.bn_pool(F.max_pool2d(a.relu(), 2))
        flat = self.bn_flat(self.fc(a.mean((2, 3))).relu().flatten(1))
        return summed, joined, pooled, flat


@pytest.mark.parametrize("dynamic", [False, True], ids=["torch.fx", "forward pass"])
def test_reasons_name_ops_as_users_write_them(dynamic: bool) -> None:
    model = _OpsAfterLayers(dynamic).eval()
    report = bnfold.plan(model, torch.randn(2, 3, 8, 8))
    assert report.capture == ("forward pass" if dynamic else "torch.fx")
    reasons = {e.name: e.reason or "" for e in report.entries}
    assert "x + y" in reasons["bn_sum"], reasons["bn_sum"]
    assert "torch.cat" in reasons["bn_cat"] or "x * y" in reasons["bn_cat"], reasons["bn_cat"]
    assert "x.relu" in reasons["bn_pool"] or "F.max_pool2d" in reasons["bn_pool"], reasons["bn_pool"]
    assert "x.relu" in reasons["bn_flat"] or "x.flatten" in reasons["bn_flat"], reasons["bn_flat"]
    internal = ("_VariableFunctionsClass", "TensorBase", "boolean_dispatch", "<locals>", "_operator", "builtin")
    for reason in reasons.values():
        assert not any(word in reason for word in internal), reason


def test_op_names_for_each_way_of_writing_an_op() -> None:
    import operator

    from bnfold.backends.capture import _op_name

    expected: dict[object, str] = {
        torch.cat: "torch.cat", torch.flatten: "torch.flatten", operator.add: "x + y", torch.Tensor.__add__: "x + y",
        torch.Tensor.__radd__: "x + y", operator.getitem: "x[...]", "add": "x.add",
        torch.Tensor.add: "x + y",  # what a forward pass sees for x + y (and x.add(y): it cannot tell them apart)
        torch.Tensor.add_: "x += y", torch.Tensor.mul: "x * y", torch.Tensor.relu: "x.relu",
        "flatten": "x.flatten", torch.Tensor.flatten: "x.flatten", F.max_pool2d: "F.max_pool2d", F.relu: "F.relu",
        F.gelu: "F.gelu", torch.special.erf: "torch.special.erf", operator.matmul: "x @ y",
        torch.Tensor.__rtruediv__: "x / y",
    }
    assert {target: _op_name(target) for target in expected} == expected


# ------------------------------------------------------------------------ 4. never plan on a wrong fx graph


class _Merge(nn.Module):
    """MONAI's UpCat pattern: the skip input is used only when it is a tensor, which a torch.fx Proxy is not."""

    def __init__(self, concatenate: bool) -> None:
        super().__init__()
        self.concatenate = concatenate

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None and torch.jit.isinstance(skip, torch.Tensor):
            return torch.cat([x, skip], dim=1) if self.concatenate else x + skip
        return x


class _SkipNet(nn.Module):
    """conv1 -> bn1 -> conv2, with conv1's raw output also carried over a skip connection to the end.

    torch.fx drops the skip (see :class:`_Merge`), so on the traced graph conv1's output has one reader, bn1, and
    folding bn1 into conv1 looks right; it would change what the skip carries. With ``concatenate`` the traced
    graph does not even run (the last conv expects the concatenated channels); without, it runs and differs.
    """

    def __init__(self, concatenate: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.merge = _Merge(concatenate)
        self.out = nn.Conv2d(8 if concatenate else 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.conv1(x)
        y = self.bn2(self.conv2(self.bn1(e).relu()))
        return self.out(self.merge(y, e))


@pytest.mark.parametrize("concatenate", [True, False], ids=["graph fails", "graph differs"])
def test_a_trace_that_is_not_the_model_falls_back_to_the_forward_pass(concatenate: bool) -> None:
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    model = calibrated_by_training(_SkipNet(concatenate), x)
    report = bnfold.plan(model, x)
    assert report.capture == "forward pass"
    assert any("torch.fx traced a graph that is not the model" in note for note in report.notes), report.notes
    assert any(("fails on the example inputs" if concatenate else "differs from the model's") in n for n in report.notes)
    status = {e.name: e.status for e in report.entries}
    assert status == {"bn1": "left", "bn2": "folded"}  # conv1's output also goes over the skip
    reasons = {e.name: e.reason or "" for e in report.entries}
    assert "conv1" in reasons["bn1"], reasons["bn1"]
    folded = bnfold.fold(model, x)
    assert bnfold.report_for(folded).capture == "forward pass"
    assert_same_outputs(model, folded, x)


def test_a_trace_that_matches_the_model_is_still_used() -> None:
    """The check costs one forward pass and must not push models fx traces correctly off torch.fx."""
    x = torch.randn(2, 3, 8, 8)
    report = bnfold.plan(_conv_bn(), x)
    assert report.capture == "torch.fx"
    assert not any("not the model" in note for note in report.notes)


def test_monai_basic_unet_is_planned_on_its_real_dataflow() -> None:
    monai_nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(6))
    model = monai_nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4), norm="batch")
    model = calibrated_by_training(model, x)
    folded = bnfold.fold(model, x)
    report = bnfold.report_for(folded)
    assert report.capture == "forward pass"
    assert any("torch.fx traced a graph that is not the model" in note for note in report.notes)
    assert len(report.folded) == len(report.entries) == 18  # every norm follows its conv; the skips read the activations
    assert_same_outputs(model, folded, x)


# ------------------------------------------------------------- 6. exact folds on badly conditioned models


def _edge_filters_on_raw_pixels(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """Zero-sum integer filters (edge detectors) on raw, offset integer pixel values, then a BN.

    The original computes its convolution exactly (integers below 2**24), so its float32 error is one rounding of
    the BN; the fold must store ``W * s`` rounded, and the filter taps, each about 2e4 * s, cancel down to outputs
    about 10 * s, which turns those roundings into an error ~1000 times the original's. The fold is exact in
    float64: only the check that knows what rounding the weights does can tell.
    """
    generator = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(1, 8, 3, bias=False)
    norm = nn.BatchNorm2d(8)
    with torch.no_grad():
        weight = torch.randint(-2, 3, (8, 1, 3, 3), generator=generator).float()
        weight[:, :, 1, 1] -= weight.sum((1, 2, 3)).reshape(8, 1)  # every filter sums to zero
        conv.weight.copy_(weight)
        norm.running_mean.copy_(torch.randn(8, generator=generator))
        norm.running_var.copy_(torch.rand(8, generator=generator) * 20 + 1)
        norm.weight.copy_(torch.randn(8, generator=generator))
        norm.bias.copy_(torch.randn(8, generator=generator))
    x = 10000 + torch.randint(-3, 4, (2, 1, 16, 16), generator=generator).float()
    return nn.Sequential(conv, norm).eval(), x


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_an_exact_fold_of_a_badly_conditioned_model_passes_verification(seed: int) -> None:
    model, x = _edge_filters_on_raw_pixels(seed)
    folded = bnfold.fold(model, x)  # raised VerificationError ("... please report this") before
    verification = bnfold.report_for(folded).verification
    assert verification["max_relative"] > TOLERANCES[torch.float32]  # the fixed tolerance alone refuses it
    assert verification["passed"]
    # the noise floor (one rounding step of the touched weights, in the original) explains the difference
    worst = max(verification["outputs"], key=lambda o: o["relative"])
    assert worst["max_abs"] <= worst["allowance"]
    assert isinstance(folded[1], nn.Identity)


def test_the_rounding_allowance_does_not_pass_a_wrong_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fold that gets the shift wrong by a hundredth, in the real fold *and* in the float64 one made for the check:
    the allowance is measured between two versions of the same (wrong) fold, so it cannot cover the error."""
    import bnfold.affine

    model, x = _edge_filters_on_raw_pixels(0)
    right = bnfold.affine.forward_bias
    monkeypatch.setattr(bnfold.affine, "forward_bias", lambda b, s, t: right(b, s, t) + 1e-2 * t.abs().max())
    with pytest.raises(VerificationError):
        bnfold.fold(model, x)
    assert isinstance(model[1], nn.BatchNorm2d)


@pytest.mark.parametrize(("encoder", "folds"), [("efficientnet-b0", 57), ("timm-efficientnet-b0", 57)])
def test_smp_deeplabv3plus_with_an_efficientnet_encoder_folds_and_verifies(encoder: str, folds: int) -> None:
    """The model of the report (random weights, 64 x 64): every norm but one folds, and the fold verifies."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    model = calibrated_by_training(smp.DeepLabV3Plus(encoder_name=encoder, encoder_weights=None, classes=3), x)
    folded = bnfold.fold(model, x)
    report = bnfold.report_for(folded)
    assert report.verification["passed"]
    assert len(report.folded) == folds
    assert_same_outputs(model, folded, x)
