"""The merge planner (bnfold.core.merge) on hand-built core graphs: which add trees merge, and every refusal's reason.

Torch-free, like the planner: each test builds the graph an adapter would hand over and checks the decision.
"""

from __future__ import annotations

import pytest

from bnfold.core.graph import INPUT, LAYER, NORM, OP, OUTPUT, Geometry, Graph, LayerFacts, NormFacts, OpFacts
from bnfold.core.merge import Branch, IdentityBranch, plan_merges
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
