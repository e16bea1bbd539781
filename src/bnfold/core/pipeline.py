"""The one fold driver: the steps every format takes in the same order, written once.

A format (a :class:`FoldBackend`) only translates its model into the core graph, gives access to its weights and
writes the decisions back. Here: the training-mode rule before anything runs the model (:func:`check_mode`),
translate, plan, check the statistics, apply (a fold that would overflow is left), and the report, whose counts
after the fold are projected where the format cannot count them (a dry run, a frozen graph). Torch-free.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import TrainingModeError
from ..report import FOLDED, LEFT, FoldReport, NormEntry
from .apply import DryRun, FoldOverflow, NormMaps, WeightAccess, apply_plan, check_statistics
from .graph import Graph
from .plan import Fold, FoldPlan, make_plan


@dataclass(frozen=True)
class NormModes:
    """The fact the training-mode rule reads: of the model's norms that have running statistics, how many there
    are and how many are set to normalise with the statistics of each batch instead."""

    with_running_statistics: int
    in_training_mode: int


class FoldBackend(Protocol):
    """One format, as the driver sees it.

    ``name``: the model's name in the report. ``exported``: its mode was fixed when it was exported (``.pt2``,
    ONNX), so the remedy for training mode is to export it again. ``measures_counts``: :meth:`counts` (parameter and
    buffer elements) is exact after the folds are written, else the driver projects it from :meth:`released` (what
    leaves with a folded norm) and :meth:`lacks_bias`. :meth:`norm_modes` is read before :meth:`translate`
    (translating may run the model); :meth:`finish` makes the written folds part of the model (dead code out...).
    """

    name: str
    exported: bool
    measures_counts: bool

    def norm_modes(self) -> NormModes: ...
    def translate(self) -> Graph: ...
    def weights(self) -> WeightAccess: ...
    def counts(self) -> tuple[int, int]: ...
    def released(self, norm: str) -> tuple[int, int]: ...
    def lacks_bias(self, layer: str) -> bool: ...
    def finish(self) -> None: ...


def check_mode(backend: FoldBackend) -> None:
    """The whole-model training-mode rule, the same for every format: a model all of whose norms with running
    statistics normalise with the statistics of each batch is in training mode, and is refused as a whole (one norm
    in training mode inside an eval model is only left, with its reason)."""
    modes = backend.norm_modes()
    if not modes.with_running_statistics or modes.in_training_mode < modes.with_running_statistics:
        return
    remedy = (
        "call model.eval() before torch.export.export or torch.onnx.export and export it again" if backend.exported
        else "call .eval() on it first (model.eval(); on the command line, pass --eval)"
    )
    raise TrainingModeError(
        f"{backend.name} is in training mode, where batch norm uses the statistics of each batch and folding would "
        f"change what it computes; {remedy}"
    )


@dataclass
class Planned:
    """A plan and what the steps after it need: the graph it was made on, the weights, the norms' maps, the report."""

    graph: Graph
    plan: FoldPlan
    access: WeightAccess
    maps: NormMaps
    report: FoldReport
    released: dict[str, tuple[int, int]] = field(default_factory=dict)  # fold norm -> (parameters, buffers)
    unbiased: set[str] = field(default_factory=set)  # layers folds will give a bias

    def made(self) -> FoldPlan:
        """The plan of the folds made: without those left because they would overflow."""
        left = {e.name for e in self.report.entries if e.status == LEFT}
        return dataclasses.replace(self.plan, folds=[f for f in self.plan.folds if f.norm not in left])


def entries(graph: Graph, the_plan: FoldPlan) -> list[NormEntry]:
    """One entry per norm: the folds in the order they are made (a chain's first norm first), then the norms left,
    with the reason."""
    units = graph.units
    return [
        NormEntry(d.norm, units[d.norm].type_name, getattr(units[d.norm].norm, "channels", None) or None, FOLDED,
                  into=d.layers, direction=d.direction) if isinstance(d, Fold)
        else NormEntry(d.norm, units[d.norm].type_name, getattr(units[d.norm].norm, "channels", None) or None, LEFT,
                       reason=d.reason)
        for d in [*the_plan.folds, *the_plan.refusals]
    ]


