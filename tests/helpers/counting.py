"""Counting batch-norm computations in a forward pass (tests and benchmarks only)."""

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
    counter = _BatchNormCounter()
    with torch.no_grad(), counter:
        model(*tuple(example_inputs))
    return counter.count


_BATCH_NORM_FUNCTIONS = frozenset({"batch_norm", "_batch_norm_impl_index", "native_batch_norm", "_native_batch_norm_legit_no_training"})


class _BatchNormCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if getattr(func, "__name__", "") in _BATCH_NORM_FUNCTIONS:
            self.count += 1
        return func(*args, **(kwargs or {}))
