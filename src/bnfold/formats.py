"""The four kinds of model bnfold folds, in one table (:data:`BACKENDS`): how to recognise each, fold it,
plan it, write it, read the written file back the way its user opens it, and run it. The API and the
``bnfold`` command call what :func:`backend_for` (or :func:`backend_for_file`) gives and never ask which kind
they have.

Nothing here imports PyTorch until a PyTorch model is handled: an ONNX model or file is folded, planned and
written on a machine without it.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

from . import loading
from .errors import InvalidInputError, VerificationError
from .files import check_output_path, staged
from .report import FoldReport


@dataclass
class Fold:
    """What a fold leaves for :func:`bnfold.report_for` and for writing its result."""

    report: FoldReport
    sources: tuple[Path, ...] = ()  # the files the fold read: never written over
    examples: list[Any] | None = None  # the batches the fold was verified on (None: not verified)
    tolerance: float | None = None
    original: Callable[[], Any] | None = None  # a weak reference to the original (None after an in-place fold)
    onnx: Any = None  # the OnnxFoldResult, which writes ONNX files


@dataclass(frozen=True)
class Backend:
    """One kind of model: how to recognise it, fold it, plan it, and write, read back and run its result.

    ``fold(model, batches, options, sources)`` folds and (option ``verify``) checks on ``batches`` (tuples of
    positional inputs; for ONNX, dicts of arrays by input name); ``options`` are those of :func:`bnfold.fold` plus
    ``judge`` (check the fold by :func:`bnfold.verification.judge_fold` on every batch, the check its written file
    gets) and ``consequence`` (what the refusal of the check says happened).
    """

    kind: str  # in sentences: "TorchScript module"
    accepts: Callable[[Any], bool]
    file_kind: str | None  # what bnfold.loading.sniff calls its files (None: a torch.save file may hold weights only)
    format: str  # the name of its file format (``bnfold fold --format``)
    article: str  # "a TorchScript", as in "model.ts is a TorchScript file"
    fold: Callable[[Any, list[Any] | None, dict[str, Any], tuple[Path, ...]], tuple[Any, Fold]]
    plan: Callable[[Any, Any, dict[str, Any]], FoldReport]
    batches: Callable[[Any], list[Any]]  # example_inputs as fold() takes them, as a list of batches
    options: frozenset[str] = frozenset()  # beyond the common ones
    write: Callable[[Any, Path], None] | None = None
    read: Callable[[Path], Any] | None = None  # a written file, opened by its path as its user opens it
    runnable: Callable[[Any], Any] = lambda model: model  # what to call on inputs
    only_as: str | None = None  # why it is written in no other format (None: an nn.Module converts to every one)
    needs_torch: bool = True
    # the command line's one example input: its shape from the one given (checked) or the model's own example
    input_shape: Callable[[Any, tuple[int, ...] | None, str], tuple[int, ...] | None] = lambda model, given, name: given
    # the only input shape the model runs on (an ONNX graph with every size fixed), the best default for a pair
    fixed_input_shape: Callable[[Any], tuple[int, ...] | None] = lambda model: None
    # refuse batch sizes the model cannot run (a program exported with a static batch), before timing them
    check_batch_sizes: Callable[[Any, tuple[int, ...]], None] = lambda model, sizes: None

    def save(self, result: Any, record: Fold, path: Path | str, force: bool) -> dict[str, Any] | None:
        """Write the folded ``result`` in its own format, checked (:func:`save_checked`,
        :func:`judge_written`)."""
        if record.onnx is not None:
            return record.onnx.save(path, force=force)  # external data beside it when the source had it
        assert self.write is not None and self.read is not None  # every PyTorch backend
        write, read = self.write, self.read
        target = check_output_path(path, record.sources, force=force)
        return save_checked(target, force, f"the folded {self.kind}", lambda file: write(result, file),
                            lambda file: self.runnable(read(file)),
                            judge_written(self, result, record, f"the written {target.name}"))


# ---------------------------------------------------------------------------------------- recognising kinds


def _torch_instance(value: Any, module: str, name: str) -> bool:
    """``isinstance(value, module.name)`` without importing torch: a torch object exists only once torch is imported."""
    owner = sys.modules.get(module)
    return owner is not None and isinstance(value, getattr(owner, name))


def is_onnx(value: Any) -> bool:
    return _torch_instance(value, "onnx", "ModelProto")


def is_module(value: Any) -> bool:
    return _torch_instance(value, "torch.nn", "Module")


# ------------------------------------------------------------------------------------------ checking a fold


def _verify_default(verify: bool | None, batches: list[Any] | None) -> bool:
    verify = batches is not None if verify is None else verify
    if verify and batches is None:
        raise InvalidInputError("verify=True needs example_inputs to run both models on")
    return verify


def _judge(original: Any, folded: Any, batches: list[Any], options: dict[str, Any], report: FoldReport,
           what: str) -> None:
    from .verification import judge_fold

    consequence = options.get("consequence") or "nothing was returned; pass verify=False to fold without the check"
    report.verification = judge_fold(original, folded, batches, options.get("tolerance"), what, report.touched(),
                                     consequence=consequence)


def _named(report: FoldReport, options: dict[str, Any]) -> FoldReport:
    if options.get("name"):
        report.model = options["name"]
    return report


def _torch_batches(example_inputs: Any) -> list[Any]:
    from .backends.capture import as_input_tuple

    return [as_input_tuple(example_inputs)]


# ------------------------------------------------------------------------------------------------ the formats


def _module_fold(model: Any, batches: list[Any] | None, options: dict[str, Any], sources: tuple[Path, ...]
                 ) -> tuple[Any, Fold]:
    from .engine import fold, report_for

    inplace = options.get("inplace", False)
    verify = _verify_default(options.get("verify"), batches)
    judged = verify and bool(options.get("judge"))  # else the engine's own check (it rolls back an in-place fold)
    folded = fold(model, batches[0] if batches else None, inplace=inplace, verify=verify and not judged,
                  tolerance=options.get("tolerance"), registry=options.get("registry"),
                  merge_branches=options.get("merge_branches", False))
    report = _named(report_for(folded), options)
    if judged:
        assert batches is not None  # _verify_default refused verify without inputs
        _judge(model, folded, batches, options, report, f"the folded {type(model).__name__}")
    return folded, Fold(report, sources, batches if verify else None, options.get("tolerance"),
                        None if inplace else weakref.ref(model))


def _module_plan(model: Any, example_inputs: Any, options: dict[str, Any]) -> FoldReport:
    from .engine import plan

    return _named(plan(model, example_inputs, registry=options.get("registry"),
                       merge_branches=options.get("merge_branches", False)), options)


def _later(module: str, name: str) -> Callable[..., Any]:
    """``module.name`` (relative to bnfold if it starts with a dot), imported when it is first called."""
    return lambda *args, **kwargs: getattr(import_module(module, __package__), name)(*args, **kwargs)


def _frozen_format(backend: str, fold_name: str, plan_name: str, default_name: str, what: str,
                   runnable: Callable[[Any], Any] = lambda model: model,
                   own_batches: Callable[[Any], list[Any] | None] = lambda model: None, plan_reads_inputs: bool = True,
                   ) -> tuple[Callable[..., tuple[Any, Fold]], Callable[..., FoldReport]]:
    """The fold and plan entries of a graph format folded by ``bnfold.backends.<backend>``: TorchScript and
    torch.export differ only in their functions' names, what runs a model (``runnable``) and whether a model carries
    its own example inputs (``own_batches``, used when none are given; its dry run then reads none of the given ones:
``plan_reads_inputs``)."""

    fold_function = _later(f".backends.{backend}", fold_name)
    plan_function = _later(f".backends.{backend}", plan_name)

    def fold(model: Any, batches: list[Any] | None, options: dict[str, Any], sources: tuple[Path, ...]
             ) -> tuple[Any, Fold]:
        given, batches = batches, batches or own_batches(model)
        verify = _verify_default(options.get("verify"), batches)
        folded, report = fold_function(model, example_inputs=given[0] if given else None,
                                       name=options.get("name") or default_name,
                                       merge_branches=options.get("merge_branches", False))
        if verify:
            assert batches is not None
            _judge(runnable(model), runnable(folded), batches, options, report, what)
        return folded, Fold(report, sources, batches if verify else None, options.get("tolerance"), weakref.ref(model))

    def plan(model: Any, example_inputs: Any, options: dict[str, Any]) -> FoldReport:
        from .core.pipeline import merge_preview

        name = options.get("name") or default_name
        given = None if example_inputs is None else _torch_batches(example_inputs)[0]
        if options.get("merge_branches"):  # the caller's model is frozen or exported again, never changed
            return merge_preview(fold_function(model, example_inputs=given, name=name, merge_branches=True)[1])
        return plan_function(model, example_inputs=given, name=name) if plan_reads_inputs else plan_function(model, name=name)

    return fold, plan


def _own_inputs(program: Any) -> list[Any] | None:
    """A program's own example inputs as one batch (none when it has none, or takes keywords)."""
    stored = getattr(program, "example_inputs", None)
    return None if stored is None or stored[1] else [tuple(stored[0])]


