"""Branch merges on an ``nn.Module``: the core's merge rounds (:mod:`bnfold.core.merge_rounds`) on a torch.fx trace
of the model (:class:`_TracedMerges`), whose module names stay those of the model (``state_dict`` keys of what is
left do not change). A module tree cannot express a merge without its forward code: in the trace, readers of a sum
read the merged layer instead, and the other branches' calls and the additions are erased.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from typing import Any

from torch import fx, nn

from ..core.graph import Graph
from ..core.merge import Merge
from ..core.merge_rounds import MergeOutcome, merge_rounds
from ..core.plan import FoldPlan
from ..layers import LayerRegistry, passes_its_input
from .capture import TraceMismatch, capture_fx, trace
from .modules import ModuleWeights, to_graph


def _dead_outside(merge: Merge, nodes: list[fx.Node]) -> str | None:
    """Why erasing the merge's nodes would break the graph (a node read for its shape only), or None."""
    removed = {nodes[i] for i in merge.removed}
    root = nodes[merge.root]  # its readers read the merged layer instead
    for node in removed - {root}:
        for user in node.users:
            if user not in removed:
                return f"{node.name} is also read by {user.name} (for its shape, or outside the captured dataflow)"
    return None


_IN_PLACE_OPERATORS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow,
    operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift, operator.imatmul, operator.setitem,
})


def _overwritten(node: fx.Node, module: fx.GraphModule) -> fx.Node | None:
    """The tensor ``node`` changes in place (its first argument), or None: ``x.mul_(2)``, ``x += y``,
    ``x[i] = v``, ``F.relu(x, inplace=True)``, a module built with ``inplace=True``."""
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node):
        return None
    if node.op == "call_method":
        name = str(node.target)
        return first if name.endswith("_") and not name.endswith("__") else None
    if node.op == "call_module":
        return first if getattr(module.get_submodule(str(node.target)), "inplace", False) is True else None
    if node.op != "call_function":
        return None
    name = getattr(node.target, "__name__", "")
    if node.target in _IN_PLACE_OPERATORS or (name.endswith("_") and not name.endswith("__")):
        return first
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # no signature (a builtin), or not these arguments
        return first if node.kwargs.get("inplace") is True else None
    return first if bound.arguments.get("inplace") is True else None


def _changed_in_place(merge: Merge, nodes: list[fx.Node], into_node: fx.Node, module: fx.GraphModule) -> str | None:
    """Why a merge would change what its terms read, or None.

    torch.fx records every read of a tensor as a read of the node that made it, also after an in-place change
    (``a(x); x.mul_(2); b(x)``): the branches then read two different values of ``x``, while the merged layer reads
    one. So no tensor the merged terms read (nor an alias of it through an identity) may be changed in place between
    the first and the last of their reads; before them every term sees the change alike, after them none does.
    """
    removed = {nodes[i] for i in merge.removed}
    readers = removed | {into_node}  # the merged terms' calls, and the additions that read them
    position = {node: index for index, node in enumerate(module.graph.nodes)}
    group: dict[fx.Node, int] = {}  # each tensor read, and its aliases, numbered by the tensor
    for start in {source for node in readers for source in node.all_input_nodes if source not in removed}:
        if start in group:
            continue
        number, frontier = len(group), [start]
        group[start] = number
        while frontier:  # identities return the tensor they read: a change through one is a change of it
            node = frontier.pop()
            linked = [user for user in node.users if _is_passing(user, module)]
            if _is_passing(node, module):
                linked += node.all_input_nodes
            for other in linked:
                if other not in group:
                    group[other] = number
                    frontier.append(other)
    reads: dict[int, list[int]] = {group[into_node]: [position[into_node]]} if into_node in group else {}
    for node in readers:  # (the merged layer's own output counts from where it is made: `a = conv(x); a.relu_()`)
        for source in node.all_input_nodes:
            if source in group:
                reads.setdefault(group[source], []).append(position[node])
    for node in module.graph.nodes:
        changed = _overwritten(node, module) if node not in removed else None
        if changed is None or changed not in group:
            continue
        seen = reads.get(group[changed], [])
        if seen and min(seen) < position[node] < max(seen):
            return f"{changed.name}, which its terms read, is changed in place by {node.name} between their reads"
    return None


def _is_passing(node: fx.Node, module: fx.GraphModule) -> bool:
    return node.op == "call_module" and passes_its_input(module.get_submodule(str(node.target)))


def _rewrite(graph: fx.Graph, merge: Merge, nodes: list[fx.Node], into_node: fx.Node,
             replaced: dict[fx.Node, fx.Node]) -> None:
    """Readers of the sum read the merged layer's output (plus the terms a split kept); the merged nodes go.

    ``replaced``: the roots of the blocks merged before in this round, and the node computing each now (a kept term
    may be one: RepGhost's shortcut is the previous block's sum); this block's root is added to it.
    """
    root = nodes[merge.root]
    result = into_node
    with graph.inserting_before(root):  # after every term: the root reads them all
        for index in merge.kept:
            result = graph.call_function(operator.add, (result, replaced.get(nodes[index], nodes[index])))
    root.replace_all_uses_with(result)
    replaced[root] = result
    for index in sorted(merge.removed, reverse=True):
        graph.erase_node(nodes[index])


