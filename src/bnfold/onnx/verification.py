"""Proof that folding changed nothing: run the original and the folded model in onnxruntime and compare.

Both sessions run on onnxruntime's CPU provider with graph optimisations off, so that what is compared is the
two graphs, not what onnxruntime makes of them. The inputs are :func:`example_inputs` unless the caller gives
some; the verdict is :mod:`bnfold.judge`'s, the same in every format (its noise floor measured here, in
onnxruntime, on a perturbed copy of the original).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from .. import judge
from ..errors import InvalidInputError, OriginalRunError, VerificationError
from ..examples import SIZES, STRIP_HEIGHTS, STRIP_WIDTH, is_image_like, photo_batch
from ..judge import VerificationResult
from .io import EXTERNAL_DATA_THRESHOLD, data_size, read, save

TOLERANCES: dict[int, float] = {
    onnx.TensorProto.DOUBLE: 1e-9,
    onnx.TensorProto.FLOAT: 1e-4,
    onnx.TensorProto.FLOAT16: 1e-2,
    onnx.TensorProto.BFLOAT16: 8e-2,
}
"""Relative tolerance by ONNX element type: :data:`bnfold.verification.TOLERANCES` (which explains them)
again, since that module imports torch and this one must not; a test checks that the two tables agree."""


def default_tolerance(model: onnx.ModelProto) -> float:
    """The loosest tolerance among the element types of the model's float outputs (float32's when there are none)."""
    types = [o.type.tensor_type.elem_type for o in model.graph.output]  # 0 for a sequence or a map
    return max((TOLERANCES[t] for t in types if t in TOLERANCES), default=TOLERANCES[onnx.TensorProto.FLOAT])


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
    for value in [v for v in values if v.name in input_shape]:
        shape = tuple(int(d) for d in input_shape[value.name])
        declared = declared_shape(value)
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


def session(model: onnx.ModelProto | str | os.PathLike[str]) -> Any:
    """An onnxruntime CPU session for ``model``, a ModelProto or the path of an .onnx file (one thread,
    optimisations off). A path is read by onnxruntime itself, external data included: no copy in Python."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 4  # errors reach the caller as exceptions; not also printed on stderr
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = ["CPUExecutionProvider"]
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(os.fspath(model), options, providers=providers)
    if data_size(model) < EXTERNAL_DATA_THRESHOLD:
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    with tempfile.TemporaryDirectory() as directory:  # too large for one protobuf: a file with external data
        path = Path(directory) / "model.onnx"
        save(model, path, external_data=True)
        return ort.InferenceSession(str(path), options, providers=providers)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller feeds (older exporters also list every initializer as a graph input); each must be a
    tensor, since example inputs can only be made for tensors."""
    initializers = {t.name for t in model.graph.initializer}
    values = [v for v in model.graph.input if v.name not in initializers]
    for value in values:
        if not value.type.HasField("tensor_type"):
            raise InvalidInputError(
                f"graph input '{value.name}' is not a tensor; give its value in the inputs (by name)"
            )
    return values


def declared_shape(value: onnx.ValueInfoProto) -> list[int | None]:
    """An input's sizes as the graph declares them, ``None`` for a free (symbolic or unset) one."""
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in value.type.tensor_type.shape.dim]


def has_free_sizes(model: onnx.ModelProto) -> bool:
    """Whether a graph input has a dynamic dimension other than the batch (axis 0): its size must be chosen."""
    return any(d is None for v in graph_inputs(model) for d in declared_shape(v)[1:])


