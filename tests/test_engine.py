"""The fold() / plan() contract: same class, caller's model untouched, dtypes, errors, report, export."""

from __future__ import annotations

import copy
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bnfold
from bnfold.verification import TOLERANCES
from conftest import assert_same_outputs, bn_count, randomize_norms


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)
        self.bn_fc = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_fc(self.fc(torch.flatten(self.pool(self.features(x)), 1)))


X = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(2))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return randomize_norms(Net(), seed).eval()


def test_fold_returns_same_class_and_leaves_caller_untouched() -> None:
    model = _net()
    before = copy.deepcopy(model.state_dict())
    folded = bnfold.fold(model)
    assert type(folded) is Net and folded is not model
    assert bn_count(folded) == 0 and bn_count(model) == 3
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert_same_outputs(model, folded, X)


def test_inplace_folds_the_model_itself() -> None:
    model = _net()
    reference = copy.deepcopy(model)
    weight = model.features[0].weight
    folded = bnfold.fold(model, inplace=True)
    assert folded is model and bn_count(model) == 0
    assert folded.features[0].weight is weight  # parameters keep their identity
    assert_same_outputs(reference, folded, X)


def test_report_lists_every_norm_with_counts_and_json() -> None:
    model = _net()
    folded = bnfold.fold(model)
    report = bnfold.report_for(folded)
    assert report.applied and report.capture == "torch.fx" and report.model == "Net"
    assert [e.name for e in report.entries] == ["features.1", "features.4", "bn_fc"]
    removed_bn = 2 * (8 + 8 + 4)  # gamma and beta of each BN
    added_bias = 8  # features.0 had no bias
    assert report.parameters_removed == removed_bn - added_bias
    assert report.parameters_after == sum(p.numel() for p in folded.parameters())
    data = json.loads(report.to_json())
    assert data["summary"] == {"norms": 3, "folded": 3, "left": 0, "parameters_removed": removed_bn - added_bias}
    assert "features.1" in str(report)
    dry = bnfold.plan(model)
    assert not dry.applied and dry.parameters_after == report.parameters_after  # projected, nothing changed
    assert [e.status for e in dry.entries] == ["folded"] * 3


def test_report_for_unknown_model_says_what_to_do() -> None:
    with pytest.raises(bnfold.InvalidInputError, match="bnfold.plan"):
        bnfold.report_for(_net())


def test_training_mode_is_refused_with_the_fix() -> None:
    model = _net().train()
    with pytest.raises(bnfold.TrainingModeError, match=r"model.eval\(\)"):
        bnfold.fold(model)
    model.eval()
    model.features[1].train()  # one norm in training mode inside an eval model: left, as in every format
    entry = next(e for e in bnfold.plan(model).entries if e.name == "features.1")
    assert entry.status == "left" and "training mode" in (entry.reason or "") and "model.eval()" in entry.reason


def test_non_finite_statistics_name_the_layer() -> None:
    model = _net()
    model.features[4].running_var[3] = float("nan")
    with pytest.raises(bnfold.NonFiniteStatisticsError, match="features.4.*running variance"):
        bnfold.fold(model, inplace=True)
    assert bn_count(model) == 3  # nothing was changed


def test_bad_arguments_get_clear_errors() -> None:
    with pytest.raises(bnfold.InvalidInputError, match="torch.nn.Module"):
        bnfold.fold("resnet50")  # type: ignore[arg-type]
    with pytest.raises(bnfold.InvalidInputError, match="example_inputs must be a tensor or a tuple"):
        bnfold.fold(_net(), {"x": X})  # type: ignore[arg-type]
    with pytest.raises(bnfold.InvalidInputError, match="verify=True needs example_inputs"):
        bnfold.fold(_net(), verify=True)
    scripted = torch.jit.script(_net())
    with pytest.raises(bnfold.InvalidInputError, match="TorchScript.*bnfold.fold"):  # the engine names the entry point
        importlib.import_module("bnfold.engine").fold(scripted)


@pytest.mark.parametrize("enabled", [True, False])
def test_fold_and_plan_leave_the_garbage_collector_as_they_found_it(enabled: bool) -> None:
    """fold() pauses Python's cyclic collector while it works; whatever happens, it is back as it was after."""
    import gc

    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        bnfold.fold(_net())
        assert gc.isenabled() is enabled
        bnfold.plan(_net(), merge_branches=True)
        assert gc.isenabled() is enabled
        with pytest.raises(bnfold.TrainingModeError):
            bnfold.fold(_net().train())
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()


