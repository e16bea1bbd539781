"""Read and write ONNX files with errors a user can act on, and writes that never leave half a file behind.

``load`` tells apart the usual wrong inputs (no such file, a directory, a text file, a PyTorch checkpoint, a
truncated or corrupt .onnx, missing external data) and names the file in a one-line :class:`InvalidInputError`.

``save`` refuses to overwrite unless asked, and writes into a temporary directory beside the target before
renaming into place (``os.replace`` is atomic within one file system), external data file first, so readers
never see a model whose data is missing, and a failed write leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from onnx import external_data_helper

from ..errors import InvalidInputError

EXTERNAL_DATA_THRESHOLD = 1_800_000_000
"""Models larger than this (bytes) are saved with external data: protobuf cannot hold more than 2 GB."""


def _describe_non_onnx(head: bytes) -> str | None:
    """What a file whose first bytes are ``head`` is, when it clearly is not ONNX protobuf."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch checkpoint saved with torch.save?), not ONNX; export with torch.onnx.export"
    if head.startswith(b"\x80") and len(head) > 1 and head[1] in (2, 3, 4, 5):
        return "a Python pickle (an old-style PyTorch checkpoint?), not ONNX; export with torch.onnx.export"
    if not head:
        return "empty"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text.isprintable() or all(c.isprintable() or c in "\r\n\t" for c in text):
        return "a text file, not a binary ONNX model"
    return None


def read(path: str | os.PathLike[str]) -> tuple[onnx.ModelProto, bool]:
    """Load ``path`` with its external data; also tell whether it had external data."""
    file = Path(path)
    if not file.exists():
        raise InvalidInputError(f"{file}: no such file; check the path")
    if file.is_dir():
        raise InvalidInputError(f"{file}: is a directory; pass the path of the .onnx file inside it")
    try:
        with open(file, "rb") as handle:
            head = handle.read(64)
    except OSError as error:
        raise InvalidInputError(f"{file}: cannot be read ({error.strerror or error})") from error
    problem = _describe_non_onnx(head)
    if problem:
        raise InvalidInputError(f"{file}: is {problem}")
    try:
        payload = file.read_bytes()  # read once: parsed here, and checked below without serialising it again
        model = onnx.load_model_from_string(payload, format="protobuf")
    except Exception as error:
        raise InvalidInputError(
            f"{file}: is not a readable ONNX model (truncated or corrupt: {_first_line(error)}); re-export it"
        ) from error
    if model.ir_version == 0 or not model.HasField("graph") or not model.opset_import:
        raise InvalidInputError(f"{file}: is not an ONNX model (no IR version, graph or opset); re-export it")
    external = any(external_data_helper.uses_external_data(t) for t in _tensors(model.graph))
    if external:
        for tensor in _tensors(model.graph):
            if external_data_helper.uses_external_data(tensor):
                info = external_data_helper.ExternalDataInfo(tensor)
                data = file.parent / info.location
                if not data.is_file():
                    raise InvalidInputError(
                        f"{file}: its external data file '{info.location}' (tensor '{tensor.name}') is missing; "
                        f"keep it beside the model, in {file.parent}"
                    )
        try:
            external_data_helper.load_external_data_for_model(model, str(file.parent))
        except Exception as error:
            raise InvalidInputError(
                f"{file}: its external data could not be read ({_first_line(error)})"
            ) from error
    try:
        if not external:
            onnx.checker.check_model(payload)
        elif data_size(model) < EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(str(file))
    except Exception as error:
        raise InvalidInputError(f"{file}: is not a valid ONNX model ({_first_line(error)})") from error
    return model, external


def data_size(model: onnx.ModelProto) -> int:
    """Bytes of tensor data in ``model`` (initializers and attribute tensors, subgraphs included), from their
    shapes and element types.

    What decides whether a model fits in one protobuf: ``ModelProto.ByteSize()`` costs as much as serialising the
    model (a second for 500 MB) and raises ``EncodeError`` above 2 GB, the very case it is asked about. Graph
    structure adds little beside the tensors, which :data:`EXTERNAL_DATA_THRESHOLD`'s margin below 2 GB covers.
    """
    total = 0
    for tensor in _tensors(model.graph):
        if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            total += sum(len(item) for item in tensor.string_data)
            continue
        count = 1
        for dim in tensor.dims:
            count *= int(dim)
        try:
            total += count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, TypeError, ValueError):  # an element type numpy cannot name: measure the tensor itself
            total += tensor.ByteSize()
    return total


def _tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """Initializers and attribute tensors of ``graph`` and of its subgraphs."""
    tensors = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                tensors.append(attr.t)
            tensors.extend(attr.tensors)
            if attr.type == onnx.AttributeProto.GRAPH:
                tensors.extend(_tensors(attr.g))
            for sub in attr.graphs:
                tensors.extend(_tensors(sub))
    return tensors


def load(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load an ONNX model, with its external data (files beside it), checked by ``onnx.checker``.

    Raises:
        InvalidInputError: missing file, a directory, not ONNX (text, PyTorch checkpoint), truncated or corrupt,
            external data missing; the one-line message names the file and the problem.
    """
    return read(path)[0]


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def save(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    external_data: bool | None = None,
) -> None:
    """Write ``model`` to ``path`` atomically; refuse to overwrite unless ``force``.

    Args:
        external_data: store tensors in ``<file name>.data`` beside the model. ``None`` (default) does so only
            when the model is too large for one protobuf (> ~1.8 GB); pass True for a model loaded with
            external data (:attr:`OnnxFoldResult.external_data` remembers it).
    """
    if not isinstance(model, onnx.ModelProto):
        raise InvalidInputError(f"save() needs an onnx.ModelProto, got {type(model).__name__}")
    target = Path(path)
    if target.is_dir():
        raise InvalidInputError(f"{target}: is a directory; pass a file path such as {target / 'model.onnx'}")
    if target.exists() and not force:
        raise InvalidInputError(f"{target}: already exists; pass force=True (--force) to overwrite it")
    if not target.parent.is_dir():
        raise InvalidInputError(f"{target}: its directory {target.parent} does not exist; create it first")
    if external_data is None:
        external_data = data_size(model) > EXTERNAL_DATA_THRESHOLD
    location = f"{target.name}.data"
    data_target = target.parent / location
    if external_data and data_target.exists() and not force:
        raise InvalidInputError(
            f"{data_target}: already exists (external data of {target.name}); pass force=True (--force) to overwrite it"
        )
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        staged = staging / target.name
        if external_data:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(
                copy, str(staged), save_as_external_data=True, all_tensors_to_one_file=True, location=location
            )
            if (staging / location).exists():
                os.replace(staging / location, data_target)
        else:
            onnx.save_model(model, str(staged))
        os.replace(staged, target)
    except OSError as error:
        raise InvalidInputError(f"{target}: could not be written ({error.strerror or error})") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
