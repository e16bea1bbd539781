"""Proof that folding changed nothing: compare the outputs of two PyTorch models.

Outputs may be tensors, tuples, lists, dicts and nestings of them; every output tensor is judged by
:mod:`bnfold.judge`, the rule all formats share. Models that draw random numbers in eval mode run every time
under the same seed (:func:`run_seeded`), so the original and the folded model see the same draws.

Default tolerances (:data:`TOLERANCES`) follow from float precision. Folding changes each weight by one
rounding and removes the norm's own roundings, so a layer's output moves by a few ``eps`` of its magnitude,
summed over the layers and amplified by the network's conditioning. About ``1000 * eps`` (1e-4 for float32,
timm's own zoo tolerance) leaves room for a hundred layers amplified ~10 times, while a wrong fold (a missing
shift, a scale on the wrong axis) gives errors of order 1. fp16 and bf16 compute every layer in half
precision, where one rounding is already 5e-4 / 4e-3 of the value: they get ten roundings, 1e-2 and 8e-2.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import judge
from .backends.capture import MODEL_CALLS_LOCK
from .errors import InvalidInputError, UndecidedError, VerificationError
from .judge import OutputError, VerificationResult

TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 8e-2,
}


def default_tolerance(model_or_dtype: nn.Module | torch.dtype) -> float:
    """The relative tolerance for a model (by the widest floating dtype of its parameters) or a dtype."""
    dtypes = ({model_or_dtype} if isinstance(model_or_dtype, torch.dtype)
              else {p.dtype for p in model_or_dtype.parameters() if p.is_floating_point()})
    fallback = TOLERANCES[torch.float32]
    return max((TOLERANCES.get(d, fallback) for d in dtypes), default=fallback)


def _flat(tree: Any) -> tuple[dict[str, Any], Any]:
    """The leaves of an output structure by path (``"[0]"``, ``"['boxes']"``, ``""`` for a lone tensor), and its
    structure."""
    leaves, spec = pytree.tree_flatten_with_path(tree)
    return {pytree.keystr(path): leaf for path, leaf in leaves}, spec


def numbers(value: Any) -> tuple[Any, float | None] | None:
    """How :func:`bnfold.judge.compare` reads a PyTorch output (see there): a tensor as a numpy array, float64 unless
    it is compared exactly (integers, booleans), a complex one as (real, imaginary) pairs; any other value as itself
    (``None``). bfloat16 has no numpy dtype, so floating tensors are widened by torch, and the epsilon comes from their
    own dtype."""
    if not isinstance(value, torch.Tensor):
        return None
    tensor = value.detach().cpu()
    if tensor.is_complex():  # (real, imaginary) pairs: both parts are judged
        return torch.view_as_real(tensor.to(torch.complex128)).numpy(), torch.finfo(tensor.dtype).eps
    if not tensor.is_floating_point():
        return tensor.numpy(), None
    return tensor.to(torch.float64).numpy(), torch.finfo(tensor.dtype).eps


def compare_outputs(reference: Any, candidate: Any, tolerance: float, perturbed: Any = None) -> VerificationResult:
    """Compare two model outputs of the same structure, tensor by tensor (:func:`bnfold.judge.compare`).

    ``perturbed``: the original's outputs with its touched tensors moved one rounding step (:func:`noise_floor`);
    when given (and of the same structure), each floating output also gets its :mod:`bnfold.judge` allowance.
    """
    (original, spec), (folded, folded_spec) = _flat(reference), _flat(candidate)
    if spec != folded_spec:
        return VerificationResult([], tolerance, [f"the outputs have different structures ({spec} vs {folded_spec})"])
    floor, floor_spec = _flat(perturbed) if perturbed is not None else ({}, spec)
    return judge.compare(original, folded, tolerance, floor if floor_spec == spec else None, numbers)


RUN_SEED = 0
"""The random state every model run of a check starts from (:func:`run_seeded`)."""


def run_seeded(model: Any, inputs: tuple[Any, ...], seed: int = RUN_SEED) -> Any:
    """``model(*inputs)`` without gradients, from torch's random state ``seed`` (the caller's state is kept).

    A forward that draws random numbers in eval mode (noise injection, a VAE's sampling) then draws the same numbers
    for the original, the folded model and the perturbed original, so their outputs are comparable.
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        return model(*inputs)


def touched_tensors(model: Any, modules: Any) -> list[str]:
    """Names of the floating parameters and buffers owned (directly) by the named modules of ``model``."""
    owners = set(modules)
    named = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, tensor in named
            if name.rpartition(".")[0] in owners and isinstance(tensor, torch.Tensor) and tensor.is_floating_point()]


