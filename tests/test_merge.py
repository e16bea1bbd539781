"""The merge planner (bnfold.core.merge) on hand-built core graphs: which add trees merge, and every refusal's reason.

Torch-free, like the planner: each test builds the graph an adapter would hand over and checks the decision.
"""

from __future__ import annotations

import pytest

from bnfold.core.graph import (
    CONSTANT,
    INPUT,
    LAYER,
    NORM,
    OP,
    OUTPUT,
    Geometry,
    Graph,
    LayerFacts,
    NormFacts,
    Operand,
    OpFacts,
)
from bnfold.core.merge import ONE, Branch, Coefficient, IdentityBranch, plan_merges
from bnfold.core.plan import FORWARD, Fold, FoldPlan


def conv_geometry(k: int, p: int | None = None, *, stride: int = 1, dilation: int = 1, groups: int = 1,
                  mode: str = "zeros", transposed: bool = False) -> Geometry:
    pad = (dilation * (k - 1)) // 2 if p is None else p
    return Geometry((k, k), (stride, stride), ((pad, pad), (pad, pad)), (dilation, dilation), groups, mode, transposed)


class Builder:
    """A core graph written the way a model reads: ``b.layer("conv", x, conv_geometry(3))``."""

    def __init__(self) -> None:
        self.graph = Graph(method="test", shapes_known=False)

    def input(self) -> int:
        return self.graph.add_node(INPUT, "a model input").index

    def layer(self, name: str, source: int, geometry: Geometry | None, *, channels: tuple[int, int] = (8, 8),
              **facts: object) -> int:
        if name not in self.graph.units:
            self.graph.add_unit(name, LAYER, "Conv2d", layer=LayerFacts(
                channels[1], channels[0], 1, geometry=geometry, **facts))  # type: ignore[arg-type]
        return self.graph.add_node(LAYER, f"module '{name}' (Conv2d)", [source], unit=name).index

    def norm(self, name: str, source: int, channels: int = 8, **facts: object) -> int:
        self.graph.add_unit(name, NORM, "BatchNorm2d", norm=NormFacts(channels, **facts))  # type: ignore[arg-type]
        return self.graph.add_node(NORM, f"module '{name}' (BatchNorm2d)", [source], unit=name).index

    def op(self, kind: str, *sources: int, label: str | None = None, **attributes: object) -> int:
        return self.graph.add_node(OP, label or f"the operation {kind}", list(sources),
                                   op=OpFacts(kind, dict(attributes))).index

    def add(self, *sources: int, **attributes: object) -> int:
        return self.op("add", *sources, **attributes)

    def output(self, *sources: int) -> int:
        return self.graph.add_node(OUTPUT, "the model output", list(sources)).index

    def sub(self, left: int, right: int, label: str = "the operation sub") -> int:
        return self.op("sub", left, right, label=label, operands=(Operand(input=0), Operand(input=1)))

    def scale(self, source: int, name: str = "gamma", shape: tuple[int, ...] = (8, 1, 1), *,
              as_node: bool = True, label: str = "the operation mul") -> int:
        """``source * name``: the constant read by a node (a module's parameter read) or named only (ONNX)."""
        if as_node:
            constant = self.graph.add_node(CONSTANT, f"the tensor '{name}'", shape=shape).index
            return self.op("mul", source, constant, label=label, operands=(
                Operand(input=0), Operand(input=1, constant=name, shape=shape)))
        return self.op("mul", source, label=label, operands=(Operand(input=0), Operand(constant=name, shape=shape)))

    def times(self, source: int, number: float, label: str = "the operation mul") -> int:
        return self.op("mul", source, label=label, operands=(Operand(number=number), Operand(input=0)))