def plan(backend: FoldBackend, *, project: bool = True, mode: bool = True) -> Planned:
    """Check the mode, translate, plan, check the statistics, and start the report (``applied=False``).

    ``project``: read what the folds will release, to project the counts after them (:func:`project`); not needed
    when the backend counts them after the fold. ``mode``: apply the training-mode rule (not between merge rounds,
    where the norms left may all be in training mode although the model was not).
    """
    if mode:
        check_mode(backend)
    graph = backend.translate()
    the_plan = make_plan(graph)
    access = backend.weights()
    maps = check_statistics([fold.norm for fold in the_plan.folds], access)
    parameters, buffers = backend.counts()
    report = FoldReport(
        model=backend.name, applied=False, capture=the_plan.method, entries=entries(graph, the_plan),
        parameters_before=parameters, parameters_after=parameters, buffers_before=buffers, buffers_after=buffers,
        notes=list(the_plan.notes),
    )
    planned = Planned(graph, the_plan, access, maps, report)
    if project:
        planned.released = {fold.norm: backend.released(fold.norm) for fold in the_plan.folds}
        layers = dict.fromkeys(layer for fold in the_plan.folds for layer in fold.layers)
        planned.unbiased = {layer for layer in layers if backend.lacks_bias(layer)}
    return planned


def project(planned: Planned) -> None:
    """The report's counts after the folds made: their norms' parameters and buffers go, each layer without a
    bias gets one (what a dry run reports, without folding to find out)."""
    made = planned.made().folds
    report = planned.report
    units = planned.graph.units
    biased = {layer for fold in made for layer in fold.layers} & planned.unbiased
    added = sum(units[layer].layer.out_channels for layer in biased)  # type: ignore[union-attr]
    report.parameters_after = report.parameters_before + added - sum(planned.released[f.norm][0] for f in made)
    report.buffers_after = report.buffers_before - sum(planned.released[f.norm][1] for f in made)


def apply(planned: Planned, access: WeightAccess | None = None) -> list[FoldOverflow]:
    """Apply the plan through ``access`` (the planned weights by default); the folds that would overflow are not
    made, and their norms are reported as left with the reason."""
    overflows = apply_plan(planned.plan, access if access is not None else planned.access, planned.maps)
    reasons = {overflow.norm: str(overflow) for overflow in overflows}
    if reasons:
        planned.report.entries = [
            dataclasses.replace(e, status=LEFT, into=(), direction=None, reason=reasons[e.name])
            if e.name in reasons else e
            for e in planned.report.entries
        ]
    return overflows


def dry_run(backend: FoldBackend) -> Planned:
    """The report of what folding would do, arithmetic included (a fold that would overflow is left), without
    changing the model."""
    planned = plan(backend)
    apply(planned, DryRun(planned.access))
    project(planned)
    return planned


def fold(backend: FoldBackend, *, mode: bool = True) -> Planned:
    """Plan and make the folds; the report counts what the model holds after them (``applied=True``)."""
    planned = plan(backend, project=not backend.measures_counts, mode=mode)
    apply(planned)
    backend.finish()
    if backend.measures_counts:
        planned.report.parameters_after, planned.report.buffers_after = backend.counts()
    else:
        project(planned)
    planned.report.applied = True
    return planned


def merge_preview(report: FoldReport) -> FoldReport:
    """The dry run of a fold with ``merge_branches``, in every format: ``report`` (of the format's fold and merges,
    on a copy of the model, unverified), marked as not applied and returned. Which blocks merge depends on the
    folds made before them, so the preview makes them rather than planning them ahead."""
    report.applied = False
    return report


def refold(backend: FoldBackend, prefix: str = "") -> tuple[Planned, dict[str, NormEntry]]:
    """Fold what a merge round made foldable; returns what was planned, and the round's entries of the norms it
    folded or left because the fold would overflow (named with ``prefix``, for a block folded on its own), for
    :meth:`~bnfold.report.FoldReport.absorb_merged_norms`."""
    planned = fold(backend, mode=False)
    planned_norms = {fold.norm for fold in planned.plan.folds}
    return planned, {
        prefix + e.name: dataclasses.replace(e, name=prefix + e.name, into=tuple(prefix + n for n in e.into))
        for e in planned.report.entries if e.name in planned_norms
    }

