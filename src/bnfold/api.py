"""One entry point for every format: :func:`fold`, :func:`plan`, :func:`report_for` and :func:`save`.

The caller never says which format a model is in: its backend is picked by the table
:data:`bnfold.formats.BACKENDS`, and the result is of the kind that was given (a path: the kind its file
holds). An option a format has no use for is refused with that reason rather than ignored.

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
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import loading
from .errors import InvalidInputError
from .formats import BACKENDS, Backend, Fold, backend_for, backend_for_file, is_module, is_onnx
from .report import FoldReport

ONNX_KEPT = 8
"""How many folded ``onnx.ModelProto`` results :func:`report_for` and :func:`save` remember (see the module note)."""

_COMMON = frozenset({"verify", "tolerance", "merge_branches", "name"})
_DEFAULTS: dict[str, Any] = {"inplace": False, "registry": None, "seed": 0, "input_shape": None}

_WANTED = ("bnfold.fold takes a torch.nn.Module, a torch.jit.ScriptModule, a torch.export.ExportedProgram, an "
           "onnx.ModelProto or the path of a model file")


def _backend(model: Any) -> Backend:
    backend = backend_for(model)
    if backend is None:
        raise InvalidInputError(f"{_WANTED}, got {type(model).__name__}")
    return backend


def read_file(path: Path, trust_pickle: bool, refuse: Callable[[Backend], None] | None = None
              ) -> tuple[Any, Backend | None, str]:
    """What the model file ``path`` holds (:func:`bnfold.loading.read`: an ONNX file stays a path, its backend
    reads it), its backend (``None``: weights, no model) and its kind (:func:`bnfold.loading.sniff`): how
    :func:`fold` and the ``bnfold`` command read a file. ``refuse`` is shown the backend that the kind alone
    names before anything is read: the command refuses ``--arch`` for it without loading a large file first."""
    loading.check_readable(path)
    kind = loading.sniff(path)
    carrier = backend_for_file(kind)
    if refuse is not None and carrier is not None:
        refuse(carrier)
    content = loading.read(path, kind, trust_pickle)
    return content, backend_for(content) or carrier, kind


def _prepare(model: Any, trust_pickle: bool, options: dict[str, Any]
             ) -> tuple[Any, Backend, tuple[Path, ...], dict[str, Any]]:
    """The model (read, if a path: an ONNX file stays a path, its backend reads it), its backend, the files
    read, and ``options`` checked against the backend, named by the path unless a name was given."""
    if not isinstance(model, (str, os.PathLike)):
        if trust_pickle:
            raise InvalidInputError(
                "trust_pickle=True applies to a model file's path; this model is already loaded"
            )
        backend, sources = _backend(model), ()
    else:
        sources = (Path(model),)
        try:
            model, found, _ = read_file(sources[0], trust_pickle)
        except InvalidInputError as error:
            if "no such file" in str(error):
                raise InvalidInputError(f"{error}; {_WANTED} (architecture names are for the `bnfold` command)"
                                        ) from None
            raise
        if found is None:
            raise InvalidInputError(
                f"{sources[0]} holds weights (a state_dict), not a model: build the model, call "
                "model.load_state_dict(torch.load(path)) and pass the model (the `bnfold` command reads it "
                "with --arch NAME)"
            )
        backend = found
        options["name"] = options["name"] or str(sources[0])
    if options.get("merge_branches") == "blocks" and "inplace" not in backend.options:
        raise InvalidInputError(
            f"merge_branches='blocks' keeps an nn.Module's class by merging block by block; a {backend.kind} merges "
            "through its graph: pass merge_branches=True"
        )
    for option, value in options.items():
        if option not in _COMMON | backend.options and value != _DEFAULTS[option]:
            owners = [b.kind for b in BACKENDS if option in b.options]
            raise InvalidInputError(
                f"{option}= does not apply to this {backend.kind}; only to: {', '.join(owners)}"
                + (" (a TorchScript module, a program and an ONNX model are always folded into a new one)"
                   if option == "inplace" else "")
            )
    return model, backend, sources, options


# --------------------------------------------------------------------------------------- where results live

_lock = threading.Lock()
_torch_folds: weakref.WeakKeyDictionary[Any, Fold] = weakref.WeakKeyDictionary()
_onnx_folds: OrderedDict[int, tuple[Any, Fold]] = OrderedDict()  # id -> (the ModelProto itself, its fold)


def _remember(result: Any, record: Fold) -> None:
    with _lock:
        if is_onnx(result):
            _onnx_folds[id(result)] = (result, record)
            _onnx_folds.move_to_end(id(result))
            while len(_onnx_folds) > ONNX_KEPT:
                _onnx_folds.popitem(last=False)
        else:
            _torch_folds[result] = record


def _record(result: Any) -> Fold:
    with _lock:
        if is_onnx(result):
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
    if record is None and is_module(result):
        from .engine import report_for as engine_report

        return Fold(engine_report(result))  # folded by bnfold.engine.fold directly: the report, nothing to recheck
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
    loaded, backend, sources, options = _prepare(model, trust_pickle, {
        "inplace": inplace, "verify": verify, "tolerance": tolerance, "merge_branches": merge_branches,
        "registry": registry, "seed": seed, "input_shape": input_shape, "name": name})
    batches = None if example_inputs is None else backend.batches(example_inputs)
    result, record = backend.fold(loaded, batches, options, sources)
    _remember(result, record)
    return result


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
    loaded, backend, _, options = _prepare(model, trust_pickle, {"merge_branches": merge_branches,
                                                                  "registry": registry, "name": name})
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
    return _backend(result).save(result, record, path, force)
