"""What each ``bnfold`` command does, on models loaded by :mod:`bnfold.app.cli.loading`.

Every command returns an exit code (see :mod:`bnfold.app.cli`) and writes its human output to the given console; with
``--json`` it prints one JSON document on stdout instead. Nothing is written to disk before every check passed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from rich.text import Text

from ...errors import InvalidInputError, OriginalRunError, VerificationError
from ...files import check_output_path, refuse_inputs, staged
from ...report import MERGED, FoldReport, print_whole
from .loading import EXPORTED, ONNX, TORCHSCRIPT, LoadedModel, load_model, names_a_file
from .output import emit, verification_line
from .saving import OnnxRuntimeModule, choose_format, read_back, write_model

OK, VERIFICATION_FAILED, BAD_INPUT = 0, 1, 2


def _load(args: argparse.Namespace, spec: str, console: Any, **options: Any) -> LoadedModel:
    settings = {"arch": args.arch, "weights": getattr(args, "weights", None), **options}
    with console.status(f"loading {spec}"):
        return load_model(
            spec, trust_pickle=args.trust_pickle, switch_to_eval=args.eval, input_shape=args.input_shape,
            seed=args.seed, **settings,
        )


def _check_runs(args: argparse.Namespace, loaded: LoadedModel, example: torch.Tensor) -> None:
    """Run the model once on the example input, so that an input it cannot take is bad input (exit 2), said once.

    Without this, the wrong shape surfaces deep in tracing, folding or verification, as a torch traceback or an
    "internal error"; afterwards a failure there is bnfold's. ONNX files are checked by their own backend.
    """
    if loaded.kind == ONNX:
        return
    shape = ",".join(str(d) for d in example.shape)
    try:
        with torch.no_grad():
            loaded.runnable(example)
    except Exception as error:  # whatever the model's own forward raises on this input
        lines = str(error).strip().splitlines()
        cause = f"{type(error).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")
        if getattr(args, "input", None) or getattr(args, "data", None):
            advice = "check --input / --data: they must fit the shape of one batch that the model's forward() takes"
        elif args.input_shape is None:
            advice = (f"the example input was the default {shape}: pass --input-shape with the shape of one batch "
                      "that its forward() takes (e.g. --input-shape 1,3,32,32), or --input FILE.npy")
        else:
            advice = "check --input-shape: it is the shape of one batch that the model's forward() takes"
        raise OriginalRunError(loaded.label, shape, cause, advice, advice) from error


def _examples(args: argparse.Namespace, loaded: LoadedModel, seed: int) -> list[torch.Tensor]:
    """The batches to fold and judge on: ``--input FILE`` (.npy, or an .npz of one array), ``--data DIR`` (images
    resized to the example shape), else the model's example input (photographs for N x 3 x H x W)."""
    if getattr(args, "input", None) and getattr(args, "data", None):
        raise InvalidInputError("--input and --data both give the inputs to judge on: pass one of them")
    if getattr(args, "input", None):
        from ...examples import read_arrays

        arrays = read_arrays(args.input)
        if len(arrays) != 1:
            raise InvalidInputError(
                f"--input {args.input} holds {len(arrays)} arrays ({', '.join(arrays)}); the command line feeds PyTorch "
                "models one tensor: save one array (numpy.save)"
            )
        return [torch.from_numpy(next(iter(arrays.values())).copy())]
    if getattr(args, "data", None):
        from ...examples import image_batches

        shape = loaded.input_shape or loaded.example_inputs(seed).shape
        return [torch.from_numpy(b) for b in image_batches(args.data, tuple(shape), limit=args.limit or 8)]
    return [loaded.example_inputs(seed)]


def _print_notes(args: argparse.Namespace, console: Any, loaded: LoadedModel) -> None:
    if not args.json and loaded.notes:
        print_whole(console, *(Text(f"note: {note}", style="dim") for note in loaded.notes))


def _onnx_backend() -> Any:
    from ... import onnx as onnx_backend

    return onnx_backend


def _plan_report(loaded: LoadedModel, example: torch.Tensor, merge_branches: bool = False) -> FoldReport:
    if loaded.kind == ONNX:
        return _onnx_backend().plan(loaded.source or loaded.module, merge_branches=merge_branches)
    if merge_branches and loaded.kind in (TORCHSCRIPT, EXPORTED):
        # Which blocks merge depends on the folds before them: fold and merge in memory (the loaded model is
        # not changed, nothing is written) and report it as the dry run it is.
        if loaded.kind == TORCHSCRIPT:
            from ...backends.torchscript import fold_script

            _, report = fold_script(loaded.module, example_inputs=example, name=loaded.label, merge_branches=True)
        else:
            _, report = _fold_exported(loaded, example, merge_branches=True)
        report.applied = False
        return report
    if loaded.kind == TORCHSCRIPT:
        from ...backends.torchscript import plan_script

        return plan_script(loaded.module, example_inputs=example, name=loaded.label)
    if loaded.kind == EXPORTED:  # a real dry run: the graph is planned, nothing is folded or exported again
        from ...backends.exported import plan_exported

        return plan_exported(loaded.module, name=loaded.label)
    from ...engine import plan

    return plan(loaded.module, example, merge_branches=merge_branches)


