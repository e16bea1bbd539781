"""Write a folded model in the format ``bnfold fold`` was asked for, read it back and check it.

The model's own format is written by its backend, as :func:`bnfold.save` writes it (:mod:`bnfold.formats`); a
TorchScript module, a ``.pt2`` program and an ONNX model are written in their own format only. An
``nn.Module`` also converts to every other format (``--format``, or OUT's extension; :data:`FORMATS`):
``state_dict`` or ``safetensors`` in the folded layout (norms gone, conv biases added: it loads into
``bnfold.fold(arch())``, which ``bnfold verify --arch NAME`` does for you), ``pickle`` (the whole module),
``torchscript`` (scripted, or traced where scripting fails), ``pt2`` (``torch.export``) or ``onnx`` (opset 18,
checked in onnxruntime). PyTorch is imported by the conversions alone, so an ONNX file is written without it.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import InvalidInputError
from ...formats import BACKENDS, Backend, Fold, judge_written, save_checked

if TYPE_CHECKING:
    import torch

_BY_SUFFIX = {".safetensors": "safetensors", ".onnx": "onnx", ".pt2": "pt2", ".ts": "torchscript", ".jit": "torchscript",
              ".torchscript": "torchscript"}


def choose_format(own: str, output: Path, requested: str | None) -> str:
    """``--format``, else the format OUT's extension names (``.onnx``, ``.pt2``, ``.ts``, ``.safetensors``),
    else the input's own format ``own`` (a state_dict for an architecture name). The extension comes first so
    that no file is written under the name of another format (a state_dict in ``folded.onnx``, which no tool
    would read as what it says); a model that cannot be written in that format is refused
    (:func:`check_writable`)."""
    return requested or _BY_SUFFIX.get(output.suffix.lower()) or own


def check_writable(backend: Backend, fmt: str) -> None:
    """Refuse a format the model cannot be written in (only an ``nn.Module`` converts)."""
    if backend.only_as is not None and fmt != backend.format:
        raise InvalidInputError(f"{backend.only_as}, not --format {fmt}")


@dataclass(frozen=True)
class Format:
    """How an ``nn.Module`` is written in one format and the file read back by its path (``None``: not checkable)."""

    write: Callable[[Any, Path, torch.Tensor], None]  # (folded module, path, example input)
    read: Callable[[Path, str | None, Callable[[], Any]], Any]  # (path, architecture, the original's outputs)
    batches: int | None = None  # how many of the fold's batches the file is judged on (None: all)


def _write_state_dict(model: Any, path: Path, example: Any) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    path.write_bytes(buffer.getvalue())


def _write_safetensors(model: Any, path: Path, example: Any) -> None:
    from safetensors.torch import save

    path.write_bytes(save({k: v.contiguous() for k, v in model.state_dict().items()}))


def _read_state_dict(path: Path, arch: str | None, outputs: Callable[[], Any]) -> Any:
    """A written state_dict (of either format) read into bnfold's folded layout of ``arch``, as ``bnfold
    verify`` reads it (without an architecture: no check)."""
    from ... import loading
    from ...engine import fold
    from ..architectures import build_arch
    from .loading import load_state_dict_into

    if arch is None:
        return None
    skeleton = fold(build_arch(arch)[0], verify=False)
    load_state_dict_into(skeleton, loading.read(path, loading.sniff(path), False), str(path), arch)
    return skeleton.eval()


def _converted(fmt: str, model: Any, example: torch.Tensor) -> Any:
    """The folded module as the kind backend ``fmt`` writes: itself, scripted (traced on the example input
    where scripting fails: many models do not script, and tracing records the same computation) or
    exported."""
    import torch

    if fmt == "pt2":
        with torch.no_grad():
            return torch.export.export(model, (example,))
    if fmt != "torchscript":
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.jit.script(model)
        except Exception:
            return torch.jit.trace(model, example)


def _write_onnx(model: Any, path: Path, example: torch.Tensor) -> None:
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), opset_version=18, dynamo=False)


def _read_onnx(path: Path, arch: str | None, outputs: Callable[[], Any]) -> Any:
    """The file in onnxruntime, opened by its path; it answers in flat outputs, put back in the original's structure."""
    from ...onnx.in_torch import OnnxRuntimeModule

    return OnnxRuntimeModule(path, outputs())


def _as(fmt: str) -> Format:
    """A format that is another backend's own: convert the module to its kind, and let the backend write and read."""
    backend = next(b for b in BACKENDS if b.format == fmt)
    assert backend.write is not None and backend.read is not None
    write, read = backend.write, backend.read
    return Format(lambda model, path, example: write(_converted(fmt, model, example), path),
                  lambda path, arch, outputs: backend.runnable(read(path)))


FORMATS: dict[str, Format] = {
    "state_dict": Format(_write_state_dict, _read_state_dict),
    "safetensors": Format(_write_safetensors, _read_state_dict),
    **{fmt: _as(fmt) for fmt in ("pickle", "torchscript", "pt2")},
    "onnx": Format(_write_onnx, _read_onnx, batches=1),  # exported on the first example, whose shapes it keeps
}


def write(folded: Any, record: Fold, backend: Backend, output: Path, fmt: str, *, force: bool, arch: str | None
          ) -> dict[str, Any] | None:
    """Write ``folded`` to ``output`` in ``fmt``, staged, read back by its path and judged like the fold (nothing is
    kept on a mismatch); returns the written file's verdict. Its own format is written by its backend, as
    :func:`bnfold.save` writes it; an ``nn.Module`` converts to the others (:data:`FORMATS`)."""
    check_writable(backend, fmt)
    if fmt == backend.format:
        return backend.save(folded, record, output, force)
    form = FORMATS[fmt]
    example = record.examples[0][0] if record.examples else None
    original = record.original() if record.original is not None else None

    def outputs() -> Any:
        import torch

        with torch.no_grad():
            return backend.runnable(original if original is not None else folded)(example)

    return save_checked(output, force, f"the folded model as {fmt}", lambda path: form.write(folded, path, example),
                        lambda path: form.read(path, arch, outputs),
                        judge_written(backend, folded, record, f"the written {fmt} file", form.batches))
