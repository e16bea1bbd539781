"""Realistic batch-norm statistics for models with random weights, from real images that ship offline.

A freshly built model has running statistics 0 / 1, under which every fold is nearly the identity and a wrong
fold can go unnoticed. Folding is only tested honestly on statistics a real forward pass produced, so the demo,
the tests and the benchmarks run a few train-mode passes over real photographs (scikit-image's sample images)
before folding. Without scikit-image, seeded random images stand in.
"""

from __future__ import annotations

import torch
from torch import nn

_SAMPLE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def sample_images(count: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """``count`` real RGB crops of ``size`` x ``size``, normalised with ImageNet mean/std, as (N, 3, H, W) float32.

    Crops are taken at seeded random positions and scales from scikit-image's sample photographs.
    """
    generator = torch.Generator().manual_seed(seed)
    try:
        from skimage import data
    except ImportError:
        return torch.randn(count, 3, size, size, generator=generator)
    photos = []
    for name in _SAMPLE_IMAGES:
        image = torch.from_numpy(getattr(data, name)().copy()).float() / 255.0
        if image.dim() == 3 and image.shape[-1] == 3:
            photos.append(image.permute(2, 0, 1))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        side = min(photo.shape[1:])
        crop = int(side * (0.3 + 0.7 * torch.rand((), generator=generator).item()))
        top = int(torch.randint(0, photo.shape[1] - crop + 1, (), generator=generator))
        left = int(torch.randint(0, photo.shape[2] - crop + 1, (), generator=generator))
        patch = photo[:, top : top + crop, left : left + crop].unsqueeze(0)
        crops.append(nn.functional.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False))
    return (torch.cat(crops) - mean) / std


@torch.no_grad()
def calibrate(model: nn.Module, images: torch.Tensor, batch_size: int = 8, momentum: float | None = None) -> nn.Module:
    """Give every batch norm of ``model`` running statistics measured on ``images``; returns ``model`` in eval.

    Runs the images through the model in train mode with cumulative averaging (``momentum=None``), so the
    statistics are the images' own, then switches to eval. Only norm buffers change; weights are untouched.
    """
    saved = {}
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            saved[module] = module.momentum
            module.momentum = momentum
            module.reset_running_stats()
    model.train()
    for start in range(0, len(images), batch_size):
        model(images[start : start + batch_size])
    for module, value in saved.items():
        module.momentum = value
    return model.eval()


@torch.no_grad()
def randomize_norm_affine(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every affine batch norm a random ``weight`` in [0.5, 1.5] and ``bias`` in [-0.5, 0.5] (seeded).

    Freshly built models have ``weight = 1, bias = 0``, which would let a fold that forgets gamma or beta pass.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            shape = module.weight.shape
            module.weight.copy_(0.5 + torch.rand(shape, generator=generator))
            module.bias.copy_(torch.rand(shape, generator=generator) - 0.5)
    return model
