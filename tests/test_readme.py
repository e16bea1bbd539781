"""The README's set-up commands are the ones CI runs, so a missing install step fails in CI, not at a user's."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    demo, tests = _bash_blocks(setup)[:2]
    assert "pytest" in tests and "pytest" not in demo
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines, f"the README's test command is not a line of .ci/run:\n{tests}"


def test_readme_extension_example_runs() -> None:
    """The "Teach bnfold your own layers" example is real code: run it and check what it claims."""
    import bnfold

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Teach bnfold your own layers", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    report = bnfold.report_for(namespace["folded"])  # type: ignore[arg-type]
    assert [(e.kind, e.direction) for e in report.folded] == [("Scale", "forward"), ("BatchNorm1d", "backward")]
    assert not report.left
