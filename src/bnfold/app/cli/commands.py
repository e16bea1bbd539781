"""What each ``bnfold`` command does, on models loaded by :mod:`bnfold.app.cli.loading`, of every kind.

Every command returns an exit code (see :mod:`bnfold.app.cli`) and prints to the given console, or one JSON
document on stdout (:func:`emit`). Nothing is written to disk before every check passed. A command calls its
model's backend (:mod:`bnfold.formats`) without asking its kind, and imports PyTorch only where a PyTorch
model is handled: on ONNX files it starts without the seconds an import of PyTorch takes
(:func:`needs_torch`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.text import Text

from ...errors import InvalidInputError, OriginalRunError
from ...files import check_output_path
from ...formats import Fold, backend_for_file, is_onnx, onnx_module
from ...loading import kind_by_name
from ...report import MERGED, print_whole, verification_line
from . import EXIT_OK, EXIT_VERIFICATION_FAILED, saving
from .loading import LoadedModel, load_model, names_a_file


def emit(args: argparse.Namespace, console: Any, payload: dict[str, Any], *renderables: Any) -> None:
    """Write ``payload`` as JSON on stdout when ``--json`` was given (for scripts), else print each renderable
    on ``console``, whole (:func:`bnfold.report.print_whole`)."""
    if args.json:
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    print_whole(console, *renderables)  # outside a terminal, as wide as the widest row: no cell is ever cut


def needs_torch(args: argparse.Namespace) -> bool:
    """Whether the command line may handle a PyTorch model: anything but inspect, fold or verify of files whose names
    say they are ONNX. :func:`bnfold.app.cli.main` then imports PyTorch before the command runs, where a missing
    PyTorch and a Ctrl-C during its import are handled."""
    if args.command not in ("inspect", "fold", "verify"):
        return True
    named = (args.original, args.folded) if args.command == "verify" else (args.model,)
    backends = [backend_for_file(kind_by_name(Path(name)) or "") for name in named]
    return any(backend is None or backend.needs_torch for backend in backends)


def _load(args: argparse.Namespace, spec: str, console: Any, **options: Any) -> LoadedModel:
    with console.status(f"loading {spec}"):
        return load_model(spec, trust_pickle=args.trust_pickle, switch_to_eval=args.eval,
                          input_shape=args.input_shape, seed=args.seed,
                          **{"arch": args.arch, "weights": args.weights, **options})


def _check_runs(args: argparse.Namespace, loaded: LoadedModel, example: Any) -> None:
    """Run the model once on the example input, so that an input it cannot take is bad input (exit 2), said once.

    Without this, the wrong shape surfaces deep in tracing, folding or verification, as a torch traceback or an
    "internal error"; afterwards a failure there is bnfold's. An ONNX file is checked by onnxruntime as it runs.
    """
    if not loaded.backend.needs_torch:
        return
    import torch

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


def _examples(args: argparse.Namespace, loaded: LoadedModel) -> list[Any] | None:
    """The batches to fold and judge on: ``--input FILE`` (.npy, or an .npz of one array), ``--data DIR`` (images
    resized to the example shape), else the model's example input (photographs for N x 3 x H x W). For an ONNX
    graph: arrays by input name, or ``None`` (:func:`bnfold.onnx.fold` makes its example inputs)."""
    _check_one_source(args)
    if not loaded.backend.needs_torch:
        return _onnx_batches(args, loaded.module)
    import torch

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

        shape = loaded.input_shape or loaded.example_inputs(args.seed).shape
        return [torch.from_numpy(b) for b in image_batches(args.data, tuple(shape), limit=args.limit or 8)]
    return [loaded.example_inputs(args.seed)]


def _check_one_source(args: argparse.Namespace) -> None:
    """``--input`` and ``--data`` both name the inputs to judge on: refused before any file is read."""
    if getattr(args, "input", None) and getattr(args, "data", None):
        raise InvalidInputError("--input and --data both give the inputs to judge on: pass one of them")


def _onnx_batches(args: argparse.Namespace, model: Any) -> list[dict[str, Any]] | None:
    """The batches of ``--input FILE`` (arrays by graph input name; an .npy for the only input) or ``--data DIR``
    (images, resized to the image input's size: ``--input-shape``, else its fixed sizes, else 224) for the ONNX
    model ``model`` (a ModelProto already read, or the path of a file, read here), or ``None``."""
    if not (getattr(args, "input", None) or getattr(args, "data", None)):
        return None
    from ...examples import image_batches, read_arrays
    from ...onnx.verification import declared_shape, graph_inputs

    values = graph_inputs(model if is_onnx(model) else onnx_module().load(model))
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
    images = [v for v in values if len(declared_shape(v)) == 4 and declared_shape(v)[1] in (3, None)]
    if len(images) != 1:
        raise InvalidInputError(
            f"--data gives images for a model with one image input (N x 3 x H x W); this one has inputs {names}: "
            "pass --input FILE.npz with arrays by input name"
        )
    declared = declared_shape(images[0])
    shape = args.input_shape or tuple(d if d is not None else (1 if axis == 0 else 3 if axis == 1 else 224)
                                      for axis, d in enumerate(declared))
    return [{images[0].name: batch} for batch in image_batches(args.data, shape, limit=args.limit or 8)]


def _check_onnx_options(args: argparse.Namespace, loaded: LoadedModel) -> None:
    """Options that mean nothing for ONNX graphs are an error, not silently ignored."""
    if loaded.backend.needs_torch:
        return
    if args.eval:
        raise InvalidInputError(
            "--eval switches a PyTorch model to eval mode; an ONNX graph keeps the mode it was exported in: "
            "export the model again after model.eval(), and drop --eval"
        )
    if args.command == "inspect" and args.input_shape:
        raise InvalidInputError(
            "--input-shape sets the shape of the random inputs that fold and verify run; inspect of an ONNX file "
            "runs nothing and plans on the graph's own shapes: drop --input-shape"
        )


def _print_notes(args: argparse.Namespace, console: Any, *models: LoadedModel) -> None:
    notes = [note for loaded in models for note in loaded.notes]
    if not args.json and notes:
        print_whole(console, *(Text(f"note: {note}", style="dim") for note in notes))


def inspect(args: argparse.Namespace, console: Any) -> int:
    """``bnfold inspect MODEL``: each norm and what folding would do with it; parameter counts. Writes nothing."""
    loaded = _load(args, args.model, console)
    _check_onnx_options(args, loaded)
    examples = _examples(args, loaded)  # inputs that do not fit are bad input here too
    example = examples[0] if examples else None
    _check_runs(args, loaded, example)
    with console.status("tracing the dataflow"):
        report = loaded.backend.plan(loaded.module, example, {"merge_branches": args.merge_branches,
                                                              "name": loaded.label})
    _print_notes(args, console, loaded)
    emit(args, console, report.to_dict(), report)
    return EXIT_OK


def _fold_loaded(args: argparse.Namespace, loaded: LoadedModel, examples: list[Any] | None,
                 merge_branches: bool = False) -> tuple[Any, Fold]:
    """Fold and verify on every batch by the check the written file gets (so a strict ``--tolerance`` cannot pass the
    fold and then refuse the identical file); raises ``VerificationError`` (nothing written yet) if outputs differ."""
    options = {"verify": True, "judge": True, "consequence": "nothing was written", "tolerance": args.tolerance,
               "merge_branches": merge_branches, "name": loaded.label, "seed": args.seed,
               "input_shape": args.input_shape}
    batches = None if examples is None else [batch for example in examples for batch in loaded.backend.batches(example)]
    return loaded.backend.fold(loaded.module, batches, options, (loaded.source,) if loaded.source else ())


def fold(args: argparse.Namespace, console: Any) -> int:
    """``bnfold fold MODEL -o OUT``: fold, verify on example inputs, write OUT atomically, print the report.

    OUT is never a file the run reads (:func:`_files_read`), with ``--force`` or not, and it replaces nothing
    before it was read back and judged like the fold itself (:func:`bnfold.app.cli.saving.write`).
    """
    output = check_output_path(args.output, _files_read(args), force=args.force)
    loaded = _load(args, args.model, console)
    _check_onnx_options(args, loaded)
    fmt = saving.choose_format(loaded.format, output, args.format)
    saving.check_writable(loaded.backend, fmt)
    examples = _examples(args, loaded)
    for batch in examples or ():
        _check_runs(args, loaded, batch)
    with console.status("folding and verifying"):
        folded, record = _fold_loaded(args, loaded, examples, args.merge_branches)
    report = record.report
    if fmt in ("state_dict", "safetensors") and any(m.status == MERGED for m in report.merges):
        raise InvalidInputError(
            f"merged branches make the model a torch.fx GraphModule, whose weights no architecture loads as a "
            f"{fmt}; write it with --format pickle, torchscript, pt2 or onnx (or an OUT ending in .pt2 / .onnx / .ts)"
        )
    with console.status(f"writing {output}"):  # staged, read back and judged before it replaces anything
        reread = saving.write(folded, record, loaded.backend, output, fmt, force=args.force, arch=loaded.arch)
    payload = {"output": str(output), "format": fmt, "report": report.to_dict(), "written_file_check": reread}
    _print_notes(args, console, loaded)
    lines = [report, f"wrote {output} ({fmt}, {output.stat().st_size / 1e6:.2f} MB)"]
    if reread is not None:
        lines.append(verification_line(reread, f"read {output} back"))
    emit(args, console, payload, *lines)
    return EXIT_OK


def _files_read(args: argparse.Namespace) -> list[Path]:
    """Every file this run reads, the one list no output may ever be part of (by path or inode, ``--force`` or not):
    MODEL (when it is a file), ``--weights`` and ``--data``."""
    named = [getattr(args, "model", None), getattr(args, "weights", None)]
    files = [Path(n) for n in named if n and Path(n).exists() and not Path(n).is_dir()]  # a folder is refused later
    data = getattr(args, "data", None)
    if data and Path(data).exists():
        files.append(Path(data))  # a folder: nothing may be written inside it either
    return files


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
    original = _load(args, args.original, console, arch=None, state_dict_arch=arch)
    folded = _load(args, args.folded, console, arch=None, weights=None, state_dict_arch=arch)
    return original, folded


def verify(args: argparse.Namespace, console: Any) -> int:
    """``bnfold verify ORIGINAL FOLDED``: compare outputs on example inputs or on ``--data``.

    Any pair of formats compares: a PyTorch model against an ONNX file runs the first in PyTorch and the second in
    onnxruntime on the same inputs (``bnfold fold resnet50 -o r50.onnx`` then ``bnfold verify resnet50 r50.onnx``).
    """
    original, folded = _load_pair(args, console)
    if not original.backend.needs_torch and not folded.backend.needs_torch:
        return _verify_onnx(args, console, original)
    from ...verification import verify as compare

    # an ONNX file's fixed input shape is the one it was exported (and folded) with: the best default for both
    fixed = (loaded.backend.fixed_input_shape(loaded.module) for loaded in (original, folded))
    shape = args.input_shape or next(filter(None, fixed), None) or original.input_shape or folded.input_shape
    original.input_shape = folded.input_shape = shape
    with console.status("comparing outputs"):
        if args.data and not args.input and (Path(args.data) / "val").is_dir():  # an ImageFolder
            from torch.utils.data import DataLoader

            from ..data import validation_folder

            size = (shape or (1, 3, 224, 224))[-1]
            loader = DataLoader(validation_folder(args.data, size=size, limit=args.limit), batch_size=16)
            result = compare(original.runnable, folded.runnable, data=loader, tolerance=args.tolerance)
        else:  # arrays, a plain image folder, or the example input (FOLDED must take that one too)
            given = bool(args.input or args.data)
            # the batches are tensors for the model that runs in PyTorch (ORIGINAL unless it is the ONNX file)
            in_torch = original if original.backend.needs_torch else folded
            batches = _examples(args, in_torch) if given else [original.example_inputs(args.seed)]
            for loaded in (in_torch,) if given else (original, folded):
                for batch in batches:
                    _check_runs(args, loaded, batch)
            result = compare(original.runnable, folded.runnable, batches[0], data=batches[1:] or None,
                             tolerance=args.tolerance)
    _print_notes(args, console, original, folded)
    lines = [str(result)]
    if not result.passed and original.seed is not None:
        lines.append(f"{original.label} is the model of --seed {original.seed}: if FOLDED was folded from other "
                     "weights, pass the --seed or --weights it was folded with")
    emit(args, console, result.to_dict(), *lines)
    return EXIT_OK if result.passed else EXIT_VERIFICATION_FAILED


def _verify_onnx(args: argparse.Namespace, console: Any, loaded: LoadedModel) -> int:
    """Compare two ONNX files in onnxruntime on example inputs (or ``--input`` / ``--data``), judged as a fold is."""
    _check_onnx_options(args, loaded)
    _check_one_source(args)
    backend = onnx_module()
    original = backend.load(args.original)
    inputs = _onnx_batches(args, original)  # its graph inputs from the model just read: the file is read once
    folded = backend.load(args.folded)
    with console.status("comparing outputs in onnxruntime"):
        result = backend.verify(original, folded, seed=args.seed, tolerance=args.tolerance, inputs=inputs,
                                input_shape=args.input_shape)
    emit(args, console, result.to_dict(), str(result))
    return EXIT_OK if result.passed else EXIT_VERIFICATION_FAILED


def bench(args: argparse.Namespace, console: Any) -> int:
    """``bnfold bench MODEL``: latency and footprint before/after folding (and the peers with ``--peers``)."""
    from ...bench import PEERS, benchmark

    if args.plot:  # before anything runs: a chart must never replace a file this run reads
        check_output_path(args.plot, _files_read(args), force=True)
    loaded = _load(args, args.model, console)
    if not loaded.backend.needs_torch:
        raise InvalidInputError("bnfold bench times PyTorch models; for ONNX files run benchmarks/onnx_peers.py")
    example = loaded.example_inputs(args.seed)
    _check_runs(args, loaded, example)
    batch_sizes = tuple(args.batch_sizes)
    loaded.backend.check_batch_sizes(loaded.module, batch_sizes)
    with console.status("folding and verifying"):
        folded = loaded.backend.runnable(_fold_loaded(args, loaded, [example])[0])
    peers = PEERS if args.peers and loaded.backend.only_as is None else ()  # the peers convert an eager nn.Module
    with console.status("timing (interleaved rounds)") as status:
        result = benchmark(
            loaded.runnable, example, batch_sizes=batch_sizes, threads=args.threads, peers=peers,
            channels_last=args.channels_last, compile=args.compile, warmup=args.warmup, repeats=args.repeats,
            folded=folded, progress=lambda stage: status.update(stage),
        )
    result.settings["model"] = loaded.label
    if args.plot:
        result.plot(args.plot)
    _print_notes(args, console, loaded)
    emit(args, console, result.to_dict(), result, *([f"wrote {args.plot}"] if args.plot else []))
    return EXIT_OK


def reproduce(args: argparse.Namespace, console: Any) -> int:
    """``bnfold reproduce``: the seed's experiment (see :mod:`bnfold.app.reproduce`)."""
    from ..reproduce import run

    return run(args, console)
