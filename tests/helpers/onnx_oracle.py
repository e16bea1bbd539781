"""An output check for ONNX tests that does not go through bnfold: onnxruntime and numpy only.

A test that reads ``report.verification["passed"]`` cannot catch a wrong fold: ``bnfold.onnx.fold`` raises when its
own check fails, so the flag is true after every fold that returned. This runs both graphs in plain onnxruntime
sessions of its own, on seeded inputs built from the graph's declared shapes, and compares the outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

FLOAT32_RELATIVE = 1e-4
"""float32's relative tolerance (``bnfold.verification.TOLERANCES``): a few ulps through a few dozen layers."""


def _outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _feeds(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    initializers = {t.name for t in model.graph.initializer}
    generator = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        feeds[value.name] = generator.standard_normal(shape).astype(dtype)
    return feeds


def assert_same_outputs(original: onnx.ModelProto, changed: onnx.ModelProto, seed: int = 0,
                        relative: float = FLOAT32_RELATIVE) -> float:
    """Both graphs compute the same outputs (``max|a - b| <= relative * max|a|`` per output); returns the worst ratio."""
    feeds = _feeds(original, seed)
    worst = 0.0
    for expected, actual in zip(_outputs(original, feeds), _outputs(changed, feeds), strict=True):
        assert expected.shape == actual.shape
        error = float(np.max(np.abs(expected.astype(np.float64) - actual.astype(np.float64))))
        scale = float(np.max(np.abs(expected)))
        assert error <= relative * scale, f"outputs differ by {error:.3g}, {error / scale:.3g} of their largest value"
        worst = max(worst, error / scale if scale else 0.0)
    return worst
