"""Execute a :class:`~bnfold.core.plan.FoldPlan` through a small read / write interface: the arithmetic, once.

Each adapter implements :class:`WeightAccess` over its format's storage; the order of folds, the channel shares of
a concatenation, the formulas (:mod:`bnfold.affine`) and the precision are here. A norm's ``(s, t)`` is computed in
float64; a weight is multiplied in its own dtype when that is float32 or wider, else in float32, and rounded once;
biases are computed in float64 (a backward fold sums as many terms as the layer has inputs). Every new tensor is
checked finite in the layer's dtype before anything is written: a fold that would overflow (a float16 weight times
a scale of 1e5) raises :class:`FoldOverflow` and its norm stays, with the reason. Arrays are ``torch.Tensor`` or
``numpy.ndarray``; :class:`Numerics` is the handful of conversions that differ.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, NamedTuple, Protocol, runtime_checkable

from .. import affine
from ..errors import NonFiniteStatisticsError
from .commuting import Value
from .graph import weight_channels
from .merge import Coefficient, Merge
from .plan import FORWARD, Fold, FoldPlan, Route

Array = Any


class Statistics(NamedTuple):
    """A norm's eval-mode map ``gamma * (x - mean) / sqrt(var + eps) + beta`` (``gamma`` / ``beta`` may be absent),
    public as :class:`bnfold.NormStatistics`. A named tuple: read for every norm of every fold, it is the cheapest."""

    mean: Array
    var: Array
    eps: float
    gamma: Array | None = None
    beta: Array | None = None


@dataclass(frozen=True)
class LayerTensors:
    """A layer's weight and bias, and how its weight is laid out (see :mod:`bnfold.affine`)."""

    weight: Array
    bias: Array | None
    out_axis: int
    groups: int = 1

    @property
    def in_axis(self) -> int:
        return 1 - self.out_axis


class Numerics(Protocol):
    """The conversions that differ between torch and numpy arrays."""

    def float64(self, array: Array) -> Array: ...

    def compute(self, weight: Array) -> Array:
        """``weight`` in the dtype it is multiplied in: its own if float32 or wider, else float32."""

    def cast(self, array: Array, like: Array) -> Array:
        """``array`` in the dtype (and on the device) of ``like``."""

    def finite(self, array: Array) -> bool: ...

    def concat64(self, arrays: list[Array]) -> Array:
        """Every value of ``arrays``, flattened, in one float64 array (on the CPU): one vectorised pass over many
        small arrays instead of one per array."""

    def repeat64(self, values: list[float], counts: list[int]) -> Array:
        """A float64 array of ``values[i]`` repeated ``counts[i]`` times, one after the other (on the CPU)."""

    def dtype_name(self, array: Array) -> str: ...

    def scalable_in_place(self, weight: Array) -> bool:
        """Whether ``weight`` can be multiplied in place (contiguous, float32 or wider)."""

    def max_abs(self, array: Array) -> float: ...

    def segment_max_abs(self, array: Array, bounds: list[int]) -> list[float]:
        """``max |array[bounds[i]:bounds[i + 1]]|`` for each span (0 for an empty one), in one pass over ``array``."""

    def segment_finite(self, array: Array, bounds: list[int]) -> list[bool]:
        """Whether each span ``array[bounds[i]:bounds[i + 1]]`` is finite, in one pass over ``array``."""

    def max_finite(self, array: Array) -> float:
        """The largest finite value of ``array``'s dtype."""

    def zeros(self, shape: tuple[int, ...], like: Array) -> Array:
        """A float64 array of zeros of ``shape`` (on the device of ``like``)."""


class WeightAccess(Protocol):
    """What an adapter provides so that :func:`apply_plan` can fold in its format."""

    numerics: Numerics

    def statistics(self, norm: str) -> Statistics: ...

    def read(self, layer: str) -> LayerTensors: ...

    def write(self, layer: str, weight: Array, bias: Array) -> None:
        """Store a layer's new weight and bias (a bias is created where the layer had none)."""

    def remove_norm(self, norm: str) -> None:
        """Take the folded norm out of the computation."""


@runtime_checkable
class ConstantAccess(Protocol):
    """What a :class:`WeightAccess` adds so that merges can scale terms by stored constants (a layer scale)."""

    def constant(self, name: str) -> Array:
        """The value of the stored constant ``name`` (a parameter, a buffer, an initializer), any shape."""