def inspect(args: argparse.Namespace, console: Any) -> int:
    """``bnfold inspect MODEL``: each norm and what folding would do with it; parameter counts. Writes nothing."""
    loaded = _load(args, args.model, console)
    example = _examples(args, loaded, args.seed)[0]
    _check_runs(args, loaded, example)
    with console.status("tracing the dataflow"):
        report = _plan_report(loaded, example, args.merge_branches)
    report.model = loaded.label
    _print_notes(args, console, loaded)
    emit(args, console, report.to_dict(), report)
    return OK


def _fold_exported(loaded: LoadedModel, example: torch.Tensor, merge_branches: bool = False) -> tuple[Any, FoldReport]:
    """Fold a torch.export program, exported again on its own example inputs (or, lacking them, on ``example``)."""
    from ...backends.exported import fold_exported

    stored = loaded.module.example_inputs
    return fold_exported(loaded.module, example_inputs=None if stored is not None else example, name=loaded.label,
                         merge_branches=merge_branches)


def _fold_loaded(
    loaded: LoadedModel, example: torch.Tensor | None, tolerance: float | None, seed: int = 0,
    merge_branches: bool = False, examples: list[Any] | None = None,
) -> tuple[Any, FoldReport]:
    """Fold and verify; raises ``VerificationError`` (nothing written yet) if outputs differ.

    Every PyTorch format is judged by :func:`_judge`, the same check that later judges the written file.
    """
    if loaded.kind == ONNX:  # the result object, which knows whether to write external data
        result = _onnx_backend().fold(loaded.source or loaded.module, verify=True, tolerance=tolerance, seed=seed,
                                      merge_branches=merge_branches, inputs=examples or None,
                                      input_shape=loaded.input_shape)
        return result, result.report
    if loaded.kind == TORCHSCRIPT:
        from ...backends.torchscript import fold_script

        folded, report = fold_script(loaded.module, example_inputs=example, name=loaded.label,
                                     merge_branches=merge_branches)
        report.verification = _judge(loaded.module, folded, examples or [example], tolerance,
                                     "the folded TorchScript model", report)
        return folded, report
    if loaded.kind == EXPORTED:
        program, report = _fold_exported(loaded, example, merge_branches)
        report.verification = _judge(loaded.runnable, program.module(), examples or [example], tolerance,
                                     "the folded torch.export program", report)
        return program, report
    from ...engine import fold, report_for

    folded = fold(loaded.module, example, verify=False, merge_branches=merge_branches)
    report = report_for(folded)
    report.verification = _judge(loaded.module, folded, examples or [example], tolerance,
                                 f"the folded {type(loaded.module).__name__}", report)
    return folded, report


def _judge(original: Any, candidate: Any, examples: list[torch.Tensor], tolerance: float | None, what: str,
           report: FoldReport | None = None) -> dict[str, Any]:
    """The command line's check of the folded model in memory and of the file written: one tensor input per batch,
    judged by :func:`bnfold.verification.judge_fold` with the tensors ``report`` says the fold touched (the same rule
    for both, so a strict ``--tolerance`` cannot pass the fold and then refuse the identical file)."""
    from ...verification import judge_fold

    touched = report.touched() if report is not None else ()
    return judge_fold(original, candidate, [(example,) for example in examples], tolerance, what, touched)


