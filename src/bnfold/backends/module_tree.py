"""One walk over a model's module tree, shared by every step of a fold (``get_submodule`` and ``named_modules``
walk it again on every call: on resnet50 a fifth of an in-place fold's time).

A tree describes the model as it was when made (a fold replaces norms), so one is made per model and per pass.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

_LAZY = nn.parameter.UninitializedTensorMixin  # a lazy module's tensors have no size yet


def _add_own_tensors(value: object, found: dict[int, tuple[torch.Tensor, int]]) -> None:
    """Add the parameters (kind 0) and buffers (kind 1) a slot value brings to ``found``: a module's whole subtree,
    a parameter."""
    if isinstance(value, nn.Module):
        for module in (value.modules() if value._modules else (value,)):  # a norm is a leaf: no walk
            for kind, table in enumerate((module._parameters, module._buffers)):
                for tensor in table.values():
                    if tensor is not None:
                        found[id(tensor)] = (tensor, kind)
    elif isinstance(value, torch.Tensor):
        found[id(value)] = (value, 0)


@dataclass(frozen=True)
class TensorCensus:
    """What a report counts, and what must be checked before folding: see :attr:`ModuleTree.census`."""

    parameters: int
    buffers: int
    first_meta: str | None  # a tensor on the meta device (a parameter's name first), or None
    holders: dict[int, int]  # id(tensor) -> how many module slots hold it


class ModuleTree:
    """Every module of ``model`` by qualified name (aliases included), each module's names, and the parent slots
    that hold each module."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.by_name: dict[str, nn.Module] = {}
        self.names_of: dict[int, list[str]] = {}
        self.slots: dict[int, list[tuple[nn.Module, str]]] = {}
        self.unique: list[tuple[str, nn.Module]] = []  # each module once, under its first name, in tree order
        for name, module in model.named_modules(remove_duplicate=False):
            self.by_name[name] = module
            if id(module) in self.names_of:
                self.names_of[id(module)].append(name)
                continue
            self.names_of[id(module)] = [name]
            self.unique.append((name, module))
            for child_name, child in module._modules.items():
                if child is not None:
                    self.slots.setdefault(id(child), []).append((module, child_name))

    def get(self, name: str) -> nn.Module:
        """The module called ``name`` (``get_submodule``'s answer, and its error for a name that is not there)."""
        module = self.by_name.get(name)
        return module if module is not None else self.model.get_submodule(name)

    def first_name(self, module: nn.Module) -> str:
        """The module's first qualified name, so a module reachable under two names gets one name in the dataflow."""
        return self.names_of[id(module)][0]

    @functools.cached_property
    def census(self) -> TensorCensus:
        """Parameter and buffer counts, and the first tensor on the meta device: one pass over every module's own
        tensors (each tensor counted once, however many slots hold it; the slots are counted too)."""
        counts = [0, 0]
        meta: list[str | None] = [None, None]  # the first parameter, the first buffer
        holders: dict[int, int] = {}
        for module_name, module in self.unique:
            prefix = f"{module_name}." if module_name else ""
            for table, kind in ((module._parameters, 0), (module._buffers, 1)):
                for name, tensor in table.items():
                    if tensor is None:
                        continue
                    seen = holders.get(id(tensor), 0)
                    holders[id(tensor)] = seen + 1
                    if seen:
                        continue
                    if tensor.is_meta and meta[kind] is None:
                        meta[kind] = prefix + name
                    if not isinstance(tensor, _LAZY):
                        counts[kind] += tensor.numel()
        return TensorCensus(counts[0], counts[1], meta[0] or meta[1], holders)

    def counts_after(self, replaced: Iterable[tuple[object, object]]) -> tuple[int, int] | None:
        """The parameter and buffer counts once each ``(old, new)`` slot value (a module, a parameter, or None) has
        been put in place of the other, from :attr:`census` without walking the tree again; None where that cannot
        be told this way (a tensor that goes is held by another slot too, or one that comes was there already)."""
        census = self.census
        gone: dict[int, tuple[torch.Tensor, int]] = {}
        came: dict[int, tuple[torch.Tensor, int]] = {}
        for old, new in replaced:
            _add_own_tensors(old, gone)
            _add_own_tensors(new, came)
        counts = [census.parameters, census.buffers]
        holders = census.holders
        # a tensor that goes must have been held by that slot only; one that comes must be new to the tree
        for tensors, others, sign, holders_before in ((gone, came, -1, 1), (came, gone, 1, 0)):
            for key, (tensor, kind) in tensors.items():
                if key in others:
                    continue
                if holders.get(key, 0) != holders_before or isinstance(tensor, _LAZY):
                    return None
                counts[kind] += sign * tensor.numel()
        return counts[0], counts[1]
