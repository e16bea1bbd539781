"""The public entry points: :func:`fold` and :func:`plan`, the pipeline capture -> plan -> apply -> verify."""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import weakref
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from .backends.block_merges import merge_blocks
from .backends.capture import MODEL_CALLS_LOCK, as_input_tuple, capture
from .backends.module_merges import merge_traced
from .backends.module_tree import ModuleTree
from .backends.modules import ModuleWeights, Rollback, layer_rule, norm_modes, to_graph
from .core import pipeline
from .core.apply import DryRun, apply_plan
from .core.graph import Graph
from .core.pipeline import NormModes, Planned
from .core.plan import FoldPlan
from .errors import InvalidInputError, NonFiniteOutputError, UndecidedError, VerificationError
from .judge import VerificationResult
from .layers import DEFAULT_REGISTRY, LayerRegistry, LinearLayerRule, NormRule, identity_replacement
from .report import FoldReport
from .verification import default_tolerance, judge_batch, noise_floor, run_seeded, touched_tensors

log = logging.getLogger(__name__)

ExampleInputs = torch.Tensor | Sequence[Any] | None
MergeBranches = bool | Literal["blocks"]
"""``fold(..., merge_branches=)``: False, True (the whole model's traced graph, block by block where torch.fx cannot
trace it whole) or ``"blocks"`` (block by block: the model keeps its class)."""

_reports: weakref.WeakKeyDictionary[nn.Module, FoldReport] = weakref.WeakKeyDictionary()


def _is_compiled(model: Any) -> bool:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # noqa: BLE001 - a torch without dynamo has no compiled modules
        return False
    return isinstance(model, OptimizedModule)


