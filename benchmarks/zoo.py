"""Zoo coverage: how many batch-norm operations bnfold and torch.fx's fuse remove from real architectures.

    python benchmarks/zoo.py [--source timm torchvision] [--limit 60] [--seed 0] [--max-params 150] [--json out.json]

For every timm and torchvision model with batch norm (or ``--limit N`` of them, sampled with ``--seed``), built
with random weights (nothing is downloaded), BN affine parameters randomised and running statistics measured in
train mode on two real photographs, at the model's default input size:

* **BN ops** are counted as calls of the batch-norm function in one forward pass, before and after folding, not
  as BN modules: a module may compute batch norm functionally (timm's BatchNormAct2d does), and fx.fuse leaves
  such modules in place. Each call is attributed to its module through the ``running_mean`` buffer it reads.
* **foldable** BN ops are counted independently of bnfold's planner, from the dataflow of one forward pass: a BN
  module call whose input comes straight from a conv / transposed conv / linear call used by nothing else, or whose
  output goes straight and only to linear layers or to convolutions that do not zero-pad (each module called once,
  a BN with a fused activation only in the forward direction). bnfold also folds through pooling, dropout and
  reshapes; those count in "folded" but not in "foldable".
* **wrong**: outputs differ from the original by more than the float32 tolerance (1e-4 of the largest output)
  *and* the difference is not explained by the original model's own float32 rounding (a float64 second opinion:
  random-weight models are often badly conditioned). bnfold is run with its own verification off, so a wrong fold
  would show here instead of being refused.
* **failed**: the tool raised an exception on a model that runs.

Models larger than ``--max-params`` million parameters (counted on the ``meta`` device, before building) or with a
default input larger than ``--max-input`` pixels are skipped and listed. Targets (issue 3): 0 wrong and 0 failed
for bnfold; at least 99% of the foldable BN ops folded.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.overrides import TorchFunctionMode

import bnfold
from bnfold.app.calibration import calibrate, randomize_norm_affine, sample_images
from bnfold.backends.capture import Site, capture_forward
from bnfold.layers import DEFAULT_REGISTRY
from bnfold.verification import TOLERANCES, compare_outputs, explained_by_rounding

LINEAR_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# -------------------------------------------------------------------------------------------- model sources


def model_names(sources: list[str]) -> list[tuple[str, str]]:
    names: list[tuple[str, str]] = []
    if "torchvision" in sources:
        import torchvision

        names += [("torchvision", n) for n in torchvision.models.list_models(module=torchvision.models)]
    if "timm" in sources:
        import timm

        names += [("timm", n) for n in timm.list_models()]
    return names


def build(source: str, name: str, device: str = "cpu") -> nn.Module:
    with torch.device(device):
        if source == "timm":
            import timm

            return timm.create_model(name, pretrained=False)
        import torchvision

        kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
        return torchvision.models.get_model(name, weights=None, **kwargs)


def input_size(source: str, model: nn.Module) -> int:
    if source == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = cfg.get("input_size", (3, 224, 224))
        return int(size[-1])
    return 299 if type(model).__name__ == "Inception3" else 224


def _declared_parameters(name: str) -> int | None:
    import torchvision

    try:
        return int(torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"])
    except Exception:
        return None


def has_batch_norm(model: nn.Module) -> bool:
    return any(DEFAULT_REGISTRY.is_norm_candidate(m) for m in model.modules())


# ------------------------------------------------------------------------------------------ counting BN ops


class _BatchNormCalls(TorchFunctionMode):
    """Counts batch-norm calls per module, by the ``running_mean`` buffer each call reads."""

    NAMES = frozenset({"batch_norm", "_batch_norm_impl_index", "native_batch_norm"})

    def __init__(self, buffer_names: dict[int, str]) -> None:
        super().__init__()
        self.buffer_names = buffer_names
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.NAMES:
            owner = "<functional>"
            for value in (*args, *kwargs.values()):
                name = self.buffer_names.get(id(value)) if isinstance(value, torch.Tensor) else None
                if name is not None and name.endswith("running_mean"):
                    owner = name.rsplit(".", 1)[0] if "." in name else ""
                    break
            self.calls[owner] += 1
        return func(*args, **kwargs)


def batch_norm_calls(model: nn.Module, x: torch.Tensor) -> tuple[Counter[str], Any]:
    names = {id(t): n for n, t in model.named_buffers(remove_duplicate=False)}
    counter = _BatchNormCalls(names)
    with torch.no_grad(), counter:
        output = model(x)
    return counter.calls, output


# ----------------------------------------------------------------------------------- independent foldability


def _plain(module: nn.Module, types: tuple[type, ...]) -> bool:
    """An instance of one of ``types`` whose class does not redefine forward."""
    base = next((t for t in types if isinstance(module, t)), None)
    return base is not None and type(module).forward is base.forward and (
        not hasattr(base, "_conv_forward") or type(module)._conv_forward is base._conv_forward
    )


def _backward_ok(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if not isinstance(module, CONV_TYPES):
        return False
    padding = module.padding
    zero_free = padding == "valid" or (not isinstance(padding, str) and all(p == 0 for p in padding))
    return zero_free or module.padding_mode != "zeros"


def _has_activation(norm: nn.Module) -> bool:
    act = getattr(norm, "act", None)
    drop = getattr(norm, "drop", None)
    return (act is not None and not isinstance(act, nn.Identity)) or (drop is not None and not isinstance(drop, nn.Identity))


def foldable_norms(model: nn.Module, x: torch.Tensor) -> Counter[str]:
    """BN calls foldable by the simple, direct criterion in the module docstring, per BN module name."""
    flow, _ = capture_forward(model, (x,), DEFAULT_REGISTRY)
    sites = flow.sites
    calls = Counter(s.name for s in sites if s.kind == "module")
    foldable: Counter[str] = Counter()
    for site in sites:
        if site.kind != "module" or DEFAULT_REGISTRY.norm(site.target).rule is None:
            continue
        norm = site.target
        if getattr(norm, "track_running_stats", True) is False or calls[site.name] != 1:
            continue
        if _forward_ok(sites, site, calls) or (not _has_activation(norm) and _backward_direct(sites, site, calls)):
            foldable[site.name] += 1
    return foldable


def _forward_ok(sites: list[Site], site: Site, calls: Counter[str]) -> bool:
    if not site.inputs:
        return False
    source = sites[site.inputs[0]]
    if source.kind != "module" or not _plain(source.target, LINEAR_TYPES) or calls[source.name] != 1:
        return False
    if source.users != [site.index]:
        return False
    if isinstance(source.target, nn.Linear):
        return source.shape is not None and len(source.shape) == 2
    return True


def _backward_direct(sites: list[Site], site: Site, calls: Counter[str]) -> bool:
    if not site.users:
        return False
    for index in site.users:
        user = sites[index]
        if user.kind != "module" or not _plain(user.target, LINEAR_TYPES) or not _backward_ok(user.target):
            return False
        if calls[user.name] != 1 or user.inputs != [site.index]:
            return False
        if isinstance(user.target, nn.Linear) and (site.shape is None or len(site.shape) != 2):
            return False
    return True


# ------------------------------------------------------------------------------------------------ one model


@dataclass
class ToolResult:
    status: str = "ok"  # ok | failed | wrong
    bn_after: int = 0
    folded: int = 0
    foldable_folded: int = 0
    relative_error: float | None = None
    seconds: float = 0.0
    message: str = ""


@dataclass
class Row:
    source: str
    name: str
    parameters: int = 0
    size: int = 0
    bn_ops: int = 0
    foldable: int = 0
    functional: int = 0
    skipped: str = ""
    tools: dict[str, ToolResult] = field(default_factory=dict)


def _judge(model: nn.Module, x: torch.Tensor, expected: Any, actual: Any, result: ToolResult) -> None:
    comparison = compare_outputs(expected, actual, TOLERANCES[torch.float32])
    result.relative_error = comparison.max_relative
    if not comparison.passed:
        second = explained_by_rounding(model, (x,), expected, actual)
        if not second.passed:
            result.status = "wrong"
            result.message = f"{comparison.worst()}; against float64: {second.worst()}"


def _run_tool(
    fold: Callable[[nn.Module, torch.Tensor], nn.Module], model: nn.Module, x: torch.Tensor, reference: Any,
    before: Counter[str], foldable: Counter[str],
) -> ToolResult:
    result = ToolResult()
    start = time.perf_counter()
    try:
        folded = fold(model, x)
        result.seconds = time.perf_counter() - start
        after, output = batch_norm_calls(folded, x)
    except Exception as error:  # a benchmark reports every failure and goes on
        result.status = "failed"
        result.message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        return result
    result.bn_after = sum(after.values())
    result.folded = sum(before.values()) - result.bn_after
    result.foldable_folded = sum(min(count, max(0, before[name] - after[name])) for name, count in foldable.items())
    _judge(model, x, reference, output, result)
    return result


def _bnfold(model: nn.Module, x: torch.Tensor) -> nn.Module:
    return bnfold.fold(model, x, verify=False)


def _fx_fuse(model: nn.Module, x: torch.Tensor) -> nn.Module:
    return fuse(model)


TOOLS: dict[str, Callable[[nn.Module, torch.Tensor], nn.Module]] = {"bnfold": _bnfold, "fx.fuse": _fx_fuse}


def evaluate(source: str, name: str, max_params: float, max_input: int) -> Row:
    row = Row(source, name)
    try:
        meta = build(source, name, "meta")
    except Exception as error:
        # torchvision's RegNets compute their widths with ops the meta device lacks; their parameter count is in
        # the offline weights metadata, so they can still be sized before being built for real.
        if source != "torchvision" or (declared := _declared_parameters(name)) is None or declared > max_params * 1e6:
            row.skipped = f"cannot be built on the meta device ({type(error).__name__})"
            return row
        meta = build(source, name)
    if not has_batch_norm(meta):
        row.skipped = "no batch norm"
        return row
    row.parameters = sum(p.numel() for p in meta.parameters())
    row.size = input_size(source, meta)
    if row.parameters > max_params * 1e6:
        row.skipped = f"{row.parameters / 1e6:.0f}M parameters > --max-params"
        return row
    if row.size > max_input:
        row.skipped = f"input {row.size} > --max-input"
        return row
    del meta
    torch.manual_seed(0)
    try:
        model = build(source, name)
        randomize_norm_affine(model, seed=1)
        images = sample_images(3, row.size, seed=2)
        calibrate(model, images[:2], batch_size=2)
        x = images[2:]
        before, reference = batch_norm_calls(model, x)
        foldable = foldable_norms(model, x)
    except Exception as error:
        row.skipped = f"the model itself does not run here ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
        return row
    row.bn_ops = sum(before.values())
    row.functional = before.get("<functional>", 0)
    row.foldable = sum(foldable.values())
    for tool, fold in TOOLS.items():
        row.tools[tool] = _run_tool(fold, model, x, reference, before, foldable)
    return row


# -------------------------------------------------------------------------------------------------- report


def totals(rows: list[Row]) -> dict[str, dict[str, float]]:
    measured = [r for r in rows if not r.skipped]
    out: dict[str, dict[str, float]] = {}
    bn_ops = sum(r.bn_ops for r in measured)
    foldable = sum(r.foldable for r in measured)
    for tool in TOOLS:
        results = [r.tools[tool] for r in measured]
        folded = sum(t.folded for t in results)
        foldable_folded = sum(t.foldable_folded for t in results)
        out[tool] = {
            "models": len(measured),
            "bn_ops": bn_ops,
            "folded": folded,
            "coverage_percent": 100.0 * folded / bn_ops if bn_ops else 0.0,
            "foldable": foldable,
            "foldable_folded": foldable_folded,
            "foldable_coverage_percent": 100.0 * foldable_folded / foldable if foldable else 100.0,
            "failed": sum(t.status == "failed" for t in results),
            "wrong": sum(t.status == "wrong" for t in results),
        }
    return out


def print_report(rows: list[Row], console: Console, all_rows: bool) -> None:
    table = Table(title="per model (BN ops left after folding; ! = failed, X = wrong)", title_justify="left")
    for column in ("model", "params", "size", "BN ops", "foldable", "bnfold left", "fx.fuse left", "bnfold err", "fx err"):
        table.add_column(column, justify="right" if column not in ("model",) else "left")
    for row in rows:
        if row.skipped:
            continue
        cells = []
        for tool in TOOLS:
            t = row.tools[tool]
            cells.append({"failed": "!", "wrong": "X"}.get(t.status, str(t.bn_after)))
        errors = [f"{row.tools[t].relative_error:.1e}" if row.tools[t].relative_error is not None else "-" for t in TOOLS]
        interesting = all_rows or row.tools["bnfold"].bn_after or row.tools["bnfold"].status != "ok"
        if interesting or row.tools["fx.fuse"].status != "ok":
            table.add_row(f"{row.source}/{row.name}", f"{row.parameters / 1e6:.1f}M", str(row.size), str(row.bn_ops),
                          str(row.foldable), *cells, *errors)
    console.print(table)
    summary = Table(title="totals", title_justify="left")
    for column in ("tool", "models", "BN ops", "folded", "coverage %", "foldable", "foldable folded", "foldable %", "failed", "wrong"):
        summary.add_column(column, justify="right")
    for tool, t in totals(rows).items():
        summary.add_row(tool, str(t["models"]), str(t["bn_ops"]), str(t["folded"]), f"{t['coverage_percent']:.1f}",
                        str(t["foldable"]), str(t["foldable_folded"]), f"{t['foldable_coverage_percent']:.1f}",
                        str(t["failed"]), str(t["wrong"]))
    console.print(summary)
    for row in rows:
        for tool, t in row.tools.items():
            if t.status != "ok":
                console.print(f"[yellow]{tool} {t.status} on {row.source}/{row.name}[/]: {t.message}")
    skipped = Counter(r.skipped.split(" (")[0] for r in rows if r.skipped and r.skipped != "no batch norm")
    if skipped:
        console.print("skipped: " + "; ".join(f"{reason}: {n}" for reason, n in skipped.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", nargs="+", default=["timm", "torchvision"], choices=["timm", "torchvision"])
    parser.add_argument("--limit", type=int, default=None, help="evaluate this many models with BN, sampled")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--models", nargs="+", default=None, help="exact model names (any source)")
    parser.add_argument("--max-params", type=float, default=150.0, help="skip models above this many million params")
    parser.add_argument("--max-input", type=int, default=384, help="skip models whose default input is larger")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write rows and totals to this file")
    parser.add_argument("--all-rows", action="store_true", help="print every model, not only those with BN left")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    candidates = model_names(args.source)
    if args.models:
        candidates = [c for c in candidates if c[1] in set(args.models)]
    random.Random(args.seed).shuffle(candidates)
    console = Console(width=None if Console().is_terminal else 170)
    rows: list[Row] = []
    measured = 0
    wanted = args.limit or len(candidates)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("models", total=wanted)
        for source, name in candidates:
            if measured >= wanted:
                break
            progress.update(task, description=f"{source}/{name}")
            try:
                row = evaluate(source, name, args.max_params, args.max_input)
            except Exception:  # a bug in this script: say so, keep going
                row = Row(source, name, skipped=f"benchmark error: {traceback.format_exc().splitlines()[-1]}")
            rows.append(row)
            if not row.skipped:
                measured += 1
                progress.advance(task)
    print_report(rows, console, args.all_rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"rows": [asdict(r) for r in rows], "totals": totals(rows)}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
