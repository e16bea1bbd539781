"""One entry point for every format: :func:`fold`, :func:`plan`, :func:`report_for` and :func:`save`.

The caller never says which format a model is in: the backend is picked from its kind, by the table
:data:`_BACKENDS` (the first entry whose ``accepts`` holds), and the result is of the kind that was given:

============================== ================================================ ==============================
given                          folded by                                        returned
============================== ================================================ ==============================
``torch.jit.ScriptModule``     :func:`bnfold.backends.torchscript.fold_script`  the frozen, folded ScriptModule
``torch.export.ExportedProgram`` :func:`bnfold.backends.exported.fold_exported`  the program, exported again
``torch.nn.Module``            :func:`bnfold.engine.fold`                       a model of the same class
``onnx.ModelProto``            :func:`bnfold.onnx.fold`                         the folded ModelProto
a path                         read as the ``bnfold`` command reads it           the kind the file holds
============================== ================================================ ==============================

The options mean the same in every format: ``verify`` (default: whenever there are inputs to compare on: the
``example_inputs`` given, a program's own example inputs, an ONNX graph's example inputs, always derivable),
``tolerance``, ``merge_branches``; an option a format has no use for (``inplace`` and ``registry`` are for
``nn.Module`` layers, ``seed`` and ``input_shape`` for ONNX example inputs) is refused with that reason rather than
ignored. Every format is judged by one rule (:mod:`bnfold.judge`).

Where the report lives: the returned object's report is kept beside it, for :func:`report_for` and :func:`save`.
PyTorch results are weakly referenced keys (the record goes with the result). A protobuf ``ModelProto`` takes no
attributes, weak references, hash or subclass, so the last :data:`ONNX_KEPT` folded ModelProtos are held (by
identity, strongly: an ``id`` can never point at another model); an older one's report is gone, and
:func:`report_for` says so. Long-running code folding many ONNX models can keep ``bnfold.onnx.fold``'s result
object, which carries the report and ``save``.

Nothing here imports PyTorch: an ONNX model or file is folded on a machine without it.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import loading
from .errors import InvalidInputError, VerificationError
from .files import check_output_path, staged
from .report import FoldReport

ONNX_KEPT = 8
"""How many folded ``onnx.ModelProto`` results :func:`report_for` and :func:`save` remember (see the module note)."""

_COMMON = frozenset({"verify", "tolerance", "merge_branches", "name"})


@dataclass
class _Fold:
    """What :func:`report_for` and :func:`save` need of a fold's result."""

    report: FoldReport
    sources: tuple[Path, ...] = ()  # the files the fold read: never written over
    examples: list[tuple[Any, ...]] | None = None  # the batches the fold was verified on (None: not verified)
    tolerance: float | None = None
    original: Callable[[], Any] | None = None  # a weak reference to the original (None after an in-place fold)
    onnx: Any = None  # the OnnxFoldResult, which writes ONNX files


@dataclass(frozen=True)
class _Backend:
    """One format: how to recognise it, fold it, plan it, and write, read back and run its result."""

    kind: str
    accepts: Callable[[Any], bool]
    fold: Callable[[Any, Any, dict[str, Any], tuple[Path, ...]], tuple[Any, _Fold]]
    plan: Callable[[Any, Any, dict[str, Any]], FoldReport]
    options: frozenset[str]  # beyond the common ones
    write: Callable[[Any, Path], None] | None = None  # None: the fold's own result object writes (ONNX)
    read: Callable[[Path], Any] | None = None
    runnable: Callable[[Any], Any] = lambda model: model


# ---------------------------------------------------------------------------------------- recognising kinds


def _torch_instance(value: Any, module: str, name: str) -> bool:
    """``isinstance(value, module.name)`` without importing torch: a torch object exists only once torch is imported."""
    owner = sys.modules.get(module)
    return owner is not None and isinstance(value, getattr(owner, name))


def _is_script(value: Any) -> bool:
    return _torch_instance(value, "torch.jit", "ScriptModule")


def _is_exported(value: Any) -> bool:
    return _torch_instance(value, "torch.export", "ExportedProgram")


def _is_module(value: Any) -> bool:
    return _torch_instance(value, "torch.nn", "Module")


def _is_onnx(value: Any) -> bool:
    return _torch_instance(value, "onnx", "ModelProto")


# ------------------------------------------------------------------------------------------------ the formats


def _verify_default(verify: bool | None, inputs: Any) -> bool:
    verify = inputs is not None if verify is None else verify
    if verify and inputs is None:
        raise InvalidInputError("verify=True needs example_inputs to run both models on")
    return verify


