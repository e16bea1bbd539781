"""The one graph every format is translated into: who feeds whom, and the facts folding needs.

Torch- and numpy-free, so that ONNX folds without PyTorch and every format is judged by the same rules
(:mod:`bnfold.core.plan`). A **node** is one step of the dataflow; a **unit** is what a fold changes, a linear layer
or a norm, with one call node or more (a module called at several places). Facts are plain values each adapter reads
off its format once; every "no" among them is a sentence a user can act on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

INPUT = "input"
CONSTANT = "constant"
LAYER = "layer"
NORM = "norm"
OP = "op"
OUTPUT = "output"


@dataclass(frozen=True)
class Geometry:
    """Where a linear layer's kernel reads its input: what deciding a branch merge needs.

    ``kernel`` (``()`` for a fully connected layer), ``stride``, ``dilation``: per spatial axis; ``padding``:
    ``(begin, end)`` per spatial axis, in input positions (a symmetric ``padding=p`` is ``(p, p)``); ``padding_mode``:
    what the padding holds (``"zeros"``, ``"reflect"``, ``"replicate"``, ``"circular"``).
    """

    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[tuple[int, int], ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding_mode: str = "zeros"
    transposed: bool = False


def same_padding(
    kernel: tuple[int, ...], dilation: tuple[int, ...], stride: tuple[int, ...] | None = None,
    sizes: tuple[int, ...] | None = None, *, odd_at_end: bool = True,
) -> tuple[tuple[int, int], ...] | None:
    """The ``(begin, end)`` zero padding per spatial axis that keeps ``ceil(size / stride)`` outputs ("same" in
    PyTorch, ``auto_pad=SAME_UPPER`` / ``SAME_LOWER`` in ONNX, TensorFlow's ``"SAME"``).

    The total on an axis of ``n`` inputs is ``max((ceil(n / s) - 1) * s + d * (k - 1) + 1 - n, 0)``, whatever
    ``n`` at stride 1 (PyTorch allows "same" only there); the odd one goes at the end (PyTorch, ``SAME_UPPER``) or at
    the beginning (``SAME_LOWER``). ``None`` where the total depends on a size that ``sizes`` does not give.
    """
    stride = stride or (1,) * len(kernel)
    pairs = []
    for axis, (k, d, s) in enumerate(zip(kernel, dilation, stride, strict=True)):
        if s == 1 or d * (k - 1) == 0:
            total = d * (k - 1) if s == 1 else 0
        elif sizes is None:
            return None
        else:
            total = max((-(-sizes[axis] // s) - 1) * s + d * (k - 1) + 1 - sizes[axis], 0)
        small, large = total // 2, total - total // 2
        pairs.append((small, large) if odd_at_end else (large, small))
    return tuple(pairs)


def show_padding(padding: tuple[tuple[int, int], ...]) -> str:
    """Padding as a user wrote it: ``(1, 1)`` when symmetric, else the ``(begin, end)`` pairs."""
    if all(begin == end for begin, end in padding):
        return str(tuple(begin for begin, _ in padding))
    return str(padding)


@dataclass(frozen=True)
class LayerFacts:
    """What the planner needs to know of a linear layer (conv, transposed conv, fully connected, Gemm, MatMul).

    Attributes:
        out_channels / in_channels: channel counts of its output and input activations.
        channel_dim: the axis of its input and output activations that holds channels (1 for convolutions, -1 for
            a fully connected layer).
        problem: why the layer must not be changed at all (no floating-point weight, shared weights, hooks...), or
            ``None``.
        input_fold_blocker: why an affine map on its *input* cannot be absorbed exactly, where no other fact says it
            (a registered layer's own rule, an ONNX ``Gemm`` with ``transA=1``): see :func:`input_fold_blocker`.
        input_padding: how the layer pads its input where ``geometry`` cannot say (``PADS_*``, ``PADDING_UNKNOWN``).
        not_a_rule: set when the layer looks like a linear layer but bnfold has no rule for it (a subclass that
            overrides ``forward``): the whole reason, and the layer is never folded into.
        geometry: its :class:`Geometry`, or ``None`` where the format does not say (never merged then).
        rank: the number of axes of its activations where the format tells it without shapes, or ``None``.
    """

    out_channels: int
    in_channels: int
    channel_dim: int
    problem: str | None = None
    input_fold_blocker: str | None = None
    not_a_rule: str | None = None
    geometry: Geometry | None = None
    rank: int | None = None
    input_padding: str | None = None


def weight_channels(shape: tuple[int, ...], out_axis: int, groups: int = 1) -> tuple[int, int]:
    """The output and input channels of a layer whose weight of ``shape`` is ``(out, in / groups, ...)``
    (``out_axis`` 0) or ``(in, out / groups, ...)`` (1: a transposed convolution, an ONNX ``MatMul``)."""
    return (shape[0], shape[1] * groups) if out_axis == 0 else (shape[1] * groups, shape[0])


# Facts for LayerFacts.input_padding: how a layer pads its input where no Geometry says it.
PADS_ZEROS = "zeros"  # its own code pads with zeros (a forward() bnfold read)
PADS_TO_SAME_AT_RUN_TIME = "same at run time"  # timm's Conv2dSame; ONNX auto_pad=SAME_* on an input of unknown shape
PADS_BEFORE_THE_LAYER = "before the layer"  # its forward() transforms the input (pads it, ...) before the convolution
PADDING_UNKNOWN = "unknown"  # an argument that is not a constant

ZERO_PADDED_BORDER = "the border outputs would see the shift where the original saw zeros"
"""Why zeros around a tensor keep a per-channel shift from passing (a padded convolution, an average pool that
counts its padding)."""

_PADDING_REASONS = {
    PADS_ZEROS: f"it pads its input with zeros: {ZERO_PADDED_BORDER}",
    PADS_TO_SAME_AT_RUN_TIME: f"it pads its input with zeros to 'same' size at run time: {ZERO_PADDED_BORDER}",
    PADS_BEFORE_THE_LAYER: "its forward() transforms the input (padding it, for example) before the convolution",
    PADDING_UNKNOWN: "bnfold cannot read how it pads its input (an argument that is not a constant)",
}


def input_fold_blocker(facts: LayerFacts) -> str | None:
    """Why an affine map ``s * x + t`` on the layer's input cannot be absorbed into it exactly, or ``None``: written
    once from the facts, so that every format refuses in the same words."""
    if facts.input_fold_blocker:
        return facts.input_fold_blocker
    if facts.input_padding is not None:
        return _PADDING_REASONS[facts.input_padding]
    geometry = facts.geometry
    if geometry is None:
        return None
    if geometry.transposed:
        return ("it is a transposed convolution: its output positions sum different numbers of input positions, so a "
                "shift on its input does not become a constant bias")
    if geometry.padding_mode == "zeros" and any(p for pair in geometry.padding for p in pair):
        return f"it pads its input with zeros (padding={show_padding(geometry.padding)}): {ZERO_PADDED_BORDER}"
    return None


@dataclass(frozen=True)
class NormFacts:
    """What the planner needs to know of a norm that is a per-channel affine map ``y = s * x + t`` in eval mode.

    Attributes:
        channels / channel_dim: its number of channels, and the axis of its input that holds them.
        problem: why it is not a foldable affine map at all (no rule for its class, hooks...), or ``None``.
        batch_statistics: why it normalises with the statistics of each batch, where it does:
            :data:`NO_RUNNING_STATISTICS` or :data:`IN_TRAINING_MODE` (the core words it, :func:`norm_problem`).
        backward_blocker: why the layers after it cannot absorb it (a fused activation after the norm), or ``None``.
        negative_scales: how many channels have ``s < 0`` (max pooling commutes with the map only when none has).
    """

    channels: int
    channel_dim: int = 1
    problem: str | None = None
    batch_statistics: str | None = None
    backward_blocker: str | None = None
    negative_scales: int = 0


NO_RUNNING_STATISTICS = "no running statistics"  # track_running_stats=False; an exported graph computes them
IN_TRAINING_MODE = "in training mode"  # has them, but set to training mode inside an eval model


def norm_problem(facts: NormFacts) -> str | None:
    """Why the norm is not a foldable affine map, or ``None``: the adapter's own :attr:`NormFacts.problem` first (a
    norm inside control flow is never rewritten), else batch statistics in the same words for every format, remedy
    included (the user's fix is in the model before any export)."""
    if facts.problem or facts.batch_statistics is None:
        return facts.problem
    return _BATCH_STATISTICS_REASONS[facts.batch_statistics]


@dataclass(frozen=True)
class OpFacts:
    """An operation in a normalised vocabulary, with the attributes that decide whether an affine map passes it.

    ``kind`` is one of the kinds below; every other operation is ``"other"``. ``attributes`` by kind:

    * ``dropout``: ``training`` (bool); ``max_pool``: ``return_indices`` (bool);
    * ``avg_pool``: ``padding`` (a tuple of ints), ``count_include_pad`` (bool), ``divisor_override`` (or None);
    * ``mean``: ``dims`` (tuple of ints, or None for all), ``keepdim`` (bool);
    * ``permute``: ``order`` (the output's axes as input axes); ``transpose``: ``dims`` (the two swapped axes);
    * ``concat``: ``axis`` (int, or None when it cannot be read);
    * ``pad``: ``mode`` (``"constant"``, ``"reflect"``, ``"replicate"``, ``"circular"``), ``padded_axes`` (the
      axes of the input that get padding, non-negative, or None when unknown);
    * ``squeeze`` / ``unsqueeze``: ``dims`` (the axes removed / inserted, or None: ``squeeze()`` of every size-1 axis);
    * ``add`` / ``sub`` (``x + alpha * y`` / ``x - alpha * y``): ``alpha`` (1 for ``+``), ``scalars`` (the operands
      that are plain numbers: ``(0,)`` for ``0 + t``) and ``operands``; a ``sub`` without ``operands`` is read as
      ``inputs[0] - inputs[1]``;
    * ``mul`` (``-x`` is ``x * -1``) and ``div`` (``operands[0] / operands[1]``, true division): ``operands``.

    ``operands`` (a tuple of :class:`Operand`, in call order) says what each operand is: node inputs cannot tell
    ``y + y`` or ``x * gamma`` exactly (torch.fx lists ``y`` once among the inputs of ``y + y``). ``adaptive_avg_pool``,
    ``upsample``, ``identity`` and ``reshape`` need no attributes (reshapes are judged on shapes).
    """

    kind: str
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Operand:
    """One operand of an ``add`` / ``sub`` / ``mul`` op: the tensor of ``node.inputs[input]``, a plain ``number``, or
    a stored tensor the model never changes (a parameter, buffer or initializer) named as the format's weight access
    reads it (``constant(name)``; it may also name the ``input`` that reads it). ``shape``: the constant's, or what an
    adapter knows of a computed operand's for :func:`bnfold.core.arithmetic.linear_combination` (which drops it).
    ``zero``: the constant is all 0 (the core decides whether it is the number 0).
    """

    input: int | None = None
    number: float | None = None
    constant: str | None = None
    shape: tuple[int, ...] | None = None
    zero: bool = False


# Reasons every adapter gives in the same words, so a model refused in one format reads the same in another.
BATCH_STATISTICS = "it normalises with the statistics of each batch, even in eval mode"
"""What a norm with :attr:`NormFacts.batch_statistics` computes, in every sentence :func:`norm_problem` writes."""
_BATCH_STATISTICS_REASONS = {
    NO_RUNNING_STATISTICS: f"it keeps no running statistics (track_running_stats=False): {BATCH_STATISTICS}; give it "
                           f"running statistics (track_running_stats=True) and train the model to fold it",
    IN_TRAINING_MODE: f"it is in training mode although the model is not (train() called on it after eval()?): "
                      f"{BATCH_STATISTICS}; call model.eval() before folding the model, or before exporting it "
                      f"(TorchScript, .pt2, ONNX), to fold it",
}


@dataclass
class Node:
    """One step of the dataflow: a model input, a read of a stored tensor, a layer or norm call, an op, the output.

    ``inputs``: the nodes whose tensors it reads, in argument order; ``users``: the nodes that read its tensor (a
    read of metadata only, a shape, is no use). ``label`` names the step as a reason does ("module 'layer1.0.conv1'
    (Conv2d)", "the operation torch.cat"); ``shape``: its tensor's, when known; ``unit``: the :class:`Unit` called.
    """

    index: int
    kind: str
    label: str
    inputs: list[int] = field(default_factory=list)
    users: list[int] = field(default_factory=list)
    shape: tuple[int, ...] | None = None
    unit: str | None = None
    op: OpFacts | None = None


@dataclass
class Unit:
    """A linear layer or a norm that a fold changes, with its call nodes in call order."""

    name: str
    kind: str  # LAYER | NORM
    type_name: str
    layer: LayerFacts | None = None
    norm: NormFacts | None = None
    calls: list[int] = field(default_factory=list)


@dataclass
class Graph:
    """Nodes in execution order, the units they call (ordered by their place in the model), and what the adapter
    wants the report to say. ``shapes_known``: shapes come from a real forward pass, or a format that records them.
    """

    nodes: list[Node] = field(default_factory=list)
    units: dict[str, Unit] = field(default_factory=dict)
    method: str = ""
    shapes_known: bool = False
    notes: list[str] = field(default_factory=list)

    def add_node(
        self,
        kind: str,
        label: str,
        inputs: list[int] | None = None,
        *,
        shape: tuple[int, ...] | None = None,
        unit: str | None = None,
        op: OpFacts | None = None,
    ) -> Node:
        """Append a node reading ``inputs`` (node indices); links users and the unit's calls."""
        node = Node(len(self.nodes), kind, label, list(inputs or []), [], shape, unit, op)
        self.nodes.append(node)
        for source in node.inputs:
            self.nodes[source].users.append(node.index)
        if unit is not None:
            self.units[unit].calls.append(node.index)
        return node

    def add_unit(
        self, name: str, kind: str, type_name: str, *, layer: LayerFacts | None = None, norm: NormFacts | None = None
    ) -> Unit:
        """Declare a layer or norm (before its calls are added)."""
        unit = Unit(name, kind, type_name, layer, norm)
        self.units[name] = unit
        return unit

    def free_name(self, base: str) -> str:
        """``base``, or ``base#2``, ``base#3``, ... where a unit has that name already (a module inlined at two
        places of a TorchScript graph, ONNX nodes of one name)."""
        name, count = base, 1
        while name in self.units:
            count += 1
            name = f"{base}#{count}"
        return name

    def norms(self) -> list[Unit]:
        """Norm units in the order of their first call; never-called norms last, in declaration order."""
        called = sorted((u for u in self.units.values() if u.kind == NORM and u.calls), key=lambda u: u.calls[0])
        return called + [u for u in self.units.values() if u.kind == NORM and not u.calls]
