"""Who feeds whom: the dataflow of a model as a list of call sites.

Folding is only safe along real dataflow: a BN may fold into the conv that produced its input only if nothing else
reads that conv's output, and the order in which modules were registered says nothing about that. This module
learns the dataflow in one of two ways and returns the same :class:`Dataflow` from both:

* **torch.fx symbolic tracing** (``method="torch.fx"``): sees every path through ``forward`` at once, needs no
  inputs, but fails on control flow that depends on tensor values and on some untraceable code.
* **one watched forward pass** (``method="forward pass"``): runs the model on the example inputs under a
  :class:`~torch.overrides.TorchFunctionMode` and forward hooks, recording every torch function call and every
  call of a layer bnfold knows. It works on any model that runs, but sees only the path those inputs take.

Capture knows nothing of folding: the registry tells it only which modules are atomic (their calls are one site,
their insides are not looked at).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .errors import CaptureError
from .layers import LayerRegistry

log = logging.getLogger(__name__)

FX = "torch.fx"
FORWARD_PASS = "forward pass"


@dataclass
class Site:
    """One step of the dataflow: a model input, a parameter read, a module call, a torch op, or the output.

    ``inputs`` are the sites that produced the tensors this step reads, in argument order; ``users`` the sites
    that read what this step produced. Reads that only look at metadata (``x.shape``, ``x.size()``) are not
    counted as uses: folding does not change shapes.
    """

    index: int
    kind: str  # "input" | "param" | "module" | "op" | "output"
    name: str  # module / parameter qualified name, or the op's name
    inputs: list[int] = field(default_factory=list)
    users: list[int] = field(default_factory=list)
    target: Any = None  # the module for module sites, the callable for op sites
    args: tuple[Any, ...] = ()  # the call's arguments, each tensor replaced by TensorRef(site index)
    kwargs: dict[str, Any] = field(default_factory=dict)
    shape: tuple[int, ...] | None = None  # shape of the (first) tensor produced, when seen
    origin: Any = None  # the torch.fx node this site was read from (fx capture only): what a graph rewrite edits


@dataclass(frozen=True)
class TensorRef:
    """Stands for a tensor argument in :attr:`Site.args`: the site that produced it."""

    site: int


@dataclass
class Dataflow:
    """The call sites of one model, with who feeds whom, and how they were learnt."""

    sites: list[Site]
    method: str
    notes: list[str] = field(default_factory=list)
    shapes_known: bool = False  # every site's shape was recorded from a forward pass

    def module_sites(self) -> dict[str, list[Site]]:
        """Call sites of each module, by qualified name, in call order."""
        calls: dict[str, list[Site]] = {}
        for site in self.sites:
            if site.kind == "module":
                calls.setdefault(site.name, []).append(site)
        return calls

    def param_reads(self) -> dict[str, list[Site]]:
        """Sites that read a parameter or buffer outside its own module's call, by qualified name."""
        reads: dict[str, list[Site]] = {}
        for site in self.sites:
            if site.kind == "param":
                reads.setdefault(site.name, []).append(site)
        return reads


# ----------------------------------------------------------------------------------------------- metadata ops

_METADATA_METHODS = frozenset(
    {"size", "dim", "ndimension", "numel", "nelement", "is_contiguous", "is_floating_point", "is_complex",
     "element_size", "get_device", "data_ptr", "stride", "storage_offset", "__len__", "type", "has_names"}
)
_METADATA_ATTRIBUTES = frozenset(
    {"shape", "dtype", "device", "ndim", "is_cuda", "is_sparse", "is_quantized", "is_meta", "layout", "requires_grad",
     "names", "grad_fn", "is_leaf"}
)


# Calls that read only the shape / dtype / device of the argument at these positions (``y.reshape_as(x)`` reads x's
# shape, ``torch.zeros_like(x)`` its shape and dtype): such reads are not uses of that tensor's values.
_METADATA_ARGUMENTS: dict[str, frozenset[int]] = {
    **{name: frozenset({1}) for name in ("reshape_as", "view_as", "expand_as", "type_as")},
    **{name: frozenset({0}) for name in (
        "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "new_zeros", "new_ones",
        "new_empty", "new_full", "new_tensor")},
}