class InPlaceWeightAccess(WeightAccess, Protocol):
    """A :class:`WeightAccess` whose weights may be multiplied where they are (no copy of each weight is made)."""

    in_place: bool

    def scale_in_place(self, layer: str, factors: Array, axis: int, groups: int) -> None:
        """Multiply the layer's weight by ``factors`` along channel ``axis`` (:func:`affine.scale_channels_in_place`)."""

    def write_bias(self, layer: str, bias: Array) -> None: ...


class FoldOverflow(ArithmeticError):
    """A fold would make a weight or bias non-finite in the layer's dtype; nothing was written for it."""

    def __init__(self, norm: str, layer: str, message: str) -> None:
        super().__init__(message)
        self.norm = norm
        self.layer = layer


@dataclass(frozen=True)
class CastMaps:
    """Every norm's ``s``, and the bias ``s * 0 + t`` of a layer without one folded forward, cast to one layer dtype
    (joined, as in :class:`NormMaps`), and whether each norm's cast bias is finite in it."""

    scale: Array
    bias: Array
    bias_finite: list[bool]


class NormMaps(Mapping[str, tuple[Array, Array]]):
    """The folded norms' ``(s, t)`` in float64, by norm name, held joined (one span each) so that the casts, checks
    and largest ``|s|`` a fold into a layer without bias needs cost a few calls per model instead of four per norm
    (on resnet50, a tenth of an in-place fold's bookkeeping)."""

    def __init__(self, numerics: Numerics, scale: Array, shift: Array, spans: dict[str, tuple[int, int]]) -> None:
        self.numerics = numerics
        self.scale = scale
        self.shift = shift
        self.spans = spans
        self.index = {norm: i for i, norm in enumerate(spans)}
        self.bounds = [start for start, _ in spans.values()] + [len(scale)]
        self._largest: list[float] | None = None
        self._casts: dict[tuple[Any, Any], CastMaps] = {}

    def __getitem__(self, norm: str) -> tuple[Array, Array]:
        start, stop = self.spans[norm]
        return self.scale[start:stop], self.shift[start:stop]

    def get(self, norm: str, default: Any = None) -> Any:  # Mapping's get goes through an exception when absent
        return self[norm] if norm in self.spans else default

    def __iter__(self) -> Iterator[str]:
        return iter(self.spans)

    def __len__(self) -> int:
        return len(self.spans)

    def largest_scale(self, norm: str) -> float:
        """``max |s|`` of the norm."""
        if self._largest is None:
            self._largest = self.numerics.segment_max_abs(self.scale, self.bounds)
        return self._largest[self.index[norm]]

    def cast(self, like: Array) -> CastMaps:
        """All maps in the dtype (and on the device) of ``like``."""
        key = (like.dtype, getattr(like, "device", None))
        found = self._casts.get(key)
        if found is None:
            bias = self.numerics.cast(affine.forward_bias(None, self.scale, self.shift), like)
            found = self._casts[key] = CastMaps(self.numerics.cast(self.scale, like), bias,
                                                self.numerics.segment_finite(bias, self.bounds))
        return found


def check_statistics(norms: list[str], access: WeightAccess) -> NormMaps:
    """Every norm's per-channel ``(s, t)`` in float64, after checking its map is finite.

    Raises :class:`~bnfold.errors.NonFiniteStatisticsError` for the first of ``norms`` whose map is not finite:
    folding it would hide a model that already computes NaN behind weights that look valid. All norms are computed
    in one vectorised pass (the float64 operations of :func:`scale_shift`, in its order): a model has hundreds of
    small norms. The maps stay valid while the plan is applied: folds write into layers, never into norms.
    """
    numerics = access.numerics
    if not norms:
        return NormMaps(numerics, numerics.repeat64([], []), numerics.repeat64([], []), {})
    statistics = [access.statistics(norm) for norm in norms]
    counts = [int(st.mean.shape[0]) for st in statistics]
    mean = numerics.concat64([st.mean for st in statistics])
    var = numerics.concat64([st.var for st in statistics])
    eps = numerics.repeat64([float(st.eps) for st in statistics], counts)
    gamma = numerics.concat64([st.gamma if st.gamma is not None else numerics.repeat64([1.0], [c])
                               for st, c in zip(statistics, counts, strict=True)])
    beta = numerics.concat64([st.beta if st.beta is not None else numerics.repeat64([0.0], [c])
                              for st, c in zip(statistics, counts, strict=True)])
    inverse_deviation = (var + eps) ** -0.5
    if not numerics.finite(numerics.concat64([mean, var, gamma, beta, inverse_deviation])):
        _raise_for_non_finite(norms, statistics, access.numerics)
    scale = inverse_deviation * gamma
    shift = -mean * scale + beta
    bounds = [0, *accumulate(counts)]
    return NormMaps(numerics, scale, shift, {norm: (bounds[i], bounds[i + 1]) for i, norm in enumerate(norms)})


