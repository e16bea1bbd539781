"""The package reads as the pipeline, and data flows one way (../shared/STYLE.md).

Imports are read from the source (module-level and inside functions alike), so these hold for every code path:

* ``bnfold.core`` (graph, commuting, plan, apply) imports nothing of bnfold but itself, ``affine`` and ``errors``:
  it is the torch-free core every format shares;
* the library never imports the application (``bnfold.app``: the command line, reproduce, the demo);
* no module imports, directly or through others, a module that imports it back;
* test code the tests share lives in ``tests/helpers`` (no test module imports another), and the benchmarks never
  put ``tests/`` or ``src/`` on ``sys.path``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "bnfold"


def _module_name(path: Path) -> str:
    parts = ["bnfold", *path.relative_to(SOURCE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """bnfold module -> the bnfold modules it imports (a package import counts as importing its __init__)."""
    modules = {_module_name(path): path for path in SOURCE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base]) if base else ".".join(anchor)
                # `from package import module` imports that module (the package is its parent, initialised
                # first anyway); `from module import name` imports the module
                submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
                targets = submodules or [base]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target.startswith("bnfold") and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def test_the_core_imports_only_itself_affine_errors_and_the_report() -> None:
    allowed = {"bnfold.affine", "bnfold.errors", "bnfold.report"}  # report: the plain data the driver fills
    for name, imported in _imports().items():
        if name.startswith("bnfold.core"):
            outside = {m for m in imported if not m.startswith("bnfold.core") and m not in allowed | {"bnfold"}}
            assert not outside, f"{name} imports {outside}"


def test_the_library_never_imports_the_application() -> None:
    for name, imported in _imports().items():
        if not name.startswith("bnfold.app") and name != "bnfold.__main__":
            assert not {m for m in imported if m.startswith("bnfold.app")}, name


def test_there_are_no_import_cycles() -> None:
    graph = _imports()
    # The package __init__ re-exports lazily (on attribute access), which is not an import of its modules' users.
    graph = {name: {m for m in imported if m != "bnfold"} for name, imported in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError(" -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def _imported_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_test_module_imports_another() -> None:
    for path in sorted([*ROOT.glob("tests/*.py"), *ROOT.glob("tests/helpers/*.py"), *ROOT.glob("benchmarks/*.py")]):
        tests = {name for name in _imported_names(path) if name.split(".")[0].startswith("test_")}
        assert not tests, f"{path.relative_to(ROOT)} imports {tests}: shared test code goes in tests/helpers"


def test_benchmarks_leave_sys_path_alone() -> None:
    for path in sorted(ROOT.glob("benchmarks/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
                raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno} uses sys.path (see benchmarks/from_tests.py)")
