"""Who feeds whom: the dataflow of a model as a list of call sites (a BN may fold into the conv that produced its
input only if nothing else reads that conv's output, which the order of registration does not tell).

Two ways, one :class:`Dataflow`: **torch.fx symbolic tracing** sees every path and needs no inputs, but fails on
value-dependent control flow; **one watched forward pass** (a :class:`~torch.overrides.TorchFunctionMode` and
forward hooks) works on any model that runs, but sees only the path the example inputs take. Modules the registry
knows are atomic: one call, their insides not looked at.
"""

from __future__ import annotations

import logging
import operator
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ..errors import CaptureError, InvalidInputError, first_line
from ..layers import LayerRegistry
from .module_tree import ModuleTree

log = logging.getLogger(__name__)

MODEL_CALLS_LOCK = threading.RLock()
"""Held while bnfold traces a model or runs one.

torch.fx tracing patches ``nn.Module.__call__`` (and ``__getattr__``) process-wide, not per thread, so while one
thread traces, any module called in another thread is recorded into the wrong trace or returns a Proxy: a
concurrent fold then fails with a misleading :class:`CaptureError`. bnfold serialises its own traces and model runs
through this lock, so folds from several threads work (they cannot protect model calls of the user's own code)."""


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

    def by_name(self, kind: str) -> dict[str, list[Site]]:
        """The sites of one ``kind`` by qualified name, in order: ``"module"``, each module's calls; ``"param"``,
        the reads of a parameter or buffer outside its own module's call."""
        grouped: dict[str, list[Site]] = {}
        for site in self.sites:
            if site.kind == kind:
                grouped.setdefault(site.name, []).append(site)
        return grouped


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


def _is_metadata_function(func: Callable[..., Any] | str) -> bool:
    name = func if isinstance(func, str) else getattr(func, "__name__", "")
    if name in _METADATA_METHODS:
        return True
    # Property reads arrive as the property's __get__ (``Tensor.shape.__get__``).
    owner = getattr(func, "__self__", None)
    return name == "__get__" and getattr(owner, "__name__", None) in _METADATA_ATTRIBUTES


# Operators as users write them, for operator.* functions and the Tensor methods behind them.
_OPERATOR_SYMBOLS: dict[str, str] = {
    "add": "x + y", "sub": "x - y", "mul": "x * y", "truediv": "x / y", "floordiv": "x // y", "mod": "x % y",
    "pow": "x ** y", "matmul": "x @ y", "neg": "-x", "pos": "+x", "abs": "abs(x)", "invert": "~x",
    "and": "x & y", "or": "x | y", "xor": "x ^ y", "lshift": "x << y", "rshift": "x >> y",
    "eq": "x == y", "ne": "x != y", "lt": "x < y", "le": "x <= y", "gt": "x > y", "ge": "x >= y",
    "iadd": "x += y", "isub": "x -= y", "imul": "x *= y", "itruediv": "x /= y", "imatmul": "x @= y",
    "getitem": "x[...]", "setitem": "x[...] = y", "contains": "y in x",
}
_REFLECTED = {"radd": "add", "rsub": "sub", "rmul": "mul", "rtruediv": "truediv", "rfloordiv": "floordiv",
              "rmod": "mod", "rpow": "pow", "rmatmul": "matmul", "rand": "and", "ror": "or", "rxor": "xor",
              "and_": "and", "or_": "or", "div": "truediv", "rdiv": "truediv", "idiv": "itruediv"}
_FUNCTIONAL_MODULES = frozenset({"torch.nn.functional", "torch._C._nn"})


def _operator_symbol(name: str, dunder_only: bool = False) -> str | None:
    """``x + y`` for ``add`` / ``__add__`` / ``__radd__``; with ``dunder_only``, plain names (``x.add(y)``) stay None."""
    dunder = name.startswith("__") and name.endswith("__")
    if dunder_only and not dunder:
        return None
    bare = name[2:-2] if dunder else name
    bare = _REFLECTED.get(bare, bare)
    return _OPERATOR_SYMBOLS.get(bare)


