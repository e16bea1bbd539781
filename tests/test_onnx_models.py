"""A real exporter's graph: torchvision ResNet-18 through torch.onnx.export, every BatchNormalization folded.

Random weights (no downloads); a few train-mode passes on random data give the norms realistic running statistics
before ``.eval()`` (as PyTorch's own fusion tests do), so a fold that ignored the mean or variance would show.
``do_constant_folding=False`` keeps the exporter from fusing the norms itself; the test checks they survive.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest

import bnfold.onnx as bo
from helpers.onnx_cases import FLOAT32_TOLERANCE, bn_count
from helpers.onnx_oracle import assert_same_outputs


def export_torchvision(
    name: str, size: int = 64, seed: int = 0, calibration_steps: int = 3
) -> onnx.ModelProto:
    """Export torchvision model ``name`` with random weights and calibrated norm statistics (eval mode)."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None)
    if name.startswith("vgg") and size == 224:
        # VGG's AdaptiveAvgPool2d((7, 7)) sees a 7x7 map at 224 and is the identity there; the TorchScript
        # exporter cannot export the adaptive pool, so it is replaced by what it computes.
        model.avgpool = torch.nn.Identity()
    model.train()
    with torch.no_grad():
        for _ in range(calibration_steps):
            model(torch.randn(4, 3, size, size))
    model.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(1, 3, size, size),),
            buffer,
            input_names=["image"],
            output_names=["logits"],
            do_constant_folding=False,
            dynamo=False,
        )
    return onnx.load_from_string(buffer.getvalue())


def test_resnet18_folds_every_norm() -> None:
    pytest.importorskip("torchvision")
    model = export_torchvision("resnet18")
    assert bn_count(model) == 20, "the exporter folded the norms itself; this test needs them in the graph"
    result = bo.fold(model)
    assert bn_count(result.model) == 0
    assert len(result.report.folded) == 20 and not result.report.left
    assert all(e.direction == "forward" and e.into[0].startswith("/") for e in result.report.entries)
    assert result.report.verification["max_relative"] < FLOAT32_TOLERANCE
    assert_same_outputs(model, result.model)  # onnxruntime on inputs of its own, not bnfold's check
    onnx.checker.check_model(result.model, full_check=True)
    # The norms' statistics (read directly or through the exporter's Identity nodes) go, and each Conv gains a
    # bias with one value per channel of its norm.
    identities = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    statistics = {
        identities.get(name, name)
        for node in model.graph.node
        if node.op_type == "BatchNormalization"
        for name in node.input[1:]
    }
    kept = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name not in statistics)
    channels = sum(e.channels for e in result.report.entries)
    assert result.report.parameters_after == kept + channels
    assert not [n for n in result.model.graph.node if n.op_type == "Identity"]


def _export_module(model: object, size: int) -> onnx.ModelProto:
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, size, size),), buffer, input_names=["image"],
                          output_names=["logits"], do_constant_folding=False, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("name", ["torchvision:densenet121", "timm:mixnet_s", "timm:rexnet_100"])
def test_folds_as_many_norms_as_the_module_api(name: str) -> None:
    """Real architectures (concatenations, BN -> ReLU -> Conv, depthwise convs): the ONNX export folds as many
    norms as :func:`bnfold.plan` on the module, and the folded file reproduces the original."""
    torch = pytest.importorskip("torch")
    import bnfold

    library, _, arch = name.partition(":")
    torch.manual_seed(0)
    if library == "timm":
        timm = pytest.importorskip("timm")
        model = timm.create_model(arch, pretrained=False)
    else:
        import torchvision

        model = torchvision.models.get_model(arch, weights=None)
    size = 64
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, size, size))
    model.eval()
    expected = bnfold.plan(model, torch.randn(1, 3, size, size))
    exported = _export_module(model, size)
    result = bo.fold(exported)
    assert len(result.report.folded) >= len(expected.folded), [e.reason for e in result.report.left][:3]
    assert bn_count(result.model) == len(result.report.left)
    assert result.report.verification["max_relative"] < FLOAT32_TOLERANCE
    assert_same_outputs(exported, result.model)
