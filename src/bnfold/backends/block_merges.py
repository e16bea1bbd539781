"""Branch merges block by block, where torch.fx cannot trace a model as a whole (ultralytics' detectors loop over
their layers) or its class is to be kept, while the blocks holding the sums can be traced (``RepConv``).

A *block* is the highest module whose own forward torch.fx traces (an untraceable one is looked into, child by
child); one forward pass records what each block is called with, and each block called once is merged as a whole
model is (:func:`~bnfold.backends.module_merges.merge_traced`) and put back into the tree as its ``GraphModule``,
keeping its plain attributes (ultralytics' ``f`` and ``i``, which the model's loop reads). What was left, and why,
goes into the notes.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..core.merge_rounds import MergeOutcome
from ..layers import LayerRegistry
from ..report import MergeEntry
from .capture import MODEL_CALLS_LOCK, trace
from .module_merges import FoldAgain, merge_traced, trace_failure

log = logging.getLogger(__name__)

_PRESERVED = "_user_preserved_attributes"
"""The key of ``GraphModule.meta`` whose attributes ``copy.deepcopy`` of a GraphModule sets on the copy."""


@dataclass
class _Block:
    """A module whose own forward torch.fx traced, and where it sits in the model."""

    name: str
    module: nn.Module
    graph: fx.Graph


def _children(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    prefix = f"{name}." if name else ""
    return [(prefix + child_name, child) for child_name, child in module._modules.items() if child is not None]


Reasons = dict[str, tuple[nn.Module, str]]
"""A module's qualified name -> the module, and why it was looked into (or left)."""


def _find_blocks(
    starts: Iterable[tuple[str, nn.Module]], registry: LayerRegistry, seen: set[int], untraced: Reasons
) -> list[_Block]:
    """The highest modules under ``starts`` (included) whose forward torch.fx traces; each module looked at once
    (``seen``, shared between calls); ``untraced`` gets each module looked into instead, with the reason."""
    blocks: list[_Block] = []
    stack = list(reversed(list(starts)))
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if registry.is_atomic(module) or not module._modules:
            continue  # a layer, a norm, or code without layers: no sum of layers inside to merge
        if module._forward_hooks or module._forward_pre_hooks:
            untraced[name] = module, "it has forward hooks, which a GraphModule in its place would not call"
        else:
            try:
                blocks.append(_Block(name, module, trace(module, registry)))
                continue
            except Exception as error:  # fx raises many kinds on code it cannot follow
                if not isinstance(module, (nn.ModuleList, nn.ModuleDict)):  # containers have no forward of their own
                    untraced[name] = module, f"torch.fx cannot trace it ({trace_failure(error)})"
        stack.extend(reversed(_children(name, module)))
    return blocks


_SUMS = frozenset({"add", "sub", "iadd", "isub", "add_", "sub_", "__add__", "__sub__", "__radd__", "__rsub__",
                   "__iadd__", "__isub__"})


def _has_sum(graph: fx.Graph) -> bool:
    """Whether a traced graph adds or subtracts anything (every block of branches is a sum or a difference)."""
    return any(node.op in ("call_function", "call_method")
               and (node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")) in _SUMS
               for node in graph.nodes)


def _positional(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """A call's arguments as the positional arguments of the module's forward (a traced graph takes those), or
    None when its parameters do not allow that (``*args``, ``**kwargs``, keyword-only)."""
    if not kwargs:
        return args
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    parameters = list(signature.parameters.values())
    if any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters):
        return None
    bound.apply_defaults()
    return tuple(bound.arguments[p.name] for p in parameters)


def _record_calls(model: nn.Module, blocks: list[_Block], counted: Iterable[nn.Module], inputs: tuple[Any, ...]
                  ) -> tuple[dict[int, int], dict[int, tuple[Any, ...] | None]]:
    """One forward pass of ``model``: how often each block and each ``counted`` module is called (by id), and (a
    copy of) the positional arguments each block called first receives (None when they could not be bound to its
    forward's parameters)."""
    modules = {id(module): module for module in (*counted, *(block.module for block in blocks))}
    counts = dict.fromkeys(modules, 0)
    blocks_ids = {id(block.module) for block in blocks}
    first_args: dict[int, tuple[Any, ...] | None] = {}

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        counts[id(module)] += 1
        if counts[id(module)] == 1 and id(module) in blocks_ids:  # copied: the model may change a tensor after the read
            copied = pytree.tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, (args, kwargs))
            first_args[id(module)] = _positional(module, *copied)

    handles = [module.register_forward_pre_hook(record, with_kwargs=True) for module in modules.values()]
    try:
        with MODEL_CALLS_LOCK, torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return counts, first_args


