"""Run the ``bnfold`` command as a user does: a subprocess of this interpreter, on the bnfold the tests import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import bnfold


def bnfold_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m bnfold ARGS`` in ``cwd``, output captured, wide enough that tables do not wrap."""
    # The subprocess runs the bnfold these tests imported (a relative PYTHONPATH=src would not survive cwd=).
    source = str(Path(bnfold.__file__).resolve().parents[1])
    path = os.pathsep.join([source, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    environment = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "bnfold", *args], cwd=cwd, capture_output=True, text=True,
                          env=environment, timeout=300)