def _graph_module(program: Any) -> Any:
    """A program's module, marked as in eval mode (its ``.eval()`` raises; its graph has no mode to switch)."""
    module = program.module()
    module.training = False
    return module


_script_fold, _script_plan = _frozen_format("torchscript", "fold_script", "plan_script", "TorchScript model",
                                            "the folded TorchScript model")
_exported_fold, _exported_plan = _frozen_format("exported", "fold_exported", "plan_exported", "exported program",
                                                "the folded torch.export program", runnable=_graph_module,
                                                own_batches=_own_inputs, plan_reads_inputs=False)


def _exported_input_shape(program: Any, given: tuple[int, ...] | None, name: str) -> tuple[int, ...]:
    """The shape of the program's one tensor input: ``given`` (if the program accepts it), else its example's."""
    from .backends.exported import check_input_shape

    if given is not None:
        check_input_shape(program, given)
    stored = program.example_inputs
    if stored is not None:
        args, kwargs = stored
        if kwargs or len(args) != 1 or not _torch_instance(args[0], "torch", "Tensor"):
            raise InvalidInputError(
                f"{name} takes {len(args)} positional and {len(kwargs)} keyword inputs; the command line handles "
                "programs with one tensor input: call bnfold.fold(program, example_inputs) from Python"
            )
        return given if given is not None else tuple(args[0].shape)
    if given is None:
        raise InvalidInputError(f"{name} carries no example inputs; pass --input-shape (e.g. 1,3,224,224)")
    return given


