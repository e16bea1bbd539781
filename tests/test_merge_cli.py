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

from helpers.cli import bnfold_cli

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


class _RepBlock(torch.nn.Module):
    """conv3x3+BN + conv1x1+BN + BN(x): one 3x3 convolution once merged."""

    def __init__(self) -> None:
        super().__init__()
        self.k3 = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4))
        self.k1 = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1, bias=False), torch.nn.BatchNorm2d(4))
        self.identity = torch.nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.k3(x) + self.k1(x) + self.identity(x))


def _save(model: torch.nn.Module, x: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path.suffix == ".ts":
            torch.jit.save(torch.jit.trace(model, x), str(path))
        elif path.suffix == ".pt2":
            torch.export.save(torch.export.export(model, (x,)), str(path))
        else:
            buffer = io.BytesIO()
            torch.onnx.export(model, (x,), buffer, input_names=["x"], do_constant_folding=False, dynamo=False)
            path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize("suffix", [".ts", ".pt2", ".onnx"])
def test_inspect_previews_the_merges_of_a_file_and_writes_nothing(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    model = _RepBlock().train()
    with torch.no_grad():
        model(x)  # statistics of its own
    model.eval()
    source = tmp_path / f"block{suffix}"
    _save(model, x, source)
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    shape = [] if suffix == ".onnx" else ["--input-shape", "2,4,8,8"]  # ONNX is planned on the graph's own shapes
    done = bnfold_cli("inspect", source.name, "--merge-branches", *shape, "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    report = report.get("report", report)
    merged = [m for m in report["merges"] if m["status"] == "merged"]
    assert len(merged) == 1 and len(merged[0]["layers"]) == 1 and len(merged[0]["identities"]) == 1
    assert report["applied"] is False
    plain = json.loads(bnfold_cli("inspect", source.name, *shape, "--json", cwd=tmp_path).stdout)
    assert plain.get("report", plain)["merges"] == []  # without the option, no preview
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name]
