"""``bnfold fold --merge-branches``: the command line merges summed branches of modules and ONNX files, and says
what it cannot do instead of writing something that would not load."""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch

from test_cli import bnfold_cli

timm = pytest.importorskip("timm")
SHAPE = ["--input-shape", "1,3,64,64"]


def _ops(path: Path) -> Counter[str]:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_an_architecture_merges_and_is_written_as_onnx(tmp_path: Path) -> None:
    done = bnfold_cli("fold", "timm:mobileone_s0", "--merge-branches", *SHAPE, "-o", "merged.onnx", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["report"]
    merged = [m for m in report["merges"] if m["status"] == "merged"]
    assert merged and report["verification"]["passed"]
    ops = _ops(tmp_path / "merged.onnx")
    assert ops["BatchNormalization"] == 0 and ops["Conv"] == len(merged)  # one conv per block, every block merged


def test_a_merged_model_is_not_written_as_a_state_dict(tmp_path: Path) -> None:
    done = bnfold_cli("fold", "timm:mobileone_s0", "--merge-branches", *SHAPE, "-o", "merged.pth", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error:") and "GraphModule" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_onnx_file_merges_without_torch_in_the_command(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("repvgg_a0", pretrained=False).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), buffer, dynamo=False, do_constant_folding=False)
    source = tmp_path / "repvgg.onnx"
    source.write_bytes(buffer.getvalue())
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    plain = bnfold_cli("fold", "repvgg.onnx", "-o", "folded.onnx", cwd=tmp_path)
    merged = bnfold_cli("fold", "repvgg.onnx", "--merge-branches", "-o", "merged.onnx", "--json", cwd=tmp_path)
    assert plain.returncode == 0 and merged.returncode == 0, merged.stderr
    assert json.loads(merged.stdout)["written_file_check"]["passed"]  # read back and compared in onnxruntime
    assert _ops(tmp_path / "merged.onnx")["Conv"] < _ops(tmp_path / "folded.onnx")["Conv"]
    assert _ops(tmp_path / "merged.onnx")["BatchNormalization"] == 0
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
