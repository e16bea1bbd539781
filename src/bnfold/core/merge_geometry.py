"""The geometry of a merge (see :mod:`bnfold.core.merge`): where each branch kernel sits inside the merged one, where
an identity branch's tap is, whether a scale is per output channel; each found, or the
:class:`~bnfold.core.plan.Reason` it is not.
"""

from __future__ import annotations

from .graph import Geometry, LayerFacts, show_padding
from .merge_tree import Factor, channel_axes
from .plan import Reason

Layer = tuple[str, LayerFacts, Geometry]
"""A branch layer: its unit name, its facts and its geometry (known: a layer without one never gets here)."""


def _shape_reason(layers: list[Layer]) -> Reason | None:
    """Why the layers are not one kind of layer with one stride, dilation, groups and channel counts, or None."""
    first_name, first, a = layers[0]
    for name, other, b in layers[1:]:
        if (first.channel_dim, len(a.kernel)) != (other.channel_dim, len(b.kernel)):
            return Reason(f"'{first_name}' and '{name}' are different kinds of layer")
        for what, mine, theirs in (("strides", a.stride, b.stride), ("dilations", a.dilation, b.dilation),
                                   ("groups", a.groups, b.groups)):
            if mine != theirs:
                return Reason(f"different {what}: '{first_name}' has {mine}, '{name}' has {theirs}")
        if (first.in_channels, first.out_channels) != (other.in_channels, other.out_channels):
            return Reason(
                f"'{first_name}' maps {first.in_channels} to {first.out_channels} channels, '{name}' "
                f"{other.in_channels} to {other.out_channels}"
            )
    for name, _, geometry in layers:
        if geometry.padding_mode != "zeros" and any(p for pair in geometry.padding for p in pair):
            return Reason(
                f"'{name}' pads with {geometry.padding_mode} values: a larger kernel would read other values where it "
                f"read padding"
            )
    return None


def place_kernels(layers: list[Layer]) -> tuple[Layer, list[tuple[int, ...]]] | Reason:
    """The layer whose kernel covers every other's, and where each layer's kernel sits inside it (its offset per
    spatial axis, in the order of ``layers``); or why none can."""
    reason = _shape_reason(layers)
    if reason is not None:
        return reason
    largest = [layer for layer in layers if all(
        all(k >= j for k, j in zip(layer[2].kernel, other.kernel, strict=True)) for _, _, other in layers)]
    if not largest:
        return Reason("no branch's kernel covers the others' (" + ", ".join(
            f"'{name}' {geometry.kernel}" for name, _, geometry in layers) + ")")
    into, _, target = largest[0]
    offsets: list[tuple[int, ...]] = []
    for name, _, geometry in layers:
        offset: list[int] = []
        for axis, (k, d, (begin, end), big_k, (big_begin, big_end)) in enumerate(zip(
            geometry.kernel, geometry.dilation, geometry.padding, target.kernel, target.padding, strict=True
        )):
            shift, rest = divmod(big_begin - begin, d)
            if rest or not 0 <= shift <= big_k - k or big_end - end != d * (big_k - k - shift):
                return Reason(
                    f"'{name}' (kernel {geometry.kernel}, padding {show_padding(geometry.padding)}) does not read the "
                    f"positions '{into}' (kernel {target.kernel}, padding {show_padding(target.padding)}) reads on "
                    f"axis {axis}: padding that would change the border outputs"
                )
            offset.append(shift)
        offsets.append(tuple(offset))
    return largest[0], offsets


def identity_tap(layer: Layer) -> tuple[int, ...] | Reason:
    """The kernel position of ``layer`` that reads each output's own input position; or why there is none."""
    into, facts, geometry = layer
    if facts.in_channels != facts.out_channels:
        return Reason(
            f"it adds its input to '{into}', which maps {facts.in_channels} to {facts.out_channels} channels: an "
            f"identity branch needs as many outputs as inputs"
        )
    if any(s != 1 for s in geometry.stride):
        return Reason(f"it adds its input to '{into}', which has stride {geometry.stride}: an identity needs stride 1")
    tap: list[int] = []
    for k, d, (begin, end) in zip(geometry.kernel, geometry.dilation, geometry.padding, strict=True):
        position, rest = divmod(begin, d)
        if rest or not 0 <= position < k or end != d * (k - 1 - position):
            return Reason(
                f"'{into}' (kernel {geometry.kernel}, padding {show_padding(geometry.padding)}) does not keep its "
                f"input's positions, so its input cannot be added as an identity kernel"
            )
        tap.append(position)
    return tuple(tap)


def scale_reason(layer: Layer, shapes: list[tuple[int, ...] | None], factors: list[Factor]) -> Reason | None:
    """Why a factor the merged terms (of ``shapes``) are scaled by is not one value per output channel of the merged
    ``layer`` (or a single value), or None."""
    into, facts, geometry = layer
    known = [shape for shape in shapes if shape is not None]
    rank = len(known[0]) if known else (len(geometry.kernel) + 2 if facts.channel_dim >= 0 else None)
    for factor in factors:
        where = f"{factor.op.label} multiplies by '{factor.name}' of shape {factor.shape}"
        if rank is not None and len(factor.shape) > rank:
            return Reason(f"{where}, more axes than the terms it scales have")
        axes = channel_axes(factor.shape)
        if not axes:
            continue  # a single value
        if facts.channel_dim >= 0 and rank is None:
            return Reason(f"{where}, and the rank of the terms it scales is not known")
        channel = facts.channel_dim - rank if facts.channel_dim >= 0 and rank is not None else facts.channel_dim
        if axes[0] - len(factor.shape) != channel or factor.shape[axes[0]] != facts.out_channels:
            return Reason(f"{where}: the scale is not per channel of '{into}' ({facts.out_channels} channels on axis "
                          f"{facts.channel_dim})")
    return None
