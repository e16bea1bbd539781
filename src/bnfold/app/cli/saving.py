"""Write a folded model to a file, in the input's format unless asked otherwise; and read it back to check it.

Formats (``--format``):

* ``state_dict``: ``torch.save(folded.state_dict())``. The folded layout (norms gone, conv biases added) loads
  into ``bnfold.fold(arch())`` of the same architecture; ``bnfold verify --arch NAME`` does that for you.
* ``safetensors``: the same state_dict as a ``.safetensors`` file.
* ``pickle``: ``torch.save(folded)``, the whole module (loading needs its code, and ``weights_only=False``).
* ``torchscript``: ``torch.jit.save`` (scripted, or traced on the example input where scripting fails).
* ``pt2``: ``torch.export.save`` of ``torch.export.export(folded, example)``; a ``.pt2`` input is folded into a
  program already (:mod:`bnfold.backends.exported`), which is saved as it is. A ``.pt2`` input can only be written as pt2.
* ``onnx``: ``torch.onnx.export`` (opset 18); an ONNX input is written by the ONNX backend instead.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from ...errors import InvalidInputError
from .loading import ARCHITECTURE, EXPORTED, ONNX, PICKLE, SAFETENSORS, STATE_DICT, TORCHSCRIPT

FORMATS = ("state_dict", "safetensors", "pickle", "torchscript", "pt2", "onnx")
_BY_SUFFIX = {".safetensors": "safetensors", ".onnx": "onnx", ".pt2": "pt2", ".ts": "torchscript", ".jit": "torchscript",
              ".torchscript": "torchscript"}


def choose_format(kind: str, output: Path, requested: str | None) -> str:
    """``--format``, else the format OUT's extension names (``.onnx``, ``.pt2``, ``.ts``, ``.safetensors``), else the
    input's format (a state_dict for an architecture name).

    The extension comes before the input's format so that no file is written under the name of another format
    (a state_dict in ``folded.onnx``, which no tool, ``bnfold verify`` included, would read as what it says); an
    input that cannot be written in that format is refused with the reason (:func:`_check_compatible`).
    """
    if requested is not None:
        return requested
    named = _BY_SUFFIX.get(output.suffix.lower())
    if named is not None:
        return named
    if kind == ARCHITECTURE:
        return "state_dict"
    return {STATE_DICT: "state_dict", SAFETENSORS: "safetensors", PICKLE: "pickle", TORCHSCRIPT: "torchscript",
            ONNX: "onnx", EXPORTED: "pt2"}[kind]


def _check_compatible(kind: str, fmt: str) -> None:
    if kind == TORCHSCRIPT and fmt != "torchscript":
        raise InvalidInputError(f"a TorchScript model can only be written as TorchScript, not --format {fmt}")
    if kind == EXPORTED and fmt != "pt2":
        raise InvalidInputError(f"a torch.export program (.pt2) can only be written as pt2, not --format {fmt}")
    if kind == ONNX and fmt != "onnx":
        raise InvalidInputError(f"an ONNX model can only be written as ONNX, not --format {fmt}")


def serialise(folded: Any, fmt: str, kind: str, example: torch.Tensor) -> bytes:
    """The bytes of ``folded`` in format ``fmt`` (everything except ONNX, which writes through a path)."""
    _check_compatible(kind, fmt)
    buffer = io.BytesIO()
    if fmt == "state_dict":
        torch.save(folded.state_dict(), buffer)
    elif fmt == "safetensors":
        from safetensors.torch import save

        state = {k: v.contiguous() for k, v in folded.state_dict().items()}
        buffer.write(save(state))
    elif fmt == "pickle":
        torch.save(folded, buffer)
    elif fmt == "torchscript":
        torch.jit.save(_scripted(folded, example), buffer)
    elif fmt == "pt2" and kind == EXPORTED:
        torch.export.save(folded, buffer)
    elif fmt == "pt2":
        with torch.no_grad():
            program = torch.export.export(folded, (example,))
        torch.export.save(program, buffer)
    else:
        raise InvalidInputError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    return buffer.getvalue()


def _scripted(model: Any, example: torch.Tensor) -> torch.jit.ScriptModule:
    if isinstance(model, torch.jit.ScriptModule):
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.jit.script(model)
        except Exception:  # many models do not script; tracing on the example input records the same computation
            return torch.jit.trace(model, example)


def write_model(folded: Any, path: Path, fmt: str, kind: str, example: torch.Tensor) -> None:
    """Write ``folded`` to ``path`` (a staged temporary file: see :func:`bnfold.files.staged`)."""
    _check_compatible(kind, fmt)
    if fmt == "onnx":
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(folded, (example,), str(path), opset_version=18, dynamo=False)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.save is deprecated; it is still the input's format
        path.write_bytes(serialise(folded, fmt, kind, example))


def read_back(output: Path, fmt: str, arch: str | None, outputs_like: Any = None) -> Any:
    """Load what :func:`write_model` wrote, to check that the file (not just the object in memory) is right.

    An ONNX file is opened by its path in onnxruntime, as its user will open it, and returned as a callable that
    answers in the structure of ``outputs_like`` (the original's outputs on the example input).
    """
    from ..architectures import build_arch
    from .loading import load_state_dict_into

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt in ("state_dict", "safetensors"):
            if arch is None:
                return None
            from ...engine import fold

            state = torch.load(output, weights_only=True) if fmt == "state_dict" else _safetensors(output)
            skeleton = fold(build_arch(arch)[0], verify=False)
            load_state_dict_into(skeleton, state, str(output), arch)
            return skeleton.eval()
        if fmt == "pickle":
            return torch.load(output, weights_only=False).eval()  # the file bnfold has just written itself
        if fmt == "torchscript":
            return torch.jit.load(str(output)).eval()
        if fmt == "pt2":
            return torch.export.load(str(output)).module()
        if fmt == "onnx":
            return OnnxRuntimeModule(output, outputs_like)
    return None


class OnnxRuntimeModule(torch.nn.Module):
    """An ONNX model run in onnxruntime behind a PyTorch call, to judge it against a PyTorch model on the same tensors.

    For the file ``bnfold fold`` wrote (opened by its path, as its user opens it) and for ``bnfold verify`` of a
    PyTorch model against an ONNX file. ``torch.onnx.export`` flattens the module's outputs; they are put back into
    the structure of ``outputs_like`` (a tensor, a tuple, a dict ...) when given, so the file is judged with the
    same comparison as the module. A graph exported with a fixed batch size runs on a larger batch one slice at a
    time.
    """

    def __init__(self, model: Any, outputs_like: Any = None) -> None:
        super().__init__()
        from ...onnx.verification import session

        self.session = session(model)
        self.input_names = [i.name for i in self.session.get_inputs()]
        first = self.session.get_inputs()[0].shape
        self.batch = first[0] if first and isinstance(first[0], int) else None
        self.structure = None if outputs_like is None else tree_flatten(outputs_like)[1]
        self.eval()

    def forward(self, *inputs: Any) -> Any:
        arrays = [leaf.detach().cpu().numpy() for leaf in tree_leaves(inputs) if isinstance(leaf, torch.Tensor)]
        if len(arrays) != len(self.input_names):
            raise InvalidInputError(f"the ONNX model takes {len(self.input_names)} inputs ({', '.join(self.input_names)}),"
                                    f" not {len(arrays)}; compare two ONNX files, or call bnfold.onnx.verify with "
                                    "inputs by name")
        length = len(arrays[0]) if arrays[0].ndim else 1
        step = self.batch if self.batch and self.batch < length else length
        try:
            parts = [self.session.run(None, {name: a[i:i + step] for name, a in zip(self.input_names, arrays, strict=True)})
                     for i in range(0, length, step)]
        except Exception as error:  # onnxruntime's own errors: a shape or type the graph does not take
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            shapes = [i.shape for i in self.session.get_inputs()]
            raise InvalidInputError(
                f"onnxruntime cannot run the ONNX model on inputs of shape {[list(a.shape) for a in arrays]} ({first}); "
                f"pass --input-shape with the shape it was exported with (its graph inputs: {shapes})"
            ) from error
        results = [torch.cat([torch.from_numpy(p[k]) for p in parts]) for k in range(len(parts[0]))]
        if self.structure is not None and self.structure.num_leaves == len(results):
            return tree_unflatten(results, self.structure)
        return results[0] if len(results) == 1 else tuple(results)


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