def onnx_module() -> Any:
    """:mod:`bnfold.onnx`, or the install hint where the onnx package is missing."""
    try:
        from . import onnx
    except ImportError as error:
        raise InvalidInputError(f"ONNX files need the onnx package ({error}): pip install 'bnfold[onnx]'") from error
    return onnx


def _onnx_fold(model_or_path: Any, batches: list[Any] | None, options: dict[str, Any], sources: tuple[Path, ...]
               ) -> tuple[Any, Fold]:
    verify = options.get("verify")
    result = onnx_module().fold(model_or_path, verify=True if verify is None else verify,
                                tolerance=options.get("tolerance"), inputs=batches,
                                seed=options.get("seed", 0), input_shape=options.get("input_shape"),
                                merge_branches=options.get("merge_branches", False))
    _named(result.report, options)
    return result.model, Fold(result.report, result.sources, onnx=result)


def _onnx_plan(model_or_path: Any, example_inputs: Any, options: dict[str, Any]) -> FoldReport:
    return _named(onnx_module().plan(model_or_path, merge_branches=options.get("merge_branches", False)), options)


def _onnx_runnable(model_or_path: Any) -> Any:
    from .onnx import load
    from .onnx.in_torch import OnnxRuntimeModule

    if not is_onnx(model_or_path):
        load(model_or_path)  # a file that is not a complete ONNX model is bad input, said in one line
    return OnnxRuntimeModule(model_or_path)


def _onnx_fixed_input_shape(model_or_path: Any) -> tuple[int, ...] | None:
    """The shape of the graph's one input when every size is fixed (``None`` otherwise)."""
    import onnx

    from .onnx.verification import declared_shape, graph_inputs

    model = model_or_path
    if not is_onnx(model):  # a file: its graph without its weights (inputs, outputs), cheap for a large model
        model = onnx.load_model(str(model), load_external_data=False)
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        return None
    sizes = declared_shape(inputs[0])
    return tuple(sizes) if sizes and all(n for n in sizes) else None  # type: ignore[arg-type]


def _torch_read(path: Path) -> Any:
    import torch

    return torch.load(path, weights_only=False)  # the file bnfold has just written itself