def repvgg(*, identity: str = "norm", small: Geometry | None = None, large: Geometry | None = None) -> Builder:
    """relu -> (conv3 -> bn3) + (conv1 -> bn1) + bn(x): bn3 / bn1 are folded forward (see ``folded``)."""
    b = Builder()
    x = b.op("other", b.input(), label="the operation relu")
    c3 = b.norm("bn3", b.layer("conv3", x, large or conv_geometry(3)))
    c1 = b.norm("bn1", b.layer("conv1", x, small or conv_geometry(1)))
    total = b.add(c3, c1)
    if identity == "norm":
        total = b.add(total, b.norm("bn", x))
    elif identity == "x":
        total = b.add(total, x)
    b.output(b.op("other", total, label="the operation relu_1"))
    return b


FOLDED = FoldPlan([Fold("bn3", ("conv3",), FORWARD), Fold("bn1", ("conv1",), FORWARD)], [], "test")


def test_repvgg_block_merges_into_the_largest_kernel_with_its_norm_identity() -> None:
    b = repvgg()
    plan = plan_merges(b.graph, FOLDED)
    assert plan.refusals == []
    (merge,) = plan.merges
    assert merge.into == "conv3"
    assert merge.branches == (Branch("conv3", (0, 0)), Branch("conv1", (1, 1)))
    assert merge.identities == (IdentityBranch("bn", (1, 1)),)
    assert merge.norms == ("bn",) and merge.merged_layers == ("conv1",)
    removed = {b.graph.nodes[i].label for i in merge.removed}
    assert removed == {"the operation add", "module 'bn3' (BatchNorm2d)", "module 'bn1' (BatchNorm2d)",
                       "module 'conv1' (Conv2d)", "module 'bn' (BatchNorm2d)"}
    assert merge.root == max(i for i, n in enumerate(b.graph.nodes) if n.op is not None and n.op.kind == "add")


def test_identity_branch_of_the_input_itself_and_zero_constants_merge() -> None:
    b = Builder()
    x = b.op("other", b.input(), label="the operation relu")
    out = b.add(b.layer("conv3", x, conv_geometry(3)), scalars=(0,))  # 0 + conv3(x)
    out = b.add(out, b.layer("conv1", x, conv_geometry(1)))
    out = b.add(b.op("identity", out), x)  # a drop path that is an identity, then += x
    b.output(out)
    (merge,) = plan_merges(b.graph).merges
    assert merge.identities == (IdentityBranch(None, (1, 1)),)
    assert [branch.layer for branch in merge.branches] == ["conv3", "conv1"]


def test_without_the_fold_plan_the_norms_between_are_not_looked_through() -> None:
    # bn3 / bn1 not folded: the sum reads three norms and no layer, so it is no block to merge
    plan = plan_merges(repvgg().graph)
    assert plan.merges == [] and plan.refusals == []
    only_bn3 = FoldPlan([Fold("bn3", ("conv3",), FORWARD)], [], "test")
    (refusal,) = plan_merges(repvgg().graph, only_bn3).refusals
    assert "comes from module 'bn1' (BatchNorm2d)" in refusal.reason
    # where the adapter splits sums: bn1 is a norm of conv1's output, another tensor than x, still not looked
    # through; conv3(x) + bn(x) merge into conv3 and bn1(conv1(x)) stays added to it
    b = repvgg()
    plan = plan_merges(b.graph, only_bn3, split_sums=True)
    assert plan.refusals == []
    (merge,) = plan.merges
    assert merge.into == "conv3" and merge.merged_layers == () and merge.norms == ("bn",)
    assert [b.graph.nodes[i].label for i in merge.kept] == ["module 'bn1' (BatchNorm2d)"]
    removed = {b.graph.nodes[i].label for i in merge.removed}
    assert removed == {"the operation add", "module 'bn3' (BatchNorm2d)", "module 'bn' (BatchNorm2d)"}