def fold(args: argparse.Namespace, console: Any) -> int:
    """``bnfold fold MODEL -o OUT``: fold, verify on example inputs, write OUT atomically, print the report.

    OUT (and, for ONNX, its external data file) is never a file the run reads (:func:`_files_read`), with
    ``--force`` or not; it is written staged, read back and judged like the fold itself (:func:`_judge`), then
    renamed into place (without ``--force``, a rename that refuses to replace a file another run wrote meanwhile).
    """
    output = check_output_path(args.output, _files_read(args), force=args.force)
    loaded = _load(args, args.model, console)
    read = _files_read(args, loaded)  # now with the files the loader found (ONNX external data)
    written = [output]
    if _onnx_data_files(loaded):  # the folded model keeps external data too, in OUT.data (bnfold.onnx.save)
        from ...onnx.io import data_file

        written.append(data_file(output))
    refuse_inputs(written, read)
    fmt = choose_format(loaded.kind, output, args.format)
    if loaded.kind == ONNX:
        from .onnx_commands import user_inputs

        examples: list[Any] = user_inputs(args, loaded.module) or []
        example = None
    else:
        examples = _examples(args, loaded, args.seed)
        example = examples[0]
        for batch in examples:
            _check_runs(args, loaded, batch)
    with console.status("folding and verifying"):
        folded, report = _fold_loaded(loaded, example, args.tolerance, args.seed, args.merge_branches, examples)
    report.model = loaded.label
    if fmt in ("state_dict", "safetensors") and any(m.status == MERGED for m in report.merges):
        raise InvalidInputError(
            f"merged branches make the model a torch.fx GraphModule, whose weights no architecture loads as a "
            f"{fmt}; write it with --format pickle, torchscript, pt2 or onnx (or an OUT ending in .pt2 / .onnx / .ts)"
        )
    reread = None
    with console.status(f"writing {output}"):
        if loaded.kind == ONNX:
            reread = folded.save(output, force=args.force)  # staged, read back in onnxruntime, graph and data as one
        else:
            with staged(output, replace=args.force) as temporary:  # checked before it replaces anything
                write_model(folded, temporary, fmt, loaded.kind, example)
                reread = _check_written(loaded, temporary, fmt, examples, args.tolerance, report)
    payload = {"output": str(output), "format": fmt, "report": report.to_dict(), "written_file_check": reread}
    _print_notes(args, console, loaded)
    lines = [report, *filter(None, [verification_line(report.verification)]),
             f"wrote {output} ({fmt}, {output.stat().st_size / 1e6:.2f} MB)"]
    if reread is not None:
        lines.append(verification_line(reread, f"read {output} back"))
    emit(args, console, payload, *lines)
    return OK


def _files_read(args: argparse.Namespace, loaded: LoadedModel | None = None) -> list[Path]:
    """Every file this run reads, the one list no output may ever be part of (by path or inode, ``--force`` or not).

    MODEL (when it is a file), ``--weights``, ``--data``, and, once ``loaded``, the external data files of an ONNX
    model (every location of every tensor).
    """
    named = [getattr(args, "model", None), getattr(args, "weights", None)]
    files = [Path(n) for n in named if n and Path(n).exists() and not Path(n).is_dir()]  # a folder is refused later
    data = getattr(args, "data", None)
    if data and Path(data).exists():
        files.append(Path(data))  # a folder: nothing may be written inside it either
    return files + (_onnx_data_files(loaded) if loaded is not None else [])


def _onnx_data_files(loaded: LoadedModel) -> list[Path]:
    """The external data files of an ONNX model file (none for any other kind)."""
    if loaded.kind != ONNX or loaded.source is None:
        return []
    import onnx

    from ...onnx.io import external_data_files

    return external_data_files(onnx.load_model(str(loaded.source), load_external_data=False), loaded.source)


def _check_written(loaded: LoadedModel, written_path: Path, fmt: str, examples: list[torch.Tensor],
                   tolerance: float | None, report: FoldReport | None = None) -> dict[str, Any] | None:
    """Load the written file and judge it as the fold was judged (:func:`_judge`); raises (nothing kept) on a mismatch."""
    outputs_like = None
    if fmt == "onnx":  # exported on the first example, whose shapes it keeps: judged on that one
        examples = examples[:1]
        with torch.no_grad():  # the file answers in flat outputs; the original's structure puts them back
            outputs_like = loaded.runnable(examples[0])
    try:
        written = read_back(written_path, fmt, loaded.arch, outputs_like)
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise VerificationError(f"the {fmt} file bnfold wrote does not load back ({first}); nothing was written") from error
    if written is None:
        return None
    return _judge(loaded.runnable, written, examples, tolerance, f"the written {fmt} file", report)


def _load_pair(args: argparse.Namespace, console: Any) -> tuple[LoadedModel, LoadedModel]:
    """ORIGINAL and FOLDED of ``bnfold verify``, whatever ``bnfold fold`` wrote FOLDED as.

    ``--arch``, or else ORIGINAL's architecture name, is the architecture of whichever of the two holds a state_dict
    (``bnfold verify resnet50 folded.pt`` needs nothing more), and is ignored for files that carry their model;
    ``--weights`` and ``--seed`` make ORIGINAL's architecture name the model that was folded.
    """
    original_is_name = not names_a_file(args.original)
    if original_is_name and args.arch is not None and args.arch != args.original:
        raise InvalidInputError(
            f"--arch {args.arch} and ORIGINAL {args.original} name different architectures; FOLDED's architecture is "
            f"ORIGINAL's: drop --arch"
        )
    arch = args.arch or (args.original if original_is_name else None)
    original = _load(args, args.original, console, arch=None, weights=getattr(args, "weights", None),
                     state_dict_arch=arch)
    folded = _load(args, args.folded, console, arch=None, weights=None, state_dict_arch=arch)
    return original, folded