def _op_name(func: Any) -> str:
    """The op as a user writes it (``torch.cat``, ``x + y``, ``F.max_pool2d``, ``x.flatten``) for reasons, not
    Python's internal names (``_VariableFunctionsClass.cat``, ``TensorBase.add``): ``func`` is a torch.fx node
    target (a callable, or a method name) or the callable a watched forward pass saw."""
    if isinstance(func, str):  # torch.fx call_method: a Tensor method by name
        return _operator_symbol(func, dunder_only=True) or f"x.{func}"
    name = str(getattr(func, "__name__", None) or repr(func))
    qualname = str(getattr(func, "__qualname__", None) or name)
    module = getattr(func, "__module__", None)
    if module in ("_operator", "operator"):
        return _operator_symbol(name) or f"operator.{name}"
    owner = qualname.split(".", 1)[0]
    if owner in ("TensorBase", "Tensor", "_TensorBase"):
        # A watched forward pass sees ``x + y`` as TensorBase.add (and ``x += y`` as add_), exactly like x.add(y):
        # the operator is the common spelling, so it names both.
        in_place = name.endswith("_") and not name.endswith("__")
        return _operator_symbol(f"i{name[:-1]}" if in_place else name) or f"x.{name}"
    if module in _FUNCTIONAL_MODULES:
        return f"F.{name}"
    if owner == "_VariableFunctionsClass" or module == "torch":
        return f"torch.{name}"
    if isinstance(module, str) and module.startswith("torch._C._"):  # torch.special.erf is _special.special_erf
        namespace = module.removeprefix("torch._C._")
        return f"torch.{namespace}.{name.removeprefix(namespace + '_')}"
    if isinstance(module, str) and module.startswith("torch.") and not module.startswith("torch._"):
        return f"{module}.{name}"
    if name == "__get__" and hasattr(func, "__self__"):  # a property read: Tensor.T, Tensor.mT
        return f"x.{getattr(func.__self__, '__name__', 'attribute')}"
    return qualname if module in (None, "builtins") else f"{module}.{qualname}"


# ---------------------------------------------------------------------------------------------------- torch.fx


