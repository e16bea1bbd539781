"""Trained model files from PyPI wheels: does ``bnfold fold FILE -o OUT`` work with default options, and is every
fold exact? Beside bnfold: onnxruntime's basic optimisation, onnxslim and onnxsim on the same files.

Per file: batch norms before and left (by each tool), bnfold's exit code with default options (the command line,
run as a user would), bnfold's error against its allowance (the noise floor of one rounding step of the touched
weights, :mod:`bnfold.judge`; ratio <= 1 passes), the error of each tool's output on the same inputs, and the time
each takes. The files come from ``tests/helpers/trained_files.py`` (downloaded once; a file that cannot be had is
listed as skipped).

    python benchmarks/real_files.py [--keys ppocr_det ppocr_cls ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from bnfold import onnx as bo
from bnfold.onnx import verification
from from_tests import load_helper

trained_files = load_helper("trained_files")
FILES, crepe_tiny, locate = trained_files.FILES, trained_files.crepe_tiny, trained_files.locate


def bn_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def error_of(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> float:
    got = verification.session(model).run(None, feeds)
    return max(float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(e, np.float64))))
               for g, e in zip(got, expected.values(), strict=True))


def peers(path: Path, feeds: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> dict[str, str]:
    """BN left / error / seconds of each peer, as table cells."""
    import onnxruntime as ort

    cells = {}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "ort.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(out)
        start = time.perf_counter()
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        seconds = time.perf_counter() - start
        optimised = onnx.load(str(out))
        cells["ort"] = f"{bn_count(optimised)} / {error_of(str(out), feeds, expected):.2g} / {seconds:.2f}s"
    for name, run in (("onnxslim", _slim), ("onnxsim", _sim)):
        try:
            start = time.perf_counter()
            model = run(onnx.load(str(path)))
            seconds = time.perf_counter() - start
            cells[name] = f"{bn_count(model)} / {error_of(model, feeds, expected):.2g} / {seconds:.2f}s"
        except Exception as error:  # a peer that fails on the file is a result too
            cells[name] = f"failed: {type(error).__name__}"
    return cells


def _slim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(model)


def _sim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnxsim's check failed")
    return simplified


def onnx_row(key: str, path: Path) -> dict[str, str]:
    model = onnx.load(str(path))
    row = {"file": key, "BN before": str(bn_count(model))}
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "bnfold", "fold", str(path), "-o", f"{folder}/out.onnx"],
                              capture_output=True, text=True)
        row["bnfold exit"] = str(done.returncode) + ("" if done.returncode == 0 else f" ({done.stderr.strip()[:80]})")
        row["bnfold CLI s"] = f"{time.perf_counter() - start:.2f}"
    start = time.perf_counter()
    result = bo.fold(path, verify=False)
    row["fold s"] = f"{time.perf_counter() - start:.2f}"
    row["BN left"] = str(bn_count(result.model))
    if result.report.folded:
        start = time.perf_counter()
        checked = bo.verify(str(path), result.model)
        row["verify s"] = f"{time.perf_counter() - start:.2f}"
        worst = next(e for e in checked.outputs if e.path == checked.worst_output)
        row["error / allowance"] = f"{worst.max_abs:.2g} / {worst.allowance or 0:.2g}"
        row["relative"] = f"{worst.relative:.2g}"
        shapes = checked.input_shapes or {}
        row["inputs"] = "x".join(map(str, next(iter(shapes.values()))))
        feeds = verification.example_inputs(model, 0, shapes)
        expected = verification.run(str(path), feeds)
        row.update(peers(path, feeds, expected))
    else:
        row.update({"verify s": "-", "error / allowance": "nothing folded", "relative": "-", "inputs": "-"})
        row.update({"ort": "-", "onnxslim": "-", "onnxsim": "-"})
    return row


def crepe_row() -> dict[str, str]:
    import torch

    import bnfold

    model, shape = crepe_tiny()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    folded = bnfold.fold(model, x)
    seconds = time.perf_counter() - start
    report = bnfold.report_for(folded)
    worst = max(report.verification["outputs"], key=lambda o: o["relative"])
    reasons = {e.reason.split(";")[0] for e in report.left}
    return {"file": "crepe_tiny (module)", "BN before": str(len(report.entries)), "BN left": str(len(report.left)),
            "bnfold exit": "-", "bnfold CLI s": "-", "fold s": f"{seconds:.2f}", "verify s": "(in fold)",
            "error / allowance": f"{worst['max_abs']:.2g} / {worst['allowance'] or 0:.2g}",
            "relative": f"{worst['relative']:.2g}", "inputs": "x".join(map(str, shape)),
            "ort": "-", "onnxslim": "-", "onnxsim": "-", "note": "; ".join(sorted(reasons))[:160]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", nargs="+", default=[k for k in FILES if k not in ("crepe_tiny", "crepe_code")] + ["crepe_tiny"])
    args = parser.parse_args()
    rows = []
    for key in args.keys:
        found = locate(key)
        if isinstance(found, str):
            rows.append({"file": key, "note": f"skipped: {found}"})
            continue
        rows.append(crepe_row() if key == "crepe_tiny" else onnx_row(key, found))
        print(f"done {key}", file=sys.stderr)
    columns = ["file", "BN before", "BN left", "bnfold exit", "error / allowance", "relative", "inputs",
               "bnfold CLI s", "fold s", "verify s", "ort", "onnxslim", "onnxsim"]
    print("peers: BN left / max abs error against the original / seconds")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row.get(c, "") for c in columns) + " |")
    for row in rows:
        if row.get("note"):
            print(f"{row['file']}: {row['note']}")


if __name__ == "__main__":
    main()
