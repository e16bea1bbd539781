"""Read and write ONNX files with errors a user can act on, and writes that never leave half a file behind.

:func:`read` names the file and the problem in a one-line :class:`InvalidInputError`, and returns every file
it read (the graph and each external data file), so that no output can ever be one of them. :func:`save`
writes the graph and its external data as one unit (:func:`bnfold.files.staged_files`): the old pair stays
whole until the new one is checked (``check``) and in place.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import onnx
from onnx import external_data_helper

from ..errors import InvalidInputError, first_line
from ..files import refuse_inputs, staged_files

EXTERNAL_DATA_THRESHOLD = 1_800_000_000
"""Models larger than this (bytes) are saved with external data: protobuf cannot hold more than 2 GB."""

INLINE_TENSOR_BYTES = 1024
"""Tensors smaller than this stay inside the graph when a model is saved with external data.

The ``onnx`` library's own threshold (``convert_model_to_external_data(size_threshold=1024)``), which exporters
follow. Not only tidy: onnxruntime infers shapes while it loads a file, from inline tensors only ("Cannot
parse data from external tensors"), so a ``ReduceMean``'s axes or a ``Reshape``'s target size stay inline.
"""


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
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        return "a text file, not a binary ONNX model"
    return None


def read(path: str | os.PathLike[str]) -> tuple[onnx.ModelProto, list[Path]]:
    """Load ``path`` with its external data; also return the external data files it read (empty if none)."""
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
            f"{file}: is not a readable ONNX model (truncated or corrupt: {first_line(error)}); re-export it"
        ) from error
    if model.ir_version == 0 or not model.HasField("graph") or not model.opset_import:
        raise InvalidInputError(f"{file}: is not an ONNX model (no IR version, graph or opset); re-export it")
    data_files = external_data_files(model, file)
    checked: bytes | onnx.ModelProto | str = payload
    if data_files:
        try:
            external_data_helper.load_external_data_for_model(model, str(file.parent))
        except Exception as error:
            raise InvalidInputError(
                f"{file}: its external data could not be read ({first_line(error)})"
            ) from error
        checked = model if data_size(model) < EXTERNAL_DATA_THRESHOLD else str(file)  # too large: by its path
    try:
        onnx.checker.check_model(checked)
    except Exception as error:
        raise InvalidInputError(f"{file}: is not a valid ONNX model ({first_line(error)})") from error
    return model, data_files


def external_data_files(model: onnx.ModelProto, path: str | os.PathLike[str]) -> list[Path]:
    """The external data files that ``model`` (as read from ``path``, data not loaded yet) keeps its tensors
    in: every location of every tensor (initializers, attributes, subgraphs), relative to ``path``'s folder.

    Raises:
        InvalidInputError: a data file is missing.
    """
    file = Path(path)
    found: dict[Path, None] = {}
    for tensor in _tensors(model.graph):
        if external_data_helper.uses_external_data(tensor):
            info = external_data_helper.ExternalDataInfo(tensor)
            data = file.parent / info.location
            if not data.is_file():
                raise InvalidInputError(
                    f"{file}: its external data file '{info.location}' (tensor '{tensor.name}') is missing; "
                    f"keep it beside the model, in {file.parent}"
                )
            found[data] = None
    return list(found)


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
        count = math.prod(int(dim) for dim in tensor.dims)
        try:
            total += count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, TypeError, ValueError):  # an element type numpy cannot name: measure the tensor itself
            total += tensor.ByteSize()
    return total


def attribute_graphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    """The graphs an attribute holds (an ``If`` branch, a ``Loop`` or ``Scan`` body), or none."""
    return [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs in a node's attributes (``If`` branches, ``Loop`` and ``Scan`` bodies)."""
    return [sub for attr in node.attribute for sub in attribute_graphs(attr)]


def _tensors(graph: onnx.GraphProto, attributes: bool = True) -> list[onnx.TensorProto]:
    """Initializers of ``graph`` and of its subgraphs, and (``attributes``) their attribute tensors (each
    attribute's tensors, then its graphs', in attribute order)."""
    tensors = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attributes:
                tensors.extend([attr.t] if attr.type == onnx.AttributeProto.TENSOR else attr.tensors)
            for sub in attribute_graphs(attr):
                tensors.extend(_tensors(sub, attributes))
    return tensors


def load(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load an ONNX model, with its external data (files beside it), checked by ``onnx.checker``.

    Raises:
        InvalidInputError: missing file, a directory, not ONNX (text, PyTorch checkpoint), truncated or corrupt,
            external data missing; the one-line message names the file and the problem.
    """
    return read(path)[0]


def data_file(path: str | os.PathLike[str]) -> Path:
    """Where :func:`save` puts the external data of a graph written to ``path``: ``<file name>.data`` beside it."""
    target = Path(path)
    return target.parent / f"{target.name}.data"


def save(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    external_data: bool | None = None,
    check: Callable[[Path], object] | None = None,
    sources: Iterable[str | os.PathLike[str]] = (),
) -> None:
    """Write ``model`` to ``path`` atomically, with its external data; refuse to overwrite unless ``force``.

    Args:
        external_data: store tensors in ``<file name>.data`` beside the model (:func:`data_file`). ``None``
            (default) does so only when the model is too large for one protobuf (> ~1.8 GB); pass True for a
            model loaded with external data (:attr:`OnnxFoldResult.external_data` remembers it).
        check: called with the staged graph's path (its data file beside it) before anything is renamed into
            place; raising stops the save with nothing written (see the module docstring). Without ``force`` the
            renames refuse to replace files that appeared meanwhile (another run writing the same path).
        sources: the files the model was read from (:attr:`OnnxFoldResult.sources`): neither ``path`` nor its data
            file may be one of them, ``force`` or not. Checked here, where the files to write are decided, so
            that no rule written twice can let a data file past the check.

    Raises:
        InvalidInputError: ``path`` (or its data file) is one of ``sources``, exists without ``force``, is a
            directory, its folder is missing, or the file system refused the write (read-only, full, ...).
    """
    if not isinstance(model, onnx.ModelProto):
        raise InvalidInputError(f"save() needs an onnx.ModelProto, got {type(model).__name__}")
    target = Path(path)
    if external_data is None:
        external_data = data_size(model) > EXTERNAL_DATA_THRESHOLD
    data_target = data_file(target)
    refuse_inputs([target, data_target] if external_data else [target], sources)
    if target.is_dir():
        raise InvalidInputError(f"{target}: is a directory; pass a file path such as {target / 'model.onnx'}")
    if target.exists() and not force:
        raise InvalidInputError(f"{target}: already exists; pass force=True (--force) to overwrite it")
    if not target.parent.is_dir():
        raise InvalidInputError(f"{target}: its directory {target.parent} does not exist; create it first")
    if external_data and data_target.exists() and not force:
        raise InvalidInputError(
            f"{data_target}: already exists (external data of {target.name}); pass force=True (--force) to overwrite it"
        )
    targets = [data_target, target] if external_data else [target]
    with staged_files(targets, replace=force) as staged:
        graph = staged[-1]
        onnx.save_model(_with_data_in(model, staged[0]) if external_data else model, str(graph))
        if check is not None:
            check(graph)


def _with_data_in(model: onnx.ModelProto, data: Path) -> onnx.ModelProto:
    """A copy of ``model`` whose large initializers' bytes are written to ``data``, referred to by its name (beside
    the graph); tensors under :data:`INLINE_TENSOR_BYTES` stay inline, where onnxruntime's shape inference needs them.

    Written here rather than by ``onnx.save_model(save_as_external_data=True)``, which refuses when a file of the
    data file's name exists *in the current working folder* (so ``--force`` failed when run beside OUT) and creates
    the file with its own permissions instead of the umask's.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with open(data, "wb") as handle:
        for tensor in _tensors(copy.graph, attributes=False):
            if (
                tensor.HasField("raw_data")
                and tensor.data_location != onnx.TensorProto.EXTERNAL
                and len(tensor.raw_data) >= INLINE_TENSOR_BYTES
            ):
                offset = handle.tell()
                handle.write(tensor.raw_data)
                external_data_helper.set_external_data(tensor, data.name, offset, len(tensor.raw_data))
                tensor.data_location = onnx.TensorProto.EXTERNAL
                tensor.ClearField("raw_data")
    return copy
