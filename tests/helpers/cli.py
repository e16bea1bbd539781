"""Run the ``bnfold`` command as a user does, or Python code on a machine without some packages: a subprocess of this
interpreter, on the bnfold the tests import."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import bnfold


def _search_path(*extra: str) -> str:
    """bnfold's own source first (a relative PYTHONPATH=src would not survive cwd=), then ``extra``, then the caller's."""
    source = str(Path(bnfold.__file__).resolve().parents[1])
    return os.pathsep.join([source, *extra, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])


def python_without(code: str, *modules: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter where importing any of ``modules`` fails (``sys.modules[name] = None``),
    the test helpers importable: what a machine without those packages does with it."""
    blocked = "".join(f"sys.modules[{name!r}] = None; " for name in modules)
    environment = {**os.environ, "PYTHONPATH": _search_path(str(Path(__file__).resolve().parents[1]))}
    return subprocess.run([sys.executable, "-c", f"import sys; {blocked}\n{code}"], capture_output=True, text=True,
                          env=environment, timeout=120)


def bnfold_cli(*args: str, cwd: Path, columns: str = "200", path: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """``python -m bnfold ARGS`` in ``cwd``; its output is a pipe (not a terminal) of ``columns`` (rich reads COLUMNS).

    ``path``: folders put on the subprocess's ``PYTHONPATH`` after bnfold's own (a ``sitecustomize`` that blocks an
    import, for example).
    """
    environment = {**os.environ, "COLUMNS": columns, "OMP_NUM_THREADS": "1", "PYTHONPATH": _search_path(*path)}
    return subprocess.run([sys.executable, "-m", "bnfold", *args], cwd=cwd, capture_output=True, text=True,
                          env=environment, timeout=600)


NO_TORCH = """
import importlib.abc, sys


class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm", "functorch"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""
"""A ``sitecustomize.py`` that makes PyTorch (and what needs it) impossible to import: an ONNX-only install."""
