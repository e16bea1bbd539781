"""bnfold's ONNX fold time against onnxruntime's basic graph optimisation on the same files, interleaved medians.

Both read the file and write the result: ``bnfold.onnx.fold(path, verify=False)`` plus ``save``, and an onnxruntime
session with ``ORT_ENABLE_BASIC`` and ``optimized_model_filepath``. Files: torchvision exports (random weights,
calibrated statistics, 224x224) made by ``benchmarks/onnx_exports.py``.

    python benchmarks/onnx_fold_speed.py --repeats 5 resnet18 vgg11_bn mobilenet_v3_small densenet121
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnx

import bnfold.onnx as bo
from onnx_exports import export_zoo_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=["resnet18", "vgg11_bn", "mobilenet_v3_small", "densenet121"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        print(f"{'model':22} {'bnfold s':>9} {'ort-basic s':>11} {'ratio':>6}  folded")
        for name in args.models:
            path = work / f"{name}.onnx"
            onnx.save(export_zoo_model(name, size=224), path)
            times: dict[str, list[float]] = {"bnfold": [], "ort": []}
            folded = 0
            for repeat in range(args.repeats):
                order = ("bnfold", "ort") if repeat % 2 == 0 else ("ort", "bnfold")
                for tool in order:
                    start = time.perf_counter()
                    if tool == "bnfold":
                        result = bo.fold(path, verify=False)
                        result.save(work / "bnfold.onnx", force=True)
                        folded = len(result.report.folded)
                    else:
                        options = ort.SessionOptions()
                        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
                        options.optimized_model_filepath = str(work / "ort.onnx")
                        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                    times[tool].append(time.perf_counter() - start)
            ours, theirs = statistics.median(times["bnfold"]), statistics.median(times["ort"])
            print(f"{name:22} {ours:9.2f} {theirs:11.2f} {ours / theirs:6.2f}  {folded}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