def _raise_for_non_finite(norms: list[str], statistics: list[Statistics], numerics: Numerics) -> None:
    for norm, stats in zip(norms, statistics, strict=True):
        for label, array in (("running mean", stats.mean), ("running variance", stats.var), ("weight", stats.gamma),
                             ("bias", stats.beta)):
            if array is not None and not numerics.finite(array):
                raise NonFiniteStatisticsError(
                    f"norm '{norm}' has NaN or infinite values in its {label}: its outputs are already invalid. "
                    f"Recalibrate its statistics (a few training-mode forward passes) before folding."
                )
        if not numerics.finite((numerics.float64(stats.var) + stats.eps) ** -0.5):
            raise NonFiniteStatisticsError(
                f"norm '{norm}' has running variance + eps <= 0, which has no square root; recalibrate its statistics."
            )
    raise NonFiniteStatisticsError("a norm's scale gamma / sqrt(var + eps) overflows float64; recalibrate its statistics.")


def scale_shift(statistics: Statistics, numerics: Numerics) -> tuple[Array, Array]:
    """The norm's per-channel ``(s, t)``, in float64."""
    f64 = numerics.float64
    gamma = None if statistics.gamma is None else f64(statistics.gamma)
    beta = None if statistics.beta is None else f64(statistics.beta)
    return affine.bn_scale_shift(f64(statistics.mean), f64(statistics.var), statistics.eps, gamma, beta)


def _forward_bias(tensors: LayerTensors, scale: Array, shift: Array, numerics: Numerics) -> Array:
    if tensors.bias is None:  # most convolutions before a norm have none (and need no cast of the scale)
        return numerics.cast(affine.forward_bias(None, scale, shift), tensors.weight)
    new_bias = affine.forward_bias(numerics.float64(tensors.bias), numerics.cast(scale, shift), shift)
    return numerics.cast(new_bias, tensors.bias)


def _backward_bias(tensors: LayerTensors, shift: Array, numerics: Numerics) -> Array:
    bias = None if tensors.bias is None else numerics.float64(tensors.bias)
    new_bias = affine.backward_bias(numerics.float64(tensors.weight), bias, shift, tensors.in_axis, tensors.groups)
    return numerics.cast(new_bias, tensors.bias if tensors.bias is not None else tensors.weight)


def folded_forward(tensors: LayerTensors, scale: Array, shift: Array, numerics: Numerics) -> tuple[Array, Array]:
    """``norm(layer(x)) == layer'(x)``: output channels scaled by ``s``, bias ``s * b + t``; in the layer's dtypes."""
    weight = numerics.compute(tensors.weight)
    new_weight = affine.scale_channels(weight, numerics.cast(scale, weight), tensors.out_axis, tensors.groups)
    return numerics.cast(new_weight, tensors.weight), _forward_bias(tensors, scale, shift, numerics)


def folded_backward(tensors: LayerTensors, scale: Array, shift: Array, numerics: Numerics) -> tuple[Array, Array]:
    """``layer(norm(x)) == layer'(x)``: input channels scaled by ``s``, bias ``b + sum W t`` (summed in float64)."""
    weight = numerics.compute(tensors.weight)
    new_weight = affine.scale_channels(weight, numerics.cast(scale, weight), tensors.in_axis, tensors.groups)
    return numerics.cast(new_weight, tensors.weight), _backward_bias(tensors, shift, numerics)