@pytest.mark.parametrize(
    ("small", "reason"),
    [
        (conv_geometry(1, stride=2), "different strides: 'conv3' has (1, 1), 'conv1' has (2, 2)"),
        (conv_geometry(1, groups=2), "different groups: 'conv3' has 1, 'conv1' has 2"),
        (conv_geometry(1, dilation=2), "different dilations"),
        (conv_geometry(1, 1), "padding that would change the border outputs"),
        (conv_geometry(5), "does not read the positions"),  # 5x5 with padding 2 in... the 5x5 is larger
        (None, "'conv1' is not mergeable: its geometry is unknown"),
        (conv_geometry(1, mode="reflect"), None),  # padding 0: the mode does not matter
        (conv_geometry(1, transposed=True), "'conv1' is a transposed convolution"),
    ],
)
def test_branches_that_do_not_read_the_same_positions_are_refused(small: Geometry | None, reason: str | None) -> None:
    b = repvgg(identity="none", small=small)
    if small is None:  # the builder's default is a geometry: rebuild with an unknown one
        b = Builder()
        x = b.input()
        b.output(b.add(b.layer("conv3", x, conv_geometry(3)), b.layer("conv1", x, None)))
    plan = plan_merges(b.graph, FOLDED)
    if reason is None:
        assert len(plan.merges) == 1 and plan.refusals == []
        return
    if small is not None and small.kernel == (5, 5):
        # a 5x5 covers the 3x3: merged into the 5x5, whose padding 2 centres the 3x3 with padding 1
        assert [m.into for m in plan.merges] == ["conv1"]
        return
    assert plan.merges == []
    (refusal,) = plan.refusals
    assert reason in refusal.reason


def test_reflect_padding_is_refused_and_off_centre_kernels_are_placed_where_they_read() -> None:
    b = repvgg(identity="none", large=conv_geometry(3, mode="reflect"))
    (refusal,) = plan_merges(b.graph, FOLDED).refusals
    assert "pads with reflect values" in refusal.reason
    # a 1x1 with padding 0 inside a 3x3 with padding (0, 2) per axis sits at the kernel's first position
    off = Geometry((3, 3), (1, 1), ((0, 2), (0, 2)), (1, 1))
    (merge,) = plan_merges(repvgg(identity="none", large=off).graph, FOLDED).merges
    assert merge.branches[1] == Branch("conv1", (0, 0))


def test_identity_needs_stride_one_and_as_many_outputs_as_inputs() -> None:
    b = repvgg(identity="x", large=conv_geometry(3, stride=2), small=conv_geometry(1, stride=2))
    (refusal,) = plan_merges(b.graph, FOLDED).refusals
    assert "an identity needs stride 1" in refusal.reason
    b = Builder()
    x = b.op("other", b.input(), label="the operation relu")
    b.output(b.add(b.layer("conv", x, conv_geometry(3), channels=(8, 16)), x))
    (refusal,) = plan_merges(b.graph).refusals
    assert "maps 8 to 16 channels" in refusal.reason


def test_depthwise_branches_with_identity_merge() -> None:
    b = Builder()
    x = b.op("other", b.input(), label="the operation relu")
    dw = conv_geometry(3, groups=8)
    b.output(b.add(b.add(b.layer("dw3", x, dw), b.layer("dw1", x, conv_geometry(1, groups=8))), x))
    (merge,) = plan_merges(b.graph).merges
    assert merge.into == "dw3" and merge.identities == (IdentityBranch(None, (1, 1)),)


@pytest.mark.parametrize(("where", "reason"), [
    ("layer", "the output of module 'conv1' (Conv2d) is also used by the operation sigmoid"),
    ("identity", "the output of module 'bn' (BatchNorm2d) is also used by the operation sigmoid"),
])
def test_a_branch_read_elsewhere_is_refused(where: str, reason: str) -> None:
    b = Builder()
    x = b.op("other", b.input(), label="the operation relu")
    c1 = b.layer("conv1", x, conv_geometry(1))
    norm = b.norm("bn", x)
    root = b.add(b.add(b.layer("conv3", x, conv_geometry(3)), c1), norm)
    b.output(root, b.op("other", {"layer": c1, "identity": norm}[where], label="the operation sigmoid"))
    plan = plan_merges(b.graph)
    assert plan.merges == []
    assert [(r.root, r.reason) for r in plan.refusals] == [(root, reason)]


