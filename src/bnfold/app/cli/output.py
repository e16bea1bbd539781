"""How a command's result reaches the user: JSON on stdout for scripts (``--json``), else rich renderables.

Used on ONNX files too, so it imports neither torch nor anything that does.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ...report import print_whole


def emit(args: argparse.Namespace, console: Any, payload: dict[str, Any], *renderables: Any) -> None:
    """Write ``payload`` as JSON when ``--json`` was given, else print each renderable on ``console``, whole
    (:func:`bnfold.report.print_whole`)."""
    if args.json:
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    print_whole(console, *renderables)  # outside a terminal, as wide as the widest row: no cell is ever cut
