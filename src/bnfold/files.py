"""Writing files safely: a file bnfold writes is either complete or absent, and never replaces one by accident.

Every writer (reports, charts, folded models, the CLI) goes through :func:`write_atomic`: the content goes to a
temporary file in the target's directory, which is renamed over the target only once it is complete. A crash or
Ctrl-C half way leaves the old file (or nothing) behind, never a truncated model.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import InvalidInputError


def write_atomic(
    target: str | os.PathLike[str], write: Callable[[Any], None], *, binary: bool = True,
    cleanup: Callable[[], None] | None = None,
) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``target``, then rename it to ``target``.

    ``cleanup`` runs afterwards whatever happens (e.g. closing a matplotlib figure).
    """
    try:
        with staged(target) as temporary, temporary.open("wb" if binary else "w") as handle:
            write(handle)
    finally:
        if cleanup is not None:
            cleanup()
    return Path(target)


@contextmanager
def staged(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``target``; renamed to ``target`` if the block succeeds, deleted if it raises.

    For writers that want a path rather than a handle (``torch.onnx.export``), and for checking a written file
    (loading it back) before it replaces anything.
    """
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name keeps the extension: some loaders (torch.export.load) go by it.
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(descriptor)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def check_output_path(output: str | os.PathLike[str], inputs: list[Path], *, force: bool) -> Path:
    """Refuse to write over an input file (ever) or over an existing file (unless ``force``)."""
    path = Path(output)
    for source in inputs:
        if path.resolve() == source.resolve():
            raise InvalidInputError(f"{path} is the input file; write the folded model to another path (-o OUT)")
    if path.is_dir():
        raise InvalidInputError(f"{path} is a directory; give a file name for the folded model")
    if path.exists() and not force:
        raise InvalidInputError(f"{path} exists; pass --force to replace it, or choose another path")
    if not path.parent.exists():
        raise InvalidInputError(f"{path.parent} does not exist; create it first or choose another path")
    return path