def test_a_partial_sum_read_elsewhere_is_a_block_of_its_own() -> None:
    b = Builder()
    x = b.op("other", b.input(), label="the operation relu")
    partial = b.add(b.layer("conv3", x, conv_geometry(3)), b.layer("conv1", x, conv_geometry(1)))
    root = b.add(partial, b.layer("conv5", x, conv_geometry(5)))
    b.output(root, b.op("other", partial, label="the operation sigmoid"))
    plan = plan_merges(b.graph)
    assert [(m.root, m.into) for m in plan.merges] == [(partial, "conv3")]
    assert [(r.root, r.reason) for r in plan.refusals] == [
        (root, "the output of the operation add is also used by the operation sigmoid")
    ]


def test_a_non_linear_op_between_a_branch_and_the_sum_is_refused() -> None:
    b = Builder()
    x = b.op("other", b.input(), label="the operation relu")
    b.output(b.add(b.layer("conv3", x, conv_geometry(3)), b.op("other", b.layer("conv1", x, conv_geometry(1)),
                                                                   label="the operation gelu")))
    (refusal,) = plan_merges(b.graph).refusals
    assert "comes from the operation gelu, which is not a conv or linear layer" in refusal.reason


def test_residual_of_a_different_tensor_is_refused_with_both_readers() -> None:
    b = Builder()
    x = b.op("other", b.input(), label="the operation relu")
    inner = b.op("other", b.layer("conv1", x, conv_geometry(3)), label="the operation relu_1")
    b.output(b.add(b.layer("conv2", inner, conv_geometry(3)), b.layer("down", x, conv_geometry(1))))
    (refusal,) = plan_merges(b.graph).refusals
    assert refusal.reason.startswith("its branches read different tensors")
    assert "'conv2' reads the operation relu_1" in refusal.reason


@pytest.mark.parametrize(("attributes", "reason"), [({"scalars": (1.0,)}, "adds the constant 1.0"),
                                                    ({"alpha": 2}, "alpha=2")])
def test_additions_that_are_not_plain_sums_are_refused(attributes: dict[str, object], reason: str) -> None:
    b = Builder()
    x = b.input()
    b.output(b.add(b.add(b.layer("conv3", x, conv_geometry(3)), b.layer("conv1", x, conv_geometry(1))),
                   **attributes))
    (refusal,) = plan_merges(b.graph).refusals
    assert reason in refusal.reason


def test_shared_layer_and_norm_problems_are_refused() -> None:
    b = Builder()
    x = b.input()
    c3 = b.layer("conv3", x, conv_geometry(3))
    b.output(b.add(c3, b.layer("conv1", x, conv_geometry(1), problem="the layer 'conv1' has forward hooks")))
    (refusal,) = plan_merges(b.graph).refusals
    assert refusal.reason == "the layer 'conv1' has forward hooks"
    b = Builder()
    x = b.op("other", b.input(), label="the operation relu")
    b.output(b.add(b.layer("conv3", x, conv_geometry(3)),
                   b.norm("bn", x, backward_blocker="it applies its activation (ReLU) after normalising")))
    (refusal,) = plan_merges(b.graph).refusals
    assert "the norm 'bn' on its identity branch: it applies its activation" in refusal.reason


def test_blocks_without_a_layer_branch_are_not_candidates() -> None:
    b = Builder()
    x = b.op("other", b.input(), label="the operation relu")
    b.output(b.add(x, b.norm("bn", x)))
    plan = plan_merges(b.graph)
    assert plan.merges == [] and plan.refusals == []


def test_a_layer_added_to_itself_is_refused() -> None:
    b = Builder()
    x = b.input()
    c1 = b.layer("conv1", x, conv_geometry(1))
    b.output(b.add(b.add(c1, c1), b.layer("conv3", x, conv_geometry(3))))
    (refusal,) = plan_merges(b.graph).refusals
    assert refusal.reason == "it adds the output of module 'conv1' (Conv2d) to itself"


# ------------------------------------------------------------------ linear combinations: differences and scales


