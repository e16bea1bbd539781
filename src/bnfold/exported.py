"""Fold batch norms inside a torch.export program (a ``.pt2`` file), by rewriting its graph and exporting again.

An ``ExportedProgram`` carries no Python classes to rebuild, so the module-tree engine cannot fold it. Instead its
unlifted module (``program.module()``: a copy, an fx ``GraphModule`` whose weights are ``get_attr`` nodes) is
rewritten: every eval-mode batch norm (``aten.batch_norm`` with ``training=False``, or
``aten._native_batch_norm_legit_no_training`` and its ``getitem 0``) whose input comes straight from a convolution,
transposed convolution or linear node with weights of its own, and is used by nothing else, is folded into that node
(:func:`bnfold.apply.forward_folded`, the same arithmetic as for modules). The producer's weight keeps its name
and gets the folded values, a missing bias becomes a new parameter ``<layer>.bias``, the norm's uses are rewired to
the producer, and the norm's state (affine parameters, running statistics) is deleted. The folded module is then
exported again on the program's example inputs, with its dynamic dimensions, so the result is an ``ExportedProgram``
that ``torch.export.save`` writes like any other. Anything else is left, with the reason.

Parameter counts are those of the program's ``parameters()``: the folded one has the folded norms' affine
parameters less, and the biases the folds add more, as for an ``nn.Module``.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .apply import FoldOverflow, forward_folded
from .errors import CaptureError, InvalidInputError
from .layers import NormStatistics
from .report import FOLDED, LEFT, FoldReport, NormEntry

aten = torch.ops.aten

# producer op -> transposed (None: read its "transposed" argument)
_PRODUCERS: dict[Any, bool | None] = {
    aten.linear.default: False,
    aten.conv1d.default: False,
    aten.conv2d.default: False,
    aten.conv3d.default: False,
    aten.conv_transpose1d.default: True,
    aten.conv_transpose2d.input: True,
    aten.conv_transpose3d.input: True,
    aten.convolution.default: None,
}

_BATCH_NORM = aten.batch_norm.default
_NO_TRAINING = aten._native_batch_norm_legit_no_training.default

# Uses that read only a tensor's metadata (shape checks), which folding does not change.
_METADATA_READS = frozenset({
    aten.sym_size.int, aten.sym_size.default, aten.sym_numel.default, aten.sym_stride.int, aten.dim.default,
    aten._assert_tensor_metadata.default,
})


def _argument(node: fx.Node, name: str) -> Any:
    """Argument ``name`` of an aten call: positional, keyword, or the schema's default."""
    for index, spec in enumerate(node.target._schema.arguments):  # type: ignore[union-attr]
        if spec.name == name:
            if index < len(node.args):
                return node.args[index]
            if name in node.kwargs:
                return node.kwargs[name]
            return spec.default_value if spec.has_default_value() else None
    raise KeyError(name)


def _set_argument(node: fx.Node, name: str, value: Any) -> None:
    index = [spec.name for spec in node.target._schema.arguments].index(name)  # type: ignore[union-attr]
    if index < len(node.args):
        node.update_arg(index, value)
    elif index == len(node.args):
        node.args = (*node.args, value)
    else:
        node.update_kwarg(name, value)


