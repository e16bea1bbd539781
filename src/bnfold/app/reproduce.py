"""The seed's experiment, end to end: train, fold, and report parameters, latency and accuracy before and after.

    bnfold reproduce [--models vgg16_bn resnet50] [--epochs 2] [--data PATH] [--out DIR]
    python -m bnfold reproduce ...                          (the same, without the console script)

For each model (torchvision ``vgg16_bn`` and ``resnet50`` by default, random initial weights, nothing
downloaded): train it for ``--epochs`` on ``--data`` (an ImageNette-style folder) or on scikit-learn's digits
(:mod:`.data`), fold it with :func:`bnfold.fold`, and measure parameters, per-image latency (batch 1,
``--latency-size`` pixels, original and folded interleaved, medians), validation accuracy of both, and whether
every prediction is the same.

``--out DIR`` receives ``report.md`` (the table), ``report.json`` and ``latency.png``. ``report.json`` holds:

* ``settings``: the options used, torch version, threads;
* ``data``: ``source``, ``classes``, ``train_samples``, ``val_samples``, ``image_size``;
* ``models``: per model name: ``parameters_before``, ``parameters_after``, ``parameters_removed``,
  ``norms_total``, ``norms_folded``, ``latency_ms_before``, ``latency_ms_after`` (per image, medians),
  ``latency_iqr_ms_before``, ``latency_iqr_ms_after`` ([q1, q3]), ``latency_ratio`` (after / before),
  ``accuracy_before``, ``accuracy_after``, ``top1_agreement`` (fraction of validation images with the same
  prediction), ``max_relative_error`` (largest output difference over the validation set, relative to the
  largest output), ``train_seconds``, ``train_loss`` (last epoch's mean), ``train_accuracy`` (last epoch).

Default settings (2 epochs of digits at 32 x 32, latency at 224 x 224) finish within 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputError
from ..files import refuse_inputs, write_atomic, write_png
from ..report import print_whole

if TYPE_CHECKING:  # imported where they run, so that `bnfold reproduce --help` works before PyTorch is installed
    from torch import nn
    from torch.utils.data import DataLoader

DEFAULT_MODELS = ("vgg16_bn", "resnet50")
EXPECTED_REMOVED = {"vgg16_bn": 8_448, "resnet50": 26_560}  # the seed's figures, for the report's last column


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``bnfold reproduce`` (``bnfold reproduce`` and ``python -m bnfold reproduce``)."""
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="NAME",
                        help="torchvision architectures to train and fold (default: vgg16_bn resnet50)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs per model (default: 2)")
    parser.add_argument("--data", default=None, metavar="PATH",
                        help="ImageFolder root with train/ and val/ (ImageNette layout); default: scikit-learn digits")
    parser.add_argument("--out", default="bnfold-reproduce", metavar="DIR",
                        help="directory for report.md, report.json and latency.png (default: ./bnfold-reproduce)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="training / validation image size (default: 32 for digits, 160 for --data)")
    parser.add_argument("--latency-size", type=int, default=224, help="input size for latency (default: 224)")
    parser.add_argument("--latency-repeats", type=int, default=15, help="interleaved timing rounds (default: 15)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (default: 32)")
    parser.add_argument("--lr", type=float, default=0.01, help="peak learning rate, one-cycle SGD (default: 0.01)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="use at most N training and N validation images (quick runs)")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch intra-op threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, data order and split (default: 0)")


def train(
    model: nn.Module, loader: DataLoader, epochs: int, lr: float, progress: Any = None, label: str = ""
) -> dict[str, float]:
    """One-cycle SGD with momentum, cross-entropy; returns the last epoch's mean loss and accuracy."""
    import torch
    from torch import nn

    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = max(1, epochs * len(loader))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.25)
    loss_fn = nn.CrossEntropyLoss()
    task = progress.add_task(f"training {label}", total=steps) if progress is not None else None
    last = {"train_loss": float("nan"), "train_accuracy": float("nan")}
    model.train()
    for epoch in range(epochs):
        total_loss, correct, seen = 0.0, 0, 0
        for images, labels in loader:
            optimiser.zero_grad(set_to_none=True)
            logits = model(images)
            loss = loss_fn(logits, labels)
            loss.backward()
            optimiser.step()
            schedule.step()
            total_loss += float(loss.detach()) * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
            if task is not None:
                progress.update(task, advance=1, description=f"training {label} epoch {epoch + 1}/{epochs} loss {float(loss.detach()):.3f}")
        last = {"train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1)}
    model.eval()
    return last


def run_model(name: str, splits: Any, args: argparse.Namespace, progress: Any = None) -> dict[str, Any]:
    """Train, fold, verify and time one model; the figures of ``report.json``'s ``models[name]``."""
    import torch
    from torch.utils.data import DataLoader

    from ..bench import BNFOLD, ORIGINAL, benchmark
    from ..engine import fold, report_for
    from ..verification import verify
    from .architectures import build_arch

    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(splits.train, batch_size=args.batch_size, shuffle=True, generator=generator, drop_last=len(splits.train) > args.batch_size)
    val_loader = DataLoader(splits.val, batch_size=64)
    torch.manual_seed(args.seed)
    model = build_arch(name, num_classes=len(splits.classes))[0]
    start = time.perf_counter()
    training = train(model, train_loader, args.epochs, args.lr, progress, name)
    train_seconds = time.perf_counter() - start
    example = next(iter(val_loader))[0][:8]
    folded = fold(model, example)
    report = report_for(folded)
    checked = verify(model, folded, data=val_loader)
    task = progress.add_task(f"timing {name}", total=None) if progress is not None else None
    timing = benchmark(
        model, input_shape=(1, 3, args.latency_size, args.latency_size), batch_sizes=(1,), peers=(),
        repeats=args.latency_repeats, warmup=2, folded=folded,
    )
    if task is not None:
        progress.remove_task(task)
    before, after = timing.timing(ORIGINAL, 1), timing.timing(BNFOLD, 1)
    assert before is not None and after is not None
    return {
        "parameters_before": report.parameters_before,
        "parameters_after": report.parameters_after,
        "parameters_removed": report.parameters_removed,
        "norms_total": len(report.entries),
        "norms_folded": len(report.folded),
        "latency_ms_before": before.per_image_ms,
        "latency_ms_after": after.per_image_ms,
        "latency_iqr_ms_before": [before.q1_ms, before.q3_ms],
        "latency_iqr_ms_after": [after.q1_ms, after.q3_ms],
        "latency_ratio": after.median_ms / before.median_ms,
        "accuracy_before": checked.accuracy_original,
        "accuracy_after": checked.accuracy_folded,
        "top1_agreement": checked.agreement,
        "max_relative_error": checked.max_relative,
        "verification_passed": checked.passed,
        "train_seconds": train_seconds,
        **training,
    }


def markdown(results: dict[str, Any]) -> str:
    """The report table (``report.md``)."""
    data = results["data"]
    lines = [
        "# bnfold reproduce",
        "",
        f"Data: {data['source']} ({data['train_samples']} training / {data['val_samples']} validation images, "
        f"{len(data['classes'])} classes, {data['image_size']} x {data['image_size']}); "
        f"{results['settings']['epochs']} epoch(s); latency per image at batch 1, "
        f"{results['settings']['latency_size']} x {results['settings']['latency_size']}, "
        f"{results['settings']['threads']} threads, interleaved medians.",
        "",
        "| model | parameters before | after | removed | BN folded | latency ms before | after | ratio "
        "| val accuracy before | after | same predictions |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in results["models"].items():
        lines.append(
            f"| {name} | {m['parameters_before']:,} | {m['parameters_after']:,} | {m['parameters_removed']:,} "
            f"| {m['norms_folded']}/{m['norms_total']} | {m['latency_ms_before']:.2f} | {m['latency_ms_after']:.2f} "
            f"| {m['latency_ratio']:.3f} | {_percent(m['accuracy_before'])} | {_percent(m['accuracy_after'])} "
            f"| {_percent(m['top1_agreement'])} |"
        )
    expected = [f"{n}: {EXPECTED_REMOVED[n]:,}" for n in results["models"] if n in EXPECTED_REMOVED]
    if expected:
        lines += ["", f"Parameters removed in the seed's table: {'; '.join(expected)}."]
    return "\n".join(lines) + "\n"


def table(results: dict[str, Any]) -> Any:
    """The report as a rich table with short headers, so it stays readable in an 80-column terminal."""
    from rich.table import Table

    settings = results["settings"]
    grid = Table(title=f"bnfold reproduce: latency ms per image at {settings['latency_size']}px, batch 1",
                 title_justify="left")
    for column in ("model", "removed", "BN", "ms before", "after", "ratio", "acc before", "after", "same"):
        grid.add_column(column, justify="left" if column == "model" else "right", overflow="fold")
    for name, m in results["models"].items():
        grid.add_row(
            name, f"{m['parameters_removed']:,}", f"{m['norms_folded']}/{m['norms_total']}",
            f"{m['latency_ms_before']:.1f}", f"{m['latency_ms_after']:.1f}", f"{m['latency_ratio']:.3f}",
            _percent(m["accuracy_before"], 1), _percent(m["accuracy_after"], 1), _percent(m["top1_agreement"], 0),
        )
    return grid


def _percent(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def figure(results: dict[str, Any]) -> Any:
    """The latency chart: one panel per model, each on its own scale, the ratio folded / original as its headline.

    The models differ in latency by several times (vgg16_bn against resnet50), so one shared axis would squash the
    smaller model's bars and their difference; each panel starts at zero and fits its own model. Bars are the
    per-image medians, whiskers the interquartile ranges. Returns a matplotlib ``Figure`` (Agg backend).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    chart, axes = plt.subplots(1, len(names), figsize=(1.2 + 3.2 * len(names), 4.4), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        model = results["models"][name]
        medians = [model["latency_ms_before"], model["latency_ms_after"]]
        iqr = [model["latency_iqr_ms_before"], model["latency_iqr_ms_after"]]
        errors = [[max(m - q[0], 0.0) for m, q in zip(medians, iqr, strict=True)],
                  [max(q[1] - m, 0.0) for m, q in zip(medians, iqr, strict=True)]]
        axis.bar([0, 1], medians, 0.6, yerr=errors, color=["#999999", "#2a7ab9"], capsize=4)
        axis.set_xticks([0, 1], ["original", "folded"])
        for x, median in enumerate(medians):  # inside the bar, clear of the whiskers
            axis.text(x, median / 2, f"{median:.2f}\nms", ha="center", va="center", fontsize=9, color="white",
                      fontweight="bold")
        axis.set_ylim(0, 1.08 * max(max(q[1] for q in iqr), *medians))
        axis.set_ylabel("ms per image")
        ratio = model["latency_ratio"]
        axis.set_title(name, fontsize=11, loc="left")
        axis.set_title(f"{ratio:.2f}x", fontsize=20, fontweight="bold", color="#2a7ab9", loc="right")
        axis.set_xlabel(f"folded / original = {ratio:.3f} ({100 * (ratio - 1):+.1f}% latency)", fontsize=9)
    size = results["settings"]["latency_size"]
    chart.suptitle(f"latency before and after folding: batch 1, {size} x {size}, median and IQR; each model on its "
                   "own scale", fontsize=10)
    chart.tight_layout()
    return chart


def reproduce(args: argparse.Namespace, console: Any = None) -> dict[str, Any]:
    """Run the experiment with the options of :func:`add_arguments`; write and return the figures."""
    import torch

    if args.epochs < 0 or args.batch_size < 1 or args.latency_repeats < 1:
        raise InvalidInputError("--epochs must be >= 0, --batch-size and --latency-repeats >= 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out {out} is a file; give a directory for report.md, report.json and latency.png")
    if args.data:  # checked before hours of training: the report must never land among the images it reads
        refuse_inputs([out / name for name in ("report.json", "report.md", "latency.png")], [Path(args.data)])
    if args.threads:
        torch.set_num_threads(args.threads)
    from . import data

    if args.data:
        splits = data.image_folder(args.data, size=args.image_size or 160, limit=args.limit)
    else:
        splits = data.digits(size=args.image_size or 32, seed=args.seed, limit=args.limit)
    results: dict[str, Any] = {
        "settings": {
            "models": list(args.models), "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "latency_size": args.latency_size, "latency_repeats": args.latency_repeats, "seed": args.seed,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
        },
        "data": {
            "source": splits.source, "classes": list(splits.classes), "train_samples": len(splits.train),
            "val_samples": len(splits.val), "image_size": int(splits.train[0][0].shape[-1]),
        },
        "models": {},
    }
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        for name in args.models:
            results["models"][name] = run_model(name, splits, args, progress)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.json", lambda handle: json.dump(results, handle, indent=2), binary=False)
    write_atomic(out / "report.md", lambda handle: handle.write(markdown(results)), binary=False)
    write_png(out / "latency.png", figure(results))
    return results


def run(args: argparse.Namespace, console: Any = None) -> int:
    """``bnfold reproduce``: run and print the table; exit code 0, or 1 if a folded model failed verification.

    Bad input raises :class:`~bnfold.errors.BnfoldError`; the command line turns it into a one-line error.
    """
    from rich.console import Console

    console = console or Console()
    results = reproduce(args, console)
    print_whole(console, table(results), f"wrote {Path(args.out) / 'report.md'}, report.json and latency.png")
    failed = [n for n, m in results["models"].items() if not m["verification_passed"]]
    if failed:
        console.print(f"[red]verification failed for {', '.join(failed)}[/]")
        return 1
    return 0