def _module_fold(model: Any, example_inputs: Any, options: dict[str, Any], sources: tuple[Path, ...]
                 ) -> tuple[Any, _Fold]:
    from .backends.capture import as_input_tuple
    from .engine import fold, report_for

    inputs = as_input_tuple(example_inputs)
    inplace = options.get("inplace", False)
    folded = fold(model, inputs, inplace=inplace, verify=options.get("verify"), tolerance=options.get("tolerance"),
                  registry=options.get("registry"), merge_branches=options.get("merge_branches", False))
    verified = (inputs is not None) if options.get("verify") is None else bool(options["verify"])
    report = report_for(folded)
    if options.get("name"):
        report.model = options["name"]
    return folded, _Fold(report, sources, [inputs] if verified and inputs is not None else None,
                         options.get("tolerance"), None if inplace else weakref.ref(model))


def _module_plan(model: Any, example_inputs: Any, options: dict[str, Any]) -> FoldReport:
    from .engine import plan

    report = plan(model, example_inputs, registry=options.get("registry"),
                  merge_branches=options.get("merge_branches", False))
    if options.get("name"):
        report.model = options["name"]
    return report


def _judged(original: Any, folded: Any, inputs: tuple[Any, ...], options: dict[str, Any], report: FoldReport,
            what: str) -> None:
    from .verification import judge_fold

    report.verification = judge_fold(original, folded, [inputs], options.get("tolerance"), what, report.touched(),
                                     consequence="nothing was returned; pass verify=False to fold without the check")


def _script_fold(module: Any, example_inputs: Any, options: dict[str, Any], sources: tuple[Path, ...]
                 ) -> tuple[Any, _Fold]:
    from .backends.capture import as_input_tuple
    from .backends.torchscript import fold_script

    inputs = as_input_tuple(example_inputs)
    verify = _verify_default(options.get("verify"), inputs)
    folded, report = fold_script(module, example_inputs=inputs, name=options.get("name") or "TorchScript model",
                                 merge_branches=options.get("merge_branches", False))
    if verify:
        assert inputs is not None  # _verify_default refused verify without inputs
        _judged(module, folded, inputs, options, report, "the folded TorchScript model")
    return folded, _Fold(report, sources, [inputs] if verify and inputs is not None else None,
                         options.get("tolerance"), weakref.ref(module))


def _script_plan(module: Any, example_inputs: Any, options: dict[str, Any]) -> FoldReport:
    from .backends.torchscript import fold_script, plan_script

    name = options.get("name") or "TorchScript model"
    if options.get("merge_branches"):  # which blocks merge depends on the folds before them: fold a copy
        _, report = fold_script(module, example_inputs=example_inputs, name=name, merge_branches=True)
        report.applied = False
        return report
    return plan_script(module, example_inputs=example_inputs, name=name)


def _program_inputs(program: Any, example_inputs: Any) -> tuple[Any, ...] | None:
    """The positional inputs to verify a program on: those given, else its own (none when it takes keywords)."""
    from .backends.capture import as_input_tuple

    if example_inputs is not None:
        return as_input_tuple(example_inputs)
    stored = getattr(program, "example_inputs", None)
    if stored is None or stored[1]:
        return None
    return tuple(stored[0])


def _exported_fold(program: Any, example_inputs: Any, options: dict[str, Any], sources: tuple[Path, ...]
                   ) -> tuple[Any, _Fold]:
    from .backends.exported import fold_exported

    inputs = _program_inputs(program, example_inputs)
    verify = _verify_default(options.get("verify"), inputs)
    given = None if example_inputs is None else inputs
    folded, report = fold_exported(program, example_inputs=given, name=options.get("name") or "exported program",
                                   merge_branches=options.get("merge_branches", False))
    if verify:
        assert inputs is not None
        _judged(program.module(), folded.module(), inputs, options, report, "the folded torch.export program")
    return folded, _Fold(report, sources, [inputs] if verify and inputs is not None else None,
                         options.get("tolerance"), weakref.ref(program))


def _exported_plan(program: Any, example_inputs: Any, options: dict[str, Any]) -> FoldReport:
    from .backends.exported import fold_exported, plan_exported

    name = options.get("name") or "exported program"
    if options.get("merge_branches"):
        given = None if example_inputs is None else _program_inputs(program, example_inputs)
        _, report = fold_exported(program, example_inputs=given, name=name, merge_branches=True)
        report.applied = False
        return report
    return plan_exported(program, name=name)


