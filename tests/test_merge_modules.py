"""``bnfold.fold(model, x, merge_branches=True)``: re-parameterisable blocks merged into one layer on nn.Modules.

Checked on hand-written blocks (every branch kind, the norm after the sum, the refusals) and on timm's RepVGG,
MobileOne and RepViT with realistic statistics, against the original and against timm's own
``reparameterize_model``: the same outputs (float64, so that the comparison is not drowned in the float32 rounding
of a deep random network), no more norms and no more convolutions in the forward pass.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from torch import fx, nn

import bnfold
import bnfold.engine
from bnfold.verification import TOLERANCES
from conftest import assert_same_outputs, calibrated_by_training, random_layer_scales
from helpers.counting import conv_calls, count_batch_norm_calls
from helpers.merge_nets import Differences, Residual, Twice, Unmergeable, net


@pytest.fixture
def prepared() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    return calibrated_by_training(net(), x), x


def test_blocks_merge_into_one_conv_each_and_compute_the_same(prepared: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = prepared
    folded = bnfold.fold(model, x, merge_branches=True)
    assert isinstance(folded, fx.GraphModule)
    assert_same_outputs(model, folded, x)
    assert count_batch_norm_calls(folded, [x]) == 0
    assert conv_calls(folded, x) == 4 + 1  # one conv per block, and the classifier
    report = bnfold.report_for(folded)
    merged = {m.into: m for m in report.merges}
    assert set(merged) == {"0.kxk.0", "1.kxk.0", "2.kxk.0", "3.conv.0"}
    assert merged["0.kxk.0"].layers == ("0.scale.0",) and merged["0.kxk.0"].identities == ()
    assert merged["1.kxk.0"].identities == ("1.identity",)
    assert merged["3.conv.0"].layers == ("3.conv1",) and merged["3.conv.0"].identities == ("input",)
    entries = {e.name: e for e in report.entries}
    assert entries["1.identity"].status == "folded" and entries["1.identity"].direction == "merge"
    assert entries["1.identity"].into == ("1.kxk.0",)
    # the norm after RepDw's sum folds into the merged conv in the round after the merge
    assert entries["3.bn"].status == "folded" and entries["3.bn"].into == ("3.conv.0",)
    assert report.left == []
    data = json.loads(report.to_json())
    assert data["merges"][0]["status"] == "merged" and isinstance(data["merges"][0]["layers"], list)
    assert "merged" in str(report)


def test_without_the_option_nothing_merges(prepared: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = prepared
    folded = bnfold.fold(model, x)
    assert type(folded) is nn.Sequential and bnfold.report_for(folded).merges == []
    assert count_batch_norm_calls(folded, [x]) == 3  # 1.identity, 2.identity, 3.bn
    assert conv_calls(folded, x) == 9


def test_inplace_folds_the_model_and_merges_a_copy(prepared: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = prepared
    original = copy.deepcopy(model)
    folded = bnfold.fold(model, x, merge_branches=True, inplace=True)
    assert isinstance(folded, fx.GraphModule) and folded is not model
    assert isinstance(model[0].kxk[1], nn.Identity)  # folds made in place
    assert conv_calls(model, x) == 9  # the merges were not: the model's own forward still sums its branches
    assert_same_outputs(original, model, x)
    assert_same_outputs(original, folded, x)


def test_plan_previews_the_merges_and_leaves_the_model_alone(prepared: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = prepared
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    report = bnfold.plan(model, x, merge_branches=True)
    folded = bnfold.fold(model, x, merge_branches=True)
    assert not report.applied and report.verification is None
    assert report.merges == bnfold.report_for(folded).merges == bnfold.engine.plan(model, x, merge_branches=True).merges
    assert {m.into for m in report.merges} == {"0.kxk.0", "1.kxk.0", "2.kxk.0", "3.conv.0"}
    assert report.parameters_after == sum(p.numel() for p in folded.parameters())
    assert "would merge add_3: 1.scale.0, identity (1.identity) into 1.kxk.0" in str(report).splitlines()[-3]
    assert not any(line.lstrip().startswith("merged") for line in str(report).splitlines())
    assert type(model) is nn.Sequential and conv_calls(model, x) == 9
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


class InPlaceSum(nn.Module):
    """``h += BN(conv(h))`` on the output of a norm (folded into c0, so an nn.Identity by the time merges run);
    with ``read_after``, ``h`` is read again after the addition, where it holds the sum."""

    def __init__(self, read_after: bool) -> None:
        super().__init__()
        self.read_after = read_after
        self.c0, self.b0 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b0(self.c0(x))
        out = h.add_(self.bn(self.conv(h)))
        return out * h if self.read_after else out


@pytest.mark.parametrize("read_after", [False, True])
def test_an_in_place_sum_merges_only_when_nothing_reads_the_overwritten_tensor_afterwards(read_after: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = calibrated_by_training(InPlaceSum(read_after), x)
    folded = bnfold.fold(model, x, merge_branches=True)  # verified on x: a wrong merge raises VerificationError
    assert_same_outputs(model, folded, x)
    merged = [m for m in bnfold.report_for(folded).merges if m.status == "merged"]
    if read_after:  # torch.fx records `out * h` as reading h before the addition; a merge would make that true
        assert merged == []
    else:
        assert [(m.into, m.identities) for m in merged] == [("conv", ("input",))]
        assert conv_calls(folded, x) == 2


class ChangedBetweenReads(nn.Module):
    """Two branches of ``x``; ``where`` says when ``x`` is changed in place: before both reads (every branch sees
    the change), between them (each sees another value), or after the sum."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.stem, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True)
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.where == "before":
            self.act(x)  # ReLU(inplace=True): x itself is changed
        a = self.a(x)
        if self.where == "between":
            x.mul_(2)
        total = a + self.b(x)
        if self.where == "after":
            x.mul_(2)
        return total * x.mean()


