"""Which operations a per-channel affine map ``y = s * x + t`` passes through unchanged.

A norm separated from its layer only by such operations still folds: ``op(s * x + t) == s * op(x) + t`` per channel,
so the layer can absorb the map on one side of ``op`` as well as on the other. The operations, and when each is
exact:

* identity, dropout in eval (``training=False``), ``contiguous`` / ``clone``;
* average pooling, adaptive average pooling and ``mean`` over non-channel dimensions: a mean of ``s * x + t`` is
  ``s * mean(x) + t`` as long as every term of the mean is a real input; average pooling that counts zero padding
  in its divisor (``count_include_pad=True`` with padding) or has a ``divisor_override`` is not exact;
* upsampling and ``interpolate`` in every mode: each output is a weighted sum of inputs with weights that sum to 1;
* max pooling (plain or adaptive) when every scale ``s >= 0``: ``max(s * x + t) == s * max(x) + t`` only then;
* reshapes (``flatten``, ``reshape``, ``view``, ``squeeze``, ``unsqueeze``, ``unflatten``) that keep every channel's
  values in one channel, and ``permute`` / ``transpose``, which move the channel axis. A row-major reshape keeps
  channel ``c`` at output axis ``k`` when ``out[k] == in[c_axis]`` and the dimensions after the channel hold the
  same number of elements before and after; that needs the shapes of a forward pass (``example_inputs``).

This module knows nothing of folding or of modules' weights: it answers, for one call site, "does a per-channel
affine on channel axis ``a`` of the input pass through, and on which axis does it come out".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .capture import Site


@dataclass(frozen=True)
class Passage:
    """An affine map on channel ``axis`` of the input comes out on channel ``axis`` of the output.

    ``needs_non_negative_scale``: exact only when every scale ``s >= 0`` (max pooling).
    """

    axis: int
    needs_non_negative_scale: bool = False


_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_MEAN_POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_AVG_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_MAX_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_UPSAMPLE_MODULES = (nn.Upsample,)  # UpsamplingNearest2d / UpsamplingBilinear2d subclass it
_RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)

_IDENTITY_OPS = frozenset({"contiguous", "clone"})
_DROPOUT_OPS = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"})
_ADAPTIVE_AVG_OPS = frozenset({"adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"})
_AVG_POOL_OPS = frozenset({"avg_pool1d", "avg_pool2d", "avg_pool3d"})
_MAX_POOL_OPS = {  # name -> position of ``return_indices``
    "max_pool1d": 6, "max_pool2d": 6, "max_pool3d": 6,
    "adaptive_max_pool1d": 2, "adaptive_max_pool2d": 2, "adaptive_max_pool3d": 2,
}
_UPSAMPLE_OPS = frozenset({"interpolate", "upsample", "upsample_nearest", "upsample_bilinear"})
_RESHAPE_OPS = frozenset({"flatten", "reshape", "view", "squeeze", "unsqueeze", "unflatten"})
_PERMUTE_OPS = frozenset({"permute", "transpose", "swapaxes", "swapdims"})


def op_name(site: Site) -> str:
    """The plain name of an op site's function or method (``"flatten"`` for ``torch.flatten`` and ``x.flatten``)."""
    target = site.target
    if isinstance(target, str):
        return target
    return str(getattr(target, "__name__", site.name))


def _argument(site: Site, position: int, keyword: str, default: Any) -> Any:
    if keyword in site.kwargs:
        return site.kwargs[keyword]
    if len(site.args) > position:
        return site.args[position]
    return default


def may_commute(site: Site) -> bool:
    """Whether ``site`` is of a kind that can commute with a per-channel affine (exactness is :func:`passage`'s job)."""
    if site.kind == "module":
        return isinstance(
            site.target,
            _IDENTITY_MODULES + _MEAN_POOL_MODULES + _AVG_POOL_MODULES + _MAX_POOL_MODULES + _UPSAMPLE_MODULES + _RESHAPE_MODULES,
        )
    if site.kind != "op":
        return False
    name = op_name(site)
    return name in _IDENTITY_OPS or name in _DROPOUT_OPS or name in _ADAPTIVE_AVG_OPS or name in _AVG_POOL_OPS or (
        name in _MAX_POOL_OPS or name in _UPSAMPLE_OPS or name in _RESHAPE_OPS or name in _PERMUTE_OPS or name == "mean"
    )


def _normalise(axis: int, rank: int | None) -> int | None:
    if axis >= 0:
        return axis
    return None if rank is None else axis % rank


def passage(site: Site, in_shape: Sequence[int] | None, axis: int) -> Passage | str:
    """How an affine map on channel ``axis`` of ``site``'s (single) input passes through it, or why it does not.

    ``in_shape`` is the input's shape when a forward pass was seen, else ``None``; ``site.shape`` the output's.
    """
    if len(site.inputs) != 1:
        return f"{_label(site)} combines {len(site.inputs)} tensors"
    rank = None if in_shape is None else len(in_shape)
    channel_axis = _normalise(axis, rank)
    if site.kind == "module":
        return _module_passage(site, site.target, in_shape, axis, channel_axis)
    name = op_name(site)
    if name in _IDENTITY_OPS:
        return Passage(axis)
    if name in _DROPOUT_OPS:
        # F.dropout(x, p, training) and torch.dropout(x, p, train) both take the flag third.
        training = site.kwargs.get("training", site.kwargs.get("train", _argument(site, 2, "training", True)))
        return Passage(axis) if training is False else f"{_label(site)} is applied with training=True"
    if name in _ADAPTIVE_AVG_OPS or name in _UPSAMPLE_OPS:
        return _spatial(site, axis, channel_axis)
    if name in _AVG_POOL_OPS:
        padding = _argument(site, 3, "padding", 0)
        include_pad = _argument(site, 5, "count_include_pad", True)
        divisor = _argument(site, 6, "divisor_override", None) if name != "avg_pool1d" else None
        return _avg_pool(site, axis, channel_axis, padding, include_pad, divisor)
    if name in _MAX_POOL_OPS:
        if _argument(site, _MAX_POOL_OPS[name], "return_indices", False):
            return f"{_label(site)} also returns indices"
        spatial = _spatial(site, axis, channel_axis)
        return Passage(spatial.axis, True) if isinstance(spatial, Passage) else spatial
    if name == "mean":
        return _mean(site, axis, channel_axis, rank)
    if name in _RESHAPE_OPS:
        return _reshape(site, in_shape, channel_axis)
    if name in _PERMUTE_OPS:
        return _permute(site, name, channel_axis, rank)
    return f"{_label(site)} does not commute with a per-channel affine map"