def example_inputs(
    model: onnx.ModelProto, seed: int = 0, input_shape: Sequence[int] | dict[str, Sequence[int]] | None = None,
    size: int | tuple[int, int] | None = None, photographs: bool = True,
) -> dict[str, np.ndarray]:
    """One array per graph input: photographs for ``N x 3 x H x W`` float inputs (unless ``photographs`` is
    false), seeded random values otherwise.

    A dynamic batch dimension (axis 0) is 1, another dynamic dimension ``size`` (1 when ``None``; a pair gives the
    first free dimension and the others); ``input_shape`` (the only input's shape, or shapes by name) overrides
    both. Fixed dimensions are kept.
    """
    rng = np.random.default_rng(seed)
    values = graph_inputs(model)
    given = _input_shapes(values, input_shape)
    feeds: dict[str, np.ndarray] = {}
    for value in values:
        tensor_type = value.type.tensor_type
        declared = declared_shape(value)
        first, rest = size if isinstance(size, tuple) else (size, size)
        free = [axis for axis, d in enumerate(declared) if d is None and axis > 0]
        shape = given.get(value.name) or tuple(
            d if d is not None else 1 if axis == 0 or first is None else first if axis == free[0] else rest
            for axis, d in enumerate(declared)
        )
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        floating = np.issubdtype(dtype, np.floating) or tensor_type.elem_type == onnx.TensorProto.BFLOAT16
        if floating and photographs and is_image_like(shape):
            feeds[value.name] = photo_batch(shape, dtype)
        elif floating:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.random(shape) < 0.5
        else:
            feeds[value.name] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


