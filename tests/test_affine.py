"""The formulas, checked against the definitions on tensors and arrays (no modules involved)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnfold import affine


def _stats(channels: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(channels, generator=g, dtype=torch.float64)
    var = 0.1 + torch.rand(channels, generator=g, dtype=torch.float64)
    gamma = torch.randn(channels, generator=g, dtype=torch.float64)
    beta = torch.randn(channels, generator=g, dtype=torch.float64)
    return mean, var, gamma, beta


def test_scale_shift_reproduces_batch_norm() -> None:
    mean, var, gamma, beta = _stats(5)
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    s, t = affine.bn_scale_shift(mean, var, 1e-3, gamma, beta)
    expected = F.batch_norm(x, mean, var, gamma, beta, training=False, eps=1e-3)
    torch.testing.assert_close(x * s.view(1, -1, 1) + t.view(1, -1, 1), expected, rtol=1e-12, atol=1e-12)


def test_missing_affine_means_ones_and_zeros() -> None:
    mean, var, _, _ = _stats(3)
    s, t = affine.bn_scale_shift(mean, var, 1e-5)
    torch.testing.assert_close(s, (var + 1e-5).rsqrt())
    torch.testing.assert_close(t, -mean * (var + 1e-5).rsqrt())


def test_same_results_on_numpy_and_torch() -> None:
    mean, var, gamma, beta = _stats(6)
    weight = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    s, t = affine.bn_scale_shift(mean, var, 1e-5, gamma, beta)
    sn, tn = affine.bn_scale_shift(mean.numpy(), var.numpy(), 1e-5, gamma.numpy(), beta.numpy())
    np.testing.assert_allclose(sn, s.numpy(), rtol=1e-15)
    np.testing.assert_allclose(tn, t.numpy(), rtol=1e-15)
    scaled = affine.scale_channels(weight, s, axis=1, groups=3)
    scaled_np = affine.scale_channels(weight.numpy(), s.numpy(), axis=1, groups=3)
    np.testing.assert_allclose(scaled_np, scaled.numpy(), rtol=1e-15)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_scale_channels_axis1_follows_group_layout(groups: int) -> None:
    # Conv weight (out, in/groups, k): input channel of weight[o, i] is (o // (out/groups)) * in_per_group + i.
    out_channels, in_per_group = 8, 3
    weight = torch.randn(out_channels, in_per_group, 2, dtype=torch.float64)
    scale = torch.randn(groups * in_per_group, dtype=torch.float64)
    scaled = affine.scale_channels(weight, scale, axis=1, groups=groups)
    per_group_out = out_channels // groups
    for o in range(out_channels):
        for i in range(in_per_group):
            channel = (o // per_group_out) * in_per_group + i
            torch.testing.assert_close(scaled[o, i], weight[o, i] * scale[channel])


def test_scale_channels_rejects_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match="channels on axis 1"):
        affine.scale_channels(torch.ones(4, 3, 1), torch.ones(5), axis=1, groups=2)


@pytest.mark.parametrize("groups", [1, 3])
def test_backward_bias_of_conv_without_padding(groups: int) -> None:
    weight = torch.randn(6, 4 // 1 if groups == 1 else 2, 3, 3, dtype=torch.float64)
    in_channels = weight.shape[1] * groups
    bias = torch.randn(6, dtype=torch.float64)
    shift = torch.randn(in_channels, dtype=torch.float64)
    x = torch.randn(2, in_channels, 5, 5, dtype=torch.float64)
    expected = F.conv2d(x + shift.view(1, -1, 1, 1), weight, bias, groups=groups)
    new_bias = affine.backward_bias(weight, bias, shift, in_axis=1, groups=groups)
    torch.testing.assert_close(F.conv2d(x, weight, new_bias, groups=groups), expected)


def test_backward_bias_with_input_on_axis0() -> None:
    # MatMul-style weight (in, out): y = x @ B + b.
    weight = torch.randn(5, 3, dtype=torch.float64)
    shift = torch.randn(5, dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64)
    new_bias = affine.backward_bias(weight, None, shift, in_axis=0)
    torch.testing.assert_close(x @ weight + new_bias, (x + shift) @ weight)


@pytest.mark.parametrize("axis, groups", [(0, 1), (0, 3), (1, 1), (1, 3)])
def test_scaling_in_place_gives_the_same_bits_as_scaling_beside(axis: int, groups: int) -> None:
    generator = torch.Generator().manual_seed(axis * 10 + groups)
    weight = torch.randn(6, 4, 3, 3, generator=generator)
    channels = weight.shape[0] if axis == 0 else groups * weight.shape[1]
    scale = torch.rand(channels, generator=generator) + 0.5
    expected = affine.scale_channels(weight, scale, axis, groups)
    affine.scale_channels_in_place(weight, scale, axis, groups)
    assert torch.equal(weight, expected)
    on_numpy = weight.numpy().copy()  # the same for numpy arrays
    affine.scale_channels_in_place(on_numpy, (1 / scale).numpy(), axis, groups)
    np.testing.assert_allclose(on_numpy, affine.scale_channels(weight, 1 / scale, axis, groups).numpy(), rtol=0, atol=0)
