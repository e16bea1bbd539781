"""Hand-built ONNX graphs, one per fold rule and per leave-alone reason (``CASES``), and the :class:`Builder` that makes
them with seeded, realistic values.

Each :class:`Case` states how many BatchNormalization nodes must remain and, for those that remain, a phrase the
reason must contain. ``tests/test_onnx.py`` folds every case; other ONNX tests build their graphs with
:class:`Builder`, and ``benchmarks/onnx_peers.py`` runs the peers on the same graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.core.graph import BATCH_STATISTICS

F32 = TensorProto.FLOAT
F16 = TensorProto.FLOAT16
OPSET = 17
FLOAT32_TOLERANCE = 1e-4


@dataclass
class Case:
    model: onnx.ModelProto
    left: int
    reason: str | None = None
    note: str | None = None


class Builder:
    """Collects nodes and initializers with seeded, realistic values (var in [0.5, 2], means nonzero, gamma +/-)."""

    def __init__(self, seed: int = 0, dtype: type = np.float32) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array).astype(self.dtype), name))
        return name

    def weight(self, name: str, shape: tuple[int, ...]) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return self.const(name, self.rng.normal(size=shape) / np.sqrt(fan_in))

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs: object) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))

    def bn(self, name: str, x: str, y: str, channels: int, **attrs: object) -> None:
        rng = self.rng
        gamma = rng.choice([-1.0, 1.0], channels) * rng.uniform(0.5, 2.0, channels)
        beta = rng.normal(size=channels)
        mean = rng.normal(size=channels) + rng.choice([-1.0, 1.0], channels)
        var = rng.uniform(0.5, 2.0, channels)
        names = [
            self.const(f"{name or y}.{k}", v)
            for k, v in (("scale", gamma), ("B", beta), ("mean", mean), ("var", var))
        ]
        self.node("BatchNormalization", [x, *names], [y], name, epsilon=1e-3, **attrs)

    def model(
        self,
        inputs: list[tuple[str, list[int]]],
        outputs: list[tuple[str, list[int]]],
        opset: int = OPSET,
        elem: int = F32,
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "case",
            [helper.make_tensor_value_info(n, elem, s) for n, s in inputs],
            [helper.make_tensor_value_info(n, elem, s) for n, s in outputs],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        return model


# -- forward folds -------------------------------------------------------------------------------------------
def conv(dims: int, bias: bool, groups: int) -> Case:
    b = Builder(dims * 10 + bias + groups)
    cin, cout, k = 4, 8, 3
    spatial = [7] * dims
    inputs = ["x", b.weight("W", (cout, cin // groups) + (k,) * dims)]
    if bias:
        inputs.append(b.const("bias", b.rng.normal(size=cout)))
    b.node("Conv", inputs, ["c"], "conv", group=groups, pads=[1] * 2 * dims)
    b.bn("bn", "c", "y", cout)
    return Case(b.model([("x", [2, cin, *spatial])], [("y", [2, cout, *spatial])]), left=0)


def conv_transpose(groups: int, bias: bool) -> Case:
    b = Builder(40 + groups)
    cin, per_group = 4, 3
    inputs = ["x", b.weight("W", (cin, per_group, 3, 3))]
    if bias:
        inputs.append(b.const("bias", b.rng.normal(size=groups * per_group)))
    b.node("ConvTranspose", inputs, ["c"], "deconv", group=groups, strides=[2, 2])
    b.bn("bn", "c", "y", groups * per_group)
    return Case(b.model([("x", [1, cin, 5, 5])], [("y", [1, groups * per_group, 11, 11])]), left=0)


def gemm(trans_b: int, c_shape: tuple[int, ...] | None, alpha: float = 1.0, beta: float = 1.0) -> Case:
    b = Builder(50 + trans_b)
    m, k, n = 3, 5, 6
    inputs = ["a", b.weight("B", (n, k) if trans_b else (k, n))]
    if c_shape is not None:
        inputs.append(b.const("C", b.rng.normal(size=c_shape)))
    b.node("Gemm", inputs, ["g"], "gemm", transB=trans_b, alpha=alpha, beta=beta)
    b.bn("bn", "g", "y", n)
    return Case(b.model([("a", [m, k])], [("y", [m, n])]), left=0)


def gemm_trans_a() -> Case:
    b = Builder(55)
    b.node("Gemm", ["a", b.weight("B", (5, 6)), b.const("C", b.rng.normal(size=6))], ["g"], "gemm", transA=1)
    b.bn("bn", "g", "y", 6)
    return Case(b.model([("a", [5, 3])], [("y", [3, 6])]), left=0)


def matmul_2d(with_add: bool) -> Case:
    b = Builder(60 + with_add)
    b.node("MatMul", ["a", b.weight("B", (5, 6))], ["p"], "matmul")
    if with_add:
        b.node("Add", ["p", b.const("bias", b.rng.normal(size=6))], ["q"], "add")
    b.bn("bn", "q" if with_add else "p", "y", 6)
    return Case(b.model([("a", [3, 5])], [("y", [3, 6])]), left=0)


def matmul_3d() -> Case:
    b = Builder(62)
    b.node("MatMul", ["a", b.weight("B", (5, 6))], ["p"], "matmul")
    b.bn("bn", "p", "y", 3)
    return Case(b.model([("a", [2, 3, 5])], [("y", [2, 3, 6])]), left=1, reason="output channels but the norm has 3")


def chain() -> Case:
    b = Builder(70)
    b.node("Conv", ["x", b.weight("W", (6, 3, 3, 3))], ["c"], "conv", pads=[1, 1, 1, 1])
    b.bn("bn1", "c", "d", 6)
    b.bn("bn2", "d", "y", 6)
    return Case(b.model([("x", [1, 3, 6, 6])], [("y", [1, 6, 6, 6])]), left=0)


def constant_node_weight() -> Case:
    b = Builder(71)
    weight = numpy_helper.from_array((b.rng.normal(size=(6, 3, 3, 3)) / 5).astype(np.float32), "Wc")
    b.node("Constant", [], ["W"], "weight_const", value=weight)
    b.node("Conv", ["x", "W"], ["c"], "conv")
    b.bn("bn", "c", "y", 6)
    return Case(
        b.model([("x", [1, 3, 6, 6])], [("y", [1, 6, 4, 4])]), left=0, note="came from a Constant node"
    )


def shared_weight() -> Case:
    b = Builder(72)
    w = b.weight("W", (6, 3, 3, 3))
    b.node("Conv", ["x", w], ["c1"], "conv1", pads=[1, 1, 1, 1])
    b.node("Conv", ["x", w], ["c2"], "conv2", pads=[1, 1, 1, 1])
    b.bn("bn1", "c1", "y1", 6)
    b.bn("bn2", "c2", "y2", 6)
    return Case(
        b.model([("x", [1, 3, 5, 5])], [("y1", [1, 6, 5, 5]), ("y2", [1, 6, 5, 5])]),
        left=0,
        note="shared with",
    )


def fp16_conv() -> Case:
    b = Builder(73, dtype=np.float16)
    b.node("Conv", ["x", b.weight("W", (8, 4, 3, 3)), b.const("bias", b.rng.normal(size=8))], ["c"], "conv")
    b.bn("bn", "c", "y", 8)
    return Case(b.model([("x", [1, 4, 6, 6])], [("y", [1, 8, 4, 4])], elem=F16), left=0)


def identity_parameters() -> Case:
    """As TorchScript exports share equal parameters: statistics and a weight reached through Identity nodes."""
    b = Builder(74)
    w = b.weight("W", (6, 3, 3, 3))
    b.node("Identity", [w], ["W_id"], "id_w")
    b.node("Identity", ["W_id"], ["W_id2"], "id_w2")
    b.node("Conv", ["x", "W_id2"], ["c1"], "conv1")
    b.node("Conv", ["x", w], ["c2"], "conv2")
    b.bn("bn1", "c1", "y1", 6)
    b.bn("bn2", "c2", "y2", 6)
    roles = ("scale", "B", "mean", "var")
    bn2 = next(n for n in b.nodes if n.name == "bn2")
    bn2.input[1:5] = [f"shared.{role}" for role in roles]  # bn2 reads bn1's statistics through Identity nodes
    b.inits = [t for t in b.inits if not t.name.startswith("bn2.")]
    b.nodes[:0] = [helper.make_node("Identity", [f"bn1.{r}"], [f"shared.{r}"], name=f"id_{r}") for r in roles]
    return Case(
        b.model([("x", [1, 3, 5, 5])], [("y1", [1, 6, 3, 3]), ("y2", [1, 6, 3, 3])]),
        left=0,
        note="Identity of 'W'",
    )


def unnamed_nodes() -> Case:
    """Exporters often leave node names empty: reports then name a node by kind and output."""
    b = Builder(75)
    b.node("Conv", ["x", b.weight("W", (6, 3, 3, 3))], ["c"], "")
    b.bn("", "c", "d", 6)
    b.node("Relu", ["d"], ["r"], "")
    b.bn("", "r", "y", 6)
    return Case(
        b.model([("x", [1, 3, 5, 5])], [("y", [1, 6, 3, 3])]), left=1, reason="its input comes from 'Relu:r' (Relu), not from a conv or linear layer"
    )


# -- backward folds ------------------------------------------------------------------------------------------
def backward_gemm() -> Case:
    b = Builder(80)
    b.bn("bn", "a", "n", 5)
    b.node(
        "Gemm",
        ["n", b.weight("B", (6, 5)), b.const("C", b.rng.normal(size=6))],
        ["y"],
        "gemm",
        transB=1,
        alpha=0.5,
        beta=2.0,
    )
    return Case(b.model([("a", [3, 5])], [("y", [3, 6])]), left=0)


def backward_gemm_no_c() -> Case:
    b = Builder(83)
    b.bn("bn", "a", "n", 5)
    b.node("Gemm", ["n", b.weight("B", (5, 6))], ["y"], "gemm", alpha=1.5, beta=0.5)
    return Case(b.model([("a", [3, 5])], [("y", [3, 6])]), left=0)


def backward_matmul() -> Case:
    b = Builder(81)
    b.bn("bn", "a", "n", 5)
    b.node("MatMul", ["n", b.weight("B", (5, 6))], ["y"], "matmul")
    return Case(b.model([("a", [3, 5])], [("y", [3, 6])]), left=0)


def backward_convs() -> Case:
    """Two unpadded convolutions read the norm (one grouped, one strided with bias): both absorb it."""
    b = Builder(82)
    b.bn("bn", "x", "n", 4)
    b.node("Conv", ["n", b.weight("W1", (6, 2, 3, 3))], ["y1"], "conv1", group=2)
    b.node(
        "Conv",
        ["n", b.weight("W2", (5, 4, 2, 2)), b.const("b2", b.rng.normal(size=5))],
        ["y2"],
        "conv2",
        strides=[2, 2],
        auto_pad="VALID",
    )
    return Case(b.model([("x", [1, 4, 6, 6])], [("y1", [1, 6, 4, 4]), ("y2", [1, 5, 3, 3])]), left=0)


# -- left alone ----------------------------------------------------------------------------------------------
def backward_padded_conv() -> Case:
    b = Builder(90)
    b.bn("bn", "x", "n", 4)
    b.node("Conv", ["n", b.weight("W", (6, 4, 3, 3))], ["y"], "conv", pads=[1, 1, 1, 1])
    return Case(b.model([("x", [1, 4, 6, 6])], [("y", [1, 6, 6, 6])]), left=1, reason="pads")


def backward_conv_transpose() -> Case:
    b = Builder(91)
    b.bn("bn", "x", "n", 4)
    b.node("ConvTranspose", ["n", b.weight("W", (4, 3, 3, 3))], ["y"], "deconv", strides=[2, 2])
    return Case(
        b.model([("x", [1, 4, 5, 5])], [("y", [1, 3, 11, 11])]), left=1, reason="transposed convolution"
    )


def training_mode(eval_neighbour: bool = True) -> Case:
    """One norm with training_mode=1 beside an eval one: left with the core's words (the whole model in training
    mode is an error instead, see test_whole_model_in_training_mode)."""
    b = Builder(92)
    b.node("Conv", ["x", b.weight("W", (6, 3, 3, 3))], ["c"], "conv")
    b.bn("bn", "c", "y", 6, training_mode=1)
    b.nodes[-1].output.extend(["running_mean", "running_var"])  # training mode needs all three outputs
    outputs = [("y", [2, 6, 4, 4])]
    if eval_neighbour:
        b.node("Conv", ["x", b.weight("W2", (6, 3, 3, 3))], ["c2"], "conv2")
        b.bn("bn2", "c2", "y2", 6)
        outputs.append(("y2", [2, 6, 4, 4]))
    return Case(b.model([("x", [2, 3, 6, 6])], outputs), left=1, reason=BATCH_STATISTICS)


def non_constant_scale() -> Case:
    b = Builder(93)
    b.node("Conv", ["x", b.weight("W", (6, 3, 3, 3))], ["c"], "conv")
    b.bn("bn", "c", "y", 6)
    b.inits = [t for t in b.inits if t.name != "bn.scale"]
    return Case(
        b.model([("x", [1, 3, 6, 6]), ("bn.scale", [6])], [("y", [1, 6, 4, 4])]), left=1, reason="graph input"
    )


def producer_two_consumers() -> Case:
    b = Builder(94)
    b.node("Conv", ["x", b.weight("W", (6, 3, 3, 3))], ["c"], "conv")
    b.bn("bn", "c", "y", 6)
    b.node("Relu", ["c"], ["r"], "relu")
    return Case(
        b.model([("x", [1, 3, 6, 6])], [("y", [1, 6, 4, 4]), ("r", [1, 6, 4, 4])]),
        left=1,
        reason="also used by 'relu' (Relu)",
    )


def producer_graph_output() -> Case:
    b = Builder(95)
    b.node("Conv", ["x", b.weight("W", (6, 3, 3, 3))], ["c"], "conv")
    b.bn("bn", "c", "y", 6)
    return Case(
        b.model([("x", [1, 3, 6, 6])], [("y", [1, 6, 4, 4]), ("c", [1, 6, 4, 4])]),
        left=1,
        reason="also used by the graph output 'c'",
    )


def non_finite_statistics() -> Case:
    b = Builder(97)
    b.node("Conv", ["x", b.weight("W", (6, 3, 3, 3))], ["c"], "conv")
    b.bn("bn", "c", "y", 6)
    var = next(t for t in b.inits if t.name == "bn.var")
    var.CopyFrom(numpy_helper.from_array(np.array([1, 1, np.inf, 1, 1, 1], np.float32), "bn.var"))
    return Case(b.model([("x", [1, 3, 6, 6])], [("y", [1, 6, 4, 4])]), left=1)


def backward_output_is_graph_output() -> Case:
    b = Builder(96)
    b.bn("bn", "a", "n", 5)
    b.node("Gemm", ["n", b.weight("B", (5, 6))], ["y"], "gemm")
    return Case(
        b.model([("a", [3, 5])], [("y", [3, 6]), ("n", [3, 5])]),
        left=1,
        reason="goes to the graph output 'n'",
    )


CASES: dict[str, Callable[[], Case]] = {
    "conv1d_bias": lambda: conv(1, True, 1),
    "conv1d_groups": lambda: conv(1, False, 2),
    "conv2d": lambda: conv(2, False, 1),
    "conv2d_bias_groups": lambda: conv(2, True, 2),
    "conv2d_depthwise": lambda: conv(2, True, 4),
    "conv3d_bias": lambda: conv(3, True, 1),
    "conv3d_groups": lambda: conv(3, False, 2),
    "convtranspose_groups_bias": lambda: conv_transpose(2, True),
    "convtranspose": lambda: conv_transpose(1, False),
    "gemm_transB0_C_vector": lambda: gemm(0, (6,)),
    "gemm_transB1_C_row": lambda: gemm(1, (1, 6), alpha=0.7, beta=1.3),
    "gemm_C_scalar": lambda: gemm(0, (), alpha=1.5, beta=-0.5),
    "gemm_C_full": lambda: gemm(1, (3, 6), beta=0.25),
    "gemm_C_column": lambda: gemm(0, (3, 1), beta=2.0),
    "gemm_no_C": lambda: gemm(1, None, alpha=0.3),
    "gemm_no_C_beta": lambda: gemm(0, None, beta=0.5),  # the C bnfold adds must not be scaled by beta
    "gemm_transA": gemm_trans_a,
    "matmul_2d": lambda: matmul_2d(False),
    "matmul_add_2d": lambda: matmul_2d(True),
    "chain_conv_bn_bn": chain,
    "constant_node_weight": constant_node_weight,
    "shared_weight": shared_weight,
    "fp16_conv": fp16_conv,
    "identity_parameters": identity_parameters,
    "unnamed_nodes": unnamed_nodes,
    "backward_gemm": backward_gemm,
    "backward_gemm_no_C_beta": backward_gemm_no_c,
    "backward_matmul": backward_matmul,
    "backward_convs_pads0": backward_convs,
    "left_matmul_3d": matmul_3d,
    "left_backward_padded_conv": backward_padded_conv,
    "left_backward_convtranspose": backward_conv_transpose,
    "left_training_mode": training_mode,
    "left_non_constant_scale": non_constant_scale,
    "left_producer_two_consumers": producer_two_consumers,
    "left_producer_graph_output": producer_graph_output,
    "left_backward_graph_output": backward_output_is_graph_output,
}


def bn_count(model: onnx.ModelProto) -> int:
    return sum(node.op_type == "BatchNormalization" for node in model.graph.node)
