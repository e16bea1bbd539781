"""Execute a :class:`~bnfold.plan.FoldPlan` on the module tree.

Precision: the per-channel scale and shift are computed in float64 from the norm's statistics; weights are
multiplied in their own dtype when that is float32 or wider, and in float32 when they are fp16 / bf16, then rounded
once. Casting a whole float32 weight to float64 would buy nothing (the product of two float32-rounded numbers
already rounds once) and costs time on large models. Biases are small and are computed in float64.

Parameters keep their identity where they exist (``weight.data`` is updated in place, so optimisers and tied
references see the new values), their dtype, device and ``requires_grad``. A bias is created where a layer had
none. Each folded norm is replaced in the module tree by its rule's replacement (``nn.Identity`` by default), so the
model's own forward code and the remaining state_dict keys stay as they were.

If anything fails half way, :class:`Rollback` restores every tensor and module it touched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import affine
from .errors import NonFiniteStatisticsError
from .layers import LayerRegistry, LinearLayerRule, NormRule, NormStatistics
from .planner import FORWARD, Fold, FoldPlan


def _float64(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().to(torch.float64)


def scale_shift(statistics: NormStatistics) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm's per-channel ``(s, t)`` in float64."""
    mean, var = _float64(statistics.mean), _float64(statistics.var)
    assert mean is not None and var is not None
    return affine.bn_scale_shift(mean, var, statistics.eps, _float64(statistics.gamma), _float64(statistics.beta))


def check_finite(model: nn.Module, names: Iterable[str], registry: LayerRegistry) -> None:
    """Raise :class:`NonFiniteStatisticsError` naming the first norm whose statistics hold NaN or infinity."""
    for name in names:
        module = model.get_submodule(name)
        rule = registry.norm(module).rule
        if not isinstance(rule, NormRule):
            continue
        stats = rule.statistics(module)
        for label, tensor in (("running_mean", stats.mean), ("running_var", stats.var), ("weight", stats.gamma), ("bias", stats.beta)):
            if tensor is not None and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteStatisticsError(
                    f"norm layer '{name}' has NaN or infinite values in its {label}: its outputs are already invalid. "
                    f"Recalibrate its statistics (a few training-mode forward passes) before folding."
                )
        if bool((stats.var.detach() + stats.eps <= 0).any()):
            raise NonFiniteStatisticsError(
                f"norm layer '{name}' has running_var + eps <= 0, which has no square root; recalibrate its statistics."
            )


def _apply_weight_scale(weight: torch.Tensor, scale: torch.Tensor, axis: int, groups: int) -> None:
    compute = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    factors = scale.to(device=weight.device, dtype=compute)
    if compute == weight.dtype and axis == 0:
        weight.mul_(factors.reshape((-1,) + (1,) * (weight.dim() - 1)))
    else:
        weight.copy_(affine.scale_channels(weight.to(compute), factors, axis, groups))


def _set_bias(layer: nn.Module, rule: LinearLayerRule, new_bias: torch.Tensor) -> None:
    weight: torch.Tensor = getattr(layer, rule.weight_name)
    bias: torch.Tensor | None = getattr(layer, rule.bias_name, None)
    if bias is not None:
        bias.copy_(new_bias.to(device=bias.device, dtype=bias.dtype))
        return
    value = new_bias.to(device=weight.device, dtype=weight.dtype)
    setattr(layer, rule.bias_name, nn.Parameter(value, requires_grad=weight.requires_grad))


def fold_forward(layer: nn.Module, rule: LinearLayerRule, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """``norm(layer(x)) == layer'(x)``: scale the layer's output channels by ``s``, bias ``b' = s*b + t``."""
    weight: torch.Tensor = getattr(layer, rule.weight_name)
    bias: torch.Tensor | None = getattr(layer, rule.bias_name, None)
    new_bias = affine.forward_bias(_float64(bias), scale.to(weight.device), shift.to(weight.device))
    _apply_weight_scale(weight.data, scale, rule.out_axis, rule.groups(layer))
    _set_bias(layer, rule, new_bias)


def fold_backward(layer: nn.Module, rule: LinearLayerRule, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """``layer(norm(x)) == layer'(x)``: scale the input channels by ``s``, bias ``b' = b + sum W t``.

    The bias sum runs in float64: it adds up as many terms as the layer has inputs.
    """
    weight: torch.Tensor = getattr(layer, rule.weight_name)
    bias: torch.Tensor | None = getattr(layer, rule.bias_name, None)
    groups = rule.groups(layer)
    new_bias = affine.backward_bias(
        weight.detach().to(torch.float64), _float64(bias), shift.to(weight.device), rule.in_axis, groups
    )
    _apply_weight_scale(weight.data, scale, rule.in_axis, groups)
    _set_bias(layer, rule, new_bias)


@dataclass
class Rollback:
    """Remembers what a fold changes, so a failure (or a failed verification) can undo it."""

    tensors: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    attributes: list[tuple[nn.Module, str, object]] = field(default_factory=list)

    def save_tensor(self, tensor: torch.Tensor) -> None:
        self.tensors.append((tensor, tensor.detach().clone()))

    def save_attribute(self, owner: nn.Module, name: str) -> None:
        self.attributes.append((owner, name, owner._modules.get(name, owner._parameters.get(name))))

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, saved in reversed(self.tensors):
                tensor.data.copy_(saved)
        for owner, name, value in reversed(self.attributes):
            if name in owner._modules:
                owner._modules[name] = value  # type: ignore[assignment]
            else:
                owner._parameters[name] = value  # type: ignore[assignment]


def _parents(model: nn.Module, module: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every (parent, attribute name) under which ``module`` sits in the tree (a module may sit at several)."""
    found = []
    for parent in model.modules():
        for child_name, child in parent._modules.items():
            if child is module:
                found.append((parent, child_name))
    return found


def apply_plan(model: nn.Module, plan: FoldPlan, registry: LayerRegistry, rollback: Rollback | None = None) -> None:
    """Fold in place, in plan order. With a ``rollback``, everything changed is recorded there first."""
    with torch.no_grad():
        for fold in plan.folds:
            _apply_fold(model, fold, registry, rollback)


def _apply_fold(model: nn.Module, fold: Fold, registry: LayerRegistry, rollback: Rollback | None) -> None:
    norm = model.get_submodule(fold.norm)
    norm_rule = registry.norm(norm).rule
    assert isinstance(norm_rule, NormRule)
    scale, shift = scale_shift(norm_rule.statistics(norm))
    for layer_name in fold.layers:
        layer = model.get_submodule(layer_name)
        layer_rule = registry.layer(layer).rule
        assert isinstance(layer_rule, LinearLayerRule)
        if rollback is not None:
            rollback.save_tensor(getattr(layer, layer_rule.weight_name))
            if getattr(layer, layer_rule.bias_name, None) is not None:
                rollback.save_tensor(getattr(layer, layer_rule.bias_name))
            else:
                rollback.save_attribute(layer, layer_rule.bias_name)
        if fold.direction == FORWARD:
            fold_forward(layer, layer_rule, scale, shift)
        else:
            fold_backward(layer, layer_rule, scale, shift)
    replacement = norm_rule.replacement(norm)
    for parent, child_name in _parents(model, norm):
        if rollback is not None:
            rollback.save_attribute(parent, child_name)
        parent._modules[child_name] = replacement
