"""Folding inside TorchScript graphs: every producer kind, scripted and traced, outputs equal, the rest left with reasons."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from bnfold.errors import InvalidInputError
from bnfold.torchscript import fold_script
from bnfold.verification import TOLERANCES
from conftest import calibrated_by_training


def _script(model: nn.Module, how: str, x: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(model) if how == "script" else torch.jit.trace(model, x)


MODELS = {
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Conv2d(8, 8, 3, groups=4, bias=False), nn.BatchNorm2d(8)), (2, 3, 9, 9)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6)), (2, 3, 11)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 4, 2), nn.BatchNorm3d(4)), (2, 2, 5, 5, 5)),
    "transposed, grouped": (lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6)), (2, 4, 5, 5)),
}


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_norm_after_a_conv_is_folded_and_outputs_match(name: str, how: str) -> None:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    x = torch.randn(*shape)
    model = calibrated_by_training(build(), x)
    scripted = _script(model, how, x)
    before = {k: v.clone() for k, v in scripted.state_dict().items()}
    folded, report = fold_script(scripted)
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(report.folded) == norms and not report.left
    assert not folded.graph.findAllNodes("aten::batch_norm")
    with torch.no_grad():
        reference, result = scripted(x), folded(x)
    # float32 tolerance: each folded weight is rounded once (see bnfold.verification)
    assert float((result - reference).abs().max() / reference.abs().max()) < TOLERANCES[torch.float32]
    expected_removed = sum(2 * m.num_features for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    added = sum(m.out_channels for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd) and m.bias is None)
    assert report.parameters_removed == expected_removed - added
    assert all(torch.equal(v, scripted.state_dict()[k]) for k, v in before.items())  # the input is untouched


def test_a_norm_with_a_second_consumer_and_a_linear_of_unknown_rank_are_left_with_reasons() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.linear, self.bn1d = nn.Linear(4, 5), nn.BatchNorm1d(5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            z = self.bn(y) + y
            return self.bn1d(self.linear(z.mean((2, 3))))

    x = torch.randn(2, 3, 4, 4)
    scripted = _script(calibrated_by_training(Branchy(), x), "script", x)
    folded, report = fold_script(scripted)
    reasons = [e.reason for e in report.left]
    assert len(reasons) == 2 and "other uses" in reasons[0] and "rank" in reasons[1]
    assert torch.allclose(folded(x), scripted(x))


def test_a_scripted_model_in_training_mode_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="training mode"):
        fold_script(torch.jit.script(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))))
