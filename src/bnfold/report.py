"""FoldReport: what was folded into what, what was left alone and why, and what it saved.

One report format for every entry point (the Python API, the CLI, the ONNX backend): a table for people (rich when
it is installed, plain text otherwise) and plain JSON-able data for scripts (:meth:`FoldReport.to_dict`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .judge import describe_inputs

FOLDED = "folded"
LEFT = "left"
MERGE = "merge"
"""The direction of a norm on an identity branch, absorbed when its block merged into one layer."""


@dataclass(frozen=True)
class NormEntry:
    """One norm layer (or ONNX BatchNormalization node) and what folding does with it.

    ``into`` names the layer(s) it folds into and ``direction`` is ``"forward"`` (into the layer before it),
    ``"backward"`` (into the layers after it) or ``"merge"`` (a norm on an identity branch, absorbed by the layer its
    block merged into, ``fold(..., merge_branches=True)``); for a norm left alone, ``reason`` says why, in words a user can
    act on.
    """

    name: str
    kind: str
    channels: int | None
    status: str
    into: tuple[str, ...] = ()
    direction: str | None = None
    reason: str | None = None


MERGED = "merged"


@dataclass(frozen=True)
class MergeEntry:
    """One block of summed parallel branches (``fold(..., merge_branches=True)``) and what became of it.

    ``block`` names the sum as the dataflow shows it; a merged block lists the layer that now computes it
    (``into``), the other branch layers merged into it (``layers``) and its identity branches (``identities``:
    the norm of each, or ``"input"`` for the input itself); a block left alone has ``reason``. A sum whose terms
    read different tensors merges the terms of one tensor: ``kept`` names the terms that stay added to ``into``'s
    output (a residual). ``region``: the module whose own traced forward the block was found in, when branches were
    merged block by block (a model torch.fx cannot trace as a whole, or ``merge_branches="blocks"``); None when the
    whole model was traced.
    """

    block: str
    status: str  # MERGED | LEFT
    into: str | None = None
    layers: tuple[str, ...] = ()
    identities: tuple[str, ...] = ()
    reason: str | None = None
    kept: tuple[str, ...] = ()
    region: str | None = None


def print_whole(console: Any, *renderables: Any) -> None:
    """Print each renderable on a rich ``console`` without cutting a number or a name.

    On a terminal, rich lays tables out to the terminal's width (a cell too long for its column wraps onto the next
    line). Anywhere else (a pipe, a file, ``tee``, a CI log) there is no width to respect, and rich's default of 80
    columns would cut cells with an ellipsis (``11,689…``): the output is printed at the width its widest row needs,
    so every cell stays on its line, whole.
    """
    if console.is_terminal:
        for renderable in renderables:
            console.print(renderable)
        return
    from rich.measure import Measurement

    unbounded = console.options.update_width(1 << 20)
    needed = max((Measurement.get(console, unbounded, r).maximum for r in renderables), default=0)
    previous = console.width
    console.width = max(previous, needed)
    try:
        for renderable in renderables:
            console.print(renderable)
    finally:
        console.width = previous


class RichPrintable:
    """``print()`` for result objects that render with rich (``__rich__``) and as plain text (``__str__``), and
    ``to_json()`` for those whose ``to_dict()`` gives plain data."""

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)  # type: ignore[attr-defined]

    def print(self, console: Any = None) -> None:
        """Print as a rich table when rich is installed, as plain text otherwise; never a cut cell
        (:func:`print_whole`)."""
        try:
            from rich.console import Console
        except ImportError:
            print(self)
            return
        print_whole(console or Console(), self)


@dataclass
class FoldReport(RichPrintable):
    """The outcome of planning or folding one model.

    Attributes:
        model: the model's class (or file) name.
        applied: ``False`` for a dry run (:func:`bnfold.plan`), ``True`` once the folds were made.
        capture: how the dataflow was learnt (``"torch.fx"``, ``"forward pass"``, ``"onnx graph"``).
        entries: one :class:`NormEntry` per norm: the folds in the order they are made, then the norms left.
        parameters_before / parameters_after: trainable parameter counts (buffers excluded); for a dry run,
            ``parameters_after`` is what the fold would leave.
        buffers_before / buffers_after: element counts of buffers (running statistics and the like).
        notes: anything the user should know that is not a per-norm decision.
        verification: filled in when the folded model was checked against the original (max errors, tolerance).
        merges: with ``merge_branches=True``, one :class:`MergeEntry` per block of summed branches.
    """

    model: str
    applied: bool
    capture: str
    entries: list[NormEntry]
    parameters_before: int
    parameters_after: int
    buffers_before: int = 0
    buffers_after: int = 0
    notes: list[str] = field(default_factory=list)
    verification: dict[str, Any] | None = None
    merges: list[MergeEntry] = field(default_factory=list)

    @property
    def folded(self) -> list[NormEntry]:
        return [e for e in self.entries if e.status == FOLDED]

    @property
    def left(self) -> list[NormEntry]:
        return [e for e in self.entries if e.status == LEFT]

    def touched(self) -> list[str]:
        """The names of every layer and norm a fold or merge changed (what :mod:`bnfold.judge` perturbs)."""
        names = [n for e in self.folded for n in (e.name, *e.into)]
        names += [n for m in self.merges if m.status == MERGED and m.into
                  for n in (m.into, *m.layers, *(i for i in m.identities if i != "input"))]
        return list(dict.fromkeys(names))

    @property
    def parameters_removed(self) -> int:
        return self.parameters_before - self.parameters_after

    def to_dict(self) -> dict[str, Any]:
        """Plain data (str, int, float, bool, None, lists, dicts) for ``json.dumps``."""
        data = asdict(self)
        for entry in data["entries"]:
            entry["into"] = list(entry["into"])
        for merge in data["merges"]:
            merge.update({key: list(merge[key]) for key in ("layers", "identities", "kept")})
        data["summary"] = {
            "norms": len(self.entries),
            "folded": len(self.folded),
            "left": len(self.left),
            "parameters_removed": self.parameters_removed,
        }
        return data

    def absorb_merged_norms(self, absorbed: dict[str, str], folded: dict[str, NormEntry] | None = None) -> None:
        """After merge rounds: a norm a merge absorbed (an identity branch) is folded, direction ``"merge"``, into the
        merged layer; a norm a later round folded takes that round's entry (with the kind and channels of the first)."""
        folded = folded or {}
        self.entries = [
            replace(e, status=FOLDED, into=(absorbed[e.name],), direction=MERGE, reason=None) if e.name in absorbed
            else replace(folded[e.name], kind=e.kind, channels=e.channels) if e.name in folded
            else e
            for e in self.entries
        ]

    def summary(self) -> str:
        verb = "folded" if self.applied else "would fold"
        return (
            f"{self.model}: {verb} {len(self.folded)} of {len(self.entries)} norm layers "
            f"({self.capture} capture); parameters {self.parameters_before:,} -> {self.parameters_after:,} "
            f"({self.parameters_removed:+,} removed)".replace("(+", "(")
        )

    def _rows(self) -> list[tuple[str, str, str, str, str]]:
        rows = []
        for e in self.entries:
            outcome = f"{e.direction} into {', '.join(e.into)}" if e.status == FOLDED else (e.reason or "")
            rows.append((e.name, e.kind, "" if e.channels is None else str(e.channels), e.status, outcome))
        return rows

    def _merge_lines(self) -> list[tuple[bool, str]]:
        """``(merged, line)`` per block; a dry run (``applied`` False) says what would merge."""
        lines = []
        verb = "merged" if self.applied else "would merge"
        for m in self.merges:
            if m.status == MERGED:
                parts = [*m.layers, *(f"identity ({i})" for i in m.identities)]
                kept = f" (+ {', '.join(m.kept)} kept)" if m.kept else ""
                lines.append((True, f"{verb} {m.block}: {', '.join(parts)} into {m.into}{kept}"))
            else:
                lines.append((False, f"left   {m.block}: {m.reason}"))
        return lines

    def __str__(self) -> str:
        lines = [self.summary()]
        for name, kind, channels, status, outcome in self._rows():
            lines.append(f"  {status:<6} {name} ({kind}, {channels} ch): {outcome}")
        lines.extend(f"  {line}" for _, line in self._merge_lines())
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.extend(f"  {line}" for line in filter(None, [verification_line(self.verification)]))
        return "\n".join(lines)

    def __rich__(self) -> Any:
        """A rich renderable (``rich.print(report)``); needs the ``report`` extra."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(title=self.summary(), title_justify="left", show_lines=False)
        for column in ("norm", "kind", "ch", "status", "folded into / reason left"):
            table.add_column(column, overflow="fold")
        for name, kind, channels, status, outcome in self._rows():
            style = "green" if status == FOLDED else "yellow"
            table.add_row(name, kind, channels, Text(status, style=style), outcome)
        extra = [Text(line, style="green" if merged else "yellow") for merged, line in self._merge_lines()]
        extra += [Text(f"note: {n}", style="dim") for n in self.notes]
        extra += [Text(line) for line in filter(None, [verification_line(self.verification)])]
        return Group(table, *extra)


def verification_line(verification: dict[str, Any] | None, what: str = "verified") -> str | None:
    """``verified on x: 1x3x224x224 (example inputs): error 1.2e-07 against allowance 4.8e-07 (...)``, for every format
    (``verification``: :meth:`bnfold.judge.VerificationResult.to_dict`); ``None`` when nothing was verified."""
    if not verification:
        return None
    inputs = describe_inputs(verification["input_shapes"], verification["inputs"], verification["batches"])
    judged = verification["judged"] or (
        f"max relative error {verification['max_relative']:.3g} (tolerance {verification['tolerance']:g})"
    )
    return f"{what}{inputs}: {judged}"
