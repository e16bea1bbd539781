"""Where the torch.export helpers used to live: they are in :mod:`bnfold.backends.exported` now.

Kept so that existing imports (``from bnfold.exported import fold_exported``, the CLI's loading code) keep working.
"""

from __future__ import annotations

from .backends.exported import (
    check_batch_sizes,
    check_input_shape,
    dynamic_shapes_of,
    fold_exported,
    parameter_count,
    plan_exported,
)

__all__ = [
    "check_batch_sizes", "check_input_shape", "dynamic_shapes_of", "fold_exported", "parameter_count", "plan_exported",
]
