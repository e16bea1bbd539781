"""Trained model files shipped inside published wheels, for tests that fold real weights.

A test asks for one file of one wheel (``wheel_member("rapidocr_onnxruntime", "rapidocr_onnxruntime/models/...")``);
the wheel is looked for in the directories of ``BNFOLD_WHEELS`` (``os.pathsep``-separated; default ``/tmp/dl``) and
in the cache directory, and, only when ``BNFOLD_FETCH_WHEELS=1``, downloaded there with ``pip download --no-deps``.
The member is extracted once into the cache directory (``BNFOLD_WHEEL_CACHE``, default
``~/.cache/bnfold-test-wheels``). Without the wheel the test is skipped, saying how to get it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("BNFOLD_WHEEL_CACHE", Path.home() / ".cache" / "bnfold-test-wheels"))


def _search_dirs() -> list[Path]:
    listed = os.environ.get("BNFOLD_WHEELS", "/tmp/dl")
    return [Path(p) for p in listed.split(os.pathsep) if p] + [CACHE]


def find_wheel(project: str, version: str | None = None) -> Path | None:
    """The newest-named wheel of ``project`` (``version`` if given) in the search directories, or None."""
    pattern = f"{project}-{version or '*'}-*.whl"
    found = sorted(path for directory in _search_dirs() if directory.is_dir() for path in directory.glob(pattern))
    if found or os.environ.get("BNFOLD_FETCH_WHEELS") != "1":
        return found[-1] if found else None
    CACHE.mkdir(parents=True, exist_ok=True)
    spec = f"{project}=={version}" if version else project
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(CACHE), spec],
                   check=False, capture_output=True, timeout=600)
    found = sorted(CACHE.glob(pattern))
    return found[-1] if found else None


def wheel_member(project: str, member: str, version: str | None = None) -> Path:
    """The file ``member`` of ``project``'s wheel, extracted into the cache; skips the test when there is none."""
    wheel = find_wheel(project, version)
    if wheel is None:
        pytest.skip(f"the {project} wheel is not available: put it in BNFOLD_WHEELS (default /tmp/dl) or set "
                    f"BNFOLD_FETCH_WHEELS=1 to download it with 'pip download --no-deps {project}'")
    target = CACHE / wheel.stem / member
    if not target.exists():
        with zipfile.ZipFile(wheel) as archive:
            if member not in archive.namelist():
                pytest.skip(f"{wheel.name} has no {member}")
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(target.suffix + f".{os.getpid()}.part")
            partial.write_bytes(archive.read(member))
            partial.replace(target)  # atomic: a test run in parallel never reads half a file
    return target
