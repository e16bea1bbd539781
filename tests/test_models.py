"""Real architectures: the seed's figures, every torchvision classifier with BN, a FrozenBatchNorm2d model.

Models are built with random weights (nothing is downloaded) and their BN statistics come from train-mode passes
over real photographs (scikit-image samples), with random gamma / beta, so folds move real numbers around.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import fx, nn

import bnfold
from bnfold.app.calibration import calibrate, randomize_norm_affine, sample_images
from bnfold.verification import TOLERANCES, compare_outputs, explained_by_rounding
from conftest import bn_count, randomize_norms
from helpers.counting import count_batch_norm_calls

MAX_PARAMETERS = 150_000_000  # larger models (regnet_y_128gf: 644M) take gigabytes to build; nothing new to learn
SMALL_INPUT = {"inception_v3": 80}  # the smallest input each model accepts, where 64 x 64 is too small


def _classifiers_with_bn() -> list[str]:
    names = []
    for name in torchvision.models.list_models(module=torchvision.models):
        size = torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]  # offline metadata
        if size > MAX_PARAMETERS:
            continue
        if any(part in name for part in ("alexnet", "convnext", "squeezenet", "swin", "vit_")) or name in (
            "vgg11", "vgg13", "vgg16", "vgg19"
        ):
            continue  # no batch norm in these families
        names.append(name)
    return names


def _build(name: str, size: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    randomize_norm_affine(model, seed=1)
    images = sample_images(8, size, seed=0)
    calibrate(model, images, batch_size=4)
    return model, images[:2]


def _forward_foldable(model: nn.Module) -> set[str]:
    """An independent count of the simple case: BN fed only by a conv/linear module called once, used once."""
    graph = fx.symbolic_trace(model).graph
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    expected = set()
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        source = node.args[0]
        if (
            isinstance(source, fx.Node) and source.op == "call_module"
            and isinstance(model.get_submodule(source.target), (nn.Conv2d, nn.Linear))
            and len(source.users) == 1 and calls[source.target] == 1 and calls[node.target] == 1
        ):
            expected.add(str(node.target))
    return expected


@pytest.mark.parametrize(("name", "removed"), [("vgg16_bn", 8_448), ("resnet50", 26_560)])
def test_seed_figures(name: str, removed: int) -> None:
    model, images = _build(name, 64)
    folded = bnfold.fold(model, images)
    report = bnfold.report_for(folded)
    assert report.parameters_removed == removed
    assert len(report.folded) == bn_count(model) and not report.left
    assert report.verification is not None and report.verification["passed"]
    assert count_batch_norm_calls(folded, (images,)) == 0
    assert count_batch_norm_calls(model, (images,)) == bn_count(model)
    assert type(folded) is type(model)


@pytest.mark.parametrize("name", _classifiers_with_bn())
def test_torchvision_classifier(name: str) -> None:
    model, images = _build(name, SMALL_INPUT.get(name, 64))
    folded = bnfold.fold(model, images)
    report = bnfold.report_for(folded)
    folded_names = {e.name for e in report.folded}
    assert _forward_foldable(model) <= folded_names, "a simple conv -> BN pair was left alone"
    assert count_batch_norm_calls(folded, (images,)) == count_batch_norm_calls(model, (images,)) - len(folded_names)
    assert_matches(model, folded, images)


def assert_matches(model: nn.Module, folded: nn.Module, *inputs: object) -> None:
    """Within the float32 tolerance, or (badly conditioned random models) no further from the float64 truth
    than the model's own float32 rounding explains."""
    with torch.no_grad():
        expected, actual = model(*inputs), folded(*inputs)
    comparison = compare_outputs(expected, actual, TOLERANCES[torch.float32])
    if not comparison.passed:
        second = explained_by_rounding(model, inputs, expected, actual)
        assert second.passed, f"{comparison.worst()}; against float64: {second.worst()}"


def _freeze_norms(model: nn.Module) -> nn.Module:
    """Swap every BatchNorm2d for torchvision's FrozenBatchNorm2d, as detection backbones use them."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                for tensor_name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, tensor_name).copy_(getattr(child, tensor_name).detach())
                setattr(parent, child_name, frozen)
    return model


def test_segmentation_model_with_frozen_batch_norm() -> None:
    torch.manual_seed(0)
    model = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=4)
    model = _freeze_norms(randomize_norms(model.eval(), seed=3)).eval()
    frozen = sum(type(m).__name__ == "FrozenBatchNorm2d" for m in model.modules())
    assert frozen == 54  # 53 in the ResNet-50 backbone, 1 in the FCN head
    images = sample_images(2, 64, seed=4)
    folded = bnfold.fold(model, images)
    report = bnfold.report_for(folded)
    assert {e.kind for e in report.folded} == {"FrozenBatchNorm2d"}
    assert len(report.folded) == 54 and not report.left
    assert not any(type(m).__name__ == "FrozenBatchNorm2d" for m in folded.modules())
    assert_matches(model, folded, images)


def test_detection_model_untraceable_by_fx_folds_from_a_forward_pass() -> None:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=0)
    model = FasterRCNN(backbone, num_classes=3, min_size=128, max_size=128).eval()
    generator = torch.Generator().manual_seed(5)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
            module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
            module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    image = sample_images(1, 128, seed=6)[0]
    with pytest.raises(bnfold.CaptureError, match="example_inputs"):
        bnfold.plan(model)
    folded = bnfold.fold(model, ([image],))
    report = bnfold.report_for(folded)
    assert report.capture == "forward pass"
    assert len(report.folded) == 20 and not report.left  # resnet18: 20 norms
    assert report.verification is not None and report.verification["passed"]


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_large_100"])
def test_timm_norm_activation_models_fold_completely(name: str) -> None:
    """timm builds these with BatchNormAct2d (BN + activation in one module), which torch.fx's fuse skips."""
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    randomize_norm_affine(model, seed=2)
    images = sample_images(6, 96, seed=7)
    calibrate(model, images, batch_size=3)
    fused = sum(isinstance(m, BatchNormAct2d) for m in model.modules())
    assert fused > 0
    folded = bnfold.fold(model, images[:2])
    report = bnfold.report_for(folded)
    assert not report.left and len(report.folded) == bn_count(model)
    assert count_batch_norm_calls(folded, (images[:2],)) == 0
    assert not any(isinstance(m, BatchNormAct2d) for m in folded.modules())
    assert type(folded) is type(model)
    assert_matches(model, folded, images[:2])
