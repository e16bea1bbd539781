"""Read a model file of any format bnfold folds: what the ``bnfold`` command and :func:`bnfold.fold` (given a
path) share.

The format is told from the content (:func:`sniff`; the extension can lie), and each reader turns every
problem into an :class:`~bnfold.errors.InvalidInputError` naming the file and the fix. Nothing here imports
PyTorch until a PyTorch file is read, so an ONNX file is sniffed and read on a machine without it.
"""

from __future__ import annotations

import pickle
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import InvalidInputError, first_line

SAFETENSORS = "safetensors"
TORCHSCRIPT = "torchscript"
ONNX = "onnx"
EXPORTED = "exported"
TORCH_FILE = "torch"  # what sniff() says of a torch.save file: a pickled module or a state_dict, known once loaded
UNKNOWN = "unknown"

_SPECIAL_FILES = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_readable(path: Path) -> None:
    """A regular file that can be read, checked without opening anything that could block or never end.

    Opening a FIFO waits for a writer, and /dev/zero or /dev/urandom never reach end of file, so the kind of
    file is decided from ``stat`` first, before any ``open``.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InvalidInputError(f"{path}: no such file") from None
    except OSError as error:
        raise InvalidInputError(f"{path}: cannot read it ({error.strerror or error})") from error
    if stat.S_ISDIR(mode):
        raise InvalidInputError(f"{path} is a directory; give a model file")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "not a regular file")
        raise InvalidInputError(f"{path} is {kind}, not a model file; save the model to a regular file and pass that")
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as error:
        raise InvalidInputError(f"{path}: cannot read it ({error.strerror or error})") from error
    if path.stat().st_size == 0:
        raise InvalidInputError(f"{path} is empty; the file was not written completely")


_NAMED = {".onnx": ONNX, ".safetensors": SAFETENSORS}


def kind_by_name(path: Path) -> str | None:
    """The format a file's name alone tells (an ONNX or safetensors file), before it is opened; else ``None``."""
    return _NAMED.get(path.suffix.lower())


def sniff(path: Path) -> str:
    """The file's format from its content (the extension can lie): onnx, safetensors, torchscript, exported, torch."""
    named = kind_by_name(path)
    if named is not None:
        return named
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as error:
            raise InvalidInputError(f"{path} is a damaged zip archive ({error}); the file may be truncated") from error
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return TORCHSCRIPT
        if any(n.endswith("serialized_exported_program.json") or "/models/" in n and n.endswith(".json") for n in names):
            return EXPORTED
        return TORCH_FILE
    with path.open("rb") as handle:
        head = handle.read(9)
    if head[:4] == b"PK\x03\x04":
        raise InvalidInputError(
            f"{path} is a damaged zip archive (PyTorch checkpoints, TorchScript archives and .pt2 programs are zip files: this one "
            "has no central directory); the file is probably truncated: write it again"
        )
    if head[:1] == b"\x80":  # a legacy (non-zip) torch.save or a plain pickle
        return TORCH_FILE
    if len(head) == 9 and int.from_bytes(head[:8], "little") < 100_000_000 and head[8:] == b"{":
        return SAFETENSORS  # an 8-byte header length, then the JSON header
    return UNKNOWN


def torch_load(path: Path, trust_pickle: bool) -> Any:
    """``torch.load`` on the CPU, weights only unless ``trust_pickle`` (a pickled module runs code from the file)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as error:
        text = str(error).lower()
        if not trust_pickle and "global" in text:  # the weights-only unpickler met a class: a pickled object
            raise InvalidInputError(
                f"{path} holds pickled Python objects (probably a whole nn.Module saved with torch.save(model)); "
                "unpickling runs code from the file, so bnfold refuses by default: pass --trust-pickle "
                "(trust_pickle=True from Python) if you trust where it came from, or save model.state_dict() and pass "
                "it with --arch NAME"
            ) from error
        raise InvalidInputError(
            f"{path} is not a readable PyTorch file (its pickled data is damaged); it may be corrupt or truncated"
        ) from error
    except (AttributeError, ModuleNotFoundError) as error:
        raise InvalidInputError(
            f"{path}: the pickled model needs code that is not importable here ({first_line(error)}); "
            "install the package that defines it, or save a state_dict instead"
        ) from error
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as error:
        raise InvalidInputError(
            f"{path} is not a complete PyTorch file ({first_line(error)}); it may be truncated or corrupt"
        ) from error


def load_safetensors(path: Path) -> dict[str, Any]:
    """The tensors of a ``.safetensors`` file, by name."""
    try:
        from safetensors.torch import load_file
    except ImportError as error:
        raise InvalidInputError("reading .safetensors needs the safetensors package: pip install 'bnfold[safetensors]'") from error
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own SafetensorError for a damaged header or data
        raise InvalidInputError(f"{path} is not a complete safetensors file ({first_line(error)})") from error


def load_torchscript(path: Path) -> Any:
    """The ``torch.jit.ScriptModule`` of a TorchScript archive, on the CPU."""
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # the TorchScript loader raises RuntimeError with a C++ backtrace
        raise InvalidInputError(f"{path} is not a loadable TorchScript archive ({first_line(error)})") from error


def load_exported(path: Path, trust_pickle: bool) -> Any:
    """The program in a ``.pt2`` file; refuses one that would run code on loading unless ``trust_pickle``."""
    from .backends.pt2_safety import load_exported as safe_load

    return safe_load(path, trust_pickle=trust_pickle)


_READERS: dict[str, Callable[[Path, bool], Any]] = {
    ONNX: lambda path, trust_pickle: path,  # bnfold.onnx reads it itself, external data and all
    TORCHSCRIPT: lambda path, trust_pickle: load_torchscript(path),
    EXPORTED: load_exported,
    TORCH_FILE: torch_load,
    SAFETENSORS: lambda path, trust_pickle: load_safetensors(path),
}


def read(path: Path, kind: str, trust_pickle: bool) -> Any:
    """What a file of ``kind`` (:func:`sniff`) holds: a model, a state_dict (or a checkpoint around one), or, for
    an ONNX file, its path (the ONNX backend reads the graph and its external data itself)."""
    if kind not in _READERS:
        raise InvalidInputError(
            f"{path} is not a model file bnfold knows (PyTorch checkpoint, pickled module, TorchScript, .pt2 program, "
            "safetensors or ONNX); check the path"
        )
    if kind != ONNX:  # every other file needs PyTorch: the install hint where it is missing
        try:
            import torch  # noqa: F401
        except ModuleNotFoundError as error:
            if (error.name or "").split(".")[0] != "torch":
                raise
            raise InvalidInputError(
                f"{path} is a PyTorch file ({kind}), which needs PyTorch, not installed here: "
                "pip install 'bnfold[torch]'"
            ) from error
    return _READERS[kind](path, trust_pickle)
