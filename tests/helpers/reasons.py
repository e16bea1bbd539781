"""Reasons with the names taken out: what stays is the sentence, which must be the same in every format.

Each adapter names the steps of its own graph: ``module 'conv' (Conv2d)`` and ``the operation x + y`` for an
nn.Module, ``the operation aten::add`` in TorchScript, ``the operation aten.add (%add)`` in a ``.pt2``,
``'/Add' (Add)`` in ONNX, and the layers and constants by their names in that format (``'2'``, ``'/2/Conv'``,
``'%self.1.bias'``). :func:`without_names` replaces each of these with ``<name>``; numbers, shapes and every word of
the sentence stay, so two reasons compare equal only when the same rule refused with the same facts.
"""

from __future__ import annotations

import re

NAME = "<name>"

_LABELS = [
    re.compile(r"module '[^']*' \([^)]*\)"),  # nn.Module call sites
    re.compile(r"the operation aten\.\w+(?:\.\w+)? \(%\w+\)"),  # .pt2 nodes
    re.compile(r"the operation aten::\w+"),  # TorchScript nodes
    re.compile(r"the operation (?:x [-+*/@] y|[\w.]+)"),  # nn.Module operations: x + y, torch.relu, x.reshape
    re.compile(r"the constant %[\w.]+"),  # TorchScript constants
    # quoted names, with the ONNX op type / ATen op that follows them and the word before them
    re.compile(r"(?:(?:layer|norm|the tensor|the graph input|the graph output) )?'[^']*'(?: \((?:aten|[A-Z])[^)]*\))?"),
    re.compile(r"(?:a model|a program) input|the (?:model|program) output"),
]


def without_names(reason: str) -> str:
    """``reason`` with every step, layer, norm and constant name replaced by ``<name>``."""
    for label in _LABELS:
        reason = label.sub(NAME, reason)
    return reason
