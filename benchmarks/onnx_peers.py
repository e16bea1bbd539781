"""bnfold's ONNX backend beside its peers, on the same files: BN nodes left and output error, plus latency.

Peers: ``onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])`` and onnxruntime's own basic graph optimisation
(``ORT_ENABLE_BASIC``, saved with ``optimized_model_filepath``). Files: PyTorch exports of torchvision models with
batch norm (random weights, norm statistics calibrated on photographs: ``benchmarks/onnx_exports.py``) and the
hand-built graphs of ``tests/helpers/onnx_cases.py`` (one per fold rule and per leave-alone reason).

Errors are ``max |a - b| / max |a|`` over every output against the original model run by onnxruntime with
optimisations off, on the same seeded random inputs. Latency: onnxruntime CPU, original vs bnfold-folded, runs
interleaved (the order alternates every repeat), medians; ratios are printed, no speed-up is claimed.

    python benchmarks/onnx_peers.py --repeats 20 --json onnx_peers.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import bnfold.onnx as bo
from bnfold.judge import compare
from bnfold.onnx.verification import example_inputs

TOOLS = ("bnfold", "onnxoptimizer", "ort-basic")
DEFAULT_MODELS = ("resnet18", "mobilenet_v3_small", "vgg11_bn", "densenet121")


def bn_count(model: onnx.ModelProto) -> int:
    return sum(node.op_type == "BatchNormalization" for node in model.graph.node)


def ort_session(path: Path, level: Any, threads: int, optimized: Path | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def outputs_of(session: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def max_relative(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> float:
    compared = compare(expected, actual, 0.0)
    return compared.max_relative if not compared.problems and compared.judged else float("inf")


def evaluate(path: Path, workdir: Path) -> dict[str, Any]:
    """BN nodes before/after and max relative error of each tool on the model at ``path``."""
    import onnxoptimizer
    import onnxruntime as ort

    model = onnx.load(str(path))
    row: dict[str, Any] = {"file": path.name, "bn_before": bn_count(model)}
    feeds = example_inputs(model, seed=0, photographs=False)
    try:
        reference = outputs_of(ort_session(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, 2), feeds)
    except Exception as error:  # e.g. a training-mode norm onnxruntime will not run for inference
        reference = None
        row["note"] = f"original does not run in onnxruntime: {str(error).splitlines()[0][:80]}"

    def record(tool: str, after: onnx.ModelProto | None, outputs: dict[str, np.ndarray] | None) -> None:
        row[tool] = {
            "bn_after": None if after is None else bn_count(after),
            "max_relative": None
            if outputs is None or reference is None
            else max_relative(reference, outputs),
        }

    def rewritten(tool: str, after: onnx.ModelProto) -> None:
        """Save a tool's rewritten model and run it unoptimised, so only the tool's own rewrite is compared."""
        out = workdir / f"{path.stem}.{tool}.onnx"
        onnx.save_model(after, str(out))
        outputs = None
        if reference is not None:
            outputs = outputs_of(ort_session(out, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, 2), feeds)
        record(tool, after, outputs)

    for tool in TOOLS:
        try:
            if tool == "bnfold":
                rewritten(tool, bo.fold(model, verify=False).model)
            elif tool == "onnxoptimizer":
                rewritten(tool, onnxoptimizer.optimize(model, ["fuse_bn_into_conv"]))
            else:
                out = workdir / f"{path.stem}.ort-basic.onnx"
                session = ort_session(path, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, 2, optimized=out)
                outputs = outputs_of(session, feeds) if reference is not None else None
                record(tool, onnx.load(str(out)), outputs)
        except Exception as error:
            row[tool] = {"bn_after": None, "max_relative": None, "error": str(error).splitlines()[0][:100]}
    return row


def latency(path: Path, folded: Path, repeats: int, threads: int) -> dict[str, Any]:
    """Median ms per run, original vs folded, under onnxruntime with optimisations off and at its default."""
    import onnxruntime as ort

    model = onnx.load(str(path))
    feeds = example_inputs(model, seed=0, photographs=False)
    result: dict[str, Any] = {"file": path.name}
    for label, level in (
        ("ort-off", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
        ("ort-all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
    ):
        sessions = {
            "original": ort_session(path, level, threads),
            "bnfold": ort_session(folded, level, threads),
        }
        times: dict[str, list[float]] = {"original": [], "bnfold": []}
        for session in sessions.values():  # warm-up
            for _ in range(2):
                session.run(None, feeds)
        for i in range(repeats):
            order = ("original", "bnfold") if i % 2 == 0 else ("bnfold", "original")
            for name in order:
                start = time.perf_counter()
                sessions[name].run(None, feeds)
                times[name].append((time.perf_counter() - start) * 1e3)
        before, after = statistics.median(times["original"]), statistics.median(times["bnfold"])
        result[label] = {"original_ms": before, "bnfold_ms": after, "ratio": after / before}
    return result


def fmt_err(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def cell(entry: dict[str, Any]) -> str:
    if "error" in entry:
        return f"error: {entry['error'][:40]}"
    after = "-" if entry["bn_after"] is None else str(entry["bn_after"])
    return f"{after} / {fmt_err(entry['max_relative'])}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write all results to this JSON file")
    parser.add_argument(
        "--repeats", type=int, default=20, help="timed runs per model and variant (default 20)"
    )
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS), help="torchvision model names")
    parser.add_argument(
        "--size", type=int, default=224, help="input image size for the exports (default 224: VGG needs it)"
    )
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads for latency")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from from_tests import load_helper
    from onnx_exports import export_zoo_model

    cases = load_helper("onnx_cases").CASES

    console = Console(width=150)
    rows: list[dict[str, Any]] = []
    timings: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        files: list[tuple[Path, bool]] = []
        for name in args.models:
            path = workdir / f"{name}.onnx"
            console.log(f"exporting {name}")
            try:
                onnx.save_model(export_zoo_model(name, size=args.size), str(path))
            except Exception as error:
                console.print(f"skipped {name}: export failed: {str(error).splitlines()[0][:120]}")
                continue
            files.append((path, True))
        for name, build in cases.items():
            path = workdir / f"case_{name}.onnx"
            onnx.save_model(build().model, str(path))
            files.append((path, False))
        for path, is_zoo in files:
            console.log(f"evaluating {path.name}")
            rows.append(evaluate(path, workdir))
            if is_zoo and args.repeats > 0:
                timings.append(
                    latency(path, workdir / f"{path.stem}.bnfold.onnx", args.repeats, args.threads)
                )

    table = Table(
        title="BatchNormalization folding on the same ONNX files: BN nodes after / max relative error"
    )
    table.add_column("file", no_wrap=True)
    table.add_column("BN before", justify="right")
    for tool in TOOLS:
        table.add_column(tool, justify="right")
    totals: dict[str, Any] = {"bn_before": sum(r["bn_before"] for r in rows)}
    for row in rows:
        table.add_row(row["file"], str(row["bn_before"]), *(cell(row[t]) for t in TOOLS))
    for tool in TOOLS:
        afters = [r[tool]["bn_after"] for r in rows if r[tool].get("bn_after") is not None]
        errors = [r[tool]["max_relative"] for r in rows if r[tool].get("max_relative") is not None]
        failed = sum("error" in r[tool] for r in rows)
        totals[tool] = {"bn_after": sum(afters), "max_relative": max(errors, default=None), "failed": failed}
    table.add_row(
        "TOTAL",
        str(totals["bn_before"]),
        *(
            f"{totals[t]['bn_after']} / {fmt_err(totals[t]['max_relative'])}"
            + (f" ({totals[t]['failed']} failed)" if totals[t]["failed"] else "")
            for t in TOOLS
        ),
        style="bold",
    )
    console.print(table)
    for row in rows:
        if "note" in row:
            console.print(f"note: {row['file']}: {row['note']}")

    if timings:
        lat = Table(
            title=f"onnxruntime CPU latency, {args.threads} threads, median of {args.repeats} interleaved runs"
        )
        for column in ("file", "ORT opt", "original ms", "bnfold ms", "bnfold / original"):
            lat.add_column(column, justify="right" if "ms" in column or "/" in column else "left")
        for timing in timings:
            for level in ("ort-off", "ort-all"):
                t = timing[level]
                lat.add_row(
                    timing["file"],
                    level,
                    f"{t['original_ms']:.2f}",
                    f"{t['bnfold_ms']:.2f}",
                    f"{t['ratio']:.3f}",
                )
        console.print(lat)

    command = "python " + " ".join(
        shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    )
    console.print(f"command: {command}")
    summary = ", ".join(
        f"{t}: {totals['bn_before']} -> {totals[t]['bn_after']} BN, max rel err {fmt_err(totals[t]['max_relative'])}"
        for t in TOOLS
    )
    console.print(f"totals: {summary}")
    if args.json:
        args.json.write_text(
            json.dumps({"command": command, "rows": rows, "totals": totals, "latency": timings}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
