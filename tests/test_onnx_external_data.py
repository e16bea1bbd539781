"""ONNX files with external data, as PyTorch's default exporter writes them, folded and opened as a user opens them.

``torch.onnx.export(..., dynamo=True)`` writes ``model.onnx`` + ``model.onnx.data`` and keeps its small tensors
(the axes of a ``ReduceMean``, the sizes of a ``Resize``, the shape of a ``Reshape``) inline, where onnxruntime's
load-time shape inference needs them. Every file bnfold writes from such a source must open by its path in
onnxruntime (``InferenceSession(path)``, the data file beside it), pass ``onnx.checker`` and shape inference by
path, and compute what the source computes. The oracle is the exported PyTorch module, not bnfold's own check.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from onnx import external_data_helper
from torch import nn
from torch.nn import functional as F

import bnfold.onnx as bo
import bnfold.onnx.io as onnx_io
from bnfold.app.cli import main as cli_main
from bnfold.errors import VerificationError
from bnfold.verification import TOLERANCES
from conftest import calibrated_by_training
from helpers.cli import bnfold_cli

pytest.importorskip("onnxscript")  # torch.onnx's dynamo exporter needs it

FLOAT32 = TOLERANCES[torch.float32]


class ShapeInputs(nn.Module):
    """A Resize (scale input), a ReduceMean (axes input) and an Unsqueeze (axes input) around a norm that the
    exporter's optimiser leaves (it follows a ReLU) and bnfold folds backward into the 1x1 convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(self.bn(torch.relu(self.conv(x))), scale_factor=2.0, mode="nearest")
        return torch.relu(self.head(y)).mean(dim=(2, 3)).unsqueeze(-1)


def _exported(module: nn.Module, x: torch.Tensor, path: Path, *, optimize: bool) -> Path:
    """``module`` exported by torch's default (dynamo) exporter with its weights as external data, as users get it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (x,), dynamo=True, optimize=optimize)
        program.save(str(path), external_data=True)
    assert (path.parent / f"{path.name}.data").is_file(), "the exporter no longer writes external data"
    return path


def _inline_names(path: Path) -> set[str]:
    model = onnx.load_model(str(path), load_external_data=False)
    return {t.name for t in model.graph.initializer if not external_data_helper.uses_external_data(t)}


CASES = {
    # optimize=False keeps the BatchNormalization nodes (the exporter's optimiser fuses them itself)
    "resnet18": (lambda: torchvision.models.resnet18(), (1, 3, 64, 64), False),
    "resnet18-optimized": (lambda: torchvision.models.resnet18(), (1, 3, 64, 64), True),
    "shape-inputs": (ShapeInputs, (1, 3, 16, 16), True),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, torch.Tensor, Path]:
    build, shape, optimize = CASES[request.param]
    torch.manual_seed(0)
    x = torch.randn(*shape)
    module = calibrated_by_training(build(), torch.randn(8, *shape[1:]))
    source = _exported(module, x, tmp_path_factory.mktemp(request.param) / "model.onnx", optimize=optimize)
    assert _inline_names(source), "the exporter no longer keeps small tensors inline: the case tests nothing"
    return module, x, source


def _opens_like_the_source(path: Path, module: nn.Module, x: torch.Tensor) -> None:
    """What a user does with the written file: open it by path, check it, infer its shapes, run it."""
    onnx.checker.check_model(str(path))
    onnx.shape_inference.infer_shapes_path(str(path), str(path.parent / "inferred.onnx"))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = module(x).numpy()
    assert np.max(np.abs(got - expected)) <= FLOAT32 * np.max(np.abs(expected))


def test_the_library_writes_a_file_onnxruntime_opens_by_path(exported, tmp_path: Path) -> None:
    module, x, source = exported
    result = bo.fold(source)
    if "shape-inputs" in str(source):
        assert len(result.report.folded) == 1 and not result.report.left, result.report.entries
    out = tmp_path / "folded.onnx"
    checked = result.save(out)
    assert sorted(os.listdir(tmp_path)) == ["folded.onnx", "folded.onnx.data"]
    kept = {t.name for t in onnx.load_model(str(out), load_external_data=False).graph.initializer}
    assert _inline_names(source) & kept <= _inline_names(out), "a tensor the source kept inline was moved out"
    if result.report.folded:
        assert checked is not None and checked["passed"]
    _opens_like_the_source(out, module, x)


def test_the_command_writes_a_file_onnxruntime_opens_by_path(exported, tmp_path: Path) -> None:
    module, x, source = exported
    done = bnfold_cli("fold", str(source), "-o", "out.onnx", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p for p in os.listdir(tmp_path) if not p.startswith("inferred")) == ["out.onnx", "out.onnx.data"]
    _opens_like_the_source(tmp_path / "out.onnx", module, x)


def test_small_tensors_stay_inline_and_large_ones_go_to_the_data_file(exported, tmp_path: Path) -> None:
    _, _, source = exported
    out = tmp_path / "folded.onnx"
    bo.fold(source).save(out)
    model = onnx.load_model(str(out), load_external_data=False)
    for tensor in model.graph.initializer:
        external = external_data_helper.uses_external_data(tensor)
        size = len(tensor.raw_data) if not external else int(external_data_helper.ExternalDataInfo(tensor).length)
        assert external == (size >= onnx_io.INLINE_TENSOR_BYTES), (tensor.name, size, external)


@pytest.fixture()
def every_tensor_external(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plant the bug of issue 20: every tensor moved to the data file, shape inputs included."""
    monkeypatch.setattr(onnx_io, "INLINE_TENSOR_BYTES", 0)


