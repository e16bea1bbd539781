"""The test helpers a benchmark measures with, each loaded from its file: ``tests/`` never goes on ``sys.path``.

Some benchmarks run on the tests' own fixtures (the hand-built ONNX graphs, the trained files taken out of PyPI
wheels, the forward-pass counters, the photographs detectors are calibrated on), so that their numbers are about
the models the tests check. These are test code, not the library's, so they stay in ``tests/helpers``; loading one
file by its path keeps every test module and ``conftest`` out of the import system, and a benchmark gets only the
helper it names. A helper loaded this way imports only installed packages (never another helper).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

HELPERS = Path(__file__).resolve().parent.parent / "tests" / "helpers"


def load_helper(name: str) -> ModuleType:
    """``tests/helpers/<name>.py``, loaded once (as ``tests_helpers.<name>``)."""
    qualified = f"tests_helpers.{name}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    spec = importlib.util.spec_from_file_location(qualified, HELPERS / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"no test helper {name!r} in {HELPERS}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module
