"""Read a torch.export archive (``.pt2``) without running code from it, unless the user says they trust the file.

``torch.export.load`` is not safe on a file from elsewhere, although the archive looks like data (JSON and raw
tensor bytes). In torch 2.14 it runs code from the file in five places:

* the sample-inputs record (``data/sample_inputs/<model>.pt``) is unpickled with ``weights_only=True`` and, when
  that fails, again with ``weights_only=False`` (``torch._export.serde.serialize.deserialize_torch_artifact``),
  so any pickle there runs; the same for the legacy whole-state_dict / constants records and the pre-2.8 layout;
* weights and tensor constants marked ``use_pickle`` in their JSON config are read with ``weights_only=False``,
  and constants named ``custom_obj_*`` / ``opaque_obj_*`` with ``torch._C._pickle_load_obj`` / ``pickle.loads``
  (``torch/export/pt2_archive/_package.py``);
* an ``data/aotinductor/`` folder is compiled code: its shared library is loaded;
* every symbolic-shape expression of the graph (``expr_str``) goes through ``sympy.sympify``, which ``eval``\\ s it;
* the program's ``guards_code`` strings are pasted into Python source and ``exec``\\ ed when ``.module()`` is
  called (``torch/export/_unlift.py``).

:func:`unsafe_records` names every record that would run code, reading the archive with :mod:`zipfile` only (a
whitelist of syntax for the expressions and guards); :func:`load_exported` hands torch the *same bytes* it checked,
or refuses with one line naming the record.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import math
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError, first_line

# Records torch reads as raw bytes or as text, never unpickled (paths relative to the archive's root folder).
_PLAIN_TEXT = frozenset({"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
                         "version"})
_CONFIG = re.compile(r"^data/(weights|constants)/[^/]+_(weights|constants)_config\.json$")
_MODEL_JSON = re.compile(r"^(models/[^/]+\.json|serialized_exported_program\.json)$")
_COMPILED_DIRS = ("data/aotinductor/",)
_PICKLED_OBJECT_PREFIXES = ("custom_obj_", "opaque_obj_")

_TRUST_HINT = ("bnfold refuses to load it, because that would run code from the file: pass --trust-pickle if you "
               "trust where it came from")

# Symbolic-shape expressions: calls of sympy's constructors and torch's sympy functions, names, numbers.
_SYMPY_CALLS = frozenset({
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "floor", "ceiling",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan", "StrictGreaterThan",
    "LessThan", "GreaterThan", "And", "Or", "Not", "Piecewise", "ITE", "sqrt", "Sum",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift",
    "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
})
_SYMPY_CALL_PREFIXES = ("OpaqueUnaryFn_", "BitwiseFn_")
# Guards: comparisons of input sizes (L['x'].size()[0]) with numbers, torch.sym_* and math.* functions.
_GUARD_NAMES = frozenset({"L", "torch", "math", "inf", "IsNonOverlappingAndDenseIndicator",
                          "cast_symbool_to_symint_guardless"})
_GUARD_CALLABLE_NAMES = frozenset({"IsNonOverlappingAndDenseIndicator", "cast_symbool_to_symint_guardless"})
_TENSOR_ATTRIBUTES = frozenset({"size", "stride", "storage_offset", "dim", "numel", "shape"})
_MATH_FUNCTIONS = frozenset(name for name in dir(math) if not name.startswith("_"))
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PLAIN_STRING = re.compile(r"^[A-Za-z0-9_.\- ]*$")
_OPERATORS = (ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.operator, ast.unaryop, ast.boolop, ast.cmpop,
              ast.Load, ast.Expression, ast.keyword)


class UnsafeArchiveError(InvalidInputError):
    """A ``.pt2`` archive holds a record whose loading would run code from the file (``--trust-pickle`` allows it)."""


def _is_weights_only(data: bytes) -> str | None:
    """``None`` if ``data`` loads with the weights-only unpickler, else why not (torch would retry it unsafely)."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # any failure: torch.export.load would fall back to weights_only=False
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        # torch's weights-only message opens with advice; the cause is on the "WeightsUnpickler error:" line
        cause = next((line.split("error:", 1)[1].strip() for line in lines if "WeightsUnpickler error:" in line), lines[0])
        return cause.split(". ")[0][:160]
    return None