def test_wrong_example_inputs_for_untraceable_model() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) if x.mean() > 0 else x

    with pytest.raises(bnfold.CaptureError, match="example_inputs match"):
        bnfold.fold(Branchy().eval(), torch.ones(1, 5, 4, 4))  # mean > 0: the conv runs and fails


def test_verification_result_is_in_the_report() -> None:
    model = _net()
    folded = bnfold.fold(model, X)
    verification = bnfold.report_for(folded).verification
    assert verification is not None and verification["tolerance"] == TOLERANCES[torch.float32]
    with torch.no_grad():  # the report's error is the one measured here, independently
        expected, actual = model(X), folded(X)
    measured = float((actual - expected).abs().max() / expected.abs().max())
    assert verification["max_relative"] == pytest.approx(measured, rel=1e-6)
    assert 0 < verification["max_relative"] <= TOLERANCES[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtype_is_kept_and_half_precision_loses_nothing_to_the_fold(dtype: torch.dtype) -> None:
    model = _net().to(dtype)
    folded = bnfold.fold(model)
    assert all(p.dtype == dtype for p in folded.parameters())
    x = X.to(dtype)
    assert_same_outputs(model, folded, x, dtype=dtype)
    # Rounded once: each folded weight is the exact (float64) product rounded to the dtype, give or take the
    # float32 intermediate (2^-24 relative): |error| <= (half an ulp + 2^-23) * |exact|, plus half the subnormal step.
    exact = bnfold.fold(copy.deepcopy(model).double()).features[0].weight
    error = (folded.features[0].weight.double() - exact).abs()
    info = torch.finfo(dtype)
    bound = (info.eps / 2 + 2.0**-23) * exact.abs() + info.smallest_normal * info.eps / 2
    assert bool((error <= bound).all())


def test_float32_fold_is_as_accurate_as_the_original() -> None:
    """The folded float32 model is no further from the float64 truth than the float32 original is (x4)."""
    model = _net()
    truth = copy.deepcopy(model).double()
    folded = bnfold.fold(model)
    with torch.no_grad():
        exact = truth(X.double())
        original_error = (model(X).double() - exact).abs().max()
        folded_error = (folded(X).double() - exact).abs().max()
    assert folded_error <= 4 * original_error + 1e-7


def test_requires_grad_and_new_bias() -> None:
    model = _net()
    model.features[0].weight.requires_grad_(False)
    folded = bnfold.fold(model)
    assert isinstance(folded.features[0].bias, nn.Parameter)
    assert not folded.features[0].bias.requires_grad
    assert folded.fc.bias.requires_grad


def test_folded_state_dict_loads_into_a_second_folded_instance() -> None:
    folded = bnfold.fold(_net(seed=0))
    other = bnfold.fold(_net(seed=1))
    other.load_state_dict(folded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(X), folded(X), rtol=0, atol=0)


def test_folded_model_exports_and_scripts() -> None:
    model = _net()
    folded = bnfold.fold(model)
    exported = torch.export.export(folded, (X,))
    assert not any("batch_norm" in str(node.target) for node in exported.graph.nodes)
    assert_same_outputs(model, exported.module(), X)
    scripted = torch.jit.script(folded)
    assert_same_outputs(model, scripted, X)


def test_sync_batch_norm_and_frozen_batch_norm_fold() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    frozen = FrozenBatchNorm2d(4)
    g = torch.Generator().manual_seed(3)
    for name in ("weight", "bias", "running_mean"):
        getattr(frozen, name).copy_(torch.randn(4, generator=g))
    frozen.running_var.copy_(0.5 + torch.rand(4, generator=g))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.Conv2d(4, 4, 1, bias=False), frozen)
    model = randomize_norms(model).eval()
    folded = bnfold.fold(model)
    assert [e.kind for e in bnfold.report_for(folded).folded] == ["SyncBatchNorm", "FrozenBatchNorm2d"]
    assert_same_outputs(model, folded, X)


def test_lazy_batch_norm_folds_once_materialised() -> None:
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d())
    assert bnfold.plan(model.eval()).entries[0].status == "left"
    model.train()
    with torch.no_grad():
        model(X)
    model.eval()
    folded = bnfold.fold(model)
    assert bn_count(folded) == 0
    assert_same_outputs(model, folded, X)