def _qualified(entry: MergeEntry, prefix: str, region: str) -> MergeEntry:
    return dataclasses.replace(
        entry, block=prefix + entry.block, into=None if entry.into is None else prefix + entry.into,
        layers=tuple(prefix + n for n in entry.layers), kept=tuple(prefix + n for n in entry.kept), region=region,
        identities=tuple(i if i == "input" else prefix + i for i in entry.identities),
    )


def _put_in_place(model: nn.Module, original: nn.Module, merged: nn.Module) -> None:
    """``merged`` in every slot of the tree that holds ``original``, with ``original``'s plain attributes (data the
    model's own code may read, such as ultralytics' ``m.f``); its bound methods and hooks stay behind."""
    own = vars(merged)
    kept = merged.meta.setdefault(_PRESERVED, {}) if isinstance(merged, fx.GraphModule) else {}
    for key, value in vars(original).items():
        if key.startswith("_") or key in own or key == "forward" or getattr(value, "__self__", None) is original:
            continue
        setattr(merged, key, value)
        kept[key] = value  # a deep copy of a GraphModule keeps only these (and what its graph reads)
    for module in model.modules():
        for child_name, child in list(module._modules.items()):
            if child is original:
                module._modules[child_name] = merged


def merge_blocks(
    model: nn.Module,
    registry: LayerRegistry,
    inputs: tuple[Any, ...],
    fold_again: FoldAgain,
) -> MergeOutcome:
    """Merge the summed branches of ``model`` (folded already, owned by the caller) inside each block below it whose
    forward torch.fx traces, and put the merged blocks back into its module tree; the model keeps its class.

    Once blocks merged, ``fold_again`` folds the whole model once more (a norm after a merged block, in its parent's
    code, may fold now). Merge entries name blocks, layers and norms by their qualified names in ``model`` and the
    block they were merged in (:attr:`~bnfold.report.MergeEntry.region`).
    """
    outcome = MergeOutcome(model=model)
    untraced: Reasons = {}
    left: Reasons = {}  # blocks not merged in
    merged_blocks: list[str] = []
    seen: set[int] = set()
    called_untraced: set[str] = set()  # the modules looked into that the forward pass calls (not only holds)
    pending = _find_blocks(_children("", model), registry, seen, untraced)
    while pending:
        counted = {name: module for name, (module, _) in untraced.items() if name not in called_untraced}
        counts, first_args = _record_calls(model, pending, counted.values(), inputs)
        called_untraced.update(name for name, module in counted.items() if counts[id(module)])
        looked_into: list[tuple[str, nn.Module]] = []
        for block in pending:
            count, args = counts[id(block.module)], first_args.get(id(block.module))
            if count == 0:  # a container whose children its parent calls one by one, or a path not taken
                looked_into.extend(_children(block.name, block.module))
                continue
            if count != 1 or args is None:
                if _has_sum(block.graph):  # (else there is nothing to merge in it anyway)
                    left[block.name] = block.module, (
                        f"it is called {count} times in one forward pass" if count > 1
                        else "its forward takes arguments a traced graph cannot be called with (*args, **kwargs)"
                    )
                continue
            prefix = f"{block.name}."
            done = merge_traced(block.module, registry, args, fold_again, graph=block.graph, prefix=prefix)
            if done.failure is not None:  # the trace is not what the block computes: its children may trace right
                untraced[block.name] = block.module, done.failure
                called_untraced.add(block.name)
                looked_into.extend(_children(block.name, block.module))
                continue
            outcome.entries.extend(_qualified(e, prefix, block.name) for e in done.entries)
            outcome.absorbed_norms.update({prefix + n: prefix + layer for n, layer in done.absorbed_norms.items()})
            outcome.notes.extend(done.notes)
            if done.model is not block.module:
                merged_blocks.append(block.name)
                _put_in_place(model, block.module, done.model)
        pending = _find_blocks(looked_into, registry, seen, untraced)
    if merged_blocks:
        fold_again(model, inputs, "")
    outcome.notes.extend(_notes(merged_blocks, {n: r for n, r in untraced.items() if n in called_untraced}, left))
    return outcome


def _notes(merged_blocks: list[str], untraced: Reasons, left: Reasons) -> list[str]:
    notes = []
    if merged_blocks:
        notes.append(
            f"branches were merged block by block, inside {len(merged_blocks)} module(s) whose forward torch.fx "
            f"traces, each now the GraphModule of its merged graph: {', '.join(merged_blocks)}"
        )
    by_reason: dict[tuple[str, str], list[str]] = {}
    for name, (module, reason) in untraced.items():
        by_reason.setdefault((type(module).__name__, reason), []).append(name)
    if by_reason:
        parts = [f"{kind} ({', '.join(names)}: {reason})" for (kind, reason), names in by_reason.items()]
        notes.append(
            "sums in the forward code of these modules were not looked at (their children were): " + "; ".join(parts)
        )
    for name, (module, reason) in left.items():
        notes.append(f"no branches were merged inside {name} ({type(module).__name__}): {reason}")
    return notes