class _Tracer(fx.Tracer):
    """fx tracer that keeps every module the registry knows as one call, so BN subclasses stay visible. Tracing is
    the largest part of an in-place fold's time: the hooks fx calls for every node do only what the dataflow needs."""

    def __init__(self, registry: LayerRegistry) -> None:
        super().__init__()
        self._registry = registry
        self._leaf: dict[int, bool] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaf = self._leaf.get(id(m))
        if leaf is None:
            leaf = self._registry.is_atomic(m) or super().is_leaf_module(m, module_qualified_name)
            self._leaf[id(m)] = leaf
        return leaf

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # Without fx's scope and module-stack bookkeeping: it feeds node metadata that nothing here reads (the
        # dataflow names modules by the node's target) and that create_node below does not copy.
        name = self.path_of_module(m)
        if self.is_leaf_module(m, name):
            return self.create_proxy("call_module", name, args, kwargs)
        return forward(*args, **kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        # fx makes graph values of parameters and buffers read in forward code; anything else it returns as it is
        # (submodules, flags such as ``self.downsample is not None``: most reads).
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_node(self, kind: str, target: Any, args: Any, kwargs: Any, name: str | None = None,
                    type_expr: Any | None = None) -> fx.Node:
        if kind == "call_function" and self.check_mutable_operations:
            return super().create_node(kind, target, args, kwargs, name, type_expr)
        # Without fx's copy of the module stack and scope into every node's metadata (unused here).
        return self.graph.create_node(kind, target, args, kwargs, name, type_expr)

    def create_arg(self, a: Any) -> Any:
        # Arguments that are graph values already (``conv(x)``, ``x + y``), without fx's walk over argument trees.
        if isinstance(a, fx.Proxy):
            return a.node
        if type(a) is tuple and all(isinstance(v, fx.Proxy) for v in a):
            return tuple(v.node for v in a)
        if type(a) is dict and not a:  # the keyword arguments of most calls
            return {}
        return super().create_arg(a)


def _fx_node_is_metadata(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in (getattr, operator.attrgetter) and len(node.args) >= 2:
        return node.args[1] in _METADATA_ATTRIBUTES
    return node.op in ("call_method", "call_function") and _is_metadata_function(node.target)


class TraceMismatch(Exception):
    """The torch.fx graph does not compute what the model computes on the example inputs.

    Symbolic tracing can drop code silently: ``if x is not None and torch.jit.isinstance(x, torch.Tensor)`` is
    False for a Proxy, so MONAI's BasicUNet traces without its skip connections. A graph that fails to run on the
    example inputs, or returns something else than the model, must not be planned on.
    """


def _fx_shapes(model: nn.Module, graph: fx.Graph, example_inputs: tuple[Any, ...]) -> dict[fx.Node, tuple[int, ...]]:
    """The shape of the (first) tensor each node produces, from running the traced graph on the example inputs.

    Raises :class:`TraceMismatch` when the traced graph does not run on them, or when its outputs differ from the
    model's own (one extra forward pass of the model, which is what it costs to know the graph is the model's).
    """
    recorder = _ShapeRecorder(fx.GraphModule(model, graph))
    with torch.no_grad():
        try:
            traced_outputs = recorder.run(*example_inputs)
        except Exception as error:  # the interpreter surfaces whatever the model's code raises
            raise TraceMismatch(
                f"the traced graph fails on the example inputs ({type(error).__name__}: {first_line(error)})"
            ) from error
        try:
            model_outputs = model(*example_inputs)
        except Exception as error:
            raise TraceMismatch(f"the model fails on the example inputs ({type(error).__name__}: {error})") from error
    difference = _outputs_differ(model_outputs, traced_outputs)
    if difference:
        raise TraceMismatch(f"the traced graph's output differs from the model's on the example inputs ({difference})")
    return recorder.shapes


class _ShapeRecorder(fx.Interpreter):
    """Runs a traced graph, keeping the shape of the first tensor each node produces.

    Not torch.fx's ShapeProp, which prints a full traceback to stderr whenever the graph fails, as it does for
    every graph that is not the model.
    """

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        first = next((v for v in pytree.tree_leaves(result) if isinstance(v, torch.Tensor)), None)
        if first is not None:
            self.shapes[n] = tuple(first.shape)
        return result


def _outputs_differ(model_outputs: Any, traced_outputs: Any) -> str | None:
    """How the traced graph's outputs differ from the model's, or ``None``.

    The graph runs the model's own operations in the same order, so its outputs match to the last bit in practice;
    the allowance (a thousandth of the output's magnitude) only absorbs a kernel choosing another summation order,
    while a dropped branch or skip connection changes outputs by their own size.
    """
    model_leaves, model_spec = pytree.tree_flatten(model_outputs)
    traced_leaves, traced_spec = pytree.tree_flatten(traced_outputs)
    if model_spec != traced_spec:
        return "different output structures"
    for index, (a, b) in enumerate(zip(model_leaves, traced_leaves, strict=True)):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            continue
        if a.shape != b.shape:
            return f"output {index} has shape {tuple(b.shape)} instead of {tuple(a.shape)}"
        if not a.is_floating_point() or a.numel() == 0:
            if not torch.equal(a, b):
                return f"output {index} has other values"
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        finite = torch.isfinite(a64) & torch.isfinite(b64)
        if not torch.equal(torch.isfinite(a64), torch.isfinite(b64)):
            return f"output {index} is non-finite at other places"
        if not bool(finite.any()):
            continue
        error = float((a64 - b64)[finite].abs().max())
        scale = float(a64[finite].abs().max())
        if error > 1e-3 * scale:
            return f"output {index} is off by {error:.3g}, against a magnitude of {scale:.3g}"
    return None


_SITE_KINDS = {"placeholder": "input", "get_attr": "param", "call_module": "module", "output": "output"}


def trace(model: nn.Module, registry: LayerRegistry) -> fx.Graph:
    """The torch.fx graph of ``model``, with every module the registry knows kept as one call."""
    return _Tracer(registry).trace(model)


def capture_fx(
    model: nn.Module,
    registry: LayerRegistry,
    example_inputs: tuple[Any, ...] | None = None,
    graph: fx.Graph | None = None,
    tree: ModuleTree | None = None,
) -> Dataflow:
    """Learn the dataflow of ``model`` by torch.fx symbolic tracing (no inputs needed; raises what torch.fx raises).

    With ``example_inputs`` every site also gets its shape (reshapes between a layer and its norm can only be judged
    with shapes), and the graph is checked against the model on them (:class:`TraceMismatch`). ``graph``: a trace of
    ``model`` already made (sites' ``origin`` are its nodes, for a caller that rewrites it); ``tree``: its tree.
    """
    graph = graph if graph is not None else trace(model, registry)
    shapes = _fx_shapes(model, graph, example_inputs) if example_inputs is not None else None
    tree = tree if tree is not None else ModuleTree(model)
    index_of: dict[fx.Node, int] = {}
    refs: list[TensorRef] = []  # one per site, shared by every argument that reads it
    sites: list[Site] = []
    metadata: set[fx.Node] = set()  # shape reads, and values computed from shapes only (``x.shape[0] * 2``)

    def to_ref(n: fx.Node) -> Any:
        index = index_of.get(n)
        return n if index is None else refs[index]

    for node in graph.nodes:
        inputs = node.all_input_nodes
        if _fx_node_is_metadata(node) or (
            node.op == "call_function" and inputs and all(source in metadata for source in inputs)
        ):
            metadata.add(node)
            continue
        index_of[node] = index = len(sites)
        refs.append(TensorRef(index))
        kind, name, target = _SITE_KINDS.get(node.op, "op"), str(node.target), node.target
        if kind == "module":
            target = tree.get(name)
            name = tree.first_name(target)
        elif kind == "op":
            name = _op_name(node.target)
        site = Site(index, kind, name, target=target if kind in ("module", "op") else None, origin=node,
                    shape=shapes.get(node) if shapes is not None else None, args=tuple(fx.node.map_arg(node.args, to_ref)),
                    kwargs=dict(fx.node.map_arg(node.kwargs, to_ref)) if node.kwargs else {})
        positions = _metadata_positions(node.target) if node.op != "call_module" else ()
        metadata_only = {node.args[p] for p in positions if p < len(node.args)}
        for source in node.all_input_nodes:
            if source in index_of and source not in metadata_only:
                site.inputs.append(index_of[source])
                sites[index_of[source]].users.append(index)
        sites.append(site)
    return Dataflow(sites, "torch.fx", shapes_known=shapes is not None)


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
        self.producer[key] = self.add("param", name).index
        return self.producer[key]

    def add(self, kind: str, name: str, **fields: Any) -> Site:
        site = Site(len(self.sites), kind, name, **fields)
        self.sites.append(site)
        return site

    def add_call(self, kind: str, name: str, target: Any, args: tuple, kwargs: dict, outputs: Any) -> None:
        metadata_only = {id(args[p]) for p in _metadata_positions(target) if p < len(args)}
        inputs: list[int] = []

        def to_ref(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and id(value) not in metadata_only:
                source = self.source_of(value)
                if source is not None:
                    inputs.append(source)
                    return TensorRef(source)
            return value

        # The arguments are mapped before the call's own site is added: a parameter read for the first time gets
        # its site there, before the call's.
        mapped = tuple(pytree.tree_map(to_ref, list(args))), pytree.tree_map(to_ref, dict(kwargs))
        site = self.add(kind, name, inputs=inputs, target=target, args=mapped[0], kwargs=mapped[1])
        for source in inputs:
            self.sites[source].users.append(site.index)
        for value in pytree.tree_leaves(outputs):
            if isinstance(value, torch.Tensor):
                if site.shape is None:
                    site.shape = tuple(value.shape)
                self.producer[id(value)] = site.index
                self.keep_alive.append(value)

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
    tree = ModuleTree(model)
    names = {module: name for name, module in tree.unique}  # each module under its first name
    parameter_names = {
        id(t): n for n, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))
    }
    recorder = _Recorder(parameter_names)
    handles = []

    def before(module: nn.Module, args: tuple) -> None:
        recorder.depth += 1

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        recorder.depth -= 1
        if recorder.depth == 0:
            recorder.add_call("module", names[module], module, args, kwargs, output)

    try:
        for module in (m for m in names if registry.is_atomic(m)):
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after, with_kwargs=True))
        for i, value in enumerate(pytree.tree_leaves(example_inputs)):
            if isinstance(value, torch.Tensor):
                recorder.producer[id(value)] = recorder.add("input", f"input_{i}", shape=tuple(value.shape)).index
        with torch.no_grad(), recorder:
            outputs = model(*example_inputs)
        recorder.add_call("output", "output", None, (outputs,), {}, None)
    finally:
        for handle in handles:
            handle.remove()
    return Dataflow(recorder.sites, "forward pass", notes=[
        "dataflow learnt from one forward pass: branches the example inputs did not take were not seen"
    ], shapes_known=True), outputs


