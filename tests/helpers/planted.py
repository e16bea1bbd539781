"""Planted bugs: tests prove a check can fail by breaking, on purpose, the code it guards."""

from __future__ import annotations

import pytest


def plant_wrong_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fold's scale off by 1e-3 on its first channel (a planted bug in the arithmetic all formats share)."""
    from bnfold.core import apply

    right_map, right_fold = apply.scale_shift, apply.fold_one

    def wrong_map(statistics, numerics):  # noqa: ANN001, ANN202
        scale, shift = right_map(statistics, numerics)
        bump = scale * 0 + 1
        bump[0] = 1 + 1e-3
        return scale * bump, shift

    monkeypatch.setattr(apply, "scale_shift", wrong_map)
    monkeypatch.setattr(apply, "fold_one", lambda fold, access, maps=None: right_fold(fold, access, None))