def _onnx_fold(model_or_path: Any, example_inputs: Any, options: dict[str, Any], sources: tuple[Path, ...]
               ) -> tuple[Any, _Fold]:
    from . import onnx as onnx_backend

    verify = options.get("verify")
    result = onnx_backend.fold(model_or_path, verify=True if verify is None else verify,
                               tolerance=options.get("tolerance"), inputs=example_inputs,
                               seed=options.get("seed", 0), input_shape=options.get("input_shape"),
                               merge_branches=options.get("merge_branches", False))
    if options.get("name"):
        result.report.model = options["name"]
    return result.model, _Fold(result.report, result.sources, onnx=result)


def _onnx_plan(model_or_path: Any, example_inputs: Any, options: dict[str, Any]) -> FoldReport:
    from . import onnx as onnx_backend

    report = onnx_backend.plan(model_or_path, merge_branches=options.get("merge_branches", False))
    if options.get("name"):
        report.model = options["name"]
    return report


def _torch_save(model: Any, path: Path) -> None:
    import torch

    torch.save(model, path)


def _torch_read(path: Path) -> Any:
    import torch

    return torch.load(path, weights_only=False)  # the file bnfold has just written itself


def _script_save(module: Any, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.save is deprecated; it is still this format
        torch.jit.save(module, str(path))


def _script_read(path: Path) -> Any:
    return loading.load_torchscript(path)


def _exported_save(program: Any, path: Path) -> None:
    import torch

    torch.export.save(program, str(path))


def _exported_read(path: Path) -> Any:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.load(str(path))  # the file bnfold has just written itself


_BACKENDS = (  # ScriptModule before nn.Module: a ScriptModule is an nn.Module
    _Backend("TorchScript module", _is_script, _script_fold, _script_plan, frozenset(), _script_save, _script_read),
    _Backend("torch.export program", _is_exported, _exported_fold, _exported_plan, frozenset(), _exported_save,
             _exported_read, runnable=lambda program: program.module()),
    _Backend("nn.Module", _is_module, _module_fold, _module_plan, frozenset({"inplace", "registry"}), _torch_save,
             _torch_read),
    _Backend("ONNX model", _is_onnx, _onnx_fold, _onnx_plan, frozenset({"seed", "input_shape"})),
)
_ONNX = _BACKENDS[-1]

_WANTED = ("bnfold.fold takes a torch.nn.Module, a torch.jit.ScriptModule, a torch.export.ExportedProgram, an "
           "onnx.ModelProto or the path of a model file")


def _backend(model: Any) -> _Backend:
    backend = next((b for b in _BACKENDS if b.accepts(model)), None)
    if backend is None:
        raise InvalidInputError(f"{_WANTED}, got {type(model).__name__}")
    return backend


def _read_path(path: Path, trust_pickle: bool) -> tuple[Any, _Backend, tuple[Path, ...]]:
    """The model a file holds (an ONNX file stays a path: its backend reads it, external data and all), its
    backend, and the files read."""
    loading.check_readable(path)
    kind = loading.sniff(path)
    if kind == loading.ONNX:
        return path, _ONNX, ()  # bnfold.onnx records the graph and its data files itself
    if kind == loading.UNKNOWN:
        raise InvalidInputError(
            f"{path} is not a model file bnfold knows (PyTorch checkpoint, pickled module, TorchScript, .pt2 program, "
            "safetensors or ONNX); check the path"
        )
    loading.needs_torch(path, kind)
    if kind == loading.TORCHSCRIPT:
        model = loading.load_torchscript(path)
    elif kind == loading.EXPORTED:
        model = loading.load_exported(path, trust_pickle)
    elif kind == loading.TORCH_FILE:
        model = loading.torch_load(path, trust_pickle)
    else:
        model = None  # a safetensors file: weights only
    if model is None or not _is_module(model) and not _is_exported(model):
        raise InvalidInputError(
            f"{path} holds weights (a state_dict), not a model: build the model, call "
            "model.load_state_dict(torch.load(path)) and pass the model (the `bnfold` command reads it with --arch NAME)"
        )
    return model, _backend(model), (path,)


def _resolve(model: Any, trust_pickle: bool) -> tuple[Any, _Backend, tuple[Path, ...], str | None]:
    """The model (read, if a path), its backend, the files read, and the name a path gives the report."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        try:
            read, backend, sources = _read_path(path, trust_pickle)
        except InvalidInputError as error:
            if "no such file" in str(error):
                raise InvalidInputError(f"{error}; {_WANTED} (architecture names are for the `bnfold` command)"
                                        ) from None
            raise
        return read, backend, sources, str(path)
    if trust_pickle:
        raise InvalidInputError("trust_pickle=True applies to a model file's path; this model is already loaded")
    return model, _backend(model), (), None


def _check_options(backend: _Backend, options: dict[str, Any], defaults: dict[str, Any]) -> None:
    if options.get("merge_branches") == "blocks" and "inplace" not in backend.options:
        raise InvalidInputError(
            f"merge_branches='blocks' keeps an nn.Module's class by merging block by block; a {backend.kind} merges "
            "through its graph: pass merge_branches=True"
        )
    for option, value in options.items():
        if option not in _COMMON | backend.options and value != defaults[option]:
            owners = [b.kind for b in _BACKENDS if option in b.options]
            raise InvalidInputError(
                f"{option}= does not apply to this {backend.kind}; only to: {', '.join(owners)}"
                + (" (a TorchScript module, a program and an ONNX model are always folded into a new one)"
                   if option == "inplace" else "")
            )


# --------------------------------------------------------------------------------------- where results live

_lock = threading.Lock()
_torch_folds: weakref.WeakKeyDictionary[Any, _Fold] = weakref.WeakKeyDictionary()
_onnx_folds: OrderedDict[int, tuple[Any, _Fold]] = OrderedDict()  # id -> (the ModelProto itself, its fold)


def _remember(result: Any, record: _Fold) -> None:
    with _lock:
        if _is_onnx(result):
            _onnx_folds[id(result)] = (result, record)
            _onnx_folds.move_to_end(id(result))
            while len(_onnx_folds) > ONNX_KEPT:
                _onnx_folds.popitem(last=False)
        else:
            _torch_folds[result] = record


def _record(result: Any) -> _Fold:
    with _lock:
        if _is_onnx(result):
            held = _onnx_folds.get(id(result))
            if held is not None and held[0] is result:
                return held[1]
            raise InvalidInputError(
                "this ONNX model was not returned by bnfold.fold() in this session, or is older than the last "
                f"{ONNX_KEPT} folded ModelProtos (a protobuf message cannot carry its report, so bnfold keeps only "
                "those): call bnfold.plan(model) for a dry-run report, or keep the result of bnfold.onnx.fold()"
            )
        try:
            record = _torch_folds.get(result)
        except TypeError:  # neither hashable nor weakly referable: not a model bnfold returned
            record = None
    if record is None and _is_module(result):
        from .engine import report_for as engine_report

        return _Fold(engine_report(result))  # folded by bnfold.engine.fold directly: the report, nothing to recheck
    if record is None:
        raise InvalidInputError(
            "this model was not returned by bnfold.fold() in this session; call bnfold.plan(model) for a dry-run report"
        )
    return record


# -------------------------------------------------------------------------------------------- the public API


def fold(
    model: Any,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    verify: bool | None = None,
    tolerance: float | None = None,
    merge_branches: bool | str = False,
    registry: Any = None,
    seed: int = 0,
    input_shape: Any = None,
    name: str | None = None,
    trust_pickle: bool = False,
) -> Any:
    """Fold every batch norm that folds exactly, in any format; the result is of the kind ``model`` is.

    Args:
        model: a ``torch.nn.Module`` (in eval mode), a ``torch.jit.ScriptModule``, a ``torch.export.ExportedProgram``,
            an ``onnx.ModelProto``, or the path of a file of one of them (a pickled module, a TorchScript archive, a
            ``.pt2`` program, an ONNX file). A path returns the kind the file holds. The caller's object is never
            changed, except an ``nn.Module`` with ``inplace=True``.
        example_inputs: what to run both models on: a tensor or a tuple of the forward's positional arguments (for
            ONNX: a dict of input name -> numpy array, or a list of them). A ``.pt2`` program's own example inputs and
            an ONNX graph's example inputs (photographs for ``N x 3 x H x W``) are used when none are given.
        inplace: fold the ``nn.Module`` itself instead of a copy (``nn.Module`` only).
        verify: compare the folded model's outputs with the original's (default: whenever there are inputs: given,
            a program's own, an ONNX graph's). A fold that fails the check raises and returns nothing.
        tolerance: largest accepted ``max|a - b| / max|a|`` per output (default: from the dtype); an output above it
            still passes within what one rounding step of the touched weights does (:mod:`bnfold.judge`).
        merge_branches: also merge summed parallel branches into one layer (RepVGG, MobileOne, ...). ``"blocks"``
            (``nn.Module`` only) merges inside each block and keeps the model's class (see :func:`bnfold.engine.fold`).
        registry: the layer rules (``nn.Module`` only; default: built-ins plus what was registered).
        seed, input_shape: the ONNX example inputs' random seed and shape (ONNX only).
        name: the model's name in the report (default: the path, or the kind).
        trust_pickle: read a path whose loading runs code from the file (a pickled module, some ``.pt2`` files).

    Returns:
        The folded model; its report is :func:`report_for` of it, and :func:`save` writes it.

    Raises:
        InvalidInputError: not a model bnfold folds, an option that does not apply to its kind, an unreadable file.
        TrainingModeError, CaptureError, NonFiniteStatisticsError, NonFiniteOutputError, VerificationError,
        UndecidedError: as :func:`bnfold.engine.fold` describes them, in every format.
    """
    loaded, backend, sources, label = _resolve(model, trust_pickle)
    options = {"inplace": inplace, "verify": verify, "tolerance": tolerance, "merge_branches": merge_branches,
               "registry": registry, "seed": seed, "input_shape": input_shape, "name": name or label}
    _check_options(backend, options, _FOLD_DEFAULTS | {"name": options["name"]})
    result, record = backend.fold(loaded, example_inputs, options, sources)
    _remember(result, record)
    return result


_FOLD_DEFAULTS: dict[str, Any] = {"inplace": False, "verify": None, "tolerance": None, "merge_branches": False,
                                  "registry": None, "seed": 0, "input_shape": None}


def plan(
    model: Any,
    example_inputs: Any = None,
    *,
    merge_branches: bool | str = False,
    registry: Any = None,
    name: str | None = None,
    trust_pickle: bool = False,
) -> FoldReport:
    """Dry run: the report of what :func:`fold` would do with ``model`` (any kind :func:`fold` takes), which is
    left untouched. With ``merge_branches=True`` the preview folds and merges a copy (whether a block merges depends
    on the folds before it)."""
    loaded, backend, _, label = _resolve(model, trust_pickle)
    options = {"merge_branches": merge_branches, "registry": registry, "name": name or label}
    _check_options(backend, options, _FOLD_DEFAULTS | {"name": options["name"]})
    return backend.plan(loaded, example_inputs, options)


def report_for(result: Any) -> FoldReport:
    """The :class:`~bnfold.report.FoldReport` of the :func:`fold` call that returned ``result``, whatever its kind.

    ``report.verification`` is the check's verdict as plain data, the same keys in every format (``passed``,
    ``tolerance``, ``max_relative``, ``max_abs``, ``outputs``...), ready for JSON.
    """
    return _record(result).report


def save(result: Any, path: str | os.PathLike[str], *, force: bool = False) -> dict[str, Any] | None:
    """Write a folded model the way ``bnfold fold`` writes: in its own format, staged beside ``path``, read back
    and checked, and only then renamed into place.

    The writer is picked by kind: ``torch.save`` of an ``nn.Module`` (the whole module: loading it needs its code),
    ``torch.jit.save`` of a ScriptModule, ``torch.export.save`` of a program, and the ONNX writer (external data
    beside it when the source had it; opened by path in onnxruntime). When the fold was verified, the file read
    back is judged on the same inputs and tolerance: against the original (as ``bnfold fold`` does) while the
    original is alive and unchanged by the fold, else against the verified result in memory. Never over a file the
    fold read, ``force`` or not; an existing ``path`` only with ``force``.

    Returns:
        The verdict of the written file's check (plain data), or ``None`` when the fold was not verified.

    Raises:
        InvalidInputError: ``result`` was not returned by :func:`fold`, ``path`` is a file the fold read, exists
            without ``force``, or cannot be written.
        VerificationError: the written file does not load back or does not reproduce the outputs (nothing written).
    """
    record = _record(result)
    if record.onnx is not None:
        return record.onnx.save(path, force=force)
    backend = _backend(result)
    assert backend.write is not None and backend.read is not None  # every PyTorch backend writes
    target = check_output_path(path, record.sources, force=force)
    checked = None
    with staged(target, replace=force) as temporary:
        try:
            backend.write(result, temporary)
        except OSError:
            raise
        except Exception as error:  # a model the writer cannot serialise (a local class does not pickle, ...)
            raise InvalidInputError(
                f"cannot write the folded {backend.kind} to {target} ({loading.first_line(error)})"
            ) from error
        try:
            written = backend.runnable(backend.read(temporary))
        except Exception as error:
            raise VerificationError(
                f"the file bnfold wrote for {target.name} does not load back ({loading.first_line(error)}); nothing "
                "was written"
            ) from error
        if record.examples is not None:
            from .verification import judge_fold

            original = record.original() if record.original is not None else None
            reference = backend.runnable(original if original is not None else result)
            checked = judge_fold(reference, written, record.examples, record.tolerance, f"the written {target.name}",
                                 record.report.touched() if original is not None else ())
    return checked