def _in_place_is_safe(tensors: LayerTensors, largest_factor: float, numerics: Numerics) -> bool:
    """Whether the weight can be scaled where it is: no product can leave its dtype's range (bounded by the largest
    weight times the largest factor, with a margin for rounding), so no check of the result is needed."""
    if not numerics.scalable_in_place(tensors.weight):
        return False
    if largest_factor <= 1:  # no product grows: a finite weight stays finite
        return True
    bound = numerics.max_abs(tensors.weight) * largest_factor
    return bound < numerics.max_finite(tensors.weight) * (1 - 2.0**-8)


def _overflow(fold: Fold, layer: str, what: str, array: Array, scale: Array, numerics: Numerics) -> FoldOverflow:
    return FoldOverflow(
        fold.norm,
        layer,
        f"folding would overflow {numerics.dtype_name(array)}: the folded {what} of '{layer}' is not finite in that "
        f"dtype (the norm's scale reaches {numerics.max_abs(scale):.3g})",
    )


def _fold_into_layer_without_bias(fold: Fold, access: WeightAccess, maps: NormMaps) -> bool:
    """The common fold (forward into one layer without bias, scaled in place) with the casts and checks
    :class:`NormMaps` made for all norms at once; ``False``, with nothing done, where the layer has a bias or its
    products could leave its dtype."""
    layer = fold.layers[0]
    tensors = access.read(layer)
    if tensors.bias is not None or not _in_place_is_safe(tensors, maps.largest_scale(fold.norm), access.numerics):
        return False
    cast, (start, stop) = maps.cast(tensors.weight), maps.spans[fold.norm]
    if not cast.bias_finite[maps.index[fold.norm]]:
        raise _overflow(fold, layer, "bias", cast.bias[start:stop], maps[fold.norm][0], access.numerics)
    access.scale_in_place(layer, cast.scale[start:stop], tensors.out_axis, tensors.groups)  # type: ignore[attr-defined]
    access.write_bias(layer, cast.bias[start:stop])  # type: ignore[attr-defined]
    access.remove_norm(fold.norm)
    return True


def _largest(factors: Array, fold: Fold, joined: NormMaps | None, numerics: Numerics) -> float:
    """``max |factors|``: from the bounds made for all norms at once where the factors are a norm's whole scale."""
    if joined is not None and len(fold.layers) == 1:
        return joined.largest_scale(fold.norm)
    return numerics.max_abs(factors)


class FoldRefused(FoldOverflow):
    """A fold the planner allowed that the model's values make impossible (a factor 0 between a layer and its norm);
    nothing was written for it, and the norm stays with the reason."""


def _value(value: Value | None, access: WeightAccess, channels: int, fold: Fold, layer: str) -> Array | float | None:
    """A step's ``a`` or ``b`` in float64: a number, or one value per channel (flattened)."""
    if value is None:
        return None
    result: Array | float = float(value.number)
    if (value.constants or value.divisors) and not isinstance(access, ConstantAccess):
        raise FoldRefused(fold.norm, layer, f"{type(access).__name__} cannot read the constants this fold goes through")
    for name, divide in [*((n, False) for n in value.constants), *((n, True) for n in value.divisors)]:
        array = access.numerics.float64(access.constant(name)).reshape(-1)  # type: ignore[attr-defined]
        if int(array.shape[0]) not in (1, channels):
            raise FoldRefused(fold.norm, layer, f"the constant '{name}' has {int(array.shape[0])} values for "
                                                f"{channels} channels")
        if int(array.shape[0]) == 1:
            array = float(array[0])
        result = result / array if divide else result * array
    return result