def repmixer(*, as_node: bool = True, shape: tuple[int, ...] = (8, 1, 1)) -> tuple[Builder, dict[str, int]]:
    """FastViT's RepMixer after its conv norms folded: ``x + gamma * ((bn_m(x) + c1(x) + c3(x)) - (0 + bn_n(x)))``
    (depthwise convolutions; the norm block's ``0 + bn_n(x)`` and its identity activations as torch.fx sees them)."""
    b = Builder()
    x = b.op("other", b.input(), label="the operation gelu")
    mixer = b.add(b.add(b.norm("bn_m", x), b.norm("bn1", b.layer("c1", x, conv_geometry(1, groups=8)))),
                  b.norm("bn3", b.layer("c3", x, conv_geometry(3, groups=8))))
    mixer = b.op("identity", b.op("identity", mixer))  # its se and act: nn.Identity
    norm = b.op("identity", b.add(b.norm("bn_n", x), scalars=(0,),
                                  operands=(Operand(number=0.0), Operand(input=0))))
    difference = b.sub(mixer, norm)
    scaled = b.scale(difference, shape=shape, as_node=as_node)
    root = b.add(x, scaled)
    b.output(b.op("other", root, label="the operation conv_mlp"))
    return b, {"x": x, "root": root, "difference": difference, "scaled": scaled}


REPMIXER_FOLDS = FoldPlan([Fold("bn1", ("c1",), FORWARD), Fold("bn3", ("c3",), FORWARD)], [], "test")


@pytest.mark.parametrize("as_node", [True, False])
def test_repmixer_merges_into_one_depthwise_conv_with_signed_scaled_terms(as_node: bool) -> None:
    b, at = repmixer(as_node=as_node)
    plan = plan_merges(b.graph, REPMIXER_FOLDS)
    assert plan.refusals == [] and not plan.again
    (merge,) = plan.merges
    gamma = Coefficient(1.0, ("gamma",))
    assert merge.root == at["root"] and merge.into == "c3" and merge.kept == ()
    assert merge.branches == (Branch("c1", (1, 1), gamma), Branch("c3", (0, 0), gamma))
    assert merge.identities == (IdentityBranch(None, (1, 1), ONE), IdentityBranch("bn_m", (1, 1), gamma),
                                IdentityBranch("bn_n", (1, 1), Coefficient(-1.0, ("gamma",))))
    removed = {b.graph.nodes[i].label for i in merge.removed}
    assert {"the operation sub", "the operation mul", "module 'bn_m' (BatchNorm2d)", "module 'bn_n' (BatchNorm2d)",
            "module 'c1' (Conv2d)", "module 'bn1' (BatchNorm2d)", "module 'bn3' (BatchNorm2d)"} <= removed
    assert ("the tensor 'gamma'" in removed) is as_node  # the scale's read goes with its product
    assert "module 'c3' (Conv2d)" not in removed and "the operation gelu" not in removed


def test_differences_scalars_and_negations_give_each_term_its_factor() -> None:
    b = Builder()
    x = b.input()
    c3, c1 = b.layer("c3", x, conv_geometry(3)), b.layer("c1", x, conv_geometry(1))
    neg = b.op("mul", b.norm("bn", x), label="the operation neg", operands=(Operand(input=0), Operand(number=-1.0)))
    # 0.5 * ((c3 - c1) - (-bn(x)))
    b.output(b.times(b.sub(b.sub(c3, c1), neg, label="the operation sub_1"), 0.5))
    (merge,) = plan_merges(b.graph).merges
    assert [(br.layer, br.coefficient) for br in merge.branches] == [("c3", Coefficient(0.5)),
                                                                     ("c1", Coefficient(-0.5))]
    assert merge.identities == (IdentityBranch("bn", (1, 1), Coefficient(0.5)),)  # -1 * -1 * 0.5


def test_legacy_sub_facts_without_operands_subtract_the_second_input() -> None:
    b = Builder()
    x = b.input()
    b.output(b.op("sub", b.layer("c3", x, conv_geometry(3)), b.layer("c1", x, conv_geometry(1))))
    (merge,) = plan_merges(b.graph).merges
    assert [br.coefficient.scale for br in merge.branches] == [1.0, -1.0]


