"""What each ``bnfold`` command does, on models loaded by :mod:`bnfold.cli.loading`.

Every command returns an exit code (see :mod:`bnfold.cli`) and writes its human output to the given console; with
``--json`` it prints one JSON document on stdout instead. Nothing is written to disk before every check passed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidInputError, VerificationError
from ..files import check_output_path, staged
from ..report import FoldReport
from .loading import EXPORTED, ONNX, TORCHSCRIPT, LoadedModel, load_model
from .saving import choose_format, read_back, write_model

OK, VERIFICATION_FAILED, BAD_INPUT = 0, 1, 2


def _load(args: argparse.Namespace, spec: str, console: Any) -> LoadedModel:
    with console.status(f"loading {spec}"):
        return load_model(
            spec, arch=args.arch, weights=getattr(args, "weights", None), trust_pickle=args.trust_pickle,
            switch_to_eval=args.eval, input_shape=args.input_shape,
        )


def _emit(args: argparse.Namespace, console: Any, payload: dict[str, Any], *renderables: Any) -> None:
    if args.json:
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    for renderable in renderables:
        console.print(renderable)


def _print_notes(args: argparse.Namespace, console: Any, loaded: LoadedModel) -> None:
    if not args.json:
        for note in loaded.notes:
            console.print(f"[dim]note: {note}[/]", highlight=False)


def _onnx_backend() -> Any:
    from .. import onnx as onnx_backend

    return onnx_backend


def _plan_report(loaded: LoadedModel, example: torch.Tensor) -> FoldReport:
    if loaded.kind == ONNX:
        return _onnx_backend().plan(loaded.source or loaded.module)
    if loaded.kind == TORCHSCRIPT:
        from ..backends.torchscript import plan_script

        return plan_script(loaded.module, example_inputs=example, name=loaded.label)
    if loaded.kind == EXPORTED:  # a real dry run: the graph is planned, nothing is folded or exported again
        from ..backends.exported import plan_exported

        return plan_exported(loaded.module, name=loaded.label)
    from ..engine import plan

    return plan(loaded.module, example)


def inspect(args: argparse.Namespace, console: Any) -> int:
    """``bnfold inspect MODEL``: each norm and what folding would do with it; parameter counts. Writes nothing."""
    loaded = _load(args, args.model, console)
    example = loaded.example_inputs(args.seed)
    with console.status("tracing the dataflow"):
        report = _plan_report(loaded, example)
    report.model = loaded.label
    _print_notes(args, console, loaded)
    _emit(args, console, report.to_dict(), report)
    return OK


def _fold_exported(loaded: LoadedModel, example: torch.Tensor) -> tuple[Any, FoldReport]:
    """Fold a torch.export program, exported again on its own example inputs (or, lacking them, on ``example``)."""
    from ..backends.exported import fold_exported

    stored = loaded.module.example_inputs
    return fold_exported(loaded.module, example_inputs=None if stored is not None else example, name=loaded.label)


def _fold_loaded(loaded: LoadedModel, example: torch.Tensor, tolerance: float | None) -> tuple[Any, FoldReport]:
    """Fold and verify; raises ``VerificationError`` (nothing written yet) if outputs differ."""
    if loaded.kind == ONNX:  # the result object, which knows whether to write external data
        result = _onnx_backend().fold(loaded.source or loaded.module, verify=True, tolerance=tolerance)
        return result, result.report
    if loaded.kind == TORCHSCRIPT:
        from ..backends.torchscript import fold_script
        from ..verification import verify

        folded, report = fold_script(loaded.module, example_inputs=example, name=loaded.label)
        checked = verify(loaded.module, folded, example, tolerance=tolerance)
        report.verification = checked.to_dict()
        if not checked.passed:
            raise VerificationError(f"the folded TorchScript model's outputs differ: {checked}")
        return folded, report
    if loaded.kind == EXPORTED:
        from ..verification import verify

        program, report = _fold_exported(loaded, example)
        checked = verify(loaded.runnable, program.module(), example, tolerance=tolerance)
        report.verification = checked.to_dict()
        if not checked.passed:
            raise VerificationError(f"the folded torch.export program's outputs differ: {checked}")
        return program, report
    from ..engine import fold, report_for

    folded = fold(loaded.module, example, tolerance=tolerance)
    return folded, report_for(folded)


def fold(args: argparse.Namespace, console: Any) -> int:
    """``bnfold fold MODEL -o OUT``: fold, verify on example inputs, write OUT atomically, print the report."""
    sources = [Path(args.model)] + ([Path(args.weights)] if args.weights else [])
    output = check_output_path(args.output, sources, force=args.force)
    loaded = _load(args, args.model, console)
    fmt = choose_format(loaded.kind, output, args.format)
    example = loaded.example_inputs(args.seed)
    with console.status("folding and verifying"):
        folded, report = _fold_loaded(loaded, example, args.tolerance)
    report.model = loaded.label
    reread = None
    with console.status(f"writing {output}"):
        if loaded.kind == ONNX:
            folded.save(output, force=args.force)  # atomic, external data beside it when the source had it
        else:
            with staged(output) as temporary:  # checked before it replaces anything
                write_model(folded, temporary, fmt, loaded.kind, example)
                reread = _check_written(loaded, temporary, fmt, example, args.tolerance)
    payload = {"output": str(output), "format": fmt, "report": report.to_dict(), "written_file_check": reread}
    _print_notes(args, console, loaded)
    lines = [report, f"wrote {output} ({fmt}, {output.stat().st_size / 1e6:.2f} MB)"]
    if reread is not None:
        lines.append(f"read {output} back: max relative error against the original {reread['max_relative']:.2e}")
    _emit(args, console, payload, *lines)
    return OK


def _check_written(loaded: LoadedModel, written_path: Path, fmt: str, example: torch.Tensor, tolerance: float | None) -> dict[str, Any] | None:
    """Load the written file and compare it with the original; raises (and nothing is kept) on a mismatch."""
    from ..verification import verify

    try:
        written = read_back(written_path, fmt, loaded.arch)
    except Exception as error:
        raise VerificationError(f"the {fmt} file bnfold wrote does not load back ({error}); nothing was written") from error
    if written is None:
        return None
    checked = verify(loaded.runnable, written, example, tolerance=tolerance)
    if not checked.passed:
        raise VerificationError(f"the written {fmt} file does not reproduce the original's outputs ({checked}); nothing was written")
    return checked.to_dict()


def verify(args: argparse.Namespace, console: Any) -> int:
    """``bnfold verify ORIGINAL FOLDED``: compare outputs on example inputs or on ``--data``."""
    original = _load(args, args.original, console)
    folded = _load(args, args.folded, console)
    if (original.kind == ONNX) != (folded.kind == ONNX):
        raise InvalidInputError("compare an ONNX file with an ONNX file, and a PyTorch model with a PyTorch model")
    if original.kind == ONNX:
        if args.data:
            raise InvalidInputError("--data is for PyTorch image models; ONNX files are compared on random inputs")
        with console.status("comparing outputs in onnxruntime"):
            result = _onnx_backend().verify(original.module, folded.module, seed=args.seed, tolerance=args.tolerance)
        verdict = "PASSED" if result["passed"] else "FAILED"
        lines = [f"verification {verdict}: max relative error {result['max_relative']:.3g} (tolerance "
                 f"{result['tolerance']:g}), worst output {result['worst_output']}"]
        lines += [f"  {name} {info['shape']}: relative {info['relative']:.3g}, abs {info['max_abs']:.3g}"
                  for name, info in result["outputs"].items()]
        _emit(args, console, result, *lines)
        return OK if result["passed"] else VERIFICATION_FAILED
    from ..verification import verify as compare

    shape = original.input_shape or folded.input_shape
    original.input_shape = folded.input_shape = shape
    with console.status("comparing outputs"):
        if args.data:
            from torch.utils.data import DataLoader

            from ..data import image_folder

            size = (shape or (1, 3, 224, 224))[-1]
            loader = DataLoader(image_folder(args.data, size=size, limit=args.limit).val, batch_size=16)
            result = compare(original.runnable, folded.runnable, data=loader, tolerance=args.tolerance)
        else:
            result = compare(original.runnable, folded.runnable, original.example_inputs(args.seed), tolerance=args.tolerance)
    _emit(args, console, result.to_dict(), str(result))
    return OK if result.passed else VERIFICATION_FAILED


def bench(args: argparse.Namespace, console: Any) -> int:
    """``bnfold bench MODEL``: latency and footprint before/after folding (and the peers with ``--peers``)."""
    from ..bench import PEERS, benchmark

    loaded = _load(args, args.model, console)
    if loaded.kind == ONNX:
        raise InvalidInputError("bnfold bench times PyTorch models; for ONNX files run benchmarks/onnx_peers.py")
    example = loaded.example_inputs(args.seed)
    batch_sizes = tuple(args.batch_sizes)
    model, folded = loaded.module, None
    if loaded.kind == TORCHSCRIPT:
        folded = _fold_loaded(loaded, example, args.tolerance)[0]
    if loaded.kind == EXPORTED:
        from ..backends.exported import check_batch_sizes

        check_batch_sizes(loaded.module, batch_sizes)
        model, folded = _graph_module(loaded.runnable), _graph_module(_fold_loaded(loaded, example, args.tolerance)[0].module())
    peers = PEERS if args.peers and loaded.kind not in (TORCHSCRIPT, EXPORTED) else ()
    with console.status("timing (interleaved rounds)") as status:
        result = benchmark(
            model, example, batch_sizes=batch_sizes, threads=args.threads, peers=peers,
            channels_last=args.channels_last, compile=args.compile, warmup=args.warmup, repeats=args.repeats,
            folded=folded, progress=lambda stage: status.update(stage),
        )
    result.settings["model"] = loaded.label
    if args.plot:
        result.plot(args.plot)
    _print_notes(args, console, loaded)
    _emit(args, console, result.to_dict(), result, *([f"wrote {args.plot}"] if args.plot else []))
    return OK


def _graph_module(module: Any) -> Any:
    """An exported program's module marked as in eval mode (its ``.eval()`` raises; its graph has no mode to switch)."""
    module.training = False
    return module


def reproduce(args: argparse.Namespace, console: Any) -> int:
    """``bnfold reproduce``: the seed's experiment (see :mod:`bnfold.reproduce`)."""
    from ..reproduce import run

    return run(args, console)