# ------------------------------------------------------------------------------------------------ either way


def capture(
    model: nn.Module, example_inputs: tuple[Any, ...] | None, registry: LayerRegistry, tree: ModuleTree | None = None
) -> Dataflow:
    """Learn the dataflow of ``model``: torch.fx first, one watched forward pass if fx cannot trace it.

    With example inputs, the fx result is completed with the shapes a forward pass produces (bnfold needs the rank
    of a Linear layer's output to know which axis a following BatchNorm1d normalises).
    """
    name = type(model).__name__
    with MODEL_CALLS_LOCK:
        try:
            return capture_fx(model, registry, example_inputs, tree=tree)
        except TraceMismatch as mismatch:
            log.info("torch.fx traced %s, but %s; watching one forward pass", name, mismatch)
            failure = (f"torch.fx traced {name} into a graph that is not the model ({mismatch}), and running the "
                       f"model on the example inputs failed")
            note = (f"torch.fx traced a graph that is not the model ({mismatch}; code that inspects its inputs, such "
                    f"as isinstance checks, is dropped by tracing): the dataflow was learnt from one forward pass instead")
        except Exception as fx_error:  # fx raises many kinds (TraceError, TypeError, NotImplementedError, ...)
            reason = f"{type(fx_error).__name__}: {fx_error}".splitlines()[0]
            if example_inputs is None:
                raise CaptureError(
                    f"torch.fx cannot trace {name} ({reason}). Pass example_inputs (a tensor or a tuple of the "
                    f"forward's positional arguments) so bnfold can learn the dataflow from one forward pass."
                ) from fx_error
            log.info("torch.fx could not trace %s (%s); watching one forward pass", name, reason)
            failure = f"torch.fx cannot trace {name} ({reason}), and running it on the example inputs failed"
            note = f"torch.fx could not trace the model: {reason}"
        assert example_inputs is not None  # a trace is checked only with inputs; without, an fx failure was raised
        try:
            flow, _ = capture_forward(model, example_inputs, registry)
        except Exception as run_error:  # whatever the model's own forward raises
            raise CaptureError(
                f"{failure} ({type(run_error).__name__}: {run_error}). Check that example_inputs match what forward() "
                f"expects."
            ) from run_error
    flow.notes.append(note)
    return flow


def as_input_tuple(example_inputs: torch.Tensor | Sequence[Any] | None) -> tuple[Any, ...] | None:
    """``example_inputs`` as the tuple of a forward's positional arguments (a lone tensor is one argument)."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise InvalidInputError(
        f"example_inputs must be a tensor or a tuple of the forward's positional arguments, got "
        f"{type(example_inputs).__name__}"
    )
