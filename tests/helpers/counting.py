"""Counting batch-norm and convolution / linear computations in a forward pass (tests and benchmarks only)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


def count_batch_norm_calls(model: nn.Module, example_inputs: Iterable[Any]) -> int:
    """How many batch-norm computations one forward pass of ``model`` makes (calls of ``torch.batch_norm``).

    Counts the function, not modules: a module may compute batch norm functionally, and a module left in place
    may compute nothing. ``F.batch_norm`` reaches ``torch.batch_norm``, which is what is counted.
    """
    return _count_calls(model, tuple(example_inputs), _BATCH_NORM_FUNCTIONS)


def conv_calls(model: nn.Module, x: torch.Tensor) -> int:
    """Convolutions and linear layers computed in one forward pass of ``model`` on ``x`` (calls, not modules)."""
    return _count_calls(model, (x,), LINEAR_FUNCTIONS)


_BATCH_NORM_FUNCTIONS = frozenset({"batch_norm", "_batch_norm_impl_index", "native_batch_norm", "_native_batch_norm_legit_no_training"})
LINEAR_FUNCTIONS = frozenset({"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "linear"})
"""The torch functions (and ATen / JIT op names) of a convolution or linear layer."""


def _count_calls(model: nn.Module, inputs: tuple[Any, ...], names: frozenset[str]) -> int:
    counter = _CallCounter(names)
    with torch.no_grad(), counter:
        model(*inputs)
    return counter.count


class _CallCounter(TorchFunctionMode):
    def __init__(self, names: frozenset[str]) -> None:
        super().__init__()
        self.names = names
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if getattr(func, "__name__", "") in self.names:
            self.count += 1
        return func(*args, **(kwargs or {}))