def routed(fold: Fold, index: int, scale: Array, shift: Array, access: WeightAccess) -> tuple[Array, Array]:
    """The ``(s, t')`` that layer ``fold.layers[index]`` absorbs: the norm's ``(s, t)`` in float64 (``scale`` /
    ``shift``, this layer's share for concatenated layers) carried through the route's affine steps, then expanded
    to the layer's input features where the route spreads channels over them (:class:`~bnfold.core.plan.Route`).

    The steps ``y = a * x + b`` stay in the model and only the shift changes, step by step from the norm outward;
    ``s`` never does. Forward, ``norm(A(y)) = A(s * y + t')`` with ``t' = (s * b + t - b) / a`` (refused where
    ``a = 0``: that channel no longer depends on the layer); backward, ``A(norm(x)) = s * A(x) + t'`` with
    ``t' = a * t + (1 - s) * b``. ``a`` and ``b`` are float64 (a division by ``d`` as ``1 / d``, 2**-53 relative).
    """
    route: Route = fold.route(index)
    if route.plain:
        return scale, shift
    numerics = access.numerics
    layer = fold.layers[index]
    channels = int(scale.shape[0])
    for step in route.steps:
        a = _value(step.scale, access, channels, fold, layer)
        b = _value(step.shift, access, channels, fold, layer)
        if fold.direction == FORWARD:
            moved = shift if b is None else scale * b + shift - b
            if a is not None:
                if (a == 0) if isinstance(a, float) else bool((a == 0).any()):
                    raise FoldRefused(
                        fold.norm, layer,
                        f"{step.label} multiplies some channel by 0 between '{layer}' and the norm, so the layer "
                        f"cannot carry the norm's shift there",
                    )
                moved = moved / a
            shift = moved
        else:
            moved = shift if a is None else shift * a
            shift = moved if b is None else moved + (1.0 - scale) * b
        shift = shift + numerics.zeros((channels,), scale)  # a single value broadcast back to one per channel
    if route.outer != 1 or route.inner != 1:
        spread = numerics.zeros((route.outer, channels, route.inner), scale)
        scale = (spread + scale.reshape((1, channels, 1))).reshape(-1)
        shift = (spread + shift.reshape((1, channels, 1))).reshape(-1)
    return scale, shift


def fold_one(fold: Fold, access: WeightAccess, maps: Mapping[str, tuple[Array, Array]] | None = None) -> None:
    """Apply one fold: compute every new tensor, check it is finite, then write them and remove the norm. Through an
    :class:`InPlaceWeightAccess`, a weight whose products provably stay finite is multiplied where it is, after every
    check passed. ``maps``: the norms' ``(s, t)`` from :func:`check_statistics`, if the caller has them."""
    numerics = access.numerics
    in_place = bool(getattr(access, "in_place", False))
    joined = maps if isinstance(maps, NormMaps) and fold.norm in maps.spans else None
    if joined is not None and in_place and fold.direction == FORWARD and len(fold.layers) == 1 and not fold.routes:
        if _fold_into_layer_without_bias(fold, access, joined):
            return
    known = maps.get(fold.norm) if maps is not None else None
    scale, shift = known if known is not None else scale_shift(access.statistics(fold.norm), numerics)
    writes: list[tuple[str, Array, Array]] = []
    scalings: list[tuple[str, Array, int, int, Array]] = []
    offset = 0  # a forward fold into several layers: their outputs were concatenated, each takes its channels
    for index, layer in enumerate(fold.layers):
        tensors = access.read(layer)
        if fold.direction == FORWARD:
            stop = (offset + int(weight_channels(tuple(tensors.weight.shape), tensors.out_axis, tensors.groups)[0])
                    if len(fold.layers) > 1 else None)
            factors, shifts, axis = scale[offset:stop], shift[offset:stop], tensors.out_axis
            offset = stop or 0
        else:
            factors, shifts, axis = scale, shift, tensors.in_axis
        factors, shifts = routed(fold, index, factors, shifts, access)
        if in_place and _in_place_is_safe(tensors, _largest(factors, fold, joined, numerics), numerics):
            new_bias = (_forward_bias(tensors, factors, shifts, numerics) if fold.direction == FORWARD
                        else _backward_bias(tensors, shifts, numerics))
            arrays = (("bias", new_bias),)
            scalings.append((layer, numerics.cast(factors, tensors.weight), axis, tensors.groups, new_bias))
        else:
            fold_layer = folded_forward if fold.direction == FORWARD else folded_backward
            new_weight, new_bias = fold_layer(tensors, factors, shifts, numerics)
            arrays = (("weight", new_weight), ("bias", new_bias))
            writes.append((layer, new_weight, new_bias))
        for what, array in arrays:
            if not numerics.finite(array):
                raise _overflow(fold, layer, what, array, scale, numerics)
    for layer, new_weight, new_bias in writes:
        access.write(layer, new_weight, new_bias)
    for layer, factors, axis, groups, new_bias in scalings:
        access.scale_in_place(layer, factors, axis, groups)  # type: ignore[attr-defined]
        access.write_bias(layer, new_bias)  # type: ignore[attr-defined]
    access.remove_norm(fold.norm)