@pytest.mark.parametrize("where", ["before", "between", "after"])
def test_a_tensor_changed_in_place_between_the_branches_reads_is_not_merged(where: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = ChangedBetweenReads(where).eval()
    folded = bnfold.fold(model, x, merge_branches=True)  # verified on x
    assert_same_outputs(model, folded, x)
    (merge,) = bnfold.report_for(folded).merges
    if where == "between":  # the merged conv would read x once: a(x) and b(x) read two values of it
        assert merge.status == "left" and "changed in place by mul_ between their reads" in (merge.reason or "")
    else:
        assert merge.status == "merged" and conv_calls(folded, x) == 2


class Refused(nn.Module):
    """A 3x3 and a 1x1 whose paddings do not centre it, and a sum with an activation in one branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1, padding=1)  # a 1x1 reading positions the 3x3 does not
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.d = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x) + nn.functional.pad(self.b(x), (-1, -1, -1, -1))
        return self.c(y) + nn.functional.relu(self.d(y))


def test_blocks_that_cannot_merge_are_left_with_their_reason() -> None:
    torch.manual_seed(0)
    model, x = Refused().eval(), torch.randn(1, 4, 8, 8)
    folded = bnfold.fold(model, x, merge_branches=True)
    assert type(folded) is Refused  # nothing merged: the model as without the option
    reasons = sorted(m.reason or "" for m in bnfold.report_for(folded).merges)
    assert len(reasons) == 2
    assert reasons[0].startswith("one of its terms comes from the operation F.pad, which is not a conv or linear layer")
    assert reasons[1].startswith("one of its terms comes from the operation F.relu, which is not a conv")


# Models torch.fx cannot trace as a whole are merged block by block: tests/test_merge_blocks.py.


@pytest.mark.parametrize("name", ["resnet50", "vgg16_bn"])
def test_models_without_reparameterisable_blocks_are_untouched_by_the_option(name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    model = calibrated_by_training(getattr(torchvision.models, name)(num_classes=10), x)
    plain = bnfold.fold(model, x)
    merged = bnfold.fold(model, x, merge_branches=True)
    assert type(merged) is type(plain)
    assert plain.state_dict().keys() == merged.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), merged.state_dict().values(), strict=True))
    report = bnfold.report_for(merged)
    assert all(m.status == "left" for m in report.merges)
    assert len(report.merges) == (16 if name == "resnet50" else 0)  # the residual sums, each with its reason


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "repvit_m0_9"])
def test_timm_reparameterisable_models_merge_as_far_as_timm(name: str) -> None:
    timm = pytest.importorskip("timm")
    from timm.utils import reparameterize_model

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = calibrated_by_training(timm.create_model(name, num_classes=10), x).double()
    x = x.double()
    folded = bnfold.fold(model, x, merge_branches=True)  # verified against the original at float64's tolerance
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # timm's fuse() creates new float32 layers otherwise
    try:
        timm_model = reparameterize_model(copy.deepcopy(model))
    finally:
        torch.set_default_dtype(default)
    assert_same_outputs(timm_model, folded, x, dtype=torch.float64)
    assert count_batch_norm_calls(folded, [x]) <= count_batch_norm_calls(timm_model, [x]) == 0
    assert conv_calls(folded, x) <= conv_calls(timm_model, x)
    report = bnfold.report_for(folded)
    assert report.verification is not None and report.verification["max_relative"] <= TOLERANCES[torch.float64]
    assert report.left == []


class LinearBranches(nn.Module):
    """Fully connected branches of one input, the input itself, and a BatchNorm1d of it (2-D activations)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.bn = nn.Linear(6, 6), nn.Linear(6, 6, bias=False), nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(x)
        return torch.relu(self.fc1(x) + self.fc2(x) + x + self.bn(x))


def test_linear_branches_and_identities_merge_into_one_linear() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    model = calibrated_by_training(LinearBranches(), x)
    folded = bnfold.fold(model, x, merge_branches=True)
    assert_same_outputs(model, folded, x)
    (merge,) = bnfold.report_for(folded).merges
    assert (merge.into, merge.layers, merge.identities) == ("fc1", ("fc2",), ("input", "bn"))
    assert conv_calls(folded, x) == 1 and count_batch_norm_calls(folded, [x]) == 0


# ------------------------------------------------------------------ differences, scales and split sums


def _timm_reference(model: nn.Module) -> nn.Module:
    from timm.utils import reparameterize_model

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # timm's fuse() creates new float32 layers otherwise
    try:
        return reparameterize_model(copy.deepcopy(model))
    finally:
        torch.set_default_dtype(default)


def test_repmixer_merges_into_one_depthwise_conv() -> None:
    """FastViT's RepMixer, x + gamma * (mixer(x) - norm(x)), is one depthwise convolution (as timm makes it)."""
    fastvit = pytest.importorskip("timm.models.fastvit")
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 12)
    model = random_layer_scales(calibrated_by_training(fastvit.RepMixer(8), x)).double()
    x = x.double()
    folded = bnfold.fold(model, x, merge_branches=True)
    assert_same_outputs(model, folded, x, dtype=torch.float64)
    assert_same_outputs(_timm_reference(model), folded, x, dtype=torch.float64)
    assert conv_calls(folded, x) == 1 and count_batch_norm_calls(folded, [x]) == 0
    assert [n.op for n in folded.graph.nodes] == ["placeholder", "call_module", "output"]
    (merge,) = bnfold.report_for(folded).merges
    assert merge.into == "mixer.conv_kxk.0.conv" and merge.layers == ("mixer.conv_scale.conv",)
    assert merge.identities == ("input", "mixer.identity", "norm.identity") and merge.kept == ()
    assert not any(name.startswith("layer_scale") for name, _ in folded.named_parameters())


