"""Real photographs as model inputs (scikit-image ships a few): what detectors see in use.

Random noise saturates a detector's heads and makes every box score alike, which hides a wrong fold or fakes an
error; photographs give the activations a model meets in practice. Tests and benchmarks only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PHOTOGRAPHS = ("astronaut", "chelsea", "coffee", "rocket")


def photograph_arrays() -> list[np.ndarray]:
    """scikit-image's colour photographs, as HxWx3 uint8 arrays (what ``YOLO.predict`` takes)."""
    from skimage import data

    return [getattr(data, name)() for name in PHOTOGRAPHS]


def photographs(size: int, count: int = len(PHOTOGRAPHS)) -> torch.Tensor:
    """``count`` photographs as a float batch ``(count, 3, size, size)`` in [0, 1] (resized, RGB)."""
    arrays = photograph_arrays()
    images = [torch.from_numpy(arrays[i % len(arrays)]).permute(2, 0, 1).float().div(255) for i in range(count)]
    resized = [F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False) for image in images]
    return torch.cat(resized).contiguous()


@torch.no_grad()
def calibrated_on_photographs(model: torch.nn.Module, size: int, passes: int = 3, seed: int = 3) -> torch.nn.Module:
    """Norm gammas near 1 and running statistics from ``passes`` train-mode passes over the photographs (flipped and
    lightly noised in turn), then eval mode."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.weight.copy_(1 + 0.2 * torch.randn(module.num_features, generator=generator))
            module.bias.copy_(0.2 * torch.randn(module.num_features, generator=generator))
            module.momentum = None
    batch = photographs(size)
    model.train()
    for index in range(passes):
        images = batch.flip(-1) if index % 2 else batch
        model((images + 0.05 * torch.randn(images.shape, generator=generator)).clamp(0, 1))
    return model.eval()
