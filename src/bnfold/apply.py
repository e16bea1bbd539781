"""Execute a :class:`~bnfold.plan.FoldPlan` on the module tree.

Precision: the per-channel scale and shift are computed in float64 from the norm's statistics; weights are
multiplied in their own dtype when that is float32 or wider, and in float32 when they are fp16 / bf16, then rounded
once. Casting a whole float32 weight to float64 would buy nothing (the product of two float32-rounded numbers
already rounds once) and costs time on large models. Biases are small and are computed in float64.

Parameters keep their identity where they exist (``weight.data`` is swapped, so optimisers and
references to the parameter see the new values), their dtype, device and ``requires_grad``. A bias is created where a layer had
none. Each folded norm is replaced in the module tree by its rule's replacement (``nn.Identity`` by default), so the
model's own forward code and the remaining state_dict keys stay as they were.

When the fold may have to be undone (it will be verified), nothing is multiplied in place: new weights are
computed out of place and swapped in, and the :class:`Rollback` keeps the old tensors, so a failed verification
restores the model exactly, at no cost. Otherwise weights are multiplied in place (see :class:`Rollback`).

Range: a fold is exact in float64, but its result is stored in the layer's dtype, and a large scale (gamma 300
over a variance of 1e-6 is 3e5) can exceed that dtype's range (float16 ends at 65504) although the unfolded model,
which multiplies activations rather than weights, stays finite. Every new weight and bias is therefore checked in
its storage dtype *before* it replaces the old one; one that would hold inf or NaN where the old tensor was finite
raises :class:`FoldOverflow`, everything done so far is undone, and the engine leaves that norm with the reason.

New tensors are made with inference mode disabled, so a model folded under ``torch.inference_mode()`` can still be
trained (inference tensors cannot be saved for backward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import affine
from .errors import NonFiniteStatisticsError
from .layers import LayerRegistry, LinearLayerRule, NormRule, NormStatistics
from .planner import FORWARD, Fold, FoldPlan


class FoldOverflow(Exception):
    """A planned fold would store a weight or bias its dtype cannot hold (it would become inf or NaN).

    Internal: raised before the tensor is changed and caught by the callers of :func:`apply_plan` and
    :func:`forward_folded`, which leave the norm ``norm`` in place with ``reason`` (never seen by users as an error).
    """

    def __init__(self, reason: str, norm: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.norm = norm


def _overflow_reason(role: str, dtype: torch.dtype, exact: Callable[[], torch.Tensor]) -> str:
    """The user-facing reason: which dtype overflows, and how large the folded values get (from float64)."""
    wide = exact().detach().to(torch.float64).abs()
    peak = float(torch.nan_to_num(wide, nan=0.0, posinf=float("inf")).max()) if wide.numel() else float("nan")
    name = str(dtype).removeprefix("torch.")
    return (
        f"folding would overflow {name}: the folded {role} reaches {peak:.1e}, beyond the largest {name} "
        f"({torch.finfo(dtype).max:.1e}); the model computes this norm in a wider range than its layer can store"
    )


def _check_stored(new: torch.Tensor, old: torch.Tensor | None, role: str, exact: Callable[[], torch.Tensor]) -> None:
    """Raise :class:`FoldOverflow` if ``new`` (in its storage dtype) is inf / NaN where ``old`` was finite.

    Values that were already non-finite before the fold are not the fold's doing and do not block it.
    """
    finite = torch.isfinite(new)
    if bool(finite.all()):
        return
    if old is not None and old.shape == new.shape and not bool((~finite & torch.isfinite(old)).any()):
        return
    raise FoldOverflow(_overflow_reason(role, new.dtype, exact))


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


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def scaled_weight(weight: torch.Tensor, scale: torch.Tensor, axis: int, groups: int) -> torch.Tensor:
    """``weight`` scaled along ``axis``, out of place, in its own dtype (multiplied in float32 if narrower).

    Raises :class:`FoldOverflow` when the result does not fit the weight's dtype.
    """
    compute = _compute_dtype(weight)
    factors = scale.to(device=weight.device, dtype=compute)
    if not bool(torch.isfinite(factors).all()):  # the scale alone exceeds float32; the product may still fit
        compute = torch.float64
        factors = scale.to(device=weight.device, dtype=compute)
    new = affine.scale_channels(weight.detach().to(compute), factors, axis, groups).to(weight.dtype)
    _check_stored(new, weight.detach(), "weight", lambda: affine.scale_channels(
        weight.detach().to(torch.float64), scale.to(device=weight.device, dtype=torch.float64), axis, groups))
    return new


def _stored_bias(new_bias: torch.Tensor, old: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``new_bias`` (float64) rounded to ``dtype``; :class:`FoldOverflow` if it does not fit."""
    stored = new_bias.to(device=device, dtype=dtype)
    _check_stored(stored, None if old is None else old.detach(), "bias", lambda: new_bias)
    return stored