@pytest.mark.parametrize(("shape", "reason"), [
    ((1, 1, 1, 8), "the operation mul multiplies by 'gamma' of shape (1, 1, 1, 8): the scale is not per channel of "
                   "'c3' (8 channels on axis 1)"),
    ((4, 1, 1), "of shape (4, 1, 1): the scale is not per channel of 'c3'"),
    ((1, 1, 8, 1, 1), "of shape (1, 1, 8, 1, 1), more axes than the terms it scales have"),
])
def test_scales_that_are_not_one_value_per_channel_are_refused(shape: tuple[int, ...], reason: str) -> None:
    b, at = repmixer(shape=shape)
    plan = plan_merges(b.graph, REPMIXER_FOLDS)
    assert plan.merges == []
    (refusal,) = plan.refusals
    assert refusal.root == at["root"] and reason in refusal.reason


def test_a_scale_of_several_values_per_channel_bounds_the_tree() -> None:
    # gamma (8, 4, 4) varies over positions: the product is no term of a linear combination, so the difference
    # inside it merges on its own, and the outer sum (x + that product) has no layer to merge into
    b, at = repmixer(shape=(8, 4, 4))
    plan = plan_merges(b.graph, REPMIXER_FOLDS)
    assert plan.refusals == []
    (merge,) = plan.merges
    assert merge.root == at["difference"] and merge.into == "c3"
    assert [i.coefficient.scale for i in merge.identities] == [1.0, -1.0]
    # a term that is such a product is refused with the reason
    b = Builder()
    x = b.input()
    b.output(b.add(b.layer("c3", x, conv_geometry(3)), b.scale(b.layer("c1", x, conv_geometry(1)), shape=(8, 4, 4))))
    (refusal,) = plan_merges(b.graph).refusals
    assert refusal.reason == ("one of its terms is the operation mul, which multiplies by 'gamma' of shape (8, 4, 4): "
                              "the scale is not per channel")


def test_a_single_value_scale_of_any_shape_that_keeps_the_rank_is_a_number() -> None:
    b, _ = repmixer(shape=(1, 1, 1))
    (merge,) = plan_merges(b.graph, REPMIXER_FOLDS).merges
    assert merge.branches[0].coefficient == Coefficient(1.0, ("gamma",))


def test_a_non_constant_multiplier_is_refused_with_both_factors() -> None:
    b = Builder()
    x = b.op("other", b.input(), label="the operation relu")
    gate = b.op("other", x, label="the operation sigmoid")
    gated = b.op("mul", b.layer("c1", x, conv_geometry(1)), gate, label="the operation mul",
                 operands=(Operand(input=0), Operand(input=1)))
    b.output(b.add(b.layer("c3", x, conv_geometry(3)), gated))
    (refusal,) = plan_merges(b.graph).refusals
    assert refusal.reason == ("one of its terms is the operation mul, a product of module 'c1' (Conv2d) and the "
                              "operation sigmoid: a non-constant multiplier")


@pytest.mark.parametrize(("operands", "reason"), [
    ((Operand(input=0), Operand(number=1.0)), "the operation sub subtracts the constant 1.0"),
    ((Operand(input=0), Operand(constant="offset", shape=(8, 1, 1))), "the operation sub subtracts the constant 'offset'"),
])
def test_subtracting_a_constant_is_refused(operands: tuple[Operand, ...], reason: str) -> None:
    b = Builder()
    x = b.input()
    total = b.add(b.layer("c3", x, conv_geometry(3)), b.layer("c1", x, conv_geometry(1)))
    b.output(b.op("sub", total, label="the operation sub", operands=operands, scalars=()))
    (refusal,) = plan_merges(b.graph).refusals
    assert refusal.reason == reason


def test_a_tensor_read_twice_by_one_addition_is_not_counted_once() -> None:
    """torch.fx lists ``y`` once among the inputs of ``y + y``; the operands say it is added twice."""
    b = Builder()
    x = b.input()
    c1 = b.layer("c1", x, conv_geometry(1))
    double = b.add(c1, operands=(Operand(input=0), Operand(input=0)))
    b.output(b.add(double, b.layer("c3", x, conv_geometry(3))))
    plan = plan_merges(b.graph)
    assert plan.merges == []
    (refusal,) = plan.refusals
    assert refusal.reason == "it adds the output of module 'c1' (Conv2d) to itself"


