"""Proof that folding changed nothing: run the original and the folded model in onnxruntime and compare.

Errors are measured per output as in :mod:`bnfold.verification` (the PyTorch side)::

    max_abs = max |a - b|        relative = max_abs / max |a|

Both sessions run on onnxruntime's CPU provider with graph optimisations off, so what is compared is the two
graphs, not what onnxruntime makes of them. Inputs are random (seeded) from the graph's input types, with dynamic
dimensions set to 1, unless the caller gives them.

The default tolerances are those of :data:`bnfold.verification.TOLERANCES`, which explains where they come from.
That module imports torch, and this one must not, so the numbers are repeated here by ONNX element type; a test
checks that the two tables agree.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from ..errors import InvalidInputError, VerificationError
from .io import data_size

TOLERANCES: dict[int, float] = {
    onnx.TensorProto.DOUBLE: 1e-9,
    onnx.TensorProto.FLOAT: 1e-4,
    onnx.TensorProto.FLOAT16: 1e-2,
    onnx.TensorProto.BFLOAT16: 8e-2,
}
"""Relative tolerance by ONNX element type (same numbers as the PyTorch side's table)."""

_INLINE_LIMIT = 1_800_000_000
"""Above this many bytes a model cannot be handed to onnxruntime as one protobuf (2 GB limit)."""


def default_tolerance(model: onnx.ModelProto) -> float:
    """The loosest tolerance among the element types of the model's float outputs (float32's when there are none)."""
    types = [o.type.tensor_type.elem_type for o in model.graph.output if o.type.HasField("tensor_type")]
    known = [TOLERANCES[t] for t in types if t in TOLERANCES]
    return max(known) if known else TOLERANCES[onnx.TensorProto.FLOAT]


def _input_shapes(
    values: list[onnx.ValueInfoProto], input_shape: Sequence[int] | dict[str, Sequence[int]] | None
) -> dict[str, tuple[int, ...]]:
    """``input_shape`` by input name, checked against the declared shapes (a bare shape: the only input's)."""
    if input_shape is None:
        return {}
    names = [v.name for v in values]
    if not isinstance(input_shape, dict):
        if len(names) != 1:
            raise InvalidInputError(
                f"an input shape is for a model with one input; this one has {len(names)} ({', '.join(names)}): "
                f"give the shapes by input name"
            )
        input_shape = {names[0]: input_shape}
    unknown = sorted(set(input_shape) - set(names))
    if unknown:
        raise InvalidInputError(f"input shapes {unknown} name no graph input; its inputs are {names}")
    shapes: dict[str, tuple[int, ...]] = {}
    for value in values:
        if value.name not in input_shape:
            continue
        shape = tuple(int(d) for d in input_shape[value.name])
        dims = value.type.tensor_type.shape.dim
        declared = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
        shown = ",".join("?" if d is None else str(d) for d in declared)
        ranked = value.type.tensor_type.HasField("shape")  # without a shape any rank is accepted
        if ranked and (len(shape) != len(declared)
                       or any(d is not None and d != n for d, n in zip(declared, shape, strict=True))):
            raise InvalidInputError(
                f"input shape {','.join(map(str, shape))} does not fit graph input '{value.name}' of shape "
                f"[{shown}] (? is free); give one that keeps its fixed sizes"
            )
        if any(n < 1 for n in shape):
            raise InvalidInputError(f"input shape {list(shape)} of '{value.name}' has sizes below 1")
        shapes[value.name] = shape
    return shapes


def random_inputs(
    model: onnx.ModelProto, seed: int = 0, input_shape: Sequence[int] | dict[str, Sequence[int]] | None = None
) -> dict[str, np.ndarray]:
    """One seeded random array per graph input (initializers excluded), dynamic dimensions set to 1.

    Args:
        input_shape: the shape of the model's only input, or shapes by input name, for graphs whose dynamic
            dimensions cannot be 1 (an image size a reshape expects); fixed dimensions must be kept.

    Raises:
        InvalidInputError: an input is not a tensor, or ``input_shape`` does not fit the graph's inputs.
    """
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    values = [v for v in model.graph.input if v.name not in initializers]
    for value in values:
        if not value.type.HasField("tensor_type"):
            raise InvalidInputError(
                f"graph input '{value.name}' is not a tensor; pass its value in inputs={{'{value.name}': ...}}"
            )
    given = _input_shapes(values, input_shape)
    feeds: dict[str, np.ndarray] = {}
    for value in values:
        tensor_type = value.type.tensor_type
        shape = given.get(value.name) or tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tensor_type.shape.dim
        )
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating) or tensor_type.elem_type == onnx.TensorProto.BFLOAT16:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.random(shape) < 0.5
        else:
            feeds[value.name] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