def apply_plan(
    plan: FoldPlan, access: WeightAccess, maps: Mapping[str, tuple[Array, Array]] | None = None
) -> list[FoldOverflow]:
    """Fold in plan order; returns the folds that would have overflowed (not applied; their norms stay), and the
    folds after one that touch its layers (a chain planned through the norm that stays). ``maps``: as
    :func:`check_statistics` returned them (computed here otherwise)."""
    overflows: list[FoldOverflow] = []
    untouchable: set[str] = set()
    for fold in plan.folds:
        if untouchable & set(fold.layers):
            overflows.append(FoldOverflow(fold.norm, fold.layers[0], "a fold it is chained with would overflow"))
            continue
        try:
            fold_one(fold, access, maps)
        except FoldOverflow as overflow:
            overflows.append(overflow)
            untouchable.update(fold.layers)
    return overflows


class MergeOverflow(ArithmeticError):
    """A merge would make the merged weight or bias non-finite in the layer's dtype; nothing was written."""


def merged_tensors(
    branches: list[tuple[LayerTensors, tuple[int, ...]]],
    identities: list[tuple[Array | None, Array | None]],
    tap: tuple[int, ...],
    numerics: Numerics,
    *,
    branch_coefficients: list[Array | float | None] | None = None,
    identity_coefficients: list[Array | float | None] | None = None,
) -> tuple[Array, Array]:
    """The kernel and bias of one layer computing a linear combination of ``branches`` and ``identities`` of the
    same input.

    ``branches[0]`` is the layer that keeps its geometry (the largest kernel); each branch's kernel is placed at its
    offset inside it, zeros elsewhere. Each identity is a per-channel map ``s * x + t`` (``(None, None)``: ``x``
    itself): ``s`` on the kernel position ``tap`` of each output channel's own input channel (within its group, for
    grouped and depthwise layers), ``t`` added to the bias. Each term enters with its coefficient ``c`` (one value
    per output channel, a single value, or None for 1: ``branch_coefficients`` / ``identity_coefficients`` in the
    order of the terms), a scale of its output channels. The sums are exact in float64 (a float32 coefficient times
    a float32 weight is exact there) and rounded once to the dtype of ``branches[0]``'s weight and bias::

        W = sum_k diag(c_k) pad(W_k) + sum_i diag(c_i * s_i) at tap        b = sum_k c_k * b_k + sum_i c_i * t_i
    """
    first = branches[0][0]
    if any(tensors.out_axis != 0 for tensors, _ in branches):
        raise ValueError("branch merges need weights laid out (out, in / groups, *kernel)")
    f64 = numerics.float64
    shape = tuple(int(n) for n in first.weight.shape)
    out_channels, per_group = shape[0], shape[1]
    branch_coefficients = branch_coefficients or [None] * len(branches)
    identity_coefficients = identity_coefficients or [None] * len(identities)
    if len(branch_coefficients) != len(branches) or len(identity_coefficients) != len(identities):
        raise ValueError("one coefficient per branch and per identity")
    weight = numerics.zeros(shape, first.weight)
    bias = numerics.zeros((out_channels,), first.weight)
    for (tensors, offset), coefficient in zip(branches, branch_coefficients, strict=True):
        kernel = tuple(int(n) for n in tensors.weight.shape[2:])
        if tuple(int(n) for n in tensors.weight.shape[:2]) != (out_channels, per_group):
            raise ValueError(f"a branch of weight shape {tuple(tensors.weight.shape)} does not fit {shape}")
        window = (slice(None), slice(None), *(slice(o, o + k) for o, k in zip(offset, kernel, strict=True)))
        weight[window] = weight[window] + f64(tensors.weight) * _per_output(coefficient, out_channels, len(shape))
        if tensors.bias is not None:
            bias = bias + f64(tensors.bias) * _per_output(coefficient, out_channels, 1)
    if identities:
        groups = out_channels // per_group
        # eye(per_group), one per group: every (per_group + 1)-th entry of a flat (per_group, per_group) block.
        eye = numerics.zeros((per_group * per_group,), first.weight)
        eye[:: per_group + 1] = 1.0
        eye = eye.reshape((1, per_group, per_group))
        diagonal = numerics.zeros((out_channels,), first.weight)
        for (scale, shift), coefficient in zip(identities, identity_coefficients, strict=True):
            factor = _per_output(coefficient, out_channels, 1)
            diagonal = diagonal + (1.0 if scale is None else f64(scale)) * factor
            if shift is not None:
                bias = bias + f64(shift) * factor
        block = (eye * diagonal.reshape((groups, per_group, 1))).reshape((out_channels, per_group))
        position = (slice(None), slice(None), *tap)
        weight[position] = weight[position] + block
    reference_bias = first.bias if first.bias is not None else first.weight
    return numerics.cast(weight, first.weight), numerics.cast(bias, reference_bias)