def _sympy_expression_problem(text: str) -> str | None:
    """Why ``text`` is not a plain symbolic-shape expression (``None`` if it is): sympify would ``eval`` it."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return "is not an expression"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else None
            if name is None or not (name in _SYMPY_CALLS or name.startswith(_SYMPY_CALL_PREFIXES)):
                return f"calls {ast.unparse(node.func)}"
        elif isinstance(node, ast.Name):
            if node.id.startswith("__") or not _IDENTIFIER.match(node.id):
                return f"names {node.id}"
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str) and not _IDENTIFIER.match(node.value):
                return f"holds the string {node.value!r}"
            if not isinstance(node.value, (str, int, float, bool)) and node.value is not None:
                return f"holds a {type(node.value).__name__} constant"
        elif not isinstance(node, _OPERATORS):
            return f"uses Python syntax {type(node).__name__}"
    return None


def _guard_problem(text: str) -> str | None:
    """Why the guard ``text`` is not a plain comparison of input sizes (``None`` if it is): torch ``exec``\\ s it."""
    if any(c in text for c in "\"\\\n\r#"):
        return "holds quotes, backslashes, comments or line breaks"
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return "is not an expression"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            allowed = (
                (isinstance(func, ast.Name) and func.id in _GUARD_CALLABLE_NAMES)
                or (isinstance(func, ast.Attribute) and func.attr in _TENSOR_ATTRIBUTES
                    and not isinstance(func.value, ast.Name))
                or (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                    and ((func.value.id == "torch" and func.attr.startswith("sym_"))
                         or (func.value.id == "math" and func.attr in _MATH_FUNCTIONS)))
            )
            if not allowed:
                return f"calls {ast.unparse(func)}"
        elif isinstance(node, ast.Attribute):
            on_module = isinstance(node.value, ast.Name) and node.value.id in ("torch", "math")
            if node.attr.startswith("_") or (not on_module and node.attr not in _TENSOR_ATTRIBUTES):
                return f"reads the attribute {node.attr}"
            if on_module and not (node.attr.startswith("sym_") or node.attr in _MATH_FUNCTIONS):
                return f"reads {ast.unparse(node)}"
        elif isinstance(node, ast.Name):
            if node.id not in _GUARD_NAMES:
                return f"names {node.id}"
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str) and not _PLAIN_STRING.match(node.value):
                return f"holds the string {node.value!r}"
            if not isinstance(node.value, (str, int, float, bool)) and node.value is not None:
                return f"holds a {type(node.value).__name__} constant"
        elif not isinstance(node, (*_OPERATORS, ast.Subscript, ast.Tuple, ast.Slice)):
            return f"uses Python syntax {type(node).__name__}"
    return None


def _walk_json(value: Any) -> Iterator[tuple[str, Any]]:
    """Every ``(key, value)`` pair in a parsed JSON document, depth first, without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                yield key, inner
                stack.append(inner)
        elif isinstance(item, list):
            stack.extend(item)


def _program_problems(record: str, data: bytes) -> list[tuple[str, str]]:
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return []  # torch fails on it too, with its own error, before running anything from it
    problems = []
    for key, value in _walk_json(document):
        if key == "expr_str" and isinstance(value, str):
            why = _sympy_expression_problem(value)
            if why is not None:
                problems.append((record, f"has a shape expression that {why} ({value[:80]!r}), which sympy would evaluate as Python"))
        elif key == "guards_code" and isinstance(value, list):
            for guard in value:
                why = "is not a string" if not isinstance(guard, str) else _guard_problem(guard)
                if why is not None:
                    problems.append((record, f"has a guard that {why} ({str(guard)[:80]!r}), which torch would execute as Python"))
    return problems