def _fetch(module: nn.Module, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


def _references(graph: fx.Graph) -> dict[str, int]:
    """How many times each attribute is read (``get_attr`` node users), to refuse shared weights."""
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            counts[node.target] = counts.get(node.target, 0) + len(node.users)
    return counts


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    value = node.meta.get("val")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _norm_output(norm: fx.Node) -> fx.Node | None:
    """The node that carries the normalised tensor: the norm itself, or the ``getitem 0`` of a tuple-valued one."""
    if norm.target == _BATCH_NORM:
        return norm
    outputs = [u for u in norm.users if u.target is operator.getitem and u.args[1] == 0]
    if len(norm.users) != len(outputs) or len(outputs) != 1:
        return None
    return outputs[0]


def _statistics(norm: fx.Node) -> list[Any]:
    """``[gamma, beta, mean, var]`` argument nodes (gamma/beta may be ``None``)."""
    return [_argument(norm, name) for name in ("weight", "bias", "running_mean", "running_var")]


def _why_not(module: fx.GraphModule, norm: fx.Node, references: dict[str, int]) -> tuple[str | None, fx.Node | None]:
    """``(reason, producer)``: why the norm cannot be folded (``None`` if it can) and the node to fold into."""
    if norm.target == _BATCH_NORM and _argument(norm, "training") is not False:
        return "the norm runs in training mode (batch statistics); export the model after .eval()", None
    if _norm_output(norm) is None:
        return "the norm's saved mean / inverse std outputs are used; only its normalised output can be folded", None
    statistics = _statistics(norm)
    if any(s is not None and (not isinstance(s, fx.Node) or s.op != "get_attr") for s in statistics) or None in statistics[2:]:
        return "its statistics or affine parameters are not stored tensors of the program (get_attr)", None
    source = norm.args[0]
    if isinstance(source, fx.Node) and source.target in (aten.addmm.default, aten.mm.default):
        return (
            f"its input comes from {source.target} (a decomposed linear layer), which bnfold does not fold into; fold "
            "the program before run_decompositions()", None,
        )
    if not isinstance(source, fx.Node) or source.target not in _PRODUCERS:
        kind = source.target if isinstance(source, fx.Node) and source.op == "call_function" else getattr(source, "op", source)
        return f"its input comes from {kind}, not a convolution or linear node", None
    producer = source
    if sum(user.target not in _METADATA_READS for user in producer.users) != 1:
        return f"the output of {producer.target} has other uses besides this norm", None
    weight, bias = _argument(producer, "weight"), _argument(producer, "bias")
    for label, node in (("weight", weight), ("bias", bias)):
        if node is None and label == "bias":
            continue
        if not isinstance(node, fx.Node) or node.op != "get_attr":
            return f"the {label} of {producer.target} is not a stored tensor of the program (get_attr)", None
        if references.get(node.target, 0) != 1:
            return f"the {label} {node.target} of {producer.target} is shared with other nodes; folding would change them too", None
    shape = _shape(producer)
    channels = _fetch(module, statistics[2].target).numel()
    if shape is None:
        return f"the output shape of {producer.target} is not recorded in the graph; export it again with torch.export", None
    if producer.target == aten.linear.default and len(shape) != 2:
        return (
            f"the linear output has rank {len(shape)}, not 2 (the norm normalises axis 1, the linear layer's features "
            "are the last axis: they coincide only for 2-D inputs)", None,
        )
    if producer.target != aten.linear.default and len(shape) != _fetch(module, weight.target).dim():
        return f"{producer.target} runs on an unbatched input: its channels are not on the norm's axis 1", None
    if len(shape) < 2 or shape[1] != channels:
        return f"the norm's {channels} channels are not the {producer.target} output's axis 1 of shape {shape}", None
    return None, producer


def _replace(module: nn.Module, target: str, value: torch.Tensor, like: torch.Tensor | None) -> None:
    """Store ``value`` at ``target`` as a parameter (or a buffer, when ``like`` is one), keeping ``requires_grad``."""
    owner_name, _, name = target.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if like is None or isinstance(like, nn.Parameter):
        requires_grad = True if like is None else like.requires_grad
        if hasattr(owner, name) and name not in owner._parameters:
            delattr(owner, name)
        owner.register_parameter(name, nn.Parameter(value, requires_grad=requires_grad))
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


def _free_name(module: nn.Module, owner: str, name: str) -> str:
    prefix = f"{owner}." if owner else ""
    parent = module.get_submodule(owner) if owner else module
    candidate, number = name, 0
    while hasattr(parent, candidate):
        number += 1
        candidate = f"{name}_{number}"
    return prefix + candidate


def _fold_into(module: fx.GraphModule, norm: fx.Node, producer: fx.Node) -> list[str]:
    """Fold ``norm`` into ``producer``; returns the attributes the norm read (to delete once nothing else does)."""
    graph = module.graph
    gamma_node, beta_node, mean_node, var_node = _statistics(norm)
    gamma, beta, mean, var = (None if n is None else _fetch(module, n.target) for n in (gamma_node, beta_node, mean_node, var_node))
    eps = float(_argument(norm, "eps"))
    weight_node, bias_node = _argument(producer, "weight"), _argument(producer, "bias")
    weight = _fetch(module, weight_node.target)
    bias = None if bias_node is None else _fetch(module, bias_node.target)
    transposed = _PRODUCERS[producer.target]
    if transposed is None:
        transposed = bool(_argument(producer, "transposed"))
    groups = int(_argument(producer, "groups")) if producer.target != aten.linear.default else 1
    statistics = NormStatistics(mean=mean, var=var, eps=eps, gamma=gamma, beta=beta)
    with torch.no_grad():
        new_weight, new_bias = forward_folded(weight, bias, statistics, 1 if transposed else 0, groups)
    _replace(module, weight_node.target, new_weight.contiguous(), weight)
    if bias_node is None:
        owner = weight_node.target.rpartition(".")[0]
        target = _free_name(module, owner, "bias")
        _replace(module, target, new_bias.contiguous(), None)
        with graph.inserting_before(producer):
            bias_node = graph.get_attr(target)
        _set_argument(producer, "bias", bias_node)
    else:
        _replace(module, bias_node.target, new_bias.contiguous(), bias)
    output = _norm_output(norm) or norm  # a tuple-valued norm without its getitem 0 was refused by _why_not
    output.replace_all_uses_with(producer)
    graph.erase_node(output)
    if output is not norm:
        graph.erase_node(norm)
    return [n.target for n in (gamma_node, beta_node, mean_node, var_node) if n is not None]


def _delete_unused(module: fx.GraphModule, targets: list[str]) -> None:
    """Delete the folded norms' state no node reads any more (and their ``num_batches_tracked`` counters)."""
    read = {node.target for node in module.graph.nodes if node.op == "get_attr"}
    owners = {t.rpartition(".")[0] for t in targets}
    candidates = list(dict.fromkeys(targets + [f"{o}.num_batches_tracked" if o else "num_batches_tracked" for o in owners]))
    for target in candidates:
        owner_name, _, name = target.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if target not in read and hasattr(owner, name):
            delattr(owner, name)


def _user_input_shapes(program: torch.export.ExportedProgram) -> list[tuple[Any, ...] | None]:
    names = set(program.graph_signature.user_inputs)
    return [
        tuple(node.meta["val"].shape) if isinstance(node.meta.get("val"), torch.Tensor) else None
        for node in program.graph.nodes if node.op == "placeholder" and node.name in names
    ]


def dynamic_shapes_of(program: torch.export.ExportedProgram) -> tuple[Any, ...] | None:
    """The ``dynamic_shapes`` that reproduce the program's dynamic dimensions (with their ranges), or ``None``.

    Only positional inputs are handled (a program with keyword inputs gets ``None``, with its shapes static).
    """
    dims: dict[str, Any] = {}
    leaves: list[Any] = []
    dynamic = False
    for shape in _user_input_shapes(program):
        if shape is None:
            leaves.append(None)
            continue
        spec = {}
        for axis, size in enumerate(shape):
            if isinstance(size, torch.SymInt):
                dynamic = True
                spec[axis] = _dim(size, program, dims)
        leaves.append(spec or None)
    if not dynamic:
        return None
    args, kwargs = pytree.tree_unflatten(leaves, program.call_spec.in_spec)
    return None if kwargs else tuple(args)


def _dim(size: torch.SymInt, program: torch.export.ExportedProgram, dims: dict[str, Any]) -> Any:
    import sympy

    expr = size.node.expr
    if not isinstance(expr, sympy.Symbol):
        return torch.export.Dim.DYNAMIC
    name = str(expr)
    if name not in dims:
        bounds = program.range_constraints.get(expr)
        low = int(bounds.lower) if bounds is not None and bounds.lower.is_finite else None
        high = int(bounds.upper) if bounds is not None and bounds.upper.is_finite else None
        dims[name] = torch.export.Dim(f"d_{name}", min=low, max=high)
    return dims[name]


def _example_inputs(program: torch.export.ExportedProgram, given: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if given is not None:
        return (given if isinstance(given, tuple) else (given,)), {}
    stored = getattr(program, "example_inputs", None)
    if stored is None:
        raise InvalidInputError(
            "the exported program carries no example inputs (torch.export.load of an older file, or they were dropped); "
            "pass example_inputs= (a tensor or a tuple of them), or --input-shape on the command line"
        )
    args, kwargs = stored
    return tuple(args), dict(kwargs)


def parameter_count(program: torch.export.ExportedProgram) -> int:
    return sum(p.numel() for p in program.parameters())


def fold_exported(
    program: torch.export.ExportedProgram,
    *,
    example_inputs: Any = None,
    name: str = "exported program",
) -> tuple[torch.export.ExportedProgram, FoldReport]:
    """Fold every foldable batch norm of a torch.export program; returns ``(folded program, report)``.

    ``example_inputs`` (a tensor or a tuple) are used to export the folded module again; by default the program's
    own. The caller's program is not changed (``program.module()`` is a copy).
    """
    args, kwargs = _example_inputs(program, example_inputs)
    module = program.module()
    graph = module.graph
    references = _references(graph)
    entries: list[NormEntry] = []
    folded_state: list[str] = []
    norms = [n for n in graph.nodes if n.op == "call_function" and n.target in (_BATCH_NORM, _NO_TRAINING)]
    for index, norm in enumerate(norms):
        label = f"batch_norm#{index} (%{norm.name})"
        kind = str(norm.target)
        mean = _statistics(norm)[2]
        count = _fetch(module, mean.target).numel() if isinstance(mean, fx.Node) and mean.op == "get_attr" else None
        reason, producer = _why_not(module, norm, references)
        if reason is not None or producer is None:
            entries.append(NormEntry(label, kind, count, LEFT, reason=reason))
            continue
        into = f"{producer.target} (%{producer.name})"
        try:
            folded_state.extend(_fold_into(module, norm, producer))
        except FoldOverflow as overflow:  # raised before the program is touched
            entries.append(NormEntry(label, kind, count, LEFT, reason=overflow.reason))
            continue
        entries.append(NormEntry(label, kind, count, FOLDED, into=(into,), direction="forward"))
    entries.extend(_other_norms(graph, len(norms)))
    graph.eliminate_dead_code()
    _delete_unused(module, folded_state)
    module.recompile()
    notes = []
    dynamic_shapes = dynamic_shapes_of(program)
    if dynamic_shapes is None and any(
        isinstance(d, torch.SymInt) for shape in _user_input_shapes(program) if shape for d in shape
    ):
        notes.append("the program's dynamic dimensions were not kept (keyword inputs); it was exported with static shapes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            folded = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes)
    except Exception as error:  # torch.export raises many types (UserError, GuardOnDataDependentSymNode, ...)
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise CaptureError(
            f"exporting the folded program again failed ({first}); check that the example inputs match the program, "
            "or fold the nn.Module with bnfold.fold and export that"
        ) from error
    report = FoldReport(
        model=name, applied=True, capture="torch.export graph", entries=entries,
        parameters_before=parameter_count(program), parameters_after=parameter_count(folded),
        buffers_before=sum(b.numel() for b in program.buffers()), buffers_after=sum(b.numel() for b in folded.buffers()),
        notes=notes,
    )
    return folded, report


def _other_norms(graph: fx.Graph, start: int) -> list[NormEntry]:
    """Batch norm forms bnfold does not fold (training-mode decompositions), reported rather than silently kept."""
    entries = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target not in (_BATCH_NORM, _NO_TRAINING) and "batch_norm" in str(node.target):
            entries.append(NormEntry(
                f"batch_norm#{start + len(entries)} (%{node.name})", str(node.target), None, LEFT,
                reason=f"{node.target} computes batch statistics (training mode); export the model after .eval()",
            ))
    return entries


def _allowed(program: torch.export.ExportedProgram, size: Any, value: int) -> bool:
    """Whether a program exported with dimension ``size`` (an int, or a symbol with a range) accepts ``value``."""
    if not isinstance(size, torch.SymInt):
        return int(size) == value
    bounds = program.range_constraints.get(size.node.expr)
    return bounds is None or (bounds.lower <= value and (not bounds.upper.is_finite or value <= bounds.upper))


def check_input_shape(program: torch.export.ExportedProgram, shape: tuple[int, ...]) -> None:
    """Refuse an input shape the program's guards would reject, naming the shapes it accepts."""
    expected = next(iter(_user_input_shapes(program)), None)
    if expected is None:
        return
    if len(expected) != len(shape) or not all(_allowed(program, s, v) for s, v in zip(expected, shape, strict=False)):
        accepted = ", ".join(str(s) if not isinstance(s, torch.SymInt) else "*" for s in expected)
        raise InvalidInputError(
            f"the program was exported for inputs of shape ({accepted}), not {tuple(shape)}; pass a matching "
            "--input-shape, or export it with dynamic_shapes for the dimensions that vary"
        )


def check_batch_sizes(program: torch.export.ExportedProgram, batch_sizes: tuple[int, ...]) -> None:
    """Refuse batch sizes outside what the program's first input accepts (a static batch accepts one size)."""
    expected = next(iter(_user_input_shapes(program)), None)
    if not expected:
        return
    refused = [b for b in batch_sizes if not _allowed(program, expected[0], b)]
    if refused:
        raise InvalidInputError(
            f"the program was exported with batch dimension {expected[0]}, which does not accept batch sizes "
            f"{refused}; pass matching --batch-sizes, or export it with a dynamic batch (dynamic_shapes)"
        )