@pytest.fixture(scope="module")
def with_shape_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    module = calibrated_by_training(ShapeInputs(), torch.randn(8, 3, 16, 16))
    return _exported(module, torch.randn(1, 3, 16, 16), tmp_path_factory.mktemp("planted") / "m.onnx", optimize=True)


@pytest.mark.parametrize("verified", [True, False])
def test_a_written_file_that_onnxruntime_cannot_open_is_never_renamed_into_place(
    with_shape_inputs: Path, tmp_path: Path, every_tensor_external: None, verified: bool
) -> None:
    result = bo.fold(with_shape_inputs, verify=verified)
    with pytest.raises(VerificationError, match="nothing was written"):
        result.save(tmp_path / "folded.onnx")
    assert os.listdir(tmp_path) == []


def test_the_command_exits_1_and_writes_nothing_when_its_file_does_not_open(
    with_shape_inputs: Path, tmp_path: Path, every_tensor_external: None, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.onnx"
    assert cli_main(["fold", str(with_shape_inputs), "-o", str(out)]) == 1
    assert "nothing was written" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_pytorch_model_written_as_onnx_is_opened_in_onnxruntime_and_compared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bnfold fold resnet18 -o out.onnx`` reads its ONNX file back in onnxruntime: a wrong file is refused."""
    exporter = torch.onnx.export

    def export_wrong_weights(module: nn.Module, *args: object, **kwargs: object) -> object:
        with torch.no_grad():
            first = next(m for m in module.modules() if isinstance(m, nn.Conv2d))
            first.weight.mul_(1.01)  # a planted wrong fold, visible only in the file
        return exporter(module, *args, **kwargs)

    out = tmp_path / "r18.onnx"
    assert cli_main(["fold", "resnet18", "-o", str(out), "--input-shape", "1,3,32,32"]) == 0
    assert "read" in capsys.readouterr().out
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])

    monkeypatch.setattr(torch.onnx, "export", export_wrong_weights)
    wrong = tmp_path / "wrong.onnx"
    assert cli_main(["fold", "resnet18", "-o", str(wrong), "--input-shape", "1,3,32,32"]) == 1
    assert "nothing was written" in capsys.readouterr().err
    assert not wrong.exists()