@pytest.mark.parametrize(("name", "blocks"), [("fastvit_t8", 10), ("repghostnet_100", 16)])
def test_fastvit_and_repghostnet_merge_at_least_as_far_as_timm(name: str, blocks: int) -> None:
    """fastvit_t8: every RepMixer merges (timm leaves 10 norms, bnfold none); repghostnet_100: the ghost modules
    whose sum is added to the shortcut merge with the shortcut kept (timm leaves 48 norms, bnfold none)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = random_layer_scales(calibrated_by_training(timm.create_model(name, num_classes=10), x)).double()
    x = x.double()
    folded = bnfold.fold(model, x, merge_branches=True)  # verified against the original at float64's tolerance
    timm_model = _timm_reference(model)
    assert_same_outputs(timm_model, folded, x, dtype=torch.float64)
    assert count_batch_norm_calls(folded, [x]) == 0 < count_batch_norm_calls(timm_model, [x])
    assert conv_calls(folded, x) <= conv_calls(timm_model, x)
    report = bnfold.report_for(folded)
    assert report.left == []
    if name == "fastvit_t8":
        mixers = [m for m in report.merges if m.status == "merged" and "norm.identity" in "".join(m.identities)]
        assert len(mixers) == blocks and all(m.kept == () for m in mixers)
    else:
        split = [m for m in report.merges if m.kept]
        assert len(split) == blocks and all(m.status == "merged" and "ghost2" in (m.into or "") for m in split)
        assert all(m.status == "merged" for m in report.merges)


@pytest.mark.parametrize("shortcut", [True, False])
def test_a_sum_with_a_residual_merges_the_terms_of_one_tensor(shortcut: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    model = calibrated_by_training(Residual(shortcut), x).double()
    x = x.double()
    folded = bnfold.fold(model, x, merge_branches=True)
    assert_same_outputs(model, folded, x, dtype=torch.float64)
    (merge,) = bnfold.report_for(folded).merges
    assert (merge.status, merge.into, merge.layers, merge.identities) == ("merged", "dw3.0", ("dw1.0",), ("bn",))
    assert merge.kept == (("shortcut_1",) if shortcut else ("repeat",))  # what the sum read: the folded norm
    assert count_batch_norm_calls(folded, [x]) == 0
    assert conv_calls(folded, x) == 2 + shortcut  # primary, the merged conv, the shortcut


def test_differences_negations_and_scales_in_all_spellings_merge() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    model = calibrated_by_training(Differences(), x).double()
    x = x.double()
    folded = bnfold.fold(model, x, merge_branches=True)
    assert_same_outputs(model, folded, x, dtype=torch.float64)
    (merge,) = bnfold.report_for(folded).merges
    assert merge.status == "merged" and set(merge.layers) | {merge.into} == {"a", "b", "c"}
    assert merge.identities == ("bn", "input") and merge.kept == ()
    assert conv_calls(folded, x) == 1 and count_batch_norm_calls(folded, [x]) == 0


def test_an_in_place_scale_of_a_tensor_other_layers_read_stays_a_term() -> None:
    """``x.mul_(beta)`` overwrites the tensor the branches read: torch.fx records their reads as reads of the value
    before it, so the product is not merged (it stays, added to the merged conv's output)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    model = calibrated_by_training(Differences(overwrite_input=True), x).double()
    x = x.double()
    folded = bnfold.fold(model, x, merge_branches=True)
    assert_same_outputs(model, folded, x, dtype=torch.float64)
    (merge,) = bnfold.report_for(folded).merges
    assert merge.status == "merged" and merge.identities == ("bn",) and merge.kept == ("mul__1",)


def test_products_that_are_no_per_channel_constant_are_left_with_their_reason() -> None:
    torch.manual_seed(0)
    model, x = Unmergeable().eval(), torch.randn(1, 4, 8, 8)
    folded = bnfold.fold(model, x, merge_branches=True)
    assert type(folded) is Unmergeable
    reasons = sorted(m.reason or "" for m in bnfold.report_for(folded).merges)
    no_split = "; merging only the terms that read one tensor would remove no layer or norm"
    assert reasons == [
        "one of its terms is the operation x * y, a product of module 'b' (Conv2d) and the operation torch.sigmoid: "
        "a non-constant multiplier" + no_split,
        "one of its terms is the operation x * y, which multiplies by 'positions' of shape (4, 8, 8): the scale is "
        "not per channel" + no_split,
    ]


def test_a_layer_output_added_to_itself_is_left_not_merged_once() -> None:
    """torch.fx lists y once among the inputs of y + y: merging used to count it once (caught by verification)."""
    torch.manual_seed(0)
    model, x = Twice().eval(), torch.randn(1, 4, 8, 8)
    folded = bnfold.fold(model, x, merge_branches=True)
    assert type(folded) is Twice
    (merge,) = bnfold.report_for(folded).merges
    assert (merge.reason or "").startswith("it adds the output of module 'a' (Conv2d) to itself")


def test_a_merged_graph_module_calls_no_identity_and_keeps_its_state_dict() -> None:
    """The folded norms left as nn.Identity are taken out of the merged forward (each was a Python call for
    nothing); the state_dict keys are those of the model that would be merged without that."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = calibrated_by_training(net(), x)
    folded = bnfold.fold(model, x, merge_branches=True)
    assert not any(n.op == "call_module" and isinstance(folded.get_submodule(n.target), nn.Identity)
                   for n in folded.graph.nodes)
    assert not any(isinstance(m, nn.Identity) for m in folded.modules())
    assert_same_outputs(model, folded, x)
    names = set(folded.state_dict())  # the model's own names: fewer (merged branches, absorbed norms), none new
    assert names < set(bnfold.fold(model, x).state_dict())
    assert {f"{i}.kxk.0.weight" for i in range(3)} | {"3.conv.0.weight"} <= names