def test_rounding_second_opinion_accepts_noise_and_rejects_a_wrong_fold() -> None:
    from bnfold.verification import explained_by_rounding

    model = _net()
    folded = bnfold.fold(model)
    with torch.no_grad():
        expected, actual = model(X), folded(X)
    assert explained_by_rounding(model, (X,), expected, actual).passed
    with torch.no_grad():
        folded.features[3].bias += 1e-3  # a shift forgotten by a thousandth
        wrong = folded(X)
    verdict = explained_by_rounding(model, (X,), expected, wrong)
    assert not verdict.passed and verdict.max_relative > 10


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_failed_verification_restores_an_inplace_fold_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnfold import affine

    model = _net()
    before = _snapshot(model)
    modules_before = [type(m) for m in model.modules()]
    right = affine.forward_bias
    wrong = lambda bias, scale, shift: right(bias, scale, shift) + 0.5  # noqa: E731 - a planted bug
    monkeypatch.setattr("bnfold.core.apply.affine.forward_bias", wrong)
    with pytest.raises(bnfold.VerificationError, match="left unchanged"):
        bnfold.fold(model, X, inplace=True)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.modules()] == modules_before
    assert model.features[0].bias is None


def _fail_on_third_bias_write(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Make the third bias write of a fold raise, half way through it; returns the call counter."""
    from bnfold.backends import modules

    calls = {"n": 0}
    original = modules.ModuleWeights.write_bias

    def failing(self: modules.ModuleWeights, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated failure")
        original(self, *args, **kwargs)

    monkeypatch.setattr(modules.ModuleWeights, "write_bias", failing)
    return calls


def test_exception_half_way_undoes_an_inplace_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _net()
    before = _snapshot(model)
    calls = _fail_on_third_bias_write(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated"):
        bnfold.fold(model, inplace=True)  # no verification: weights were multiplied in place
    assert calls["n"] == 3
    after = model.state_dict()
    assert before.keys() == after.keys() and bn_count(model) == 3
    for key in before:  # divided back: within one rounding of the original
        torch.testing.assert_close(after[key], before[key], rtol=2 * torch.finfo(torch.float32).eps, atol=0)


def test_a_failure_half_way_through_a_verified_inplace_fold_restores_it_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _net()
    before = _snapshot(model)
    calls = _fail_on_third_bias_write(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated"):
        bnfold.fold(model, X, inplace=True)  # verified: new tensors are swapped in, the old ones kept
    after = model.state_dict()
    assert calls["n"] == 3 and bn_count(model) == 3
    for key in before:
        assert torch.equal(after[key], before[key]), key


def test_difference_explained_by_rounding_is_accepted_and_noted() -> None:
    model = _net()
    reference = copy.deepcopy(model)
    folded = bnfold.fold(model, X, inplace=True, tolerance=0.0)  # any rounding difference fails the first check
    report = bnfold.report_for(folded)
    assert folded is model and bn_count(model) == 0
    assert report.verification is not None and report.verification["passed"]
    worst = max(report.verification["outputs"], key=lambda o: o["relative"])
    assert worst["relative"] > 0 and worst["max_abs"] <= worst["allowance"]  # the judge's allowance explains it
    assert any("rounding" in note and "allowance" in note for note in report.notes)
    assert_same_outputs(reference, folded, X)


def test_an_inplace_fold_passed_by_the_float64_second_opinion_is_folded_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a noise floor, a rounding difference above the tolerance is decided by the float64 second opinion,
    which runs the original: the in-place fold is undone for it, and made again when it passes."""
    monkeypatch.setattr("bnfold.engine.noise_floor", lambda *args: None)
    model = _net()
    reference = copy.deepcopy(model)
    folded = bnfold.fold(model, X, inplace=True, tolerance=0.0)
    report = bnfold.report_for(folded)
    assert folded is model and bn_count(model) == 0
    assert report.verification is not None and report.verification["max_relative"] > 0
    assert report.verification["passed"] and report.verification["rounding_check"]["passed"]
    assert [note for note in report.notes if "float64 evaluation" in note]
    assert_same_outputs(reference, folded, X)


@pytest.mark.parametrize("build", [
    _net,
    lambda: randomize_norms(nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False), nn.BatchNorm2d(6),
                                          nn.BatchNorm2d(6, affine=False), nn.Conv2d(6, 2, 1)), 1).eval(),
    lambda: randomize_norms(nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 3, bias=False), nn.ReLU()), 2).eval(),
], ids=["net", "transposed-chain", "backward-linear"])
def test_dry_run_projects_the_parameter_count_the_fold_reaches(build) -> None:
    model = build()
    projected = bnfold.plan(model)
    folded = bnfold.report_for(bnfold.fold(model))
    assert projected.parameters_after == folded.parameters_after < projected.parameters_before


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_fold_that_would_overflow_the_dtype_is_left_with_the_reason(dtype: torch.dtype) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[1].weight.fill_(300.0)  # scale 300 / sqrt(1e-6 + 1e-5) ~ 9e4: beyond float16's 65504
        model[1].running_var.fill_(1e-6)
        model[0].weight.fill_(1.0)
        big = 1e36 if dtype == torch.bfloat16 else 1.0  # bfloat16 reaches 3e38: push its weights near that
        model[0].weight.mul_(big)
    model = model.to(dtype)
    planned = bnfold.plan(model)
    folded = bnfold.fold(model)
    for report in (planned, bnfold.report_for(folded)):
        first, second = report.entries
        assert first.status == "left" and "overflow" in (first.reason or ""), first
        assert second.status == "folded"
    assert isinstance(folded[1], nn.BatchNorm2d) and torch.isfinite(folded[0].weight).all()
    x = torch.randn(1, 3, 6, 6, dtype=dtype) * (1 / big)
    with torch.no_grad():
        assert torch.isfinite(folded(x)).all() == torch.isfinite(model(x)).all()