def _one_step(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``tensor`` with each value moved to its next representable neighbour, up or down at random."""
    up = torch.rand(tensor.shape, generator=generator) < 0.5
    if tensor.dtype in (torch.float32, torch.float64):
        infinity = torch.full_like(tensor, float("inf"))
        return torch.nextafter(tensor, torch.where(up.to(tensor.device), infinity, -infinity))
    step = torch.finfo(tensor.dtype).eps
    sign = torch.where(up, 1.0, -1.0).to(tensor.device)
    return (tensor.float() * (1 + sign * step)).to(tensor.dtype)


def noise_floor(model: Any, names: Any, inputs: tuple[Any, ...], seed: int = RUN_SEED) -> Any:
    """The outputs of ``model`` with each named tensor moved one rounding step (:mod:`bnfold.judge`), or ``None``
    when no name matches. The tensors are swapped back afterwards, bit for bit, whatever the forward does."""
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    chosen = [n for n in names if n in tensors]
    if not chosen:
        return None
    generator = torch.Generator().manual_seed(judge.PERTURB_SEED)
    saved = {}
    try:
        for name in chosen:  # on .data: no gradient is recorded
            saved[name] = tensors[name].data
            tensors[name].data = _one_step(tensors[name].data, generator)
        return run_seeded(model, inputs, seed)
    finally:
        for name, data in saved.items():
            tensors[name].data = data


def _to_float64(tree: Any) -> Any:
    return pytree.tree_map(lambda v: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v, tree)


ROUNDING_FACTOR = 4.0
"""How much further from the float64 truth the folded model may be than the error sources it is allowed (see
:func:`explained_by_rounding`). Two float computations of the same function that round at different places are
each off the truth by a similar amount; across the torchvision zoo the ratio stays below 3, while a wrong fold moves
outputs by a sizeable fraction of their magnitude, thousands of times the original's rounding error."""


def _round_like(exact_fold: nn.Module, original: nn.Module) -> None:
    """Round every floating tensor of the float64 ``exact_fold`` through the dtype the original stores it in.

    Tensors the fold did not touch came from the original, so rounding them changes nothing; folded weights and
    biases get exactly the one rounding the real fold gives them. A bias the fold created takes its weight's dtype.
    """
    stored = {n: t.dtype for n, t in (*original.named_parameters(), *original.named_buffers()) if t.is_floating_point()}
    fallback = max((p.dtype for p in original.parameters() if p.is_floating_point()),
                   key=lambda d: torch.finfo(d).bits, default=torch.float32)
    with torch.no_grad():
        for name, tensor in (*exact_fold.named_parameters(), *exact_fold.named_buffers()):
            if tensor.is_floating_point():
                owner = name.rpartition(".")[0]
                dtype = stored.get(name) or stored.get(f"{owner}.weight" if owner else "weight", fallback)
                tensor.data = tensor.data.to(dtype).to(tensor.dtype)


def _ratio(error: float, allowance: float) -> float:
    return error / allowance if allowance else (0.0 if error == 0 else float("inf"))


def explained_by_rounding(
    original: nn.Module,
    inputs: tuple[Any, ...],
    original_outputs: Any,
    folded_outputs: Any,
    exact_fold: nn.Module | None = None,
    folded_float64: nn.Module | None = None,
) -> VerificationResult:
    """Second opinion for a difference above the fixed tolerance: is it only float rounding?

    Badly conditioned networks (random weights, BN variances near zero, outputs that cancel) amplify float32
    rounding until two correct computations of the same function differ by more than any fixed tolerance. Outputs
    are judged against the truth ``T``, the float64 evaluation of ``original`` (copied, not changed) on ``inputs``;
    ``original_outputs`` / ``folded_outputs`` are what the two models returned on them. Either test passes:

    1. **As precise as the original.** ``|F32 - T|`` is at most :data:`ROUNDING_FACTOR` times the original's
       own ``|O32 - T|``, plus one rounding of the output.
    2. **Right up to the rounding of its weights** (needs ``exact_fold``, the same plan carried out in
       float64, and ``folded_float64``, a float64 copy of the folded model; both are consumed). ``|F64 - T|``
       (the folded weights without activation rounding) is at most :data:`ROUNDING_FACTOR` times ``|R - E|``
       plus one rounding of the output, where ``E`` is ``exact_fold``'s output and ``R`` its output once its
       weights are rounded through the stored dtype (what one rounding of every folded weight does to this
       model, whatever its conditioning).

    Why the second test: an original whose weights and inputs are small integers (a fixed edge filter on raw
    pixel values) computes exactly, while ``W * s`` must be rounded, and taps that cancel on offset inputs
    turn that rounding into an error hundreds of times the original's (near zero): test 1 refuses a fold exact
    in float64. Test 2 cannot pass a wrong fold: ``|F64 - T|`` is then of the output's size, while ``|R - E|``
    is measured between two versions of the fold *as planned*, never against the folded model, and stays at
    rounding level.

    The returned comparison's ``relative`` is, per output, the smaller of the two error / allowance ratios
    (pass <= 1).
    """
    truth = run_seeded(copy.deepcopy(original).double(), _to_float64(inputs))  # the copy is freed once it ran
    trees = [truth, original_outputs, folded_outputs]
    if exact_fold is not None and folded_float64 is not None:  # the second test: (E, R, F64) of each output
        trees.append(run_seeded(exact_fold, _to_float64(inputs)))
        _round_like(exact_fold, original)
        trees += [run_seeded(exact_fold, _to_float64(inputs)), run_seeded(folded_float64, _to_float64(inputs))]
    comparison = VerificationResult([], 1.0)
    for path, t, a, b, *second_test in zip(_flat(truth)[0], *(_flat(tree)[0].values() for tree in trees), strict=True):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
            continue
        finite = torch.isfinite(t)
        one_rounding = float(t[finite].abs().max()) * torch.finfo(a.dtype).eps
        error = float((b.double() - t)[finite].abs().max())
        ratio = _ratio(error, ROUNDING_FACTOR * float((a.double() - t)[finite].abs().max()) + one_rounding)
        if second_test:
            exact, rounded, folded64 = second_test
            rounding = float((rounded - exact)[finite].abs().max())
            weights_error = float((folded64 - t)[finite].abs().max())
            # A rounding that is not finite measures nothing (and must not allow everything): no second test.
            allowance = ROUNDING_FACTOR * (rounding if math.isfinite(rounding) else 0.0) + one_rounding
            if _ratio(weights_error, allowance) < ratio:
                ratio, error = _ratio(weights_error, allowance), weights_error
        comparison.outputs.append(OutputError(path, error, ratio, tuple(t.shape)))
    return comparison


# ------------------------------------------------------------------------- the check of a fold in any format


def judge_fold(original: Any, candidate: Any, examples: list[tuple[Any, ...]], tolerance: float | None, what: str,
               touched: Any = (), consequence: str = "nothing was written") -> dict[str, Any]:
    """The one output check of a fold in a PyTorch format (a TorchScript module, a torch.export program,
    and an nn.Module folded with the option ``judge``, as ``bnfold fold`` does) and of a written file
    (``bnfold fold``, :func:`bnfold.save`): ``candidate`` against ``original`` on each batch of ``examples``
    (a tuple of positional inputs), by :func:`judge_batch`. ``touched``: module names of ``original``
    (``FoldReport.touched()``) whose tensors the noise floor moves; ``tolerance``: default from the original's
    dtype.

    Returns:
        The verdict over every batch as plain data (:meth:`VerificationResult.to_dict`): per output, its
        worst batch (:meth:`VerificationResult.absorb`), as :func:`verify` and the ONNX check report it.

    Raises:
        VerificationError: the outputs differ beyond both (one line, naming the worst output, then ``consequence``).
        UndecidedError: the original's own outputs vary run to run as much (no verdict).
    """
    limit = tolerance if tolerance is not None else default_tolerance(original)
    names = touched_tensors(original, touched) if touched else []
    verdict: VerificationResult | None = None
    for example in examples:
        expected, actual = run_seeded(original, example), run_seeded(candidate, example)
        perturbed = noise_floor(original, names, example) if names else None
        comparison = judge_batch(original, example, expected, actual, limit, perturbed, names, lambda result: (
            UndecidedError(f"{what} cannot be verified: {result.undecided}; {consequence}") if result.undecided
            else VerificationError(f"{what} differs from the original: {result.worst()}; {consequence}")))
        if verdict is None:
            verdict = comparison
        else:
            verdict.absorb(comparison)
    if verdict is None:
        return {}
    verdict.batches = len(examples)
    return verdict.to_dict()


def judge_batch(original: Any, inputs: tuple[Any, ...], expected: Any, actual: Any, limit: float, perturbed: Any,
                touched: list[str], refusal: Callable[[VerificationResult], Exception] | None, *,
                restore: Callable[[], Any] | None = None, reapply: Callable[[], Any] | None = None,
                folded_float64: Callable[[], nn.Module] | None = None,
                exact_fold: Callable[[], nn.Module] | None = None) -> VerificationResult:
    """The verdict on a fold in every PyTorch format, on one batch ``inputs``: the folded model's outputs ``actual``
    against the original's ``expected`` and its noise floor ``perturbed`` (of the ``touched`` tensors).

    An output passes within ``limit`` (``max|a - b| / max|a|``) or the noise floor's allowance (:mod:`bnfold.judge`).
    Above ``limit``, an original that differs from itself run to run makes the check undecided; an output beyond both
    gets the float64 second opinion (:func:`explained_by_rounding`: none for a model that cannot run in float64),
    which decides. No verdict, or a failing one, raises ``refusal(result)``; with no ``refusal`` (:func:`verify`,
    which reports rather than refuses) it is returned like a passing one.

    Hooks of a fold made in the caller's model itself: ``restore`` gives the original back whenever it must run
    again or the fold may be refused (a refused fold leaves the model as it was), ``reapply`` folds it again when
    the verdict passes after all; ``folded_float64`` / ``exact_fold`` make the second opinion's models (the first
    while the folded model is still there).
    """
    comparison = described(compare_outputs(expected, actual, limit, perturbed), inputs, touched)
    if comparison.passed and comparison.max_relative <= limit:
        return comparison
    second_opinion = comparison.judged and not comparison.passed and not comparison.problems
    # its float64 copy of the folded model, made before the fold is undone
    folded = folded_float64() if folded_float64 is not None and second_opinion else None
    if restore is not None:
        restore()
    # A NaN (or unmatched infinity): no error is known, no second opinion can pass it; nor an undecided check.
    if comparison.judged and not comparison.problems:  # above the tolerance, the verdict rests on the floor: noise?
        with MODEL_CALLS_LOCK:  # the original, run again
            comparison.check_run_to_run(_flat(expected)[0], _flat(run_seeded(original, inputs))[0], numbers)
    if second_opinion and comparison.judged:
        exact = exact_fold() if exact_fold is not None and folded is not None else None
        try:
            with MODEL_CALLS_LOCK:
                comparison.rounding_check = explained_by_rounding(original, inputs, expected, actual, exact, folded)
        except Exception:  # a graph that cannot run in float64 (some TorchScript / exported graphs): no opinion
            if exact is not None:
                raise
        del exact, folded
    if not comparison.passed and refusal is not None:
        raise refusal(comparison)
    if comparison.passed and restore is not None and reapply is not None:
        reapply()
    return comparison


def described(result: VerificationResult, inputs: tuple[Any, ...], touched: list[str]) -> VerificationResult:
    """``result`` with what it was judged on: the shapes of ``inputs`` and the number of ``touched`` tensors (those
    the noise floor moved)."""
    shapes = [list(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
    result.input_shapes = {"input": shapes[0]} if len(shapes) == 1 else {f"input{n}": s for n, s in enumerate(shapes)}
    result.perturbed_tensors = len(touched)
    return result


# ------------------------------------------------------------------------------------------ bnfold.verify()


def _batches(data: Any) -> Any:
    """Yield ``(inputs_tuple, labels_or_None)`` from a tensor, a DataLoader or an iterable of batches."""
    for batch in [data] if isinstance(data, torch.Tensor) else data:
        if isinstance(batch, torch.Tensor):
            yield (batch,), None
        elif isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor) and (
            batch[1].dtype in (torch.int64, torch.int32) and batch[1].dim() == 1
        ):
            yield (batch[0],), batch[1]
        elif isinstance(batch, (tuple, list)):
            yield tuple(batch), None
        else:
            raise InvalidInputError(
                f"data must yield tensors or (inputs, labels) pairs, got {type(batch).__name__}; pass a DataLoader "
                f"over your validation set"
            )


def verify(
    original: nn.Module,
    folded: nn.Module,
    inputs: Any = None,
    *,
    data: Any = None,
    tolerance: float | None = None,
    max_batches: int | None = None,
) -> VerificationResult:
    """Prove that ``folded`` computes what ``original`` computes: per-output errors and top-1 agreement.

    Args:
        original / folded: the model before and after folding (both in eval mode; neither is changed).
        inputs: a tensor or a tuple of positional inputs to compare the outputs on.
        data: a validation set: a tensor, a ``DataLoader`` or any iterable of batches (``inputs`` or
            ``(inputs, labels)``). Every batch is compared like ``inputs``; for a classifier (output of shape
            ``(batch, classes)``) the fraction of samples with the same top-1 prediction is reported, and each model's
            accuracy when labels are given.
        tolerance: largest accepted ``max|a - b| / max|a|`` per output; default from the original's dtype.
        max_batches: stop after this many batches of ``data``.

    Each output tensor (tuples, lists, dicts are walked) is judged by :func:`judge_batch`, the check of every fold,
    on the noise floor of the tensors ``folded`` changed (:func:`changed_tensors`), with its float64 second opinion
    (the original's own float rounding; ``folded`` need not share the original's modules, so no exact fold); both
    models run from the same random state.
    """
    if inputs is None and data is None:
        raise InvalidInputError("verify() needs inputs or data to run both models on")
    limit = tolerance if tolerance is not None else default_tolerance(original)
    given = [] if inputs is None else [(inputs if isinstance(inputs, tuple) else (inputs,), None)]
    from_data = _batches(data) if data is not None else ()
    touched = changed_tensors(original, folded)
    result: VerificationResult | None = None
    agree = correct_original = correct_folded = labelled = 0
    with MODEL_CALLS_LOCK, torch.no_grad():  # the models run while no other thread traces
        for number, (batch, labels) in enumerate(itertools.chain(given, from_data)):
            if max_batches is not None and number >= max_batches + len(given):
                break
            expected, actual = run_seeded(original, batch), run_seeded(folded, batch)
            comparison = judge_batch(original, batch, expected, actual, limit, noise_floor(original, touched, batch),
                                     touched, None)
            if result is None:
                result = comparison
            else:
                result.absorb(comparison)
                result.batches += 1
            if number < len(given) or not (isinstance(expected, torch.Tensor) and expected.dim() == 2
                                           and expected.is_floating_point()):  # no classifier's logits
                continue
            top_original, top_folded = expected.argmax(-1), actual.argmax(-1)
            agree += int((top_original == top_folded).sum())
            result.samples += int(top_original.numel())
            if labels is not None:
                labels = labels.to(top_original.device)
                correct_original += int((top_original == labels).sum())
                correct_folded += int((top_folded == labels).sum())
                labelled += int(labels.numel())
    if result is None:
        raise InvalidInputError("verify() compared nothing: data holds no batch (or max_batches is 0)")
    if result.samples:
        result.agreement = agree / result.samples
    if labelled:
        result.accuracy_original = correct_original / labelled
        result.accuracy_folded = correct_folded / labelled
    return result


def changed_tensors(original: Any, folded: Any) -> list[str]:
    """Floating parameters and buffers of ``original`` that ``folded`` lacks or holds with other values (what a fold
    touched, read from the two models: the noise floor of :func:`verify` perturbs them). A model whose tensors are
    not named like the original's (a frozen TorchScript module) makes every tensor count as touched."""
    theirs = dict([*folded.named_parameters(), *folded.named_buffers()])
    changed = []
    for name, tensor in [*original.named_parameters(), *original.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        other = theirs.get(name)
        if other is None or other.shape != tensor.shape or not torch.equal(other.detach(), tensor.detach()):
            changed.append(name)
    return changed

