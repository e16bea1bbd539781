"""How long folding takes: bnfold (in place, and copying) against torch.fx.experimental.optimization.fuse.

    python benchmarks/fold_speed.py [--models resnet50 vgg16_bn] [--repeats 15] [--threads 2] [--calibrated]

fx.fuse is timed as users call it (``fuse(model)``, which copies the model first). The three methods run
interleaved, in a rotating order, on the same machine in one run; the table gives medians, the interquartile range
and the ratio of each median to fx.fuse's. For an in-place fold, each repeat folds a fresh copy made outside the
timed region. Targets from the issue: in-place fold at most 0.25x fx.fuse on resnet50, 0.08x on vgg16_bn.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from rich.console import Console
from rich.table import Table
from torch.fx.experimental.optimization import fuse

import bnfold
from bnfold.app.calibration import calibrate, randomize_norm_affine, sample_images

TARGETS = {"resnet50": 0.25, "vgg16_bn": 0.08}


def _time(prepare: Callable[[], object], run: Callable[[object], object]) -> float:
    subject = prepare()
    start = time.perf_counter()
    run(subject)
    return time.perf_counter() - start


def measure(name: str, repeats: int, calibrated: bool = False) -> dict[str, list[float]]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    if calibrated:  # realistic scales, some above 1: the in-place fold then bounds each weight before multiplying
        calibrate(randomize_norm_affine(model), sample_images(8, size=112))
    methods: dict[str, tuple[Callable[[], object], Callable[[object], object]]] = {
        "fx.fuse (copying)": (lambda: model, lambda m: fuse(m)),
        "bnfold.fold (copying)": (lambda: model, lambda m: bnfold.fold(m)),
        "bnfold.fold (in place)": (lambda: copy.deepcopy(model), lambda m: bnfold.fold(m, inplace=True)),
    }
    for prepare, run in methods.values():  # warm-up: imports, allocator, fx caches
        _time(prepare, run)
    times: dict[str, list[float]] = {label: [] for label in methods}
    labels = list(methods)
    for round_index in range(repeats):
        order = labels[round_index % len(labels):] + labels[: round_index % len(labels)]
        for label in order:
            times[label].append(_time(*methods[label]))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16_bn"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--calibrated", action="store_true",
                        help="give the norms statistics measured on sample images (the default torchvision init has "
                             "every scale <= 1, where no overflow bound is needed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    console = Console()
    statistics_kind = "calibrated statistics" if args.calibrated else "default statistics"
    table = Table(title=f"Fold time, {args.repeats} interleaved repeats, {args.threads} thread(s), {statistics_kind}, "
                        f"torch {torch.__version__}")
    for column in ("model", "method", "median ms", "IQR ms", "x fx.fuse", "target"):
        table.add_column(column, justify="right" if column not in ("model", "method") else "left")
    for name in args.models:
        times = measure(name, args.repeats, args.calibrated)
        reference = statistics.median(times["fx.fuse (copying)"])
        for label, samples in times.items():
            median = statistics.median(samples)
            quartiles = statistics.quantiles(samples, n=4)
            ratio = median / reference
            target = ""
            if label == "bnfold.fold (in place)" and name in TARGETS:
                goal = TARGETS[name]
                target = f"<= {goal}x " + ("[green]met[/]" if ratio <= goal else "[red]missed[/]")
            table.add_row(name, label, f"{median * 1e3:.1f}", f"{(quartiles[2] - quartiles[0]) * 1e3:.1f}", f"{ratio:.3f}", target)
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