def _per_output(coefficient: Array | float | None, out_channels: int, rank: int) -> Array | float:
    """``coefficient`` (None: 1) shaped to scale axis 0 of an array of ``rank`` axes (a product by 1.0 is exact)."""
    if coefficient is None:
        return 1.0
    if isinstance(coefficient, (int, float)):
        return float(coefficient)
    size = int(coefficient.reshape(-1).shape[0])
    if size not in (1, out_channels):
        raise ValueError(f"a coefficient of {size} values for {out_channels} output channels")
    return coefficient.reshape((-1,) + (1,) * (rank - 1))


def coefficient_values(coefficient: Coefficient, access: WeightAccess) -> Array | float | None:
    """The values of a term's :class:`~bnfold.core.merge.Coefficient` in float64 (``scale`` times its stored
    factors, each read through the access's ``constant`` and flattened to one value per channel), or None for 1."""
    if coefficient.is_one:
        return None
    value: Array | float = float(coefficient.scale)
    if coefficient.factors and not isinstance(access, ConstantAccess):
        raise TypeError(f"{type(access).__name__} cannot read constants, which this merge's scales need")
    for name in coefficient.factors:
        factor = access.numerics.float64(access.constant(name))  # type: ignore[attr-defined]
        value = factor.reshape(-1) * value
    return value


def merge_one(merge: Merge, access: WeightAccess) -> None:
    """Compute the merged kernel and bias of ``merge`` from the layers as folded and each term's coefficient (read
    through a :class:`ConstantAccess`), check they are finite, and write them into its layer (the rest of the
    merge is the adapter's rewrite of its graph)."""
    numerics = access.numerics
    order = sorted(merge.branches, key=lambda branch: branch.layer != merge.into)
    branches = [(access.read(branch.layer), branch.offset) for branch in order]
    identities = [(None, None) if identity.norm is None else scale_shift(access.statistics(identity.norm), numerics)
                  for identity in merge.identities]
    tap = merge.identities[0].tap if merge.identities else ()
    weight, bias = merged_tensors(
        branches, identities, tap, numerics,
        branch_coefficients=[coefficient_values(branch.coefficient, access) for branch in order],
        identity_coefficients=[coefficient_values(identity.coefficient, access) for identity in merge.identities],
    )
    for what, array in (("weight", weight), ("bias", bias)):
        if not numerics.finite(array):
            raise MergeOverflow(
                f"merging would overflow {numerics.dtype_name(array)}: the merged {what} of '{merge.into}' is not "
                f"finite in that dtype",
            )
    access.write(merge.into, weight, bias)


class DryRun:
    """A :class:`WeightAccess` that reads through ``access`` and keeps every write to itself: ``apply_plan(plan,
    DryRun(access))`` does all of a fold's arithmetic and reports the overflows without changing the model."""

    def __init__(self, access: WeightAccess) -> None:
        self.access = access
        self.numerics = access.numerics
        self.written: dict[str, LayerTensors] = {}

    def statistics(self, norm: str) -> Statistics:
        return self.access.statistics(norm)

    def read(self, layer: str) -> LayerTensors:
        return self.written.get(layer) or self.access.read(layer)

    def write(self, layer: str, weight: Array, bias: Array) -> None:
        tensors = self.read(layer)
        self.written[layer] = LayerTensors(weight, bias, tensors.out_axis, tensors.groups)

    def remove_norm(self, norm: str) -> None:
        pass

    def constant(self, name: str) -> Array:
        return self.access.constant(name)  # type: ignore[attr-defined]
