"""The one registry of layer knowledge: linear layers (:class:`LinearLayerRule`: a weight and an optional bias
that can absorb a per-channel affine map on their output or, where exact, their input) and norms
(:class:`NormRule`: a per-channel affine map in eval, removed once a neighbour absorbed it).

A rule matches a module of one of its classes, or of a subclass that overrides none of the methods that compute the
output: a subclass that computes something else (a weight-standardised conv, a norm with an activation inside)
would be broken silently by a fold that assumed the parent's maths. Built-in layers are declared as data, like
those users teach bnfold with :func:`register_layer` / :func:`register_norm`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .core.apply import Statistics
from .core.graph import PADS_TO_SAME_AT_RUN_TIME
from .errors import InvalidInputError

NormStatistics = Statistics
"""What a norm layer computes in eval: ``gamma * (x - mean) / sqrt(var + eps) + beta`` per channel; the fields
``mean``, ``var``, ``eps``, ``gamma`` and ``beta`` (the last two may be ``None``). The core's
:class:`~bnfold.core.apply.Statistics`, under the name norm rules know it by."""


@dataclass(frozen=True)
class LinearLayerRule:
    """How a linear layer stores its weight, and when it can absorb an affine map on its input.

    Attributes:
        types: the classes (and their subclasses that keep ``behaviour_methods``) the rule covers. Classes of
            optional packages may be given by their dotted name (``"timm.layers.conv2d_same.Conv2dSame"``): they
            match only once that package is imported, which it is whenever a model holds such a layer.
        out_axis: the weight axis of output channels (0 for Conv/Linear, 1 for ConvTranspose); the other of 0 and
            1 holds the input channels. Axis 1 holds one group's share of its channels.
        activation_channel_dim: the dimension of the layer's input/output tensor that holds channels
            (1 for convolutions, -1 for Linear).
        groups: number of channel groups of a module (1 unless it is a grouped convolution).
        input_fold_blocker: ``None`` when an affine on the layer's input can be folded into it exactly, else the
            reason it cannot, for a rule of your own. The built-in rules state facts instead (the module's
            :class:`~bnfold.core.graph.Geometry`, ``input_padding``) and the core words the reason.
        input_padding: how the module pads its input where bnfold reads no geometry for it: one of the
            ``PADS_*`` / ``PADDING_UNKNOWN`` facts of :mod:`bnfold.core.graph`, or ``None``.
        behaviour_methods: methods a subclass must not override to still be covered by the rule.
        weight_name / bias_name: attribute names of the weight and bias parameters.
    """

    types: tuple[type[nn.Module] | str, ...]
    out_axis: int
    activation_channel_dim: int
    groups: Callable[[nn.Module], int] = lambda module: 1
    input_fold_blocker: Callable[[nn.Module], str | None] = lambda module: None
    input_padding: Callable[[nn.Module], str | None] = lambda module: None
    behaviour_methods: tuple[str, ...] = ("forward",)
    weight_name: str = "weight"
    bias_name: str = "bias"

    @property
    def in_axis(self) -> int:
        return 1 - self.out_axis

    def out_channels(self, module: nn.Module) -> int:
        weight = getattr(module, self.weight_name)
        count = weight.shape[self.out_axis]
        return count * self.groups(module) if self.out_axis == 1 else count

    def in_channels(self, module: nn.Module) -> int:
        weight = getattr(module, self.weight_name)
        count = weight.shape[self.in_axis]
        return count * self.groups(module) if self.in_axis == 1 else count


def identity_replacement(module: nn.Module) -> nn.Module:
    return nn.Identity()


@dataclass(frozen=True)
class NormRule:
    """How to read a norm layer as a per-channel affine map, and what replaces it once folded.

    Attributes:
        types, behaviour_methods: as for :class:`LinearLayerRule`.
        statistics: reads the eval-mode affine map of a module.
        unfoldable: ``None`` when the module is a per-channel affine in eval, else the reason it is not (a lazy
            module never run).
        keeps_running_statistics: whether the module holds running statistics; one that does not
            (``track_running_stats=False``) normalises with batch statistics even in eval.
        replacement: the module that takes the norm's place in the module tree after the fold (``nn.Identity``,
            or the activation of a fused norm-activation module).
        channel_dim: the dimension of the norm's input that holds channels.
        depends_on_training: whether the module computes something else in training mode (batch statistics), so
            that folding it requires eval mode. ``False`` for frozen norms.
        backward_blocker: ``None`` when the module's output is exactly its affine map, so that the layers after it
            can absorb it; else the reason they cannot (a fused activation after the norm).
    """

    types: tuple[type[nn.Module] | str, ...]
    statistics: Callable[[nn.Module], NormStatistics]
    unfoldable: Callable[[nn.Module], str | None] = lambda module: None
    keeps_running_statistics: Callable[[nn.Module], bool] = lambda module: True
    replacement: Callable[[nn.Module], nn.Module] = identity_replacement
    channel_dim: int = 1
    behaviour_methods: tuple[str, ...] = ("forward",)
    depends_on_training: bool = True
    backward_blocker: Callable[[nn.Module], str | None] = lambda module: None


# ---------------------------------------------------------------------------------------------- built-in rules


def _conv_groups(module: nn.Module) -> int:
    return int(getattr(module, "groups", 1))


CONV_RULE = LinearLayerRule(
    types=(nn.Conv1d, nn.Conv2d, nn.Conv3d),
    out_axis=0,
    activation_channel_dim=1,
    groups=_conv_groups,
    behaviour_methods=("forward", "_conv_forward"),
)
CONV_TRANSPOSE_RULE = replace(
    CONV_RULE, types=(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), out_axis=1,
    behaviour_methods=("forward", "_output_padding"),
)
LINEAR_RULE = LinearLayerRule(types=(nn.Linear,), out_axis=0, activation_channel_dim=-1)


# timm's Conv2dSame (tf_* EfficientNets, MixNets, ...): zero-pads the input to 'same' size, then a plain conv2d
# with this module's weight and bias, so the output is linear per output channel like any Conv2d.
TIMM_CONV2D_SAME_RULE = replace(
    CONV_RULE, types=("timm.layers.conv2d_same.Conv2dSame",), behaviour_methods=("forward",),
    input_padding=lambda module: None if all(k == 1 for k in module.kernel_size) else PADS_TO_SAME_AT_RUN_TIME,
)


def _batch_norm_statistics(module: nn.Module) -> NormStatistics:
    return NormStatistics(module.running_mean, module.running_var, float(module.eps), module.weight, module.bias)


def _batch_norm_keeps_running_statistics(module: nn.Module) -> bool:
    return module.track_running_stats and module.running_mean is not None and module.running_var is not None


def _batch_norm_unfoldable(module: nn.Module) -> str | None:
    if isinstance(module.running_mean, nn.parameter.UninitializedBuffer):
        return "it is a lazy module that was never run: its statistics are not initialised yet"
    return None


BATCH_NORM_RULE = NormRule(
    types=(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm),
    statistics=_batch_norm_statistics,
    unfoldable=_batch_norm_unfoldable,
    keeps_running_statistics=_batch_norm_keeps_running_statistics,
)
FROZEN_BATCH_NORM_RULE = NormRule(
    types=("torchvision.ops.misc.FrozenBatchNorm2d",),
    statistics=_batch_norm_statistics,  # the same buffer and parameter names
    depends_on_training=False,
)


class NormActivation(nn.Module):
    """What is left of a fused norm-activation module once its norm is folded: its dropout, then its activation.

    Keeps the ``drop`` and ``act`` attribute names, so state_dict keys of an activation with parameters (PReLU)
    stay as they were.
    """

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def passes_its_input(module: nn.Module) -> bool:
    """An nn.Identity or a dropout in eval: its output is the very tensor it reads."""
    return isinstance(module, nn.Identity) or (isinstance(module, nn.modules.dropout._DropoutNd) and not module.training)


def _norm_act_replacement(module: nn.Module) -> nn.Module:
    """The activation alone where that changes nothing (no dropout, no state); else :class:`NormActivation`."""
    act: nn.Module = module.act
    if isinstance(module.drop, nn.Identity) and not any(True for _ in act.state_dict()):
        return act
    return NormActivation(module.drop, act)


def _norm_act_backward_blocker(module: nn.Module) -> str | None:
    if isinstance(module.act, nn.Identity) and passes_its_input(module.drop):
        return None
    return (
        f"it applies its activation ({type(module.act).__name__}) after normalising, so only the layer before it can "
        f"absorb the norm"
    )


# timm's fused norm + activation modules (timm.layers.norm_act): F.batch_norm, then self.drop, then self.act.
# BatchNormAct2d and SyncBatchNormAct subclass BatchNorm2d / SyncBatchNorm; FrozenBatchNormAct2d keeps its
# statistics in buffers, like torchvision's FrozenBatchNorm2d.
TIMM_BATCH_NORM_ACT_RULE = replace(
    BATCH_NORM_RULE, types=("timm.layers.norm_act.BatchNormAct2d", "timm.layers.norm_act.SyncBatchNormAct"),
    replacement=_norm_act_replacement, backward_blocker=_norm_act_backward_blocker,
)
TIMM_FROZEN_BATCH_NORM_ACT_RULE = replace(
    FROZEN_BATCH_NORM_RULE, types=("timm.layers.norm_act.FrozenBatchNormAct2d",),
    replacement=_norm_act_replacement, backward_blocker=_norm_act_backward_blocker,
)

BUILTIN_LAYER_RULES: tuple[LinearLayerRule, ...] = (CONV_RULE, CONV_TRANSPOSE_RULE, LINEAR_RULE, TIMM_CONV2D_SAME_RULE)
BUILTIN_NORM_RULES: tuple[NormRule, ...] = (
    BATCH_NORM_RULE,
    FROZEN_BATCH_NORM_RULE,
    TIMM_BATCH_NORM_ACT_RULE,
    TIMM_FROZEN_BATCH_NORM_ACT_RULE,
)

NORM_BASE_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)
"""Classes whose instances the report always lists, matched by a rule or not (so an unknown BN subclass shows up)."""


# --------------------------------------------------------------------------------------------------- lookup


def _resolve(types: Sequence[type | str]) -> tuple[type, ...]:
    resolved = []
    for item in types:
        if isinstance(item, str):  # a dotted name: the class once its module is imported
            module_name, _, class_name = item.rpartition(".")
            item = getattr(sys.modules.get(module_name), class_name, None)
            if not isinstance(item, type):
                continue
        resolved.append(item)
    return tuple(resolved)


@dataclass(frozen=True)
class Match:
    """The result of looking a module up: its rule, or why no rule covers it."""

    rule: LinearLayerRule | NormRule | None
    reason: str | None = None


_MATCHES: dict[tuple[type, tuple[int, ...]], Match] = {}
_ATOMIC: dict[tuple[type, tuple[int, ...]], bool] = {}


def _match(module: nn.Module, rules: Sequence[LinearLayerRule | NormRule]) -> Match:
    """Find the rule for ``module``: its own class, or the nearest registered ancestor it does not re-define;
    remembered per class and rule list (a class named by a dotted string is an ancestor only once imported)."""
    key = (type(module), tuple(map(id, rules)))
    found = _MATCHES.get(key)
    if found is None:
        found = _MATCHES[key] = _match_class(type(module), rules)
    return found


def _match_class(cls: type, rules: Sequence[LinearLayerRule | NormRule]) -> Match:
    best: tuple[int, LinearLayerRule | NormRule, type] | None = None
    for rule in rules:
        for registered in _resolve(rule.types):
            if issubclass(cls, registered):
                depth = cls.__mro__.index(registered)
                if best is None or depth < best[0]:
                    best = (depth, rule, registered)
    if best is None:
        return Match(None, None)
    _, rule, registered = best
    if registered is cls:
        return Match(rule)
    overridden = [
        name for name in rule.behaviour_methods if getattr(cls, name, None) is not getattr(registered, name, None)
    ]
    if overridden:
        return Match(
            None,
            f"its class {cls.__qualname__} subclasses {registered.__name__} but overrides {', '.join(overridden)}(), "
            f"so it may compute something else; if it is still a per-channel affine / linear layer, teach bnfold with "
            f"bnfold.register_norm or bnfold.register_layer",
        )
    return Match(rule)


@dataclass
class LayerRegistry:
    """The rules bnfold folds with. :data:`DEFAULT_REGISTRY` holds the built-ins and what users register."""

    layers: list[LinearLayerRule] = field(default_factory=lambda: list(BUILTIN_LAYER_RULES))
    norms: list[NormRule] = field(default_factory=lambda: list(BUILTIN_NORM_RULES))

    def layer(self, module: nn.Module) -> Match:
        """The linear-layer rule of ``module`` (``Match(None, None)`` if it is not a linear layer at all)."""
        return _match(module, self.layers)

    def norm(self, module: nn.Module) -> Match:
        """The norm rule of ``module``; for an unregistered BN subclass, ``rule=None`` with the reason."""
        match = _match(module, self.norms)
        if match.rule is None and match.reason is None and isinstance(module, NORM_BASE_TYPES):
            return Match(
                None,
                f"bnfold has no rule for {type(module).__qualname__}; if it is a per-channel affine in eval, "
                f"teach bnfold with bnfold.register_norm",
            )
        return match

    def is_norm_candidate(self, module: nn.Module) -> bool:
        """Whether the report should list ``module``: any batch-norm-like module, foldable or not."""
        return isinstance(module, NORM_BASE_TYPES) or _match(module, self.norms).rule is not None

    def is_atomic(self, module: nn.Module) -> bool:
        """Whether capture should see calls of ``module`` as one step rather than look inside it (remembered per
        class and rule list, as :func:`_match` is: tracing asks it of every module)."""
        rules = (*self.layers, *self.norms)
        key = (type(module), tuple(map(id, rules)))
        atomic = _ATOMIC.get(key)
        if atomic is None:
            cls = type(module)
            atomic = _ATOMIC[key] = issubclass(cls, NORM_BASE_TYPES) or any(
                issubclass(cls, _resolve(rule.types)) for rule in rules
            )
        return atomic


DEFAULT_REGISTRY = LayerRegistry()


def register_layer(
    types: type[nn.Module] | Sequence[type[nn.Module]],
    *,
    out_axis: int = 0,
    activation_channel_dim: int = 1,
    groups: Callable[[nn.Module], int] | None = None,
    input_fold_blocker: Callable[[nn.Module], str | None] | None = None,
    weight_name: str = "weight",
    bias_name: str = "bias",
    registry: LayerRegistry | None = None,
) -> LinearLayerRule:
    """Teach bnfold a linear layer of your own, so batch norms next to it fold into it.

    The layer must compute ``y = W (*) x + b``, linear in ``x`` over channels, with ``W`` stored in parameter
    ``weight_name`` with output channels on axis ``out_axis`` (0 or 1) and ``b`` in ``bias_name`` (it may be
    ``None``; bnfold then adds one). ``input_fold_blocker(module)`` says why an affine on the input cannot fold
    exactly (return ``None`` where it can; by default it always can, as for a Linear).
    """
    rule = LinearLayerRule(
        types=tuple(types) if isinstance(types, Sequence) else (types,),
        out_axis=out_axis,
        activation_channel_dim=activation_channel_dim,
        groups=groups or (lambda module: 1),
        input_fold_blocker=input_fold_blocker or (lambda module: None),
        weight_name=weight_name,
        bias_name=bias_name,
    )
    if out_axis not in (0, 1):
        raise InvalidInputError(f"out_axis must be 0 or 1 (the weight axis of output channels), got {out_axis}")
    (registry or DEFAULT_REGISTRY).layers.insert(0, rule)
    return rule


def register_norm(
    types: type[nn.Module] | Sequence[type[nn.Module]],
    statistics: Callable[[nn.Module], NormStatistics],
    *,
    replacement: Callable[[nn.Module], nn.Module] | None = None,
    unfoldable: Callable[[nn.Module], str | None] | None = None,
    backward_blocker: Callable[[nn.Module], str | None] | None = None,
    channel_dim: int = 1,
    depends_on_training: bool = True,
    registry: LayerRegistry | None = None,
) -> NormRule:
    """Teach bnfold a norm layer of your own that is a per-channel affine map in eval mode.

    ``statistics(module)`` returns its :class:`NormStatistics`; ``replacement(module)`` the module that takes its
    place after folding (``nn.Identity`` by default; for a norm with a built-in activation, the activation).
    ``unfoldable(module)`` says why a module cannot be folded at all (``None``: it can), ``backward_blocker(module)``
    why the layers after it cannot absorb it (a norm followed by its own activation). ``depends_on_training=False``
    for a norm that computes the same in training mode (frozen statistics).
    """
    rule = NormRule(
        types=tuple(types) if isinstance(types, Sequence) else (types,),
        statistics=statistics,
        unfoldable=unfoldable or (lambda module: None),
        replacement=replacement or identity_replacement,
        channel_dim=channel_dim,
        depends_on_training=depends_on_training,
        backward_blocker=backward_blocker or (lambda module: None),
    )
    (registry or DEFAULT_REGISTRY).norms.insert(0, rule)
    return rule