def forward_folded(
    weight: torch.Tensor, bias: torch.Tensor | None, statistics: NormStatistics, out_axis: int, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """New ``(weight, bias)`` of a layer that absorbed the norm ``statistics`` on its output, in the weight's dtype.

    For folders that store the tensors themselves (the TorchScript and torch.export graph folders); folds on the
    module tree go through :func:`fold_forward`, which also records how to undo them.

    Raises :class:`FoldOverflow` (before anything is stored) when the new weight or bias does not fit the weight's
    dtype; the caller leaves that norm, with the exception's ``reason``.
    """
    with torch.inference_mode(False):
        scale, shift = scale_shift(statistics)
        new_bias = affine.forward_bias(_float64(bias), scale.to(weight.device), shift.to(weight.device))
        new_weight = scaled_weight(weight, scale, out_axis, groups)
        return new_weight, _stored_bias(new_bias, bias, weight.dtype, weight.device)


@dataclass
class Rollback:
    """Undo information for a fold made in place.

    With ``exact=True`` new weights are computed out of place and swapped in (``parameter.data = new``), so undoing
    is swapping the old tensors back, bit for bit, without copying any weight. With ``exact=False`` (an in-place fold
    that will not be verified) full-precision weights are multiplied in place, which is several times faster on
    large models; should anything fail half way, they are divided back, which restores them to within one rounding.
    Biases and module slots are always swapped, hence restored exactly.
    """

    exact: bool = True
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    scaled_in_place: list[tuple[torch.Tensor, torch.Tensor, int, int]] = field(default_factory=list)
    attributes: list[tuple[nn.Module, str, object]] = field(default_factory=list)

    def swap(self, tensor: torch.Tensor, new_value: torch.Tensor) -> None:
        self.swapped.append((tensor, tensor.data))
        tensor.data = new_value

    def scale_weight(self, weight: torch.Tensor, scale: torch.Tensor, axis: int, groups: int) -> None:
        if self.exact or axis != 0 or _compute_dtype(weight) != weight.dtype:
            self.swap(weight, scaled_weight(weight, scale, axis, groups))
            return
        factors = scale.to(device=weight.device, dtype=weight.dtype)
        # The largest magnitude per output channel, scaled, is the largest the product can reach (rounding is
        # monotonic): checked before the weight is touched, at the cost of one reduction.
        peak = weight.detach().abs().amax(dim=tuple(range(1, weight.dim()))) if weight.dim() > 1 else weight.detach().abs()
        _check_stored(peak * factors.abs(), peak, "weight", lambda: affine.scale_channels(
            weight.detach().to(torch.float64), scale.to(device=weight.device, dtype=torch.float64), axis, groups))
        weight.data.mul_(factors.reshape((-1,) + (1,) * (weight.dim() - 1)))
        self.scaled_in_place.append((weight, factors, axis, groups))

    def set_module_entry(self, owner: nn.Module, name: str, value: object) -> None:
        """Set a child module or parameter slot of ``owner`` (bypassing nn.Module's type checks on re-assignment)."""
        table = owner._modules if name in owner._modules else owner._parameters
        self.attributes.append((owner, name, table.get(name)))
        table[name] = value  # type: ignore[assignment]

    def restore(self) -> None:
        with torch.no_grad():
            for weight, factors, _, _ in reversed(self.scaled_in_place):
                weight.data.div_(factors.reshape((-1,) + (1,) * (weight.dim() - 1)))
        for tensor, old in reversed(self.swapped):
            tensor.data = old
        for owner, name, value in reversed(self.attributes):
            table = owner._modules if name in owner._modules else owner._parameters
            table[name] = value  # type: ignore[assignment]


def _set_bias(layer: nn.Module, rule: LinearLayerRule, new_bias: torch.Tensor, rollback: Rollback) -> None:
    weight: torch.Tensor = getattr(layer, rule.weight_name)
    bias: torch.Tensor | None = getattr(layer, rule.bias_name, None)
    if bias is not None:
        rollback.swap(bias, _stored_bias(new_bias, bias, bias.dtype, bias.device))
        return
    value = _stored_bias(new_bias, None, weight.dtype, weight.device)
    rollback.set_module_entry(layer, rule.bias_name, nn.Parameter(value, requires_grad=weight.requires_grad))


def fold_forward(layer: nn.Module, rule: LinearLayerRule, scale: torch.Tensor, shift: torch.Tensor, rollback: Rollback) -> None:
    """``norm(layer(x)) == layer'(x)``: scale the layer's output channels by ``s``, bias ``b' = s*b + t``."""
    weight: torch.Tensor = getattr(layer, rule.weight_name)
    bias: torch.Tensor | None = getattr(layer, rule.bias_name, None)
    new_bias = affine.forward_bias(_float64(bias), scale.to(weight.device), shift.to(weight.device))
    rollback.scale_weight(weight, scale, rule.out_axis, rule.groups(layer))
    _set_bias(layer, rule, new_bias, rollback)


def fold_backward(layer: nn.Module, rule: LinearLayerRule, scale: torch.Tensor, shift: torch.Tensor, rollback: Rollback) -> None:
    """``layer(norm(x)) == layer'(x)``: scale the input channels by ``s``, bias ``b' = b + sum W t``.

    The bias sum runs in float64: it adds up as many terms as the layer has inputs.
    """
    weight: torch.Tensor = getattr(layer, rule.weight_name)
    bias: torch.Tensor | None = getattr(layer, rule.bias_name, None)
    groups = rule.groups(layer)
    new_bias = affine.backward_bias(
        weight.detach().to(torch.float64), _float64(bias), shift.to(weight.device), rule.in_axis, groups
    )
    rollback.scale_weight(weight, scale, rule.in_axis, groups)
    _set_bias(layer, rule, new_bias, rollback)


def _parent_slots(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (parent, attribute name) under which each module sits in the tree (a module may sit at several)."""
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for child_name, child in parent._modules.items():
            if child is not None:
                slots.setdefault(id(child), []).append((parent, child_name))
    return slots


def apply_plan(model: nn.Module, plan: FoldPlan, registry: LayerRegistry, *, exact_undo: bool = True) -> Rollback:
    """Fold in place, in plan order; returns what undoes it. On an exception, everything done is undone first.

    ``exact_undo=False`` allows weights to be multiplied in place (see :class:`Rollback`). Raises
    :class:`FoldOverflow` naming the first fold whose result does not fit its dtype, with everything undone.
    """
    rollback = Rollback(exact=exact_undo)
    slots = _parent_slots(model)
    try:
        with torch.no_grad(), torch.inference_mode(False):
            for fold in plan.folds:
                try:
                    _apply_fold(model, fold, registry, rollback, slots)
                except FoldOverflow as overflow:
                    raise FoldOverflow(overflow.reason, fold.norm) from None
    except BaseException:
        rollback.restore()
        raise
    return rollback


def _apply_fold(
    model: nn.Module, fold: Fold, registry: LayerRegistry, rollback: Rollback, slots: dict[int, list[tuple[nn.Module, str]]]
) -> None:
    norm = model.get_submodule(fold.norm)
    norm_rule = registry.norm(norm).rule
    assert isinstance(norm_rule, NormRule)
    scale, shift = scale_shift(norm_rule.statistics(norm))
    offset = 0  # a forward fold into several layers: their outputs were concatenated, each takes its channels
    for layer_name in fold.layers:
        layer = model.get_submodule(layer_name)
        layer_rule = registry.layer(layer).rule
        assert isinstance(layer_rule, LinearLayerRule)
        if fold.direction == FORWARD:
            share = slice(offset, offset + layer_rule.out_channels(layer)) if len(fold.layers) > 1 else slice(None)
            fold_forward(layer, layer_rule, scale[share], shift[share], rollback)
            offset = share.stop or 0
        else:
            fold_backward(layer, layer_rule, scale, shift, rollback)
    replacement = norm_rule.replacement(norm)
    for parent, child_name in slots.get(id(norm), []):
        rollback.set_module_entry(parent, child_name, replacement)