def _label(site: Site) -> str:
    if site.kind == "module":
        return f"module '{site.name}' ({type(site.target).__name__})"
    return f"the operation {site.name}"


def _spatial(site: Site, axis: int, channel_axis: int | None) -> Passage | str:
    """Pooling / upsampling act on the dimensions after (batch, channels); channels must be axis 1."""
    if channel_axis != 1:
        return f"{_label(site)} works on spatial dimensions, but the channels are on axis {axis}"
    return Passage(1)


def _avg_pool(site: Site, axis: int, channel_axis: int | None, padding: Any, include_pad: Any, divisor: Any) -> Passage | str:
    if divisor is not None:
        return f"{_label(site)} divides by divisor_override={divisor}, not by the number of values averaged"
    paddings = padding if isinstance(padding, (tuple, list)) else (padding,)
    if include_pad and any(p != 0 for p in paddings):
        return (
            f"{_label(site)} counts its zero padding in the mean (count_include_pad=True, padding={padding}): the border "
            f"outputs would see the shift where the original saw zeros"
        )
    return _spatial(site, axis, channel_axis)


def _module_passage(site: Site, module: nn.Module, in_shape: Sequence[int] | None, axis: int, channel_axis: int | None) -> Passage | str:
    if isinstance(module, _IDENTITY_MODULES):
        if isinstance(module, nn.Identity) or not module.training:
            return Passage(axis)
        return f"{_label(site)} is in training mode"
    if isinstance(module, _MEAN_POOL_MODULES + _UPSAMPLE_MODULES):
        return _spatial(site, axis, channel_axis)
    if isinstance(module, _AVG_POOL_MODULES):
        divisor = getattr(module, "divisor_override", None)
        return _avg_pool(site, axis, channel_axis, module.padding, module.count_include_pad, divisor)
    if isinstance(module, _MAX_POOL_MODULES):
        if module.return_indices:
            return f"{_label(site)} also returns indices"
        spatial = _spatial(site, axis, channel_axis)
        return Passage(spatial.axis, True) if isinstance(spatial, Passage) else spatial
    if isinstance(module, _RESHAPE_MODULES):
        return _reshape(site, in_shape, channel_axis)
    return f"{_label(site)} does not commute with a per-channel affine map"


def _mean(site: Site, axis: int, channel_axis: int | None, rank: int | None) -> Passage | str:
    dims = _argument(site, 1, "dim", None)
    keepdim = bool(_argument(site, 2, "keepdim", False))
    if dims is None or rank is None or channel_axis is None:
        return f"{_label(site)} may average over the channels (pass example_inputs so bnfold can see the shapes)"
    listed = list(dims) if isinstance(dims, (tuple, list)) else [dims]
    if not all(isinstance(d, int) for d in listed):
        return f"{_label(site)} has dimensions bnfold cannot read"
    dims = [d % rank for d in listed]
    if channel_axis in dims:
        return f"{_label(site)} averages over the channel axis"
    return Passage(channel_axis if keepdim else channel_axis - sum(d < channel_axis for d in dims))


def _reshape(site: Site, in_shape: Sequence[int] | None, channel_axis: int | None) -> Passage | str:
    out_shape = site.shape
    if in_shape is None or out_shape is None or channel_axis is None:
        return (
            f"{_label(site)} reshapes its input; pass example_inputs so bnfold can check that every channel keeps "
            f"its own values"
        )
    channels = in_shape[channel_axis]
    trailing = math.prod(in_shape[channel_axis + 1 :])
    for out_axis, size in enumerate(out_shape):
        if size == channels and math.prod(out_shape[out_axis + 1 :]) == trailing:
            return Passage(out_axis)
    return (
        f"{_label(site)} reshapes {tuple(in_shape)} to {tuple(out_shape)}, which mixes the values of different channels "
        f"along one axis"
    )


def _permute(site: Site, name: str, channel_axis: int | None, rank: int | None) -> Passage | str:
    if channel_axis is None or rank is None:
        return f"{_label(site)} moves axes; pass example_inputs so bnfold can follow the channel axis"
    args = [a for a in site.args[1:]]
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        dims = site.kwargs.get("dims", dims)
        order = [int(d) % rank for d in dims]
        return Passage(order.index(channel_axis))
    first = int(site.kwargs.get("dim0", args[0] if args else 0)) % rank
    second = int(site.kwargs.get("dim1", args[1] if len(args) > 1 else 0)) % rank
    if channel_axis == first:
        return Passage(second)
    if channel_axis == second:
        return Passage(first)
    return Passage(channel_axis)
