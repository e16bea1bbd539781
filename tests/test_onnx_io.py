"""ONNX files: every wrong input gets a one-line error naming the file; writes are atomic and refuse to overwrite."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

import bnfold.onnx as bo
from bnfold.errors import InvalidInputError
from helpers.onnx_cases import CASES, bn_count


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "conv.onnx"
    onnx.save_model(CASES["conv2d_bias_groups"]().model, str(path))
    return path


def one_line_error(path: object, match: str) -> str:
    with pytest.raises(InvalidInputError, match=match) as caught:
        bo.load(path)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    one_line_error(tmp_path / "nope.onnx", "no such file")


def test_directory(tmp_path: Path) -> None:
    one_line_error(tmp_path, "is a directory")


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\nreally\n")
    one_line_error(path, "text file")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    one_line_error(path, "empty")


def test_pytorch_checkpoint(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(3)}, path)
    one_line_error(path, "PyTorch checkpoint")


def test_truncated_file(model_file: Path) -> None:
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    one_line_error(model_file, "truncated or corrupt")


def test_corrupt_file(model_file: Path) -> None:
    rng = np.random.default_rng(0)
    model_file.write_bytes(b"\x08\x08\x12" + rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    one_line_error(model_file, "ONNX")


def test_fold_accepts_a_path(model_file: Path) -> None:
    result = bo.fold(model_file)
    assert result.report.model == "conv.onnx" and bn_count(result.model) == 0 and not result.external_data


def test_save_refuses_to_overwrite(model_file: Path, tmp_path: Path) -> None:
    before = model_file.read_bytes()
    folded = bo.fold(model_file).model
    with pytest.raises(InvalidInputError, match="already exists; pass force=True"):
        bo.save(folded, model_file)
    assert model_file.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["conv.onnx"]
    bo.save(folded, model_file, force=True)
    assert bn_count(bo.load(model_file)) == 0
    assert sorted(os.listdir(tmp_path)) == ["conv.onnx"]


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", broken)
    with pytest.raises(InvalidInputError, match="could not be written"):
        bo.save(CASES["conv2d"]().model, tmp_path / "out.onnx")
    assert os.listdir(tmp_path) == []


def test_external_data_round_trip(tmp_path: Path) -> None:
    source_dir, out_dir = tmp_path / "source", tmp_path / "out"
    source_dir.mkdir()
    out_dir.mkdir()
    original = CASES["conv3d_bias"]().model
    external = onnx.ModelProto()
    external.CopyFrom(original)  # save_model moves the tensors of the model it is given into the data file
    onnx.save_model(
        external,
        str(source_dir / "m.onnx"),
        save_as_external_data=True,
        location="m.weights",
        size_threshold=0,
    )
    assert (source_dir / "m.weights").exists()

    result = bo.fold(source_dir / "m.onnx")
    assert result.external_data and result.report.verification["passed"]
    result.save(out_dir / "folded.onnx")
    assert sorted(os.listdir(out_dir)) == ["folded.onnx", "folded.onnx.data"]

    reloaded = bo.load(out_dir / "folded.onnx")
    assert bn_count(reloaded) == 0
    check = bo.verify(original, reloaded, seed=3)
    assert check.passed, str(check)


def test_missing_external_data(tmp_path: Path) -> None:
    onnx.save_model(
        CASES["conv2d"]().model,
        str(tmp_path / "m.onnx"),
        save_as_external_data=True,
        location="m.bin",
        size_threshold=0,
    )
    (tmp_path / "m.bin").unlink()
    one_line_error(tmp_path / "m.onnx", "external data file 'm.bin'")


def test_save_into_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="does not exist"):
        bo.save(CASES["conv2d"]().model, tmp_path / "no" / "m.onnx")