# ------------------------------------------------------------------ sums whose terms read different tensors


def split_block(*, residual: str = "input", negate: bool = False) -> tuple[Builder, dict[str, int]]:
    """``(conv_a(x) + conv_b(x) + bn(x)) + y`` (RepGhost's ghost module plus the bottleneck's shortcut)."""
    b = Builder()
    y = b.input()
    x = b.op("other", b.layer("primary", y, conv_geometry(1)), label="the operation relu")
    inner = b.add(b.add(b.layer("dw3", x, conv_geometry(3, groups=8)), b.layer("dw1", x, conv_geometry(1, groups=8))),
                  b.norm("bn", x))
    term = y if residual == "input" else b.layer("shortcut", y, conv_geometry(1))
    root = b.sub(inner, term, label="the operation sub_2") if negate else b.add(inner, term)
    b.output(b.op("other", root, label="the operation relu_1"))
    return b, {"x": x, "y": y, "term": term, "root": root, "inner": inner}


@pytest.mark.parametrize("residual", ["input", "conv"])
def test_terms_reading_one_tensor_merge_and_the_residual_stays_added(residual: str) -> None:
    b, at = split_block(residual=residual)
    assert plan_merges(b.graph).merges == []  # split only where the adapter asks for it
    plan = plan_merges(b.graph, split_sums=True)
    assert plan.refusals == [] and not plan.again
    (merge,) = plan.merges
    assert merge.root == at["root"] and merge.into == "dw3" and merge.merged_layers == ("dw1",)
    assert merge.norms == ("bn",) and merge.kept == (at["term"],)
    removed = {b.graph.nodes[i].label for i in merge.removed}
    assert removed == {"the operation add", "module 'dw1' (Conv2d)", "module 'bn' (BatchNorm2d)"}
    assert at["term"] not in merge.removed and at["root"] in merge.removed and at["inner"] in merge.removed


def test_a_subtracted_residual_is_not_split_off() -> None:
    b, _ = split_block(negate=True)
    (refusal,) = plan_merges(b.graph, split_sums=True).refusals
    assert refusal.reason == ("its terms read different tensors, and a model input, which would stay added to the "
                              "merged layer's output, enters the sum scaled or subtracted")


def test_a_split_that_removes_no_layer_or_norm_is_not_made() -> None:
    b = Builder()
    y = b.input()
    x = b.op("other", y, label="the operation relu")
    b.output(b.add(b.add(b.layer("conv", x, conv_geometry(3)), x), y))  # conv(x) + x: only an addition to save
    (refusal,) = plan_merges(b.graph, split_sums=True).refusals
    assert refusal.reason.startswith("one of its terms comes from a model input, which is not a conv or linear layer")
    assert refusal.reason.endswith("; merging only the terms that read one tensor would remove no layer or norm")
    (refusal,) = plan_merges(b.graph).refusals
    assert refusal.reason.endswith("or that tensor itself")  # without splits, the reason as before


def test_of_two_tensors_whose_terms_merge_the_larger_saving_goes_first_and_another_round_is_asked() -> None:
    b = Builder()
    x, y = b.input(), b.input()
    total = b.add(b.add(b.layer("x3", x, conv_geometry(3)), b.layer("x1", x, conv_geometry(1))),
                  b.add(b.add(b.layer("y3", y, conv_geometry(3)), b.layer("y1", y, conv_geometry(1))), b.norm("bn", y)))
    b.output(total)
    plan = plan_merges(b.graph, split_sums=True)
    (merge,) = plan.merges
    assert merge.into == "y3" and plan.again
    (refusal,) = plan_merges(b.graph).refusals  # an adapter that does not split sums
    assert refusal.reason.startswith("its branches read different tensors")
    assert [b.graph.nodes[i].label for i in merge.kept] == ["module 'x3' (Conv2d)", "module 'x1' (Conv2d)"]