def session(model: onnx.ModelProto | str | os.PathLike[str], threads: int = 1, optimize: bool = False) -> Any:
    """An onnxruntime CPU session for ``model``, a ModelProto or the path of an .onnx file (optimisations off
    unless ``optimize``). A path is read by onnxruntime itself, external data included: no copy in Python."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = ["CPUExecutionProvider"]
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(os.fspath(model), options, providers=providers)
    if data_size(model) < _INLINE_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "model.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # save_model moves the tensors of the model it is given to the external file
        onnx.save_model(copy, str(path), save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(str(path), options, providers=providers)


def run(model: onnx.ModelProto | str | os.PathLike[str], feeds: dict[str, np.ndarray], which: str = "") -> dict[str, np.ndarray]:
    """Outputs of ``model`` on ``feeds``, by output name.

    Raises:
        VerificationError: onnxruntime cannot load or run the model (custom ops, invalid random inputs, ...).
    """
    try:
        sess = session(model)
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feeds), strict=True))
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VerificationError(
            f"onnxruntime could not run the {which or 'given'} model ({message}); pass inputs={{name: array}} if "
            "random inputs are not valid for it, or verify=False to skip the check"
        ) from error


def compare(expected: np.ndarray, actual: np.ndarray, tolerance: float) -> dict[str, Any]:
    """``max_abs``, ``relative`` (max_abs / max |expected|) and ``passed`` for one output."""
    a = np.asarray(expected).astype(np.float64)
    b = np.asarray(actual).astype(np.float64)
    if a.shape != b.shape:
        return {"max_abs": float("inf"), "relative": float("inf"), "passed": False, "shape": list(a.shape)}
    max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    relative = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    passed = bool(relative <= tolerance)  # NaN compares False: a NaN output fails
    return {"max_abs": max_abs, "relative": relative, "passed": passed, "shape": list(a.shape)}


def verify(
    original: onnx.ModelProto | str | os.PathLike[str],
    folded: onnx.ModelProto | str | os.PathLike[str],
    *,
    inputs: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    tolerance: float | None = None,
    input_shape: Sequence[int] | dict[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Run both models on the same inputs and compare every output.

    Args:
        original, folded: the models to compare (same input and output names), each a ModelProto or the path of
            its file (onnxruntime then opens the file itself, external data included, as a user's
            ``InferenceSession(path)`` does; the inputs and the tolerance come from the graph of ``original``).
        inputs: input arrays by name; inputs not given are random (``seed``), dynamic dimensions set to 1.
        tolerance: relative tolerance; by default from the outputs' dtype (:data:`TOLERANCES`).
        input_shape: shape of the random inputs (see :func:`random_inputs`).

    Returns:
        ``{"passed", "tolerance", "max_relative", "worst_output", "inputs", "outputs": {name: {"max_abs",
        "relative", "passed", "shape"}}}`` — plain data, ready for ``json.dumps`` and ``FoldReport.verification``.
    """
    described = next((m for m in (original, folded) if isinstance(m, onnx.ModelProto)), None)
    if described is None:  # two paths: the graph describes the inputs and outputs; its weights are not needed
        described = onnx.load_model(os.fspath(original), load_external_data=False)
    if tolerance is None:
        tolerance = default_tolerance(described)
    feeds = random_inputs(described, seed, input_shape)
    if inputs is not None:
        if not isinstance(inputs, dict):
            raise InvalidInputError(
                f"inputs must be a dict of input name -> numpy array, got {type(inputs).__name__}"
            )
        unknown = sorted(set(inputs) - set(feeds))
        if unknown:
            raise InvalidInputError(
                f"inputs {unknown} are not graph inputs of the model; its inputs are {sorted(feeds)}"
            )
        feeds.update({k: np.asarray(v) for k, v in inputs.items()})
    expected = run(original, feeds, "original")
    actual = run(folded, feeds, "folded")
    outputs = {}
    for name, value in expected.items():
        if name not in actual:
            outputs[name] = {"max_abs": float("inf"), "relative": float("inf"), "passed": False, "shape": []}
            continue
        outputs[name] = compare(value, actual[name], tolerance)
    worst = max(outputs, key=lambda n: outputs[n]["relative"], default=None)
    return {
        "passed": all(o["passed"] for o in outputs.values()),
        "tolerance": tolerance,
        "max_relative": outputs[worst]["relative"] if worst is not None else 0.0,
        "worst_output": worst,
        "inputs": "given" if inputs else f"random (seed {seed})",
        "outputs": outputs,
    }
