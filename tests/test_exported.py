"""Folding inside torch.export programs: every producer kind, outputs equal, the input untouched, the rest left with reasons."""

from __future__ import annotations

import io

import pytest
import torch
import torchvision
from torch import nn

from bnfold.errors import InvalidInputError
from bnfold.exported import fold_exported
from bnfold.verification import TOLERANCES
from conftest import calibrated_by_training

NORM_OPS = (torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit_no_training.default)


def _norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _relative(reference: torch.Tensor, result: torch.Tensor) -> float:
    return float((result - reference).abs().max() / reference.abs().max())


MODELS = {
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8)), (2, 3, 9, 9)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6)), (2, 3, 11)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 4, 2), nn.BatchNorm3d(4)), (2, 2, 5, 5, 5)),
    "grouped": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, groups=4, bias=False), nn.BatchNorm2d(8)), (2, 4, 7, 7)),
    "transposed, grouped": (lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6)), (2, 4, 5, 5)),
    "linear on 2-D input": (lambda: nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5)), (4, 6)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_norm_after_a_conv_or_linear_is_folded_and_outputs_match(name: str) -> None:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    x = torch.randn(*shape)
    model = calibrated_by_training(build(), x)
    program = torch.export.export(model, (x,))
    before = {k: v.clone() for k, v in program.state_dict.items()}
    graph_before = str(program.graph)
    folded, report = fold_exported(program)
    norms = _norms(model)
    assert len(report.folded) == len(norms) and not report.left
    assert not [n for n in folded.graph.nodes if n.target in NORM_OPS]
    with torch.no_grad():
        reference, result = program.module()(x), folded.module()(x)
    # float32 tolerance: each folded weight is rounded once (see bnfold.verification)
    assert _relative(reference, result) < TOLERANCES[torch.float32]
    removed = sum(2 * m.num_features for m in norms)
    added = sum(m.out_channels for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd) and m.bias is None)
    added += sum(m.out_features for m in model.modules() if isinstance(m, nn.Linear) and m.bias is None)
    assert report.parameters_removed == removed - added
    assert report.parameters_after == sum(p.numel() for p in folded.parameters())
    assert not any("running" in k or "num_batches" in k for k in folded.state_dict)  # the norms' state is gone
    assert str(program.graph) == graph_before  # the input is untouched
    assert all(torch.equal(v, program.state_dict[k]) for k, v in before.items())


def test_the_folded_program_saves_loads_and_keeps_its_dynamic_batch() -> None:
    x = torch.randn(2, 3, 8, 8)
    model = calibrated_by_training(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), x)
    batch = torch.export.Dim("batch", min=2, max=16)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    folded, report = fold_exported(program)
    assert len(report.folded) == 1 and not report.notes
    buffer = io.BytesIO()
    torch.export.save(folded, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    x5 = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert _relative(model(x5), loaded.module()(x5)) < TOLERANCES[torch.float32]
    assert [(int(r.lower), int(r.upper)) for r in loaded.range_constraints.values()] == [(2, 16)]


def test_a_norm_with_a_second_consumer_and_a_linear_on_3d_input_are_left_with_reasons() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.linear, self.bn1d = nn.Linear(4, 4), nn.BatchNorm1d(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            z = self.bn(y) + y
            return self.bn1d(self.linear(z.flatten(2).transpose(1, 2)))  # (batch, 16, 4): the norm sees 16 tokens

    x = torch.randn(2, 3, 4, 4)
    model = calibrated_by_training(Branchy(), x)
    program = torch.export.export(model, (x,))
    folded, report = fold_exported(program)
    reasons = [e.reason or "" for e in report.left]
    assert len(reasons) == 2 and "other uses" in reasons[0] and "rank 3, not 2" in reasons[1]
    assert report.parameters_removed == 0
    with torch.no_grad():
        assert torch.allclose(folded.module()(x), model(x))


def test_a_shared_weight_is_left_with_the_reason() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) + self.conv(x * 2)

    x = torch.randn(2, 3, 4, 4)
    model = calibrated_by_training(Shared(), x)
    folded, report = fold_exported(torch.export.export(model, (x,)))
    assert len(report.left) == 1 and "shared" in (report.left[0].reason or "")
    with torch.no_grad():
        assert torch.allclose(folded.module()(x), model(x))


def test_a_program_exported_in_training_mode_is_left_with_the_reason() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).train()
    program = torch.export.export(model, (torch.randn(2, 1, 3, 3),))
    _, report = fold_exported(program)
    assert not report.folded and report.left and all(".eval()" in (e.reason or "") for e in report.left)


def test_without_example_inputs_the_error_says_what_to_pass() -> None:
    x = torch.randn(2, 3, 4, 4)
    program = torch.export.export(nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)).eval(), (x,))
    program.example_inputs = None
    with pytest.raises(InvalidInputError, match="example_inputs="):
        fold_exported(program)
    folded, report = fold_exported(program, example_inputs=x)
    assert len(report.folded) == 1


def test_a_decomposed_program_folds_into_convolution_nodes_and_leaves_addmm_with_the_reason() -> None:
    """``run_decompositions`` turns conv2d into aten.convolution (with a transposed flag) and batch_norm into
    ``_native_batch_norm_legit_no_training`` + ``getitem 0``; linear becomes addmm, which is left with a hint."""
    x = torch.randn(2, 4, 5, 5)
    model = calibrated_by_training(nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3, bias=False),
        nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 9 * 9, 3), nn.BatchNorm1d(3),
    ), x)
    program = torch.export.export(model, (x,)).run_decompositions()
    assert any(n.target == NORM_OPS[1] for n in program.graph.nodes)
    folded, report = fold_exported(program)
    assert [e.into[0].split(" ")[0] for e in report.folded] == ["aten.convolution.default"] * 2
    assert len(report.left) == 1 and "run_decompositions" in (report.left[0].reason or "")
    with torch.no_grad():
        assert _relative(model(x), folded.module()(x)) < TOLERANCES[torch.float32]
    assert report.parameters_removed == 2 * (6 + 4) - 4


def test_a_conv_on_an_unbatched_input_is_left_with_the_reason() -> None:
    x = torch.randn(3, 10)  # (channels, length): the norm's axis 1 is the length, not the conv's channels
    model = calibrated_by_training(nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(8)), x)
    folded, report = fold_exported(torch.export.export(model, (x,)))
    assert len(report.left) == 1 and "unbatched" in (report.left[0].reason or "")
    with torch.no_grad():
        assert torch.allclose(folded.module()(x), model(x))
