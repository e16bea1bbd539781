"""Shared test helpers: realistic norm statistics, seeded inputs, and the comparison every fold test makes."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from bnfold.verification import TOLERANCES, compare_outputs

# Two cores on CI: one intra-op thread per test process keeps timings of the suite predictable.
torch.set_num_threads(int(os.environ.get("BNFOLD_TEST_THREADS", "1")))


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN realistic, distinct statistics: mean ~ N(0, 1), var in [0.2, 2.2], gamma/beta random.

    The initial 0 / 1 statistics would let a fold that ignores the mean or the variance pass unnoticed.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.randn(shape, generator=generator))
            module.running_var.copy_(0.2 + 2 * torch.rand(shape, generator=generator))
            if module.affine:
                module.weight.copy_(torch.randn(shape, generator=generator))
                module.bias.copy_(torch.randn(shape, generator=generator))
    return model


@torch.no_grad()
def calibrated_by_training(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Random gamma / beta and running statistics from three train-mode passes on noisy ``x``, then eval mode.

    Statistics the model's own layers produce (rather than drawn at random) are what a traced or exported graph
    sees in practice, and they are far from the 0 / 1 a fold that ignored them would get away with.
    """
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.weight.data = torch.randn(module.num_features, generator=generator)
            module.bias.data = torch.randn(module.num_features, generator=generator)
            module.momentum = None
    model.train()
    for _ in range(3):
        model(x + torch.randn(x.shape, generator=generator))
    return model.eval()


@torch.no_grad()
def well_conditioned(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Norm gammas near 1 and running statistics from three train-mode passes on noisy ``x``, then eval mode.

    With gammas drawn around 0 (:func:`calibrated_by_training`) a deep random network amplifies float32 rounding so
    much that the unfolded model is itself ~2e-4 away from its float64 evaluation (mobileone_s0), and no float32
    comparison at the fold tolerance could tell a right merge from a wrong one; gammas near 1 keep it well conditioned.
    """
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.weight.copy_(1 + 0.2 * torch.randn(module.num_features, generator=generator))
            module.bias.copy_(0.2 * torch.randn(module.num_features, generator=generator))
            module.momentum = None
    model.train()
    for _ in range(3):
        model(x + torch.randn(x.shape, generator=generator))
    return model.eval()


@torch.no_grad()
def random_layer_scales(model: nn.Module, seed: int = 1) -> nn.Module:
    """Layer scales of order 1 (timm starts them at 1e-5, where a wrong coefficient would hide in the rounding)."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if name.endswith("gamma"):
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model


def script_or_trace(model: nn.Module, x: torch.Tensor, how: str) -> torch.jit.ScriptModule:
    """``model`` as TorchScript, scripted (``how="script"``) or traced on ``x``, without torch's deprecation warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(model) if how == "script" else torch.jit.trace(model, x)


def assert_same_outputs(original: nn.Module, folded: nn.Module, *inputs: object, dtype: torch.dtype = torch.float32) -> float:
    """Run both models and assert the folded one is within the dtype's tolerance; return the relative error."""
    with torch.no_grad():
        expected = original(*inputs)
        actual = folded(*inputs)
    comparison = compare_outputs(expected, actual, TOLERANCES[dtype])
    assert comparison.passed, comparison.worst()
    return comparison.max_relative


def bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.fixture
def seeded() -> None:
    torch.manual_seed(0)