class _SharedNormTensor(nn.Module):
    """Two norms holding one running-mean buffer; only ``bn2`` folds (``bn1`` reads the input, a ReLU follows it):
    the buffer stays in the model with ``bn1``, so the count after the fold must keep it."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(3)
        self.conv, self.bn2 = nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)
        self.bn2.running_mean = self.bn1.running_mean  # a buffer held by two norms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv(torch.relu(self.bn1(x))))


@pytest.mark.parametrize("build", [
    lambda: __import__("torchvision").models.resnet18(),
    lambda: __import__("timm").create_model("efficientnet_b0"),  # BatchNormAct2d: the norm leaves its activation
    lambda: _SharedNormTensor(),
], ids=["resnet18", "efficientnet_b0", "shared_buffer"])
def test_inplace_fold_reports_the_counts_a_fresh_count_gives(build) -> None:  # type: ignore[no-untyped-def]
    """An in-place fold without verification counts parameters and buffers from what it replaced, not by walking
    the model again: the numbers must be those of a walk."""
    model = randomize_norms(build().eval())
    folded = bnfold.fold(model, inplace=True)
    report = bnfold.report_for(folded)
    assert report.parameters_after == sum(p.numel() for p in folded.parameters())
    assert report.buffers_after == sum(b.numel() for b in folded.buffers())
    assert report.parameters_after < report.parameters_before


def test_undoing_a_fold_twice_changes_nothing_more() -> None:
    """The undo information is used up by the first restore: a second would divide the scaled weight again."""
    from bnfold.backends.modules import Rollback

    weight = nn.Parameter(torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0)))
    original = weight.detach().clone()
    rollback = Rollback()
    rollback.scale(weight, torch.tensor([2.0, 0.5, 3.0, 0.25]), 0, 1)
    rollback.restore()
    once = weight.detach().clone()
    rollback.restore()
    assert torch.equal(weight.detach(), once) and torch.allclose(once, original)


_READS_THE_NORM_DIRECTLY = """
import torch
from torch import nn
import bnfold


class ReadsTheNormDirectly(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        scale = (self.bn.weight * self.bn.bias * self.bn.running_mean * self.bn.running_var).view(1, -1, 1, 1)
        return self.bn(self.conv(x)) * scale


report = bnfold.plan(ReadsTheNormDirectly().eval(), torch.randn(1, 3, 8, 8))
print(report.entries[0].reason)
"""


def test_a_norm_whose_tensors_the_forward_reads_directly_names_the_same_tensor_in_every_run() -> None:
    """The reason named whichever tensor a set of strings gave first, which changes with the hash seed of the run:
    four runs with four seeds named 'bn.bias', 'bn.running_var' or 'bn.weight'. It names the first in declaration
    order now."""
    source = str(Path(bnfold.__file__).resolve().parents[1])
    runs = [subprocess.Popen([sys.executable, "-c", _READS_THE_NORM_DIRECTLY], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONHASHSEED": str(seed), "OMP_NUM_THREADS": "1",
                                  "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))})
            for seed in (0, 2, 5, 7)]
    reasons = {run.communicate(timeout=300)[0].strip() for run in runs}
    assert reasons == {"its tensor 'bn.weight' is also read directly by the operation x * y in the forward code"}