def _metadata_positions(target: Any) -> frozenset[int]:
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return _METADATA_ARGUMENTS.get(name, frozenset())


def _is_metadata_function(func: Callable[..., Any]) -> bool:
    name = getattr(func, "__name__", "")
    if name in _METADATA_METHODS:
        return True
    # Property reads arrive as the property's __get__ (``Tensor.shape.__get__``).
    owner = getattr(func, "__self__", None)
    return name == "__get__" and getattr(owner, "__name__", None) in _METADATA_ATTRIBUTES


def _op_name(func: Any) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    return str(name)


def _canonical_names(model: nn.Module) -> dict[nn.Module, str]:
    """Each module's first qualified name, so a module reachable under two names gets one name in the dataflow."""
    return {module: name for name, module in reversed(list(model.named_modules(remove_duplicate=False)))}


# ---------------------------------------------------------------------------------------------------- torch.fx


class _Tracer(fx.Tracer):
    """fx tracer that keeps every module the registry knows as one call, so BN subclasses stay visible."""

    def __init__(self, registry: LayerRegistry) -> None:
        super().__init__()
        self._registry = registry

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return self._registry.is_atomic(m) or super().is_leaf_module(m, module_qualified_name)


def _fx_node_is_metadata(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    if node.op == "call_function":
        if node.target in (getattr, operator.attrgetter) and len(node.args) >= 2:
            return node.args[1] in _METADATA_ATTRIBUTES
        return getattr(node.target, "__name__", "") in _METADATA_METHODS
    return False


def _fx_shapes(model: nn.Module, graph: fx.Graph, example_inputs: tuple[Any, ...]) -> dict[fx.Node, tuple[int, ...]] | None:
    """The shape of the (first) tensor each node produces, from running the traced graph on the example inputs.

    ``None`` when the traced graph does not run (the caller then falls back to hooks on the model itself).
    """
    try:
        with torch.no_grad():
            ShapeProp(fx.GraphModule(model, graph)).propagate(*example_inputs)
    except Exception as error:  # the interpreter surfaces whatever the model's code raises
        log.info("shape propagation on the traced graph failed (%s); using forward hooks", error)
        return None
    shapes: dict[fx.Node, tuple[int, ...]] = {}
    for node in graph.nodes:
        meta = node.meta.get("tensor_meta")
        first = next((m for m in pytree.tree_leaves(meta, is_leaf=lambda m: isinstance(m, TensorMetadata))), None)
        if isinstance(first, TensorMetadata):
            shapes[node] = tuple(first.shape)
    return shapes


def trace(model: nn.Module, registry: LayerRegistry) -> fx.Graph:
    """The torch.fx graph of ``model``, with every module the registry knows kept as one call."""
    return _Tracer(registry).trace(model)


def capture_fx(
    model: nn.Module,
    registry: LayerRegistry,
    example_inputs: tuple[Any, ...] | None = None,
    graph: fx.Graph | None = None,
) -> Dataflow:
    """Learn the dataflow of ``model`` by torch.fx symbolic tracing (no inputs needed).

    With ``example_inputs`` every site also gets the shape of what it produces (reshapes between a layer and its
    norm can only be judged with shapes). Raises whatever torch.fx raises when the model cannot be traced;
    :func:`capture` turns that into advice. ``graph``: a graph :func:`trace` made of ``model`` already (each site's
    ``origin`` is then a node of it, for a caller that rewrites that graph).
    """
    graph = graph if graph is not None else trace(model, registry)
    shapes = _fx_shapes(model, graph, example_inputs) if example_inputs is not None else None
    canonical = _canonical_names(model)
    index_of: dict[fx.Node, int] = {}
    sites: list[Site] = []
    metadata: set[fx.Node] = set()  # shape reads, and values computed from shapes only (``x.shape[0] * 2``)
    for node in graph.nodes:
        inputs = node.all_input_nodes
        if _fx_node_is_metadata(node) or (
            node.op == "call_function" and inputs and all(source in metadata for source in inputs)
        ):
            metadata.add(node)
            continue
        index = len(sites)
        index_of[node] = index
        if node.op == "placeholder":
            site = Site(index, "input", str(node.target))
        elif node.op == "get_attr":
            site = Site(index, "param", str(node.target))
        elif node.op == "call_module":
            module = model.get_submodule(str(node.target))
            site = Site(index, "module", canonical[module], target=module)
        elif node.op == "output":
            site = Site(index, "output", "output")
        else:
            site = Site(index, "op", _op_name(node.target), target=node.target)
        site.origin = node
        if shapes is not None:
            site.shape = shapes.get(node)
        to_ref = lambda n: TensorRef(index_of[n]) if n in index_of else n  # noqa: E731
        site.args = tuple(fx.node.map_arg(node.args, to_ref))
        site.kwargs = dict(fx.node.map_arg(node.kwargs, to_ref))
        metadata_only = {node.args[p] for p in _metadata_positions(node.target) if p < len(node.args)}
        for source in node.all_input_nodes:
            if source in index_of and source not in metadata_only:
                site.inputs.append(index_of[source])
                sites[index_of[source]].users.append(index)
        sites.append(site)
    return Dataflow(sites, FX, shapes_known=shapes is not None)


# ------------------------------------------------------------------------------------------ one forward pass


class _Recorder(TorchFunctionMode):
    """Records torch calls made outside atomic modules, and atomic module calls, as sites."""

    def __init__(self, parameter_names: dict[int, str]) -> None:
        super().__init__()
        self.sites: list[Site] = []
        self.producer: dict[int, int] = {}  # id(tensor) -> site index that last produced / mutated it
        self.keep_alive: list[torch.Tensor] = []  # so ids are never reused during the capture
        self.parameter_names = parameter_names
        self.depth = 0  # > 0 while inside an atomic module's call

    def source_of(self, tensor: torch.Tensor) -> int | None:
        key = id(tensor)
        if key in self.producer:
            return self.producer[key]
        name = self.parameter_names.get(key)
        if name is None:
            return None  # a constant made inside forward (torch.zeros, ...): nothing folds through it
        index = self._add(Site(len(self.sites), "param", name))
        self.producer[key] = index
        return index

    def _add(self, site: Site) -> int:
        self.sites.append(site)
        return site.index

    def add_call(self, kind: str, name: str, target: Any, args: tuple, kwargs: dict, outputs: Any) -> int:
        index = len(self.sites)
        site = Site(index, kind, name, target=target)

        metadata_only = {id(args[p]) for p in _metadata_positions(target) if p < len(args)}

        def to_ref(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and id(value) not in metadata_only:
                source = self.source_of(value)
                if source is not None:
                    site.inputs.append(source)
                    self.sites[source].users.append(index)
                    return TensorRef(source)
            return value

        site.args = tuple(pytree.tree_map(to_ref, list(args)))
        site.kwargs = pytree.tree_map(to_ref, dict(kwargs))
        self._add(site)
        for value in pytree.tree_leaves(outputs):
            if isinstance(value, torch.Tensor):
                if site.shape is None:
                    site.shape = tuple(value.shape)
                self.producer[id(value)] = index
                self.keep_alive.append(value)
        return index

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.depth == 0 and not _is_metadata_function(func):
            leaves = pytree.tree_leaves((args, kwargs))
            if any(isinstance(v, torch.Tensor) for v in leaves):
                self.add_call("op", _op_name(func), func, args, kwargs, result)
        return result


def capture_forward(
    model: nn.Module, example_inputs: tuple[Any, ...], registry: LayerRegistry
) -> tuple[Dataflow, Any]:
    """Learn the dataflow of ``model`` by running it once on ``example_inputs``; also returns the outputs.

    Every tensor the pass creates is kept alive until it ends, so a tensor's ``id`` names one tensor only.
    """
    names = _canonical_names(model)
    parameter_names = {
        id(t): n for n, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))
    }
    recorder = _Recorder(parameter_names)
    handles = []
    atomic = [m for m in names if registry.is_atomic(m)]

    def before(module: nn.Module, args: tuple) -> None:
        recorder.depth += 1

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        recorder.depth -= 1
        if recorder.depth == 0:
            recorder.add_call("module", names[module], module, args, kwargs, output)

    try:
        for module in atomic:
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after, with_kwargs=True))
        for i, value in enumerate(pytree.tree_leaves(example_inputs)):
            if isinstance(value, torch.Tensor):
                index = recorder._add(Site(len(recorder.sites), "input", f"input_{i}", shape=tuple(value.shape)))
                recorder.producer[id(value)] = index
        with torch.no_grad(), recorder:
            outputs = model(*example_inputs)
        recorder.add_call("output", "output", None, (outputs,), {}, None)
    finally:
        for handle in handles:
            handle.remove()
    return Dataflow(recorder.sites, FORWARD_PASS, notes=[
        "dataflow learnt from one forward pass: branches the example inputs did not take were not seen"
    ], shapes_known=True), outputs


