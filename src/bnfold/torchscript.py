"""Fold batch norms inside a TorchScript model (a ``torch.jit.save`` archive), by rewriting its frozen graph.

A TorchScript archive carries no Python classes to rebuild, so the module-tree engine cannot fold it. Instead the
model is frozen (``torch._C._freeze_module``: submodule calls inlined, weights turned into graph constants, *no*
optimisation passes, so nothing is folded behind our back), and every ``aten::batch_norm`` in eval mode whose
input comes straight from a convolution or linear node with constant weights, and is used by nothing else, is
folded into that node (:func:`bnfold.apply.forward_folded`, the same arithmetic as for modules): the node gets
new constant weight and bias, the norm's uses are rewired to the producer, the norm node is deleted. Anything else
is left, with the reason.

The result is a frozen ``ScriptModule``: its weights are constants (no ``parameters()``), and only ``forward`` is
kept, which is what a deployment archive needs. Parameter counts are those of the original's ``parameters()``,
less the folded norms' affine parameters, plus the biases the folds add, as for an ``nn.Module``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .apply import FoldOverflow, forward_folded
from .errors import InvalidInputError
from .layers import NormStatistics
from .report import FOLDED, LEFT, FoldReport, NormEntry

# kind -> (index of the groups argument or None, index of the "transposed" flag or None, transposed by kind)
_PRODUCERS: dict[str, tuple[int | None, int | None, bool]] = {
    "aten::linear": (None, None, False),
    "aten::conv1d": (6, None, False),
    "aten::conv2d": (6, None, False),
    "aten::conv3d": (6, None, False),
    "aten::conv_transpose1d": (6, None, True),
    "aten::conv_transpose2d": (6, None, True),
    "aten::conv_transpose3d": (6, None, True),
    "aten::_convolution": (8, 6, False),
}


# Uses that read only a tensor's metadata (a norm's input-rank check), which folding does not change.
_METADATA_READS = frozenset({"aten::dim", "aten::size", "prim::shape", "aten::numel", "prim::dtype", "prim::device"})


def freeze(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Freeze without ``torch.jit.freeze``'s optimisation passes (they fold conv + BN themselves, silently)."""
    if module.training:
        raise InvalidInputError("the TorchScript model is in training mode; call .eval() (or pass --eval) first")
    frozen = torch.jit.RecursiveScriptModule(torch._C._freeze_module(module._c, []))
    torch.jit.RecursiveScriptModule._finalize_scriptmodule(frozen)
    return frozen


def _constant(value: Any) -> Any:
    node = value.node()
    return node.output().toIValue() if node.kind() == "prim::Constant" else _NOT_CONSTANT


_NOT_CONSTANT = object()


def _why_not(norm: Any) -> tuple[str | None, Any]:
    """``(reason, producer)``: why the norm cannot be folded (``None`` if it can) and the node to fold into."""
    inputs = list(norm.inputs())
    statistics = [_constant(v) for v in inputs[1:5]]
    training = _constant(inputs[5])
    if training is not False:
        return "the norm runs in training mode (batch statistics); save the model after .eval()", None
    if any(s is _NOT_CONSTANT for s in statistics) or statistics[2] is None or statistics[3] is None:
        return "its statistics or affine parameters are not constants of the frozen graph", None
    producer = inputs[0].node()
    if producer.kind() not in _PRODUCERS:
        return f"its input comes from {producer.kind()}, not a convolution or linear node", None
    if sum(use.user.kind() not in _METADATA_READS for use in inputs[0].uses()) != 1:
        return f"the output of {producer.kind()} has other uses besides this norm", None
    weight, bias = _constant(producer.inputsAt(1)), _constant(producer.inputsAt(2))
    if not isinstance(weight, torch.Tensor) or bias is _NOT_CONSTANT:
        return f"the weight or bias of {producer.kind()} is not a constant", None
    if producer.kind() == "aten::linear" and (weight.dim() != 2 or producer.output().type().dim() != 2):
        return (
            "the linear output's rank is not known to be 2 in the TorchScript graph (the norm normalises axis 1, the "
            "linear layer's features are the last axis: they coincide only for 2-D inputs); trace the model "
            "(torch.jit.trace records shapes) or fold the nn.Module before scripting", None,
        )
    return None, producer


def _fold_into(graph: Any, norm: Any, producer: Any) -> int:
    """Fold ``norm`` into ``producer``; returns the change in parameter count (norm's affine out, a bias in)."""
    inputs = list(norm.inputs())
    gamma, beta, mean, var = (_constant(v) for v in inputs[1:5])
    eps = float(_constant(inputs[7]))
    weight, bias = _constant(producer.inputsAt(1)), _constant(producer.inputsAt(2))
    groups_at, flag_at, transposed = _PRODUCERS[producer.kind()]
    if flag_at is not None:
        transposed = bool(_constant(producer.inputsAt(flag_at)))
    groups = int(_constant(producer.inputsAt(groups_at))) if groups_at is not None else 1
    statistics = NormStatistics(mean=mean, var=var, eps=eps, gamma=gamma, beta=beta)
    new_weight, new_bias = forward_folded(weight, bias, statistics, 1 if transposed else 0, groups)
    graph.setInsertPoint(producer)
    weight_value = graph.insertConstant(new_weight.contiguous())
    bias_value = graph.insertConstant(new_bias.contiguous())
    producer.replaceInput(1, weight_value)
    producer.replaceInput(2, bias_value)
    norm.output().replaceAllUsesWith(producer.output())
    norm.destroy()
    removed = sum(t.numel() for t in (gamma, beta) if t is not None)
    return removed - (new_bias.numel() if bias is None else 0)


def fold_script(module: torch.jit.ScriptModule, *, name: str = "TorchScript model") -> tuple[torch.jit.ScriptModule, FoldReport]:
    """Fold every foldable batch norm of a TorchScript model; returns ``(frozen folded module, report)``.

    The caller's module is not changed (freezing works on a copy).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folded = freeze(module)
    before = sum(p.numel() for p in module.parameters())
    removed = 0
    graph = folded.graph
    entries: list[NormEntry] = []
    for index, norm in enumerate(list(graph.findAllNodes("aten::batch_norm"))):
        label = f"batch_norm#{index} (%{norm.output().debugName()})"
        mean = _constant(norm.inputsAt(3))
        channels = mean.numel() if isinstance(mean, torch.Tensor) else None
        reason, producer = _why_not(norm)
        if reason is not None:
            entries.append(NormEntry(label, "aten::batch_norm", channels, LEFT, reason=reason))
            continue
        into = f"{producer.kind()} (%{producer.output().debugName()})"
        try:
            removed += _fold_into(graph, norm, producer)
        except FoldOverflow as overflow:  # raised before the graph is touched
            entries.append(NormEntry(label, "aten::batch_norm", channels, LEFT, reason=overflow.reason))
            continue
        entries.append(NormEntry(label, "aten::batch_norm", channels, FOLDED, into=(into,), direction="forward"))
    torch._C._jit_pass_dce(graph)
    torch._C._jit_pass_constant_pooling(graph)
    report = FoldReport(
        model=name, applied=True, capture="torchscript graph", entries=entries,
        parameters_before=before, parameters_after=before - removed,
        notes=["the folded model is frozen: weights are graph constants and only forward() is kept"],
    )
    return folded, report
