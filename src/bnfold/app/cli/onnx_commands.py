"""``bnfold inspect / fold / verify`` on ONNX files, without importing torch.

The general commands (:mod:`bnfold.app.cli.commands`) load every kind of model and import torch to do so, which costs
seconds and is needless for an ONNX file: the ONNX backend (:mod:`bnfold.onnx`) runs on onnx, numpy and
onnxruntime. :func:`handles` tells :func:`bnfold.app.cli.main` when a command line only names ONNX files; the handlers
here then do what the general ones do for ONNX, with the same output and exit codes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ...errors import InvalidInputError
from ...files import check_output_path
from ...formats import backend_for_file
from ...loading import kind_by_name
from .output import emit, verification_line

OK, VERIFICATION_FAILED = 0, 1
COMMANDS = ("inspect", "fold", "verify")


def _files(args: argparse.Namespace) -> list[str]:
    if args.command == "verify":
        return [args.original, args.folded]
    return [args.model]


def handles(args: argparse.Namespace) -> bool:
    """Whether the command names only files whose backend needs no PyTorch (ONNX files, known by their names:
    :mod:`bnfold.formats`) and no option that needs PyTorch."""
    if args.command not in COMMANDS or getattr(args, "weights", None) or getattr(args, "arch", None):
        return False
    backends = [backend_for_file(kind_by_name(Path(name)) or "") for name in _files(args)]
    return all(backend is not None and not backend.needs_torch for backend in backends)


def _check_options(args: argparse.Namespace) -> None:
    """Options of the general commands that mean nothing for an ONNX file are an error, not silently ignored."""
    if getattr(args, "eval", False):
        raise InvalidInputError(
            "--eval switches a PyTorch model to eval mode; an ONNX graph keeps the mode it was exported in: "
            "export the model again after model.eval(), and drop --eval"
        )
    if args.command == "inspect" and getattr(args, "input_shape", None):
        raise InvalidInputError(
            "--input-shape sets the shape of the random inputs that fold and verify run; inspect of an ONNX file "
            "runs nothing and plans on the graph's own shapes: drop --input-shape"
        )
    if getattr(args, "input", None) and getattr(args, "data", None):
        raise InvalidInputError("--input and --data both give the inputs to judge on: pass one of them")


def user_inputs(args: argparse.Namespace, model: Any) -> list[dict[str, Any]] | None:
    """The batches of ``--input FILE`` (arrays by graph input name; an .npy for the only input) or ``--data DIR``
    (images, resized to the image input's size: ``--input-shape``, else its fixed sizes, else 224), or ``None``."""
    from ...examples import image_batches, read_arrays
    from ...onnx.verification import _declared, _graph_inputs

    values = _graph_inputs(model)
    names = [v.name for v in values]
    if getattr(args, "input", None):
        arrays = read_arrays(args.input)
        if set(arrays) == {""} or (len(names) == 1 and len(arrays) == 1):
            if len(names) != 1:
                raise InvalidInputError(
                    f"--input {args.input} holds one unnamed array; the model has {len(names)} inputs "
                    f"({', '.join(names)}): save them by name with numpy.savez(FILE, name=array, ...)"
                )
            return [{names[0]: next(iter(arrays.values()))}]
        unknown = sorted(set(arrays) - set(names))
        if unknown:
            raise InvalidInputError(f"--input {args.input}: arrays {unknown} name no graph input; its inputs are {names}")
        return [arrays]
    if getattr(args, "data", None):
        images = [v for v in values if len(_declared(v)) == 4 and _declared(v)[1] in (3, None)]
        if len(images) != 1:
            raise InvalidInputError(
                f"--data gives images for a model with one image input (N x 3 x H x W); this one has inputs {names}: "
                "pass --input FILE.npz with arrays by input name"
            )
        declared = _declared(images[0])
        shape = args.input_shape or tuple(d if d is not None else (1 if axis == 0 else 3 if axis == 1 else 224)
                                          for axis, d in enumerate(declared))
        return [{images[0].name: batch} for batch in image_batches(args.data, shape, limit=args.limit)]
    return None


def _backend() -> Any:
    try:
        from ... import onnx as backend
    except ImportError as error:
        raise InvalidInputError(f"ONNX files need the onnx package ({error}): pip install 'bnfold[onnx]'") from error
    return backend


def inspect(args: argparse.Namespace, console: Any) -> int:
    """Each BatchNormalization and what folding would do with it; a dry run that writes nothing."""
    _check_options(args)
    backend = _backend()
    with console.status(f"loading {args.model}"):
        model = backend.load(args.model)
    user_inputs(args, model)  # a file that does not fit is bad input here too (inspect runs nothing)
    with console.status("planning"):
        report = backend.plan(model, merge_branches=args.merge_branches)
    report.model = Path(args.model).name
    emit(args, console, report.to_dict(), report)
    return OK


def fold(args: argparse.Namespace, console: Any) -> int:
    """Fold, verify in onnxruntime, write OUT atomically (with external data beside it when the source had it)."""
    if args.format not in (None, "onnx"):
        raise InvalidInputError(f"an ONNX model is written as ONNX, not {args.format}; drop --format")
    _check_options(args)
    output = check_output_path(args.output, [Path(args.model)], force=args.force)
    backend = _backend()
    inputs = None
    if args.input or args.data:
        with console.status("reading the inputs"):
            inputs = user_inputs(args, backend.load(args.model))
    with console.status("folding and verifying"):
        result = backend.fold(args.model, verify=True, tolerance=args.tolerance, seed=args.seed, inputs=inputs,
                              input_shape=args.input_shape, merge_branches=args.merge_branches)
    result.report.model = Path(args.model).name
    with console.status(f"writing {output}"):
        # never over a file the model was read from (its external data included); staged, read back, then renamed
        reread = result.save(output, force=args.force)
    payload = {"output": str(output), "format": "onnx", "report": result.report.to_dict(), "written_file_check": reread}
    lines = [result.report, *filter(None, [verification_line(result.report.verification)]),
             f"wrote {output} (onnx, {output.stat().st_size / 1e6:.2f} MB)"]
    if reread is not None:
        lines.append(verification_line(reread, f"read {output} back"))
    emit(args, console, payload, *lines)
    return OK


def verify(args: argparse.Namespace, console: Any) -> int:
    """Compare two ONNX files in onnxruntime on example inputs (or ``--input`` / ``--data``), judged as a fold is."""
    _check_options(args)
    backend = _backend()
    original, folded = backend.load(args.original), backend.load(args.folded)
    inputs = user_inputs(args, original)
    with console.status("comparing outputs in onnxruntime"):
        result = backend.verify(original, folded, seed=args.seed, tolerance=args.tolerance, inputs=inputs,
                                input_shape=args.input_shape)
    emit(args, console, result.to_dict(), str(result))
    return OK if result.passed else VERIFICATION_FAILED