def _check_model(model: Any) -> ModuleTree:
    """Raise the error for a model bnfold cannot fold; return its :class:`ModuleTree` (walked once, here)."""
    if _is_compiled(model):
        raise InvalidInputError(
            "this module was made by torch.compile, whose compiled graph bnfold cannot see into; fold the module "
            "before compiling it (torch.compile(bnfold.fold(model))), or pass compiled._orig_mod and compile the "
            "result again"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise InvalidInputError(
            "this is a TorchScript module, whose layers bnfold.engine.fold cannot rewrite in Python: bnfold.fold(module) "
            "folds it into a frozen TorchScript module"
        )
    if not isinstance(model, nn.Module):
        raise InvalidInputError(
            f"bnfold.engine.fold takes a torch.nn.Module, got {type(model).__name__}; bnfold.fold takes every kind "
            "bnfold folds (a ScriptModule, an ExportedProgram, an onnx.ModelProto, a model file's path)"
        )
    tree = ModuleTree(model)
    meta = tree.census.first_meta
    if meta is not None:
        raise InvalidInputError(
            f"the tensor '{meta}' of {type(model).__name__} is on the meta device: its weights are not materialised, "
            f"so there is nothing to fold. Load them first, e.g. model.to_empty(device='cpu') then "
            f"model.load_state_dict(state_dict)"
        )
    return tree


def _count(model: nn.Module | ModuleTree) -> tuple[int, int]:
    """The model's parameter and buffer counts (from its tree, if it has one made already)."""
    census = (model if isinstance(model, ModuleTree) else ModuleTree(model)).census
    return census.parameters, census.buffers


class ModuleBackend:
    """:class:`bnfold.core.pipeline.FoldBackend` for an ``nn.Module``: its dataflow is captured (torch.fx, or one
    watched forward pass), its weights changed in place."""

    exported = False
    measures_counts = True

    def __init__(self, model: nn.Module, inputs: tuple[Any, ...] | None, registry: LayerRegistry) -> None:
        self.tree: ModuleTree | None = _check_model(model)
        self.model, self.inputs, self.registry, self.name = model, inputs, registry, type(model).__name__
        self.access = ModuleWeights(model, registry, tree=self.tree)

    def norm_modes(self) -> NormModes:
        assert self.tree is not None
        return norm_modes(module for _, module in self.tree.unique)

    def translate(self) -> Graph:
        assert self.tree is not None
        self.flow = capture(self.model, self.inputs, self.registry, self.tree)
        return to_graph(self.model, self.flow, self.registry, self.tree)

    def weights(self) -> ModuleWeights:
        return self.access

    def counts(self) -> tuple[int, int]:
        return _count(self.tree if self.tree is not None else self.model)

    def released(self, norm: str) -> tuple[int, int]:
        """The norm's own parameters and buffers, less what its replacement keeps (a fused activation's)."""
        assert self.tree is not None
        module = self.tree.get(norm)
        rule = self.registry.norm(module).rule
        kept: set[int] = set()
        if isinstance(rule, NormRule) and rule.replacement is not identity_replacement:  # Identity keeps nothing
            replacement = rule.replacement(module)
            kept = {id(t) for t in (*replacement.parameters(), *replacement.buffers())}
        lazy = nn.parameter.UninitializedTensorMixin
        leaf = not module._modules  # a norm is mostly a leaf
        own = (module._parameters.values(), module._buffers.values()) if leaf else (module.parameters(), module.buffers())
        return tuple(  # type: ignore[return-value]
            sum(t.numel() for t in tensors if t is not None and id(t) not in kept and not isinstance(t, lazy))
            for tensors in own
        )

    def lacks_bias(self, layer: str) -> bool:
        assert self.tree is not None
        module = self.tree.get(layer)
        rule, _ = layer_rule(module, self.registry)
        return isinstance(rule, LinearLayerRule) and getattr(module, rule.bias_name, None) is None

    def finish(self) -> None:
        self.tree = None  # the tree's counts are the model's before the folds


@contextlib.contextmanager
def _collector_paused() -> Any:
    """Python's cyclic garbage collector off for a fold's bookkeeping, back as it was after.

    A fold allocates tens of thousands of small objects (the fx graph, sites, the core graph, the report), none of
    them garbage until it ends; each allocation threshold crossed meanwhile runs a collection that scans them again,
    and now and then every object of the process (a tenth of resnet50's in-place fold time). Paused, the young
    objects are scanned once, by the first collection after the fold; it also collects what the fold leaves as
    cyclic garbage (the fx graph).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@_collector_paused()
def plan(
    model: nn.Module,
    example_inputs: ExampleInputs = None,
    *,
    registry: LayerRegistry | None = None,
    merge_branches: MergeBranches = False,
) -> FoldReport:
    """Dry run: the report of what :func:`fold` would do, without changing anything.

    ``example_inputs`` (a tensor or a tuple of the forward's positional arguments) are needed only for models that
    torch.fx cannot trace; given anyway, they let bnfold check activation shapes and that the traced graph is the
    model.

    With ``merge_branches`` the report also lists the blocks of summed branches that would merge, and why the
    others would not: the preview of every format (:func:`bnfold.core.pipeline.merge_preview`), which folds and
    merges a copy of ``model``, unverified; the model itself is not touched.
    """
    if merge_branches:
        return pipeline.merge_preview(report_for(fold(model, example_inputs, verify=False, registry=registry,
                                                      merge_branches=merge_branches)))
    with MODEL_CALLS_LOCK:
        backend = ModuleBackend(model, as_input_tuple(example_inputs), registry or DEFAULT_REGISTRY)
        planned = pipeline.plan(backend)
    with torch.no_grad():
        pipeline.apply(planned, DryRun(planned.access))
    pipeline.project(planned)
    return planned.report


@_collector_paused()
def fold(
    model: nn.Module,
    example_inputs: ExampleInputs = None,
    *,
    inplace: bool = False,
    verify: bool | None = None,
    tolerance: float | None = None,
    registry: LayerRegistry | None = None,
    merge_branches: MergeBranches = False,
) -> nn.Module:
    """Fold every batch norm that can be folded exactly into its neighbouring conv / linear layer.

    Returns a model of the same class with each folded norm replaced by ``nn.Identity`` (or, for a fused
    norm-activation module, its activation) and the absorbing layers' weights and biases updated; dtype, device and
    ``requires_grad`` are kept. The report of what was folded and what was left alone (and why) is
    :func:`report_for` of the returned model.

    With ``merge_branches=True`` bnfold goes on to re-parameterise blocks that sum parallel branches of one input
    (RepVGG, MobileOne, RepViT, ...: ``conv3x3(x) + conv1x1(x) + BN(x)`` becomes one 3x3 convolution; see
    :mod:`bnfold.core.merge` for when that is exact). Where a block merges, the result is a
    ``torch.fx.GraphModule`` of the traced model (same module names), not the model's own class; a model with
    nothing to merge is returned as without the option. Where torch.fx cannot trace the model as a whole, or
    with ``merge_branches="blocks"``, branches are merged block by block and the model keeps its class
    (:mod:`bnfold.backends.block_merges`). ``report.merges`` lists every block merged or left, with the
    reason. Merges are made on a copy even with ``inplace=True`` (``model`` then gets the folds only).

    Args:
        model: an ``nn.Module`` in eval mode.
        example_inputs: a tensor or a tuple of the forward's positional arguments. Needed when torch.fx cannot trace
            the model (bnfold then learns the dataflow from one forward pass); when given, the folded model's outputs
            are checked against the original's.
        inplace: fold ``model`` itself instead of a copy. Default ``False``: the caller's model is left untouched.
        verify: compare outputs on ``example_inputs`` (default: whenever they are given). On a mismatch a
            :class:`~bnfold.errors.VerificationError` is raised and, with ``inplace=True``, every change is undone.
        tolerance: largest accepted ``max|a - b| / max|a|`` per output; default from the model's dtype
            (:func:`bnfold.verification.default_tolerance`).
        registry: the layer rules to fold with (default: built-ins plus what was registered).
        merge_branches: also merge summed parallel branches into one layer: ``True`` (the result may be a
            GraphModule) or ``"blocks"`` (block by block: the model keeps its class; needs ``example_inputs``).

    A norm whose fold would store a weight or bias its dtype cannot hold (float16 ends at 65504) is left, with that
    reason in the report. Folds from several threads at once are safe (bnfold serialises its traces and model runs).

    Raises:
        InvalidInputError: not an ``nn.Module`` (a TorchScript module, a ``torch.compile`` result), weights on the
            meta device, example inputs of the wrong kind, or ``merge_branches="blocks"`` without example inputs.
        TrainingModeError: the model is in training mode.
        CaptureError: torch.fx cannot trace the model and no (working) example inputs were given.
        NonFiniteStatisticsError: a norm to fold has NaN or infinite statistics.
        NonFiniteOutputError: the original model's own output on ``example_inputs`` is NaN: nothing to verify against.
        VerificationError: the folded outputs differ from the original's beyond the tolerance (and beyond what
            float rounding explains, see :func:`bnfold.verification.explained_by_rounding`).
    """
    registry = registry or DEFAULT_REGISTRY
    inputs = as_input_tuple(example_inputs)
    verify = inputs is not None if verify is None else verify
    if verify and inputs is None:
        raise InvalidInputError("verify=True needs example_inputs to run both models on")
    if not (isinstance(merge_branches, bool) or merge_branches == "blocks"):
        raise InvalidInputError(f"merge_branches must be False, True or \"blocks\", got {merge_branches!r}")
    if merge_branches == "blocks" and inputs is None:
        raise InvalidInputError(
            'merge_branches="blocks" needs example_inputs: each block is merged on the inputs it receives in one '
            "forward pass of the model"
        )
    with MODEL_CALLS_LOCK:
        backend = ModuleBackend(model, inputs, registry)
        tree = backend.tree
        assert tree is not None
        planned = pipeline.plan(backend)
        the_plan, report = planned.plan, planned.report
        if verify:
            assert inputs is not None
            reference = run_seeded(model, inputs)
            touched = touched_tensors(model, [name for fold in the_plan.folds for name in (fold.norm, *fold.layers)])
            perturbed = noise_floor(model, touched, inputs)
    target = model if inplace else _copy(model)
    # A copy may be multiplied in place freely; the caller's own model only when no verification may undo it.
    rollback = _apply(target, planned, registry, in_place=not (inplace and verify),
                      tree=tree if target is model else None)
    try:
        if merge_branches:
            target = _merge(copy.deepcopy(target) if inplace else target, inputs, registry, report, merge_branches)
        if verify:
            assert inputs is not None
            with MODEL_CALLS_LOCK:
                folded_outputs = run_seeded(target, inputs)
    except BaseException:
        rollback.restore()
        raise
    if verify:
        assert inputs is not None
        limit = tolerance if tolerance is not None else default_tolerance(model)
        comparison = judge_batch(
            model, inputs, reference, folded_outputs, limit, perturbed, touched,
            lambda result: _refusal(type(model).__name__, reference, result),
            restore=rollback.restore if inplace else None, reapply=lambda: _apply(model, planned, registry),
            folded_float64=lambda: _copy(target).double(), exact_fold=lambda: _exact_fold(model, planned, registry))
        report.verification = comparison.to_dict()
        if comparison.max_relative > limit:
            report.notes.append(
                f"outputs differ by {comparison.max_relative:.2g} (relative), above the tolerance {limit:g}, but by no "
                + (f"more than one rounding step of the folded weights explains ({comparison.describe()})"
                   if comparison.rounding_check is None else
                   "more than the model's own float rounding explains (checked against a float64 evaluation)"))
    report.applied = True
    counts = None
    if target is model and not verify and not merge_branches:  # one fold, recorded by ``rollback``: no new walk
        counts = tree.counts_after(rollback.replacements())
    report.parameters_after, report.buffers_after = counts if counts is not None else _count(target)
    _reports[target] = report
    log.info("%s", report.summary())
    return target


def _apply(target: nn.Module, planned: Planned, registry: LayerRegistry, *, in_place: bool = False,
           tree: ModuleTree | None = None) -> Rollback:
    """Fold ``target`` (``planned``'s model or a copy of it) in place; on an exception everything done is undone
    (bit for bit unless ``in_place``: see :class:`~bnfold.backends.modules.Rollback`). A fold that would overflow
    the layer's dtype is not applied: its norm is reported as left, with the reason. ``tree``: the model's, if
    ``target`` is the model planned."""
    rollback = Rollback()
    try:
        with torch.no_grad(), torch.inference_mode(False):
            pipeline.apply(planned, ModuleWeights(target, registry, rollback, in_place=in_place, tree=tree))
    except BaseException:
        rollback.restore()
        raise
    return rollback


def _merge(model: nn.Module, inputs: tuple[Any, ...] | None, registry: LayerRegistry, report: FoldReport,
           how: bool | str) -> nn.Module:
    """Merge the summed branches of the folded ``model`` (owned here), folding what each round makes foldable;
    the report gets the blocks, and the norms folded or absorbed on the way. ``how``: ``True`` merges in the whole
    model's traced graph, or block by block where torch.fx cannot trace it; ``"blocks"`` block by block only."""

    def fold_again(module: nn.Module, module_inputs: tuple[Any, ...] | None, prefix: str) -> FoldPlan:
        planned, entries = pipeline.refold(ModuleBackend(module, module_inputs, registry), prefix)
        report.absorb_merged_norms({}, entries)
        return planned.made()

    # Merges trace the model with torch.fx (and run it) again: while no other thread traces (see MODEL_CALLS_LOCK).
    with MODEL_CALLS_LOCK, torch.no_grad(), torch.inference_mode(False):  # new weights usable outside inference mode
        whole_failure = None
        if how is True:
            outcome = merge_traced(model, registry, inputs, fold_again)
            whole_failure = outcome.failure
        if how == "blocks" or whole_failure is not None:
            assert inputs is not None  # checked by fold(); an untraceable model was folded on them already
            outcome = merge_blocks(model, registry, inputs, fold_again)
            if whole_failure is not None:
                outcome.notes.insert(0, (
                    f"{type(model).__name__} was not merged as a whole, {whole_failure}: branches were merged inside "
                    f"the modules whose own forward torch.fx traces"
                ))
    report.absorb_merged_norms(outcome.absorbed_norms)
    report.merges = outcome.entries
    report.notes.extend(outcome.notes)
    return outcome.model


def _exact_fold(model: nn.Module, planned: Planned, registry: LayerRegistry) -> nn.Module:
    """The folds made (not those left because they would overflow) carried out on a float64 copy of ``model``, for
    the second opinion (:func:`bnfold.verification.explained_by_rounding`)."""
    exact_fold = _copy(model).double()
    with torch.no_grad():
        apply_plan(planned.made(), ModuleWeights(exact_fold, registry))
    return exact_fold


def _refusal(name: str, reference: Any, comparison: VerificationResult) -> Exception:
    """The error of a fold of ``name`` that ``comparison`` refuses (the original's outputs: ``reference``)."""
    if comparison.undecided:
        return UndecidedError(
            f"the fold of {name} cannot be verified: {comparison.undecided}. The model was left unchanged; pass "
            f"verify=False to fold without the check."
        )
    if not comparison.judged and _holds_nan(reference):
        return NonFiniteOutputError(
            f"the original {name}'s own output is NaN on the example inputs, so whether the fold is right cannot be "
            f"checked. The model was left unchanged; check the model (weights, norm statistics) and the inputs, or "
            f"pass verify=False."
        )
    return VerificationError(
        f"the folded {name} differs from the original: {comparison.worst()}. The model was left unchanged. Please "
        f"report this with the model; bnfold.plan(model) shows which folds were attempted."
    )


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy whose tensors are normal tensors even under ``torch.inference_mode()`` (so it can be trained)."""
    with torch.inference_mode(False):
        return copy.deepcopy(model)


def _holds_nan(outputs: Any) -> bool:
    leaves = torch.utils._pytree.tree_leaves(outputs)
    return any(isinstance(v, torch.Tensor) and v.is_floating_point() and bool(torch.isnan(v).any()) for v in leaves)


def report_for(model: nn.Module) -> FoldReport:
    """The report of the :func:`fold` call that returned ``model``."""
    try:
        return _reports[model]
    except KeyError:
        raise InvalidInputError(
            "this model was not returned by bnfold.fold() in this session; call bnfold.plan(model) for a dry-run report"
        ) from None