def _script_save(module: Any, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.save is deprecated; it is still this format
        torch.jit.save(module, str(path))


def _exported_save(program: Any, path: Path) -> None:
    import torch

    torch.export.save(program, str(path))


def _exported_read(path: Path) -> Any:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.load(str(path))  # the file bnfold has just written itself


# ------------------------------------------------------------------------------------------ writing, checked


def save_checked(target: Path, force: bool, what: str, write: Callable[[Path], None], read: Callable[[Path], Any],
                 judge: Callable[[Any], dict[str, Any] | None] | None) -> dict[str, Any] | None:
    """Write ``target`` staged beside it, open the staged file by its path (``read``) and ``judge`` what it holds;
    only then rename it into place (over an existing file only with ``force``). Returns the judge's verdict.

    Raises:
        InvalidInputError: the writer cannot serialise the model (a local class does not pickle, ...).
        VerificationError: the written file does not load back, or the judge refuses it (nothing written).
    """
    with staged(target, replace=force) as temporary:
        try:
            write(temporary)
        except OSError:
            raise
        except Exception as error:
            raise InvalidInputError(f"cannot write {what} to {target} ({loading.first_line(error)})") from error
        try:
            written = read(temporary)
        except Exception as error:
            raise VerificationError(
                f"the file bnfold wrote for {target.name} does not load back ({loading.first_line(error)}); nothing "
                "was written"
            ) from error
        return judge(written) if judge is not None and written is not None else None


def judge_written(backend: Backend, result: Any, record: Fold, what: str, batches: int | None = None
                  ) -> Callable[[Any], dict[str, Any] | None]:
    """The check of a written file of ``result`` (the fold's first ``batches`` batches, all by default): judged like
    the fold, when it was verified, against the original while it is alive and unchanged by the fold, else against
    the verified result in memory."""

    def judge(written: Any) -> dict[str, Any] | None:
        from .verification import judge_fold

        if record.examples is None:
            return None
        original = record.original() if record.original is not None else None
        reference = backend.runnable(original if original is not None else result)
        return judge_fold(reference, written, record.examples[:batches], record.tolerance, what,
                          record.report.touched() if original is not None else ())

    return judge


# TorchScript before nn.Module: a ScriptModule is an nn.Module and backend_for takes the first that accepts it
BACKENDS = (
    Backend("TorchScript module", lambda m: _torch_instance(m, "torch.jit", "ScriptModule"), loading.TORCHSCRIPT,
            "torchscript", "a TorchScript", _script_fold, _script_plan, _torch_batches, write=_script_save,
            read=loading.load_torchscript, only_as="a TorchScript model can only be written as TorchScript"),
    Backend("torch.export program", lambda m: _torch_instance(m, "torch.export", "ExportedProgram"), loading.EXPORTED,
            "pt2", "a torch.export (.pt2)", _exported_fold, _exported_plan, _torch_batches,
            write=_exported_save, read=_exported_read, runnable=_graph_module,
            only_as="a torch.export program (.pt2) can only be written as pt2", input_shape=_exported_input_shape,
            check_batch_sizes=_later(".backends.exported", "check_batch_sizes")),
    Backend("nn.Module", is_module, None, "pickle", "a pickled nn.Module", _module_fold, _module_plan,
            _torch_batches, frozenset({"inplace", "registry"}), _later("torch", "save"), _torch_read),
    Backend("ONNX model", is_onnx, loading.ONNX, "onnx", "an ONNX", _onnx_fold, _onnx_plan,
            lambda inputs: inputs if isinstance(inputs, list) else [inputs],
            frozenset({"seed", "input_shape"}), runnable=_onnx_runnable, needs_torch=False,
            only_as="an ONNX model can only be written as ONNX", fixed_input_shape=_onnx_fixed_input_shape),
)


def backend_for(model: Any) -> Backend | None:
    """The backend of a model in memory (the first entry of :data:`BACKENDS` that accepts it), or ``None``."""
    return next((b for b in BACKENDS if b.accepts(model)), None)


def backend_for_file(kind: str) -> Backend | None:
    """The backend of a file of ``kind`` (:func:`bnfold.loading.sniff`), or ``None`` (weights only, unknown)."""
    return next((b for b in BACKENDS if b.file_kind == kind), None)
