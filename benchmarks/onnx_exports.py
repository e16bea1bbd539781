"""ONNX files of zoo models for the ONNX benchmarks: random weights, norm statistics measured on photographs.

Built from what bnfold ships for this (:func:`bnfold.app.architectures.build_arch`, :mod:`bnfold.app.calibration`),
exported with the TorchScript exporter without constant folding, so that every BatchNormalization node stays for
the tools to fold.
"""

from __future__ import annotations

import io
import warnings

import onnx
import torch

from bnfold.app.architectures import build_arch
from bnfold.app.calibration import calibrate, randomize_norm_affine, sample_images


def export_zoo_model(name: str, size: int = 224, seed: int = 0, images: int = 16) -> onnx.ModelProto:
    """Model ``name`` (torchvision or timm) with seeded random weights and norm statistics from ``images``
    photographs, exported for a ``(1, 3, size, size)`` input."""
    model, _ = build_arch(name, seed=seed)
    if name.startswith("vgg") and size == 224 and hasattr(model, "avgpool"):
        # VGG's AdaptiveAvgPool2d((7, 7)) sees a 7x7 map at 224 and is the identity there; the TorchScript
        # exporter cannot export the adaptive pool, so it is replaced by what it computes.
        model.avgpool = torch.nn.Identity()
    calibrate(randomize_norm_affine(model, seed), sample_images(images, size, seed))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (sample_images(1, size, seed + 1),), buffer, input_names=["image"],
                          output_names=["logits"], do_constant_folding=False, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())