class _TracedMerges:
    """A model's torch.fx trace as merge rounds see it (:class:`~bnfold.core.merge_rounds.MergeTarget`): the first
    round makes a GraphModule that shares every module with ``model`` (merged layers are written in place), the
    rounds after edit its graph again, so block names stay those of the returned model."""

    def __init__(self, model: nn.Module, registry: LayerRegistry, inputs: tuple[Any, ...] | None,
                 fold_again: FoldAgain, graph: fx.Graph | None, prefix: str) -> None:
        self.model, self.registry, self.inputs, self.graph = model, registry, inputs, graph
        self._fold_again, self.prefix = fold_again, prefix

    def translate(self) -> Graph | str:
        model, registry, inputs, graph = self.model, self.registry, self.inputs, self.graph
        self.graph = None
        if isinstance(model, fx.GraphModule):
            module = model
            flow = capture_fx(module, registry, inputs, graph=module.graph)
        else:
            if graph is None:
                try:
                    graph = trace(model, registry)
                except Exception as error:  # fx raises many kinds on code it cannot follow
                    return f"torch.fx cannot trace it ({trace_failure(error)})"
            try:  # the graph checked against the model itself (a GraphModule of it would be checked against itself)
                flow = capture_fx(model, registry, inputs, graph=graph)
            except TraceMismatch as mismatch:
                return f"its torch.fx trace is not what it computes ({mismatch})"
            module = fx.GraphModule(model, graph, class_name=type(model).__name__)
            module.training = model.training  # a new Module starts in training mode; its submodules are the model's
            # torch.load re-traces a pickled GraphModule's code with the class that traced it (every module kept as a
            # leaf); bnfold's tracer needs a registry to be made, torch.fx's own makes the same graph of that code.
            module._tracer_cls = None
        self.module = module
        self.nodes = [site.origin for site in flow.sites]
        self.core = to_graph(module, flow, registry)
        self.access = ModuleWeights(module, registry)
        return self.core

    def start(self, merges: list[Merge]) -> None:
        self.replaced: dict[fx.Node, fx.Node] = {}

    def name(self, index: int) -> str:
        return self.nodes[index].name

    def _into(self, merge: Merge) -> fx.Node:
        return self.nodes[self.core.units[merge.into].calls[0]]

    def blocked(self, merge: Merge) -> str | None:
        return _dead_outside(merge, self.nodes) or _changed_in_place(merge, self.nodes, self._into(merge), self.module)

    def rewrite(self, merge: Merge) -> tuple[str, ...]:
        kept = tuple(self.nodes[index].name for index in merge.kept)
        _rewrite(self.module.graph, merge, self.nodes, self._into(merge), self.replaced)
        return kept

    def commit(self) -> None:
        self.module.graph.lint()
        self.module.delete_all_unused_submodules()
        self.module.recompile()
        self.model = self.module

    def fold_again(self) -> bool:
        return bool(self._fold_again(self.model, self.inputs, self.prefix).folds)


FoldAgain = Callable[[nn.Module, "tuple[Any, ...] | None", str], FoldPlan]
"""``fold_again(module, inputs, prefix)`` folds ``module`` in place (planned on ``inputs``) and returns its plan;
``prefix`` is the module's qualified name in the model plus a dot (empty for the model itself), for the report."""


def trace_failure(error: Exception) -> str:
    """Why torch.fx could not trace a module, in one short line (fx's messages run on with advice)."""
    first = (f"{type(error).__name__}: {error}".strip().splitlines() or [""])[0]
    return first.split(". ", 1)[0].rstrip(".")


def merge_traced(
    model: nn.Module,
    registry: LayerRegistry,
    inputs: tuple[Any, ...] | None,
    fold_again: FoldAgain,
    *,
    graph: fx.Graph | None = None,
    prefix: str = "",
) -> MergeOutcome:
    """Merge the summed branches of ``model`` (folded already, owned by the caller) in its torch.fx trace, fold what
    that made foldable (``fold_again``), and repeat while anything changes (:func:`bnfold.core.merge_rounds.
    merge_rounds`). ``graph``: a torch.fx trace of ``model`` made already; ``prefix``: what ``fold_again`` is told
    (``model`` is that block of a larger model). When torch.fx cannot trace ``model``, or traces a graph that is not
    ``model`` on ``inputs``, nothing is merged and :attr:`MergeOutcome.failure` says why."""
    outcome = merge_rounds(_TracedMerges(model, registry, inputs, fold_again, graph, prefix))
    if outcome.model is not model:
        _drop_identity_calls(outcome.model)
    return outcome


def _drop_identity_calls(module: fx.GraphModule) -> None:
    """Take the calls of ``nn.Identity`` modules (the folded norms, mostly) out of a merged GraphModule's forward.

    Each is a Python call that returns its input: on a small network at batch 1 a hundred of them cost as much as a
    few convolutions (RepViT's merged graph calls 109). The modules hold no tensors, so the state_dict is unchanged.
    Dropout stays: in training mode it is no identity.
    """
    for node in list(module.graph.nodes):
        if (node.op == "call_module" and type(module.get_submodule(str(node.target))) is nn.Identity
                and len(node.args) == 1 and not node.kwargs):
            node.replace_all_uses_with(node.args[0])
            module.graph.erase_node(node)
    module.graph.lint()
    module.delete_all_unused_submodules()
    module.recompile()
