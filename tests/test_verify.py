"""bnfold.verify(): per-output errors on any output structure, top-1 agreement over a data set, planted bugs caught."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bnfold
from conftest import randomize_norms

GEN = torch.Generator().manual_seed(21)
X = torch.randn(4, 3, 12, 12, generator=GEN)


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)
    )
    return randomize_norms(model).eval()


def _loader(count: int = 24) -> DataLoader:
    images = torch.randn(count, 3, 12, 12, generator=GEN)
    labels = torch.randint(0, 5, (count,), generator=GEN)
    return DataLoader(TensorDataset(images, labels), batch_size=8)


def test_a_correct_fold_passes_with_full_agreement() -> None:
    model = _classifier()
    folded = bnfold.fold(model, X)
    result = bnfold.verify(model, folded, X, data=_loader())
    assert result.passed and result.batches == 4 and result.samples == 24
    assert result.agreement == 1.0 and result.accuracy_original == result.accuracy_folded
    assert 0 < result.max_relative < 1e-5  # folding moves roundings, it does not remove them all
    data = result.to_dict()
    assert data["passed"] and data["top1_agreement"] == 1.0 and data["outputs"][0]["shape"][1] == 5
    assert "PASSED" in str(result)


def test_a_planted_wrong_fold_is_caught() -> None:
    model = _classifier()
    folded = bnfold.fold(model, X)
    with torch.no_grad():
        folded[0].bias[3] += 0.05  # one channel's shift off by a twentieth
    result = bnfold.verify(model, folded, X, data=_loader())
    assert not result.passed and result.max_relative > 1e-3
    assert "FAILED" in str(result)


def test_structured_outputs_are_compared_leaf_by_leaf() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _classifier()
            self.aux = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
            randomize_norms(self.aux)

        def forward(self, x: torch.Tensor) -> dict[str, object]:
            return {"logits": self.body(x), "extra": [self.aux(x), x.shape[0]]}

    model = TwoHeads().eval()
    folded = bnfold.fold(model, X)
    result = bnfold.verify(model, folded, X)
    assert result.passed and {e.path for e in result.outputs} == {"['logits']", "['extra'][0]"}
    broken = copy.deepcopy(folded)
    with torch.no_grad():
        broken.aux[0].weight.mul_(1.01)
    worst = max(bnfold.verify(model, broken, X).outputs, key=lambda e: e.relative)
    assert worst.path == "['extra'][0]" and worst.relative > 1e-3


def test_verify_needs_something_to_run_on() -> None:
    model = _classifier()
    with pytest.raises(bnfold.InvalidInputError, match="inputs or data"):
        bnfold.verify(model, model)
    with pytest.raises(bnfold.InvalidInputError, match="compared nothing"):  # an empty set proves nothing
        bnfold.verify(model, model, data=[])


def test_max_batches_limits_the_data_read() -> None:
    model = _classifier()
    result = bnfold.verify(model, bnfold.fold(model), data=_loader(), max_batches=2)
    assert result.batches == 2 and result.samples == 16


class _OffOnSmallInputs(nn.Module):
    """The identity, off by 1e-6 on a batch whose values are all below 1.5: an error on one batch only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1e-6 * (x.abs().max() < 1.5).to(x.dtype)


def test_the_check_of_a_fold_reports_the_worst_batch_not_the_last() -> None:
    from bnfold.verification import judge_fold

    first, second = torch.ones(2, 3), torch.full((2, 3), 2.0)  # the first batch holds the larger error
    verdict = judge_fold(nn.Identity(), _OffOnSmallInputs(), [(first,), (second,)], 1e-4, "the candidate")
    assert verdict["passed"] and verdict["batches"] == 2
    # 1 + 1e-6 rounded to float32
    assert verdict["max_abs"] == verdict["max_relative"] == pytest.approx(1e-6, rel=0.1)
    assert judge_fold(nn.Identity(), _OffOnSmallInputs(), [(second,)], 1e-4, "the candidate")["max_abs"] == 0


def test_verify_asks_the_float64_second_opinion_the_check_of_a_fold_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    """One judge: without a noise floor (as in test_engine) and at tolerance 0, any rounding difference is beyond
    both, and the float64 second opinion decides, in ``bnfold.verify`` as in the check of ``bnfold.fold`` (verify
    failed the fold that fold's own check passed). A visibly wrong weight still fails."""
    for module in ("bnfold.verification", "bnfold.engine"):
        monkeypatch.setattr(f"{module}.noise_floor", lambda *args: None)
    model = _classifier()
    own_check = bnfold.report_for(bnfold.fold(model, X, tolerance=0.0)).verification
    folded = bnfold.fold(model, verify=False)
    result = bnfold.verify(model, folded, X, tolerance=0.0)
    assert result.max_relative > 0 and own_check["max_relative"] > 0  # beyond the tolerance
    assert result.rounding_check is not None and own_check["rounding_check"] is not None
    assert result.passed and result.rounding_check.passed and own_check["rounding_check"]["passed"]
    with torch.no_grad():
        folded[0].weight[3] *= 1.01  # one channel's scale off by a hundredth
    wrong = bnfold.verify(model, folded, X, tolerance=0.0)
    assert wrong.rounding_check is not None and not wrong.passed and wrong.rounding_check.max_relative > 10


class _RoundsToIntegers(nn.Module):
    """``(x + 1e7) - 1e7`` in float32: ``x`` rounded to an integer (its float64 evaluation is ``x`` itself)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 1e7) - 1e7


class _ExactUnlessLarge(nn.Module):
    """``x`` itself (exact), off by 10 on a batch holding a value above 50: a wrong result on that batch only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 10 * (x.abs().max() > 50).to(x.dtype)


def test_every_batch_of_data_is_judged_with_its_second_opinion() -> None:
    """A batch passed by the fixed tolerance and one passed only by the float64 second opinion pass together; a
    batch the second opinion refuses fails the data set, whichever batch passed by an opinion before it."""
    from bnfold.verification import judge_fold

    integers, fractions, large = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.3, 0.7, 1.1]), torch.tensor([60.0])
    original, candidate = _RoundsToIntegers(), _ExactUnlessLarge()
    result = bnfold.verify(original, candidate, data=[integers, fractions])
    assert result.passed and result.batches == 2 and result.max_relative > 0.1
    assert result.rounding_check is not None and result.rounding_check.passed
    assert judge_fold(original, candidate, [(integers,), (fractions,)], None, "the candidate") == result.to_dict()
    refused = bnfold.verify(original, candidate, data=[fractions, large])
    assert not refused.passed and refused.rounding_check is not None and not refused.rounding_check.passed