def verify(args: argparse.Namespace, console: Any) -> int:
    """``bnfold verify ORIGINAL FOLDED``: compare outputs on example inputs or on ``--data``.

    Any pair of formats compares: a PyTorch model against an ONNX file runs the first in PyTorch and the second in
    onnxruntime on the same inputs (``bnfold fold resnet50 -o r50.onnx`` then ``bnfold verify resnet50 r50.onnx``).
    """
    original, folded = _load_pair(args, console)
    if original.kind == ONNX and folded.kind == ONNX:  # ONNX files named with options that route here
        from . import onnx_commands

        return onnx_commands.verify(args, console)
    from ...verification import verify as compare

    # an ONNX file's fixed input shape is the one it was exported (and folded) with: the best default for both
    shape = args.input_shape or _onnx_input_shape(original, folded) or original.input_shape or folded.input_shape
    original.input_shape = folded.input_shape = shape
    with console.status("comparing outputs"):
        if args.input or (args.data and not (Path(args.data) / "val").is_dir()):  # arrays, or a plain image folder
            batches = _examples(args, original, args.seed)
            for batch in batches:
                _check_runs(args, original, batch)
            result = compare(_runnable(original), _runnable(folded), batches[0], data=batches[1:] or None,
                             tolerance=args.tolerance)
        elif args.data:
            from torch.utils.data import DataLoader

            from ..data import validation_folder

            size = (shape or (1, 3, 224, 224))[-1]
            loader = DataLoader(validation_folder(args.data, size=size, limit=args.limit), batch_size=16)
            result = compare(_runnable(original), _runnable(folded), data=loader, tolerance=args.tolerance)
        else:
            example = original.example_inputs(args.seed)
            _check_runs(args, original, example)
            _check_runs(args, folded, example)
            result = compare(_runnable(original), _runnable(folded), example, tolerance=args.tolerance)
    _print_notes(args, console, original)
    _print_notes(args, console, folded)
    lines = [str(result)]
    if not result.passed and original.seed is not None:
        lines.append(f"{original.label} is the model of --seed {original.seed}: if FOLDED was folded from other "
                     "weights, pass the --seed or --weights it was folded with")
    emit(args, console, result.to_dict(), *lines)
    return OK if result.passed else VERIFICATION_FAILED


def _runnable(loaded: LoadedModel) -> Any:
    """What ``bnfold verify`` calls: the model, or an ONNX file run in onnxruntime (:class:`OnnxRuntimeModule`)."""
    if loaded.kind != ONNX:
        return loaded.runnable
    return OnnxRuntimeModule(loaded.source or loaded.module)


def _onnx_input_shape(*models: LoadedModel) -> tuple[int, ...] | None:
    """The input shape the ONNX model among ``models`` declares, when it has one input and every size is fixed."""
    for loaded in models:
        if loaded.kind == ONNX:
            initializers = {t.name for t in loaded.module.graph.initializer}
            inputs = [v for v in loaded.module.graph.input if v.name not in initializers]
            if len(inputs) != 1:
                return None
            dims = inputs[0].type.tensor_type.shape.dim
            sizes = tuple(d.dim_value if d.HasField("dim_value") else 0 for d in dims)
            return sizes if sizes and all(n > 0 for n in sizes) else None
    return None


def bench(args: argparse.Namespace, console: Any) -> int:
    """``bnfold bench MODEL``: latency and footprint before/after folding (and the peers with ``--peers``)."""
    from ...bench import PEERS, benchmark

    if args.plot:  # before anything runs: a chart must never replace a file this run reads
        check_output_path(args.plot, _files_read(args), force=True)
    loaded = _load(args, args.model, console)
    if loaded.kind == ONNX:
        raise InvalidInputError("bnfold bench times PyTorch models; for ONNX files run benchmarks/onnx_peers.py")
    example = loaded.example_inputs(args.seed)
    _check_runs(args, loaded, example)
    batch_sizes = tuple(args.batch_sizes)
    model, folded = loaded.module, None
    if loaded.kind == TORCHSCRIPT:
        folded = _fold_loaded(loaded, example, args.tolerance)[0]
    if loaded.kind == EXPORTED:
        from ...backends.exported import check_batch_sizes

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
    emit(args, console, result.to_dict(), result, *([f"wrote {args.plot}"] if args.plot else []))
    return OK


def _graph_module(module: Any) -> Any:
    """An exported program's module marked as in eval mode (its ``.eval()`` raises; its graph has no mode to switch)."""
    module.training = False
    return module


def reproduce(args: argparse.Namespace, console: Any) -> int:
    """``bnfold reproduce``: the seed's experiment (see :mod:`bnfold.app.reproduce`)."""
    from ..reproduce import run

    return run(args, console)