# ------------------------------------------------------------------------------------------------ either way


def capture(
    model: nn.Module, example_inputs: tuple[Any, ...] | None, registry: LayerRegistry
) -> Dataflow:
    """Learn the dataflow of ``model``: torch.fx first, one watched forward pass if fx cannot trace it.

    With example inputs, the fx result is completed with the shapes a forward pass produces (bnfold needs the rank
    of a Linear layer's output to know which axis a following BatchNorm1d normalises).
    """
    try:
        flow = capture_fx(model, registry, example_inputs)
    except Exception as fx_error:  # fx raises many kinds (TraceError, TypeError, NotImplementedError, ...)
        reason = f"{type(fx_error).__name__}: {fx_error}".splitlines()[0]
        if example_inputs is None:
            raise CaptureError(
                f"torch.fx cannot trace {type(model).__name__} ({reason}). Pass example_inputs (a tensor or a tuple of "
                f"the forward's positional arguments) so bnfold can learn the dataflow from one forward pass."
            ) from fx_error
        log.info("torch.fx could not trace %s (%s); watching one forward pass", type(model).__name__, reason)
        try:
            flow, _ = capture_forward(model, example_inputs, registry)
        except Exception as run_error:
            raise CaptureError(
                f"torch.fx cannot trace {type(model).__name__} ({reason}), and running it on the example inputs failed "
                f"({type(run_error).__name__}: {run_error}). Check that example_inputs match what forward() expects."
            ) from run_error
        flow.notes.append(f"torch.fx could not trace the model: {reason}")
        return flow
    if example_inputs is not None and not flow.shapes_known:
        _add_shapes(flow, model, example_inputs, registry)
    return flow