def _shapes(feeds: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{name}: {'x'.join(map(str, a.shape)) or 'scalar'}" for name, a in feeds.items())


def _cause(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


class _Runner:
    """One onnxruntime session of a model, created on first use."""

    def __init__(self, model: onnx.ModelProto | str | os.PathLike[str]) -> None:
        self.model, self._session = model, None

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            self._session = session(self.model)
        names = [o.name for o in self._session.get_outputs()]
        return dict(zip(names, self._session.run(names, feeds), strict=True))


def _does_not_run(shapes: str, error: BaseException | None, api_hint: str) -> OriginalRunError:
    """The original model does not run on inputs of ``shapes``; ``api_hint`` says what to pass in Python."""
    return OriginalRunError(
        "the original model", shapes, f"onnxruntime: {_cause(error) if error else ''}",
        f"pass {api_hint}, or verify=False to skip the check",
        "pass --input-shape N,C,H,W, or --input FILE.npz with arrays it takes (--debug shows onnxruntime's "
        "message)",
    )


def _run_original(runner: _Runner, feeds: dict[str, np.ndarray], given: bool) -> dict[str, np.ndarray]:
    try:
        return runner(feeds)
    except Exception as error:
        source = "the given inputs" if given else "example inputs"
        hint = f"inputs={{name: array}} or input_shape= with {source} it takes"
        raise _does_not_run(_shapes(feeds), error, hint) from error


def choose_inputs(
    original: _Runner, described: onnx.ModelProto, seed: int,
    input_shape: Sequence[int] | dict[str, Sequence[int]] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Example inputs the original runs on, and its outputs: free sizes (unless ``input_shape`` gives them)
    take the first of :data:`SIZES` that works, then a strip (each of :data:`STRIP_HEIGHTS` by
    :data:`STRIP_WIDTH`), then 1 (the smallest input there is).

    Raises:
        OriginalRunError: no size works (the last error is chained).
    """
    if input_shape is not None or not has_free_sizes(described):
        feeds = example_inputs(described, seed, input_shape)
        return feeds, _run_original(original, feeds, False)
    tried, last = [], None
    for size in [*SIZES, *((h, STRIP_WIDTH) for h in STRIP_HEIGHTS), 1]:
        feeds = example_inputs(described, seed, size=size)
        try:
            return feeds, original(feeds)
        except Exception as error:
            tried.append(_shapes(feeds))
            last = error
    shapes = f"{tried[0]} ... {tried[-1]} ({len(tried)} sizes tried)"
    raise _does_not_run(shapes, last, "input_shape= or inputs={name: array} with inputs it takes") from last


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and ``Constant`` node values by name (the tensors a fold may touch)."""
    found = {t.name: t for t in model.graph.initializer}
    found.update((n.output[0], a.t) for n in model.graph.node if n.op_type == "Constant" and n.output
                 for a in n.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR)
    return found


_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)


def touched_constants(original: onnx.ModelProto, folded: onnx.ModelProto) -> list[str]:
    """The float constants of ``original`` that ``folded`` changed: every float constant input of a node the fold
    removed (a BatchNormalization, a merged branch), and each constant input of a kept node whose value differs."""
    mine, theirs = _constants(original), _constants(folded)
    kept = {n.name or tuple(n.output): n for n in folded.graph.node}  # by name, or by outputs when unnamed
    touched: dict[str, None] = {}
    for node in original.graph.node:
        if node.op_type == "Constant":
            continue
        other = kept.get(node.name or tuple(node.output))
        for position, name in enumerate(node.input):
            tensor = mine.get(name)
            if tensor is None or tensor.data_type not in _FLOATS:
                continue
            same_place = other is not None and other.op_type == node.op_type and position < len(other.input)
            counterpart = theirs.get(other.input[position]) if same_place else None
            if counterpart is None or not _same(tensor, counterpart):
                touched[name] = None
    return list(touched)


def _same(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    if a.data_type != b.data_type or list(a.dims) != list(b.dims):
        return False
    if a.raw_data and b.raw_data:
        return a.raw_data == b.raw_data
    return bool(np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b)))


def perturbed(original: onnx.ModelProto, names: Sequence[str], seed: int = judge.PERTURB_SEED) -> onnx.ModelProto:
    """A copy of ``original`` with each named float constant moved one step of its dtype, up or down (seeded)."""
    copy = deepcopy(original)
    rng = np.random.default_rng(seed)
    constants = _constants(copy)
    for name in names:
        tensor = constants[name]
        value = onnx.numpy_helper.to_array(tensor)
        direction = np.where(rng.random(value.shape) < 0.5, -np.inf, np.inf).astype(value.dtype)
        moved = np.nextafter(value, direction).astype(value.dtype)
        tensor.CopyFrom(onnx.numpy_helper.from_array(moved, tensor.name))
    return copy


def _given_feeds(described: onnx.ModelProto, inputs: Any, seed: int,
                 input_shape: Sequence[int] | dict[str, Sequence[int]] | None) -> list[dict[str, np.ndarray]]:
    """The batches to compare on: ``inputs`` (a dict, or a list of dicts, by input name) over the example inputs."""
    feeds = []
    for batch in inputs if isinstance(inputs, list) else [inputs]:
        if not isinstance(batch, dict):
            raise InvalidInputError(
                f"inputs must be a dict of input name -> numpy array (or a list of them), got {type(batch).__name__}"
            )
        names = [v.name for v in graph_inputs(described)]
        unknown = sorted(set(batch) - set(names))
        if unknown:
            raise InvalidInputError(f"inputs {unknown} are not graph inputs of the model; its inputs are {sorted(names)}")
        feeds.append(example_inputs(described, seed, input_shape, size=_common_size(described, batch)))
        feeds[-1].update({k: np.asarray(v) for k, v in batch.items()})
    return feeds


def _common_size(described: onnx.ModelProto, batch: dict[str, Any]) -> int | None:
    """The size given inputs use for their free dimensions, for the inputs not given (``None``: nothing to copy)."""
    for value in graph_inputs(described):
        shape = np.shape(batch[value.name]) if value.name in batch else ()
        for axis, d in enumerate(declared_shape(value)):
            if axis and d is None and axis < len(shape):
                return int(shape[axis])
    return None


def verify(
    original: onnx.ModelProto | str | os.PathLike[str],
    folded: onnx.ModelProto | str | os.PathLike[str],
    *,
    inputs: dict[str, np.ndarray] | list[dict[str, np.ndarray]] | None = None,
    seed: int = 0,
    tolerance: float | None = None,
    input_shape: Sequence[int] | dict[str, Sequence[int]] | None = None,
) -> VerificationResult:
    """Run both models on the same inputs and judge every output (:mod:`bnfold.judge`).

    Args:
        original, folded: the models to compare (same input and output names), each a ModelProto or the path of
            its file (onnxruntime then opens the file itself, external data included, as a user's
            ``InferenceSession(path)`` does; the inputs and the tolerance come from the graph of ``original``).
        inputs: input arrays by name, or a list of such batches (each is compared); inputs not given are
            :func:`example_inputs`.
        tolerance: relative tolerance; by default from the outputs' dtype (:data:`TOLERANCES`). An output within it,
            or within the noise floor's allowance, passes.
        input_shape: shape of the example inputs (see :func:`example_inputs`); without it, dynamic sizes are
            chosen: the first of :data:`bnfold.examples.SIZES` the original runs on.

    Returns:
        The :class:`~bnfold.judge.VerificationResult` every format's check gives (each output by its name, the worst
        over the batches); ``to_dict()`` is the plain data of ``FoldReport.verification``.

    Raises:
        OriginalRunError: the original does not run on the inputs (bad input, not a failed verification).
        VerificationError: the folded model does not run where the original does.
    """
    described = next((m for m in (original, folded) if isinstance(m, onnx.ModelProto)), None)
    if described is None:  # two paths: the graph describes the inputs and outputs; its weights are not needed
        described = onnx.load_model(os.fspath(original), load_external_data=False)
    if tolerance is None:
        tolerance = default_tolerance(described)
    run_original, run_folded = _Runner(original), _Runner(folded)
    if inputs is not None:
        batches = _given_feeds(described, inputs, seed, input_shape)
        expected = [_run_original(run_original, feeds, True) for feeds in batches]
        label = "given inputs"
    else:
        feeds, outputs = choose_inputs(run_original, described, seed, input_shape)
        batches, expected = [feeds], [outputs]
        kinds = ["photographs" if is_image_like(a.shape) and np.issubdtype(a.dtype, np.floating)
                 else f"random (seed {seed})" for a in feeds.values()]
        label = ", ".join(dict.fromkeys(kinds))
        if input_shape is None and has_free_sizes(described):
            label += ", sizes chosen: the first the original runs on"
    actual: list[dict[str, np.ndarray]] = []
    for feeds in batches:
        try:
            actual.append(run_folded(feeds))
        except Exception as error:
            raise VerificationError(
                f"onnxruntime could not run the folded model on inputs the original runs on "
                f"({_shapes(feeds)}: {_cause(error)})"
            ) from error
    source = original if isinstance(original, onnx.ModelProto) else read(original)[0]
    target = folded if isinstance(folded, onnx.ModelProto) else read(folded)[0]
    touched = touched_constants(source, target)
    floor = _Runner(perturbed(source, touched)) if touched else None  # the noise floor
    del source, target  # the weights of a file, read for the floor: not held while the batches are judged
    result = VerificationResult([], tolerance, batches=len(batches), inputs=label,
                                input_shapes={name: list(a.shape) for name, a in batches[0].items()},
                                perturbed_tensors=len(touched))
    for feeds, outputs, folded_outputs in zip(batches, expected, actual, strict=True):
        result.absorb(judge.compare(outputs, folded_outputs, tolerance, floor(feeds) if floor else None))
    for feeds, first in zip(batches, expected, strict=True):
        if result.max_relative <= tolerance or result.undecided:  # beyond it, the verdict rests on the floor: noise?
            break
        result.check_run_to_run(first, run_original(feeds))
    return result


def run(model: onnx.ModelProto | str | os.PathLike[str], feeds: dict[str, np.ndarray]
        ) -> dict[str, np.ndarray]:
    """Outputs of ``model`` on ``feeds``, by output name.

    Raises:
        OriginalRunError: onnxruntime cannot load or run the model (custom ops, inputs it does not take, ...).
    """
    return _run_original(_Runner(model), feeds, True)