def unsafe_records(data: bytes) -> list[tuple[str, str]]:
    """``(record, why)`` for every record of the ``.pt2`` archive ``data`` whose loading would run code.

    An empty list means ``torch.export.load`` can read these bytes without unpickling anything but plain tensors
    and containers, loading compiled code, or evaluating strings from the file. Raises ``zipfile.BadZipFile`` if
    ``data`` is not a zip archive.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        folded = [name.casefold() for name in names]
        if len(set(folded)) != len(folded):  # torch's reader (miniz) may pick another copy than the one checked here
            twice = sorted({n for n, f in zip(names, folded, strict=True) if folded.count(f) > 1})
            return [(twice[0], "appears more than once in the archive (a copy could hide another)")]
        root = names[0].split("/", 1)[0] if names and "/" in names[0] else ""
        relative = {name: name[len(root) + 1:] if root and name.startswith(root + "/") else name for name in names}
        by_relative = {rel.casefold(): name for name, rel in relative.items()}
        problems: list[tuple[str, str]] = []
        raw: set[str] = set()
        checked: set[str] = set()
        for name, rel in relative.items():
            match = _CONFIG.match(rel)
            if match is None:
                continue
            checked.add(name)
            folder = f"data/{match.group(1)}/"
            try:
                config = json.loads(archive.read(name)).get("config", {})
            except (ValueError, UnicodeDecodeError, AttributeError):
                continue  # torch refuses a damaged config itself, before reading the records it lists
            for fqn, meta in config.items() if isinstance(config, dict) else ():
                if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
                    continue
                path_name = meta["path_name"]
                target = by_relative.get((folder + path_name).casefold())
                if path_name.startswith(_PICKLED_OBJECT_PREFIXES):
                    problems.append((target or folder + path_name, f"(constant {fqn}) is a pickled Python object"))
                    if target is not None:
                        checked.add(target)
                elif not meta.get("use_pickle") and target is not None:
                    raw.add(target)
        for name, rel in relative.items():
            if name in raw or name in checked or name.endswith("/") or rel in _PLAIN_TEXT or rel.startswith("extra/"):
                continue
            if rel.startswith(_COMPILED_DIRS):
                problems.append((name, "is compiled AOTInductor code (a shared library torch would load)"))
            elif _MODEL_JSON.match(rel):
                problems.extend(_program_problems(name, archive.read(name)))
            else:  # anything else torch may unpickle (sample inputs, pickled weights, legacy records)
                why = _is_weights_only(archive.read(name))
                if why is not None:
                    problems.append((name, f"is not plain tensor data (the weights-only unpickler refuses it: {why})"))
        return problems


@contextlib.contextmanager
def _quiet(*logger_names: str) -> Iterator[None]:
    """Silence torch's loggers (and their children) meanwhile: torch logs whole tracebacks on damaged files."""
    loggers = [logging.getLogger(name) for name in logger_names]
    saved = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, saved, strict=True):
            logger.setLevel(level)


def load_exported(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """``torch.export.load(path)``, refusing (``UnsafeArchiveError``) an archive that would run code on loading.

    With ``trust_pickle=True`` the file is loaded as torch does (its pickles and guards run). Either way torch reads
    the bytes that were checked, so the file changing in between cannot slip anything past the check. Other
    failures (a damaged or truncated archive) are an ``InvalidInputError``.
    """
    import torch

    source = Path(path)
    data = source.read_bytes()
    if not trust_pickle:
        try:
            problems = unsafe_records(data)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
            raise InvalidInputError(f"{source} is a damaged zip archive ({error}); the file may be truncated") from error
        if problems:
            record, why = problems[0]
            more = f" ({len(problems) - 1} more such record{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
            raise UnsafeArchiveError(f"{source}: record {record} {why}{more}; {_TRUST_HINT}")
    try:
        with _quiet("torch.export", "torch._export"):
            return torch.export.load(io.BytesIO(data))
    except Exception as error:  # the archive reader raises RuntimeError / KeyError / JSON errors on a damaged file
        raise InvalidInputError(
            f"{source} is not a loadable torch.export program ({first_line(error)}); it may be truncated or corrupt"
        ) from error