def _add_shapes(flow: Dataflow, model: nn.Module, example_inputs: tuple[Any, ...], registry: LayerRegistry) -> None:
    """Record the output shape of each atomic module site, from one forward pass with hooks on those modules."""
    sites_of = flow.module_sites()
    seen: dict[str, list[tuple[int, ...]]] = {}
    handles = []

    def remember(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                seen.setdefault(name, []).append(tuple(output.shape))
        return hook

    try:
        for name in sites_of:
            handles.append(model.get_submodule(name).register_forward_hook(remember(name)))
        with torch.no_grad():
            model(*example_inputs)
    except Exception as run_error:
        raise CaptureError(
            f"running {type(model).__name__} on the example inputs failed ({type(run_error).__name__}: {run_error}). "
            f"Check that example_inputs match what forward() expects."
        ) from run_error
    finally:
        for handle in handles:
            handle.remove()
    for name, shapes in seen.items():
        for site, shape in zip(sites_of[name], shapes, strict=False):
            site.shape = shape


def count_batch_norm_calls(model: nn.Module, example_inputs: Iterable[Any]) -> int:
    """How many batch-norm computations one forward pass of ``model`` makes (calls of ``torch.batch_norm``).

    Counts the function, not modules: a module may compute batch norm functionally, and a module left in place
    may compute nothing. ``F.batch_norm`` reaches ``torch.batch_norm``, which is what is counted.
    """
    counter = _BatchNormCounter()
    with torch.no_grad(), counter:
        model(*tuple(example_inputs))
    return counter.count


_BATCH_NORM_FUNCTIONS = frozenset({"batch_norm", "_batch_norm_impl_index", "native_batch_norm", "_native_batch_norm_legit_no_training"})


class _BatchNormCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if getattr(func, "__name__", "") in _BATCH_NORM_FUNCTIONS:
            self.count += 1
        return func(*args, **(kwargs or {}))
