"""Models by architecture name: torchvision's and timm's registries, freshly initialised, nothing downloaded.

Shared by the command line (``bnfold fold resnet50``) and ``bnfold reproduce``. An unknown name is an error
that suggests the closest known names.
"""

from __future__ import annotations

import difflib
import importlib

import torch
from torch import nn

from ..errors import InvalidInputError


def _names(library: str) -> list[str]:
    """The architecture names torchvision or timm knows (none when it is not installed)."""
    try:
        module = importlib.import_module(library)
    except ImportError:
        return []
    return list(module.models.list_models() if library == "torchvision" else module.list_models())


def resolve_arch(name: str) -> tuple[str, str]:
    """``(library, name)`` for ``name``, ``tv:name`` or ``timm:name``; torchvision first for bare names."""
    library, _, bare = name.rpartition(":")
    known: dict[str, list[str]] = {}
    for registry, prefixes in (("torchvision", ("", "tv", "torchvision")), ("timm", ("", "timm"))):
        if library in prefixes:
            known[registry] = _names(registry)
            if bare in known[registry]:
                return registry, bare
    if library not in ("", "tv", "torchvision", "timm"):
        raise InvalidInputError(f"unknown model library {library!r} in {name!r}; use tv:NAME or timm:NAME")
    candidates = list(dict.fromkeys(n for names in known.values() for n in names))
    close = difflib.get_close_matches(bare, candidates, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models() or timm.list_models()"
    if not any(known.values()):
        hint = "; install torchvision and timm (pip install 'bnfold[vision]') to build models by name"
    raise InvalidInputError(f"{name!r} is neither a model file nor a known architecture{hint}")


def build_arch(name: str, num_classes: int | None = None, seed: int | None = None) -> tuple[nn.Module, tuple[int, ...]]:
    """A freshly initialised model of architecture ``name`` (nothing downloaded) and its default input shape.

    ``seed``: initialise the weights from ``torch.manual_seed(seed)`` inside a forked random state, so the same name
    and seed give the same weights in every run and the caller's random state is not consumed; ``None`` draws them
    from the global random state (as ``bnfold reproduce`` does after seeding it).
    """
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        library, bare = resolve_arch(name)
        extra = {} if num_classes is None else {"num_classes": num_classes}
        if library == "torchvision":
            import torchvision

            model = torchvision.models.get_model(bare, weights=None, **extra)
            size = 299 if bare == "inception_v3" else 224
            return model.eval(), (1, 3, size, size)
        import timm

        model = timm.create_model(bare, pretrained=False, **extra)
    config = getattr(model, "pretrained_cfg", None) or {}
    channels, height, width = config.get("input_size", (3, 224, 224))
    return model.eval(), (1, channels, height, width)
