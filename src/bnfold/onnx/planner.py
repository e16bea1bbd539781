"""Decide, for every BatchNormalization node, where it folds or why it stays.

A plan is computed on the graph as it is now; :mod:`bnfold.onnx.pipeline` applies one fold and plans again, so
chains (Conv -> BN -> BN) fold one link at a time. The planner reads shapes and attributes but never weights'
values (except the norm's own statistics, to refuse NaN/inf): rewriting is :mod:`bnfold.onnx.apply`'s job.

Forward (into the node before the norm) is tried first; backward (into the nodes after it) only when forward is
impossible. Every refusal is a sentence naming the node and what would make the fold possible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .graph import FLOAT_TYPES, SUBGRAPH, GraphIndex, attribute, display_name
from .layers import KINDS, ONNX_DOMAINS, LinearKind, kind_of

NORM_INPUTS = ("scale", "B", "input_mean", "input_var")
SUPPORTED = ", ".join(KINDS)


@dataclass
class ForwardFold:
    """Fold ``norm`` into ``producer`` (and into ``bias_add``, a constant Add between a MatMul and the norm)."""

    norm: onnx.NodeProto
    producer: onnx.NodeProto
    bias_add: onnx.NodeProto | None = None

    @property
    def into(self) -> tuple[str, ...]:
        nodes = (self.producer,) if self.bias_add is None else (self.producer, self.bias_add)
        return tuple(display_name(n) for n in nodes)


@dataclass
class BackwardFold:
    """Fold ``norm`` into every node that reads its output."""

    norm: onnx.NodeProto
    consumers: tuple[onnx.NodeProto, ...]

    @property
    def into(self) -> tuple[str, ...]:
        return tuple(display_name(n) for n in self.consumers)


@dataclass
class Leave:
    """Keep ``norm``, because of ``reason``."""

    norm: onnx.NodeProto
    reason: str


Decision = ForwardFold | BackwardFold | Leave


def is_norm(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ONNX_DOMAINS


def plan_graph(index: GraphIndex, ranks: dict[str, int], opset: int) -> list[Decision]:
    """One decision per top-level BatchNormalization node, in graph order."""
    return [decide(node, index, ranks, opset) for node in index.nodes if is_norm(node)]


def decide(norm: onnx.NodeProto, index: GraphIndex, ranks: dict[str, int], opset: int) -> Decision:
    problem = norm_problem(norm, index, opset)
    if problem:
        return Leave(norm, problem)
    forward = forward_target(norm, index, ranks, opset)
    if not isinstance(forward, str):
        return forward
    backward = backward_target(norm, index, ranks, opset)
    if not isinstance(backward, str):
        return backward
    return Leave(norm, f"not forward: {forward}; not backward: {backward}")


def norm_problem(norm: onnx.NodeProto, index: GraphIndex, opset: int = 15) -> str | None:
    """Why the norm itself cannot be folded anywhere (training mode, non-constant or odd statistics), or None."""
    if opset < 7 and not attribute(norm, "is_test", 0):
        return "it has is_test=0 (opset < 7), i.e. training mode; export the model in eval mode to fold it"
    if attribute(norm, "training_mode", 0):
        return (
            "it runs in training mode (training_mode=1) and normalises with batch statistics; "
            "export the model in eval mode (model.eval()) to fold it"
        )
    if attribute(norm, "spatial", 1) == 0:
        return "it has spatial=0 (one statistic per element, opset < 9), which bnfold does not fold"
    if any(name and index.readers_of(name) for name in norm.output[1:]) or any(
        name in index.graph_outputs for name in norm.output[1:] if name
    ):
        return "its running-statistics outputs are used (a training graph); export in eval mode to fold it"
    if len(norm.input) < 5:
        return "it has fewer than five inputs, which is not a valid BatchNormalization"
    channels = None
    for role, name in zip(NORM_INPUTS, norm.input[1:5], strict=True):
        if not index.is_constant(name):
            return (
                f"its {role} '{name}' is {index.constant_kind(name)}, not a constant initializer; "
                "export with the parameters stored as initializers (export_params=True) to fold it"
            )
        shape = index.shape(name)
        if len(shape) != 1 or (channels is not None and shape[0] != channels):
            return f"its {role} '{name}' has shape {list(shape)}, not one value per channel like the others"
        channels = shape[0]
        if index.dtype(name) not in FLOAT_TYPES:
            return f"its {role} '{name}' is not a floating-point tensor"
        if not np.all(np.isfinite(index.array(name))):
            return (
                f"its {role} '{name}' holds NaN or infinity; recalibrate or fix the statistics before folding"
            )
    return None


def channels_of(norm: onnx.NodeProto, index: GraphIndex) -> int:
    return index.shape(norm.input[1])[0]


def _weight_problem(node: onnx.NodeProto, kind: LinearKind, index: GraphIndex) -> str | None:
    label = f"'{display_name(node)}' ({node.op_type})"
    if len(node.input) <= kind.weight_slot or not node.input[kind.weight_slot]:
        return f"{label} has no weight input"
    weight = node.input[kind.weight_slot]
    if not index.is_constant(weight):
        return (
            f"the weight '{weight}' of {label} is {index.constant_kind(weight)}, not a constant initializer"
        )
    if index.dtype(weight) not in FLOAT_TYPES:
        return f"the weight '{weight}' of {label} is not a floating-point tensor (a quantized model?)"
    if kind.bias_slot is not None and len(node.input) > kind.bias_slot and node.input[kind.bias_slot]:
        bias = node.input[kind.bias_slot]
        if not index.is_constant(bias):
            return f"the bias '{bias}' of {label} is {index.constant_kind(bias)}, not a constant initializer"
        if index.dtype(bias) not in FLOAT_TYPES:
            return f"the bias '{bias}' of {label} is not a floating-point tensor"
    if node.op_type == "MatMul" and len(index.shape(weight)) != 2:
        return f"the weight '{weight}' of {label} has rank {len(index.shape(weight))}; bnfold folds 2-D MatMul weights only"
    return None


def _private_output(name: str, owner: str, index: GraphIndex, reader: onnx.NodeProto) -> str | None:
    """Why tensor ``name`` (produced by ``owner``) is not read by ``reader`` alone, or None."""
    if name in index.graph_outputs:
        return (
            f"the output '{name}' of {owner} is also a graph output, which must keep its unnormalised values"
        )
    others = [r for r in index.readers_of(name) if r is not reader]
    if others or len(index.readers_of(name)) != 1:
        names = sorted({"a subgraph" if r is SUBGRAPH else f"'{display_name(r)}'" for r in others}) or [
            "the same node twice"
        ]
        return (
            f"the output '{name}' of {owner} is also read by {', '.join(names)}, which needs it unnormalised"
        )
    return None


def forward_target(
    norm: onnx.NodeProto, index: GraphIndex, ranks: dict[str, int], opset: int
) -> ForwardFold | str:
    """The node before ``norm`` that absorbs it, or why there is none."""
    source = norm.input[0]
    producer = index.producer.get(source)
    if producer is None:
        return (
            f"its input '{source}' is {index.constant_kind(source)}, there is no layer before it to fold into"
        )
    bias_add = None
    if producer.op_type == "Add" and producer.domain in ONNX_DOMAINS:
        matmul = _matmul_before_add(producer, index)
        if isinstance(matmul, str):
            return matmul
        bias_add, producer = producer, matmul
    kind = kind_of(producer)
    label = f"'{display_name(producer)}' ({producer.op_type})"
    if kind is None:
        return f"the node before it, {label}, is not one of {SUPPORTED}"
    if bias_add is None:
        private = _private_output(source, label, index, norm)
    else:
        private = _private_output(bias_add.output[0], f"'{display_name(bias_add)}' (Add)", index, norm)
        private = private or _private_output(producer.output[0], label, index, bias_add)
    if private:
        return private
    problem = _weight_problem(producer, kind, index)
    if problem:
        return problem
    if producer.op_type == "MatMul":
        rank = ranks.get(producer.output[0])
        if rank is None:
            return (
                f"the rank of the output of {label} is unknown (run onnx shape inference on the model first)"
            )
        if rank != 2:
            return (
                f"the output of {label} has rank {rank}; BatchNormalization normalises axis 1, which is not the "
                "MatMul's output-feature axis (the last one)"
            )
        if bias_add is None and opset < 7:
            return f"folding into {label} turns it into a Gemm with bias, which needs opset 7 or later"
    weight_shape = index.shape(producer.input[kind.weight_slot])
    channels = channels_of(norm, index)
    if kind.channels(producer, weight_shape, kind.out_axis(producer)) != channels:
        return f"{label} does not have {channels} output channels on its weight's output axis"
    if bias_add is not None:
        bias = _other_input(bias_add, producer.output[0])
        shape = index.shape(bias)
        if (
            len(shape) > 2
            or (shape and shape[-1] not in (1, channels))
            or index.dtype(bias) not in FLOAT_TYPES
        ):
            return f"the bias '{bias}' added after {label} has shape {list(shape)}, not a per-column bias"
    return ForwardFold(norm, producer, bias_add)


def _other_input(add: onnx.NodeProto, name: str) -> str:
    return add.input[1] if add.input[0] == name else add.input[0]


def _matmul_before_add(add: onnx.NodeProto, index: GraphIndex) -> onnx.NodeProto | str:
    """The MatMul in ``MatMul -> Add(constant) -> norm``, or why the Add is not such a bias."""
    label = f"the node before it, '{display_name(add)}' (Add),"
    for slot in (0, 1):
        producer = index.producer.get(add.input[slot])
        if producer is not None and producer.op_type == "MatMul" and producer.domain in ONNX_DOMAINS:
            if index.is_constant(add.input[1 - slot]):
                return producer
            return f"{label} adds '{add.input[1 - slot]}', which is not a constant bias"
    return f"{label} does not add a constant bias to a MatMul, the only Add bnfold folds through"


def backward_target(
    norm: onnx.NodeProto, index: GraphIndex, ranks: dict[str, int], opset: int
) -> BackwardFold | str:
    """The nodes after ``norm`` that absorb it, or why they cannot."""
    output = norm.output[0]
    if output in index.graph_outputs:
        return f"its output '{output}' is a graph output, which must keep its normalised values"
    readers = index.readers_of(output)
    if not readers:
        return f"its output '{output}' is not read by any node"
    if SUBGRAPH in readers:
        return f"its output '{output}' is read inside a subgraph (If/Loop/Scan body)"
    consumers: list[onnx.NodeProto] = []
    for reader in readers:
        if isinstance(reader, str):  # only SUBGRAPH, excluded above
            continue
        if any(reader is c for c in consumers):
            return f"'{display_name(reader)}' reads its output '{output}' more than once"
        problem = _backward_problem(reader, output, norm, index, ranks, opset)
        if problem:
            return problem
        consumers.append(reader)
    return BackwardFold(norm, tuple(consumers))


def _backward_problem(
    node: onnx.NodeProto,
    output: str,
    norm: onnx.NodeProto,
    index: GraphIndex,
    ranks: dict[str, int],
    opset: int,
) -> str | None:
    label = f"'{display_name(node)}' ({node.op_type})"
    kind = kind_of(node)
    if kind is None:
        return f"{label} reads its output and is not one of {SUPPORTED}"
    if not kind.backward:
        return (
            f"{label} reads its output; a transposed convolution overlaps its windows unevenly, so a "
            "per-channel shift of its input does not become a per-channel bias"
        )
    if node.input[0] != output or list(node.input[1:]).count(output):
        return f"{label} reads its output as a weight or bias, not as its data input"
    problem = _weight_problem(node, kind, index)
    if problem:
        return problem
    if node.op_type == "Gemm" and attribute(node, "transA", 0):
        return f"{label} has transA=1, so the norm's channels are not the Gemm's input features"
    if node.op_type == "MatMul":
        rank = ranks.get(output)
        if rank != 2:
            what = "unknown" if rank is None else str(rank)
            return (
                f"its output has rank {what}, so its channel axis 1 is not the input-feature axis of {label}"
            )
        if opset < 7:
            return f"folding into {label} turns it into a Gemm with bias, which needs opset 7 or later"
    if node.op_type == "Conv":
        auto_pad = attribute(node, "auto_pad", "NOTSET")
        pads = attribute(node, "pads", None) or []
        if auto_pad not in ("NOTSET", "VALID") or any(int(p) for p in pads):  # type: ignore[union-attr]
            shown = f"auto_pad={auto_pad}" if auto_pad not in ("NOTSET", "VALID") else f"pads={list(pads)}"  # type: ignore[call-overload]
            return (
                f"{label} zero-pads its input ({shown}); the padded border would not receive the norm's shift, "
                "so a backward fold is not exact"
            )
    weight_shape = index.shape(node.input[kind.weight_slot])
    channels = channels_of(norm, index)
    if kind.channels(node, weight_shape, kind.in_axis(node)) != channels:
        return f"{label} does not have {channels} input channels on its weight's input axis"
    return None
