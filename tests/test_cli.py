"""The ``bnfold`` command run as a subprocess on real files: results that load and match, and bad input refused.

Every error case checks the exit code, that the message is one line naming the problem (no traceback), and that
nothing was written. The models are torchvision ResNet-18s at 32 x 32 with calibrated statistics, small enough to
keep each run at a few seconds (most of it is importing torch).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

import bnfold
from bnfold.app.calibration import calibrate, randomize_norm_affine
from bnfold.verification import TOLERANCES
from helpers.cli import bnfold_cli

SHAPE = ["--input-shape", "1,3,32,32"]
TOLERANCE = TOLERANCES[torch.float32]


def _trained_resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    randomize_norm_affine(model, seed=1)
    calibrate(model, torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    model = _trained_resnet18()
    made = {name: root / name for name in ("r18.pth", "module.pt", "r18.ts", "train.pt", "corrupt.pth", "truncated.pth",
                                           "notes.txt", "r18.onnx", "r18.pt2", "truncated.pt2")}
    torch.save(model.state_dict(), made["r18.pth"])
    torch.save(model, made["module.pt"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), made["r18.ts"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(made["r18.onnx"]), dynamo=False,
                          do_constant_folding=False)  # constant folding would leave no BatchNormalization to fold
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 32, 32),)), made["r18.pt2"])
    program = made["r18.pt2"].read_bytes()
    made["truncated.pt2"].write_bytes(program[: len(program) // 2])
    torch.save(model.train(), made["train.pt"])
    model.eval()
    made["corrupt.pth"].write_bytes(b"\x80\x02" + bytes(range(256)) * 8)
    whole = made["r18.pth"].read_bytes()
    made["truncated.pth"].write_bytes(whole[: len(whole) // 2])
    made["notes.txt"].write_text("not a model\n")
    return made


@pytest.fixture(scope="module")
def reference(files: dict[str, Path]) -> tuple[torch.nn.Module, torch.Tensor]:
    model = _trained_resnet18()
    model.load_state_dict(torch.load(files["r18.pth"], weights_only=True))
    return model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / a.abs().max()).detach())


def test_fold_a_state_dict_writes_one_that_loads_into_the_folded_architecture(files, reference, tmp_path) -> None:
    out = tmp_path / "folded.pth"
    result = bnfold_cli("fold", str(files["r18.pth"]), "--arch", "resnet18", "-o", str(out), *SHAPE, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["format"] == "state_dict" and payload["report"]["summary"]["folded"] == 20
    assert payload["report"]["parameters_before"] - payload["report"]["parameters_after"] == 4_800  # 9,600 affine - 4,800 biases
    model, x = reference
    skeleton = bnfold.fold(torchvision.models.resnet18().eval(), verify=False)
    skeleton.load_state_dict(torch.load(out, weights_only=True))
    assert _relative(model(x), skeleton.eval()(x)) < TOLERANCE
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in skeleton.modules())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded.pth"]  # no temporary file left behind


def test_fold_a_pickled_module_needs_trust_pickle(files, reference, tmp_path) -> None:
    out = tmp_path / "folded.pt"
    refused = bnfold_cli("fold", str(files["module.pt"]), "-o", str(out), *SHAPE, cwd=tmp_path)
    assert refused.returncode == 2 and "--trust-pickle" in refused.stderr and "Traceback" not in refused.stderr
    assert not out.exists()
    result = bnfold_cli("fold", str(files["module.pt"]), "-o", str(out), *SHAPE, "--trust-pickle", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folded = torch.load(out, weights_only=False)
    model, x = reference
    assert _relative(model(x), folded(x)) < TOLERANCE
    assert "folded 20 of 20" in result.stdout


def test_fold_a_torchscript_archive_removes_every_batch_norm_from_its_graph(files, reference, tmp_path) -> None:
    out = tmp_path / "folded.ts"
    result = bnfold_cli("fold", str(files["r18.ts"]), "-o", str(out), *SHAPE, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folded = torch.jit.load(str(out))
    assert not folded.graph.findAllNodes("aten::batch_norm")
    model, x = reference
    assert _relative(model(x), folded(x)) < TOLERANCE


def test_fold_a_torch_export_program_writes_one_without_batch_norms(files, reference, tmp_path) -> None:
    out = tmp_path / "out.pt2"
    result = bnfold_cli("fold", str(files["r18.pt2"]), "-o", str(out), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["format"] == "pt2" and payload["report"]["summary"]["folded"] == 20
    assert payload["report"]["parameters_before"] - payload["report"]["parameters_after"] == 4_800
    folded = torch.export.load(str(out))
    assert not any("batch_norm" in str(n.target) for n in folded.graph.nodes)
    model, _ = reference
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))  # the program's static shape
    with torch.no_grad():
        assert _relative(model(x), folded.module()(x)) < TOLERANCE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt2"]


def test_fold_an_onnx_file_and_verify_it_in_onnxruntime(files, tmp_path) -> None:
    import onnx

    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(files["r18.onnx"])).graph.node) == 20
    out = tmp_path / "folded.onnx"
    result = bnfold_cli("fold", str(files["r18.onnx"]), "-o", str(out), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["report"]
    assert report["summary"]["folded"] == 20 and report["verification"]["passed"]
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(out)).graph.node)
    checked = bnfold_cli("verify", str(files["r18.onnx"]), str(out), cwd=tmp_path)
    assert checked.returncode == 0 and "PASSED" in checked.stdout


def test_inspect_lists_every_norm_and_writes_nothing(files, tmp_path) -> None:
    result = bnfold_cli("inspect", str(files["r18.pth"]), "--arch", "resnet18", *SHAPE, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["applied"] is False and len(report["entries"]) == 20
    assert {e["into"][0] for e in report["entries"]} >= {"conv1", "layer1.0.conv1", "layer4.1.conv2"}
    assert list(tmp_path.iterdir()) == []


def test_verify_passes_a_fold_and_fails_a_tampered_one(files, tmp_path) -> None:
    folded = tmp_path / "folded.pth"
    assert bnfold_cli("fold", str(files["r18.pth"]), "--arch", "resnet18", "-o", str(folded), *SHAPE, cwd=tmp_path).returncode == 0
    good = bnfold_cli("verify", str(files["r18.pth"]), str(folded), "--arch", "resnet18", *SHAPE, cwd=tmp_path)
    assert good.returncode == 0 and "PASSED" in good.stdout
    state = torch.load(folded, weights_only=True)
    state["layer2.0.conv1.bias"] += 0.5  # a wrong shift, as a broken folder would leave
    tampered = tmp_path / "tampered.pth"
    torch.save(state, tampered)
    bad = bnfold_cli("verify", str(files["r18.pth"]), str(tampered), "--arch", "resnet18", *SHAPE, cwd=tmp_path)
    assert bad.returncode == 1 and "FAILED" in bad.stdout


def test_bench_prints_the_documented_structure(tmp_path) -> None:
    result = bnfold_cli("bench", "resnet18", *SHAPE, "--repeats", "2", "--warmup", "1", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert {t["variant"] for t in payload["timings"]} == {"original", "bnfold"}
    assert all(t["median_ms"] > 0 for t in payload["timings"])


BAD_INPUTS = {
    "missing file": (["fold", "missing.pth", "--arch", "resnet18"], "no such file"),
    "directory": (["fold", "{dir}", "--arch", "resnet18"], "is a directory"),
    "corrupt checkpoint": (["fold", "{corrupt.pth}", "--arch", "resnet18"], "may be corrupt"),
    "truncated checkpoint": (["fold", "{truncated.pth}", "--arch", "resnet18"], "truncated"),
    "wrong format": (["fold", "{notes.txt}"], "not a model file"),
    "unknown architecture": (["fold", "resnet5O"], "did you mean resnet50"),
    "state_dict of another architecture": (["fold", "{r18.pth}", "--arch", "resnet34"], "missing: layer1.2.conv1.weight"),
    "state_dict without --arch": (["fold", "{r18.pth}"], "pass --arch"),
    "saved in training mode": (["fold", "{train.pt}", "--trust-pickle"], "pass --eval"),
    "ONNX file that is not ONNX": (["fold", "{notes.onnx}"], "notes.onnx"),
    "truncated .pt2": (["fold", "{truncated.pt2}"], "truncated"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_one_line_error_and_nothing_is_written(files, tmp_path, case) -> None:
    (tmp_path / "notes.onnx").write_text("not a model\n")
    arguments, expected = BAD_INPUTS[case]
    names = {f"{{{name}}}": str(path) for name, path in files.items()} | {"{dir}": str(tmp_path), "{notes.onnx}": str(tmp_path / "notes.onnx")}
    arguments = [names.get(a, a) for a in arguments]
    before = sorted(tmp_path.iterdir())
    result = bnfold_cli(*arguments, "-o", str(tmp_path / "out.pth"), *SHAPE, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr
    assert sorted(tmp_path.iterdir()) == before


def test_training_mode_model_folds_with_eval(files, tmp_path) -> None:
    result = bnfold_cli("fold", str(files["train.pt"]), "--trust-pickle", "--eval", "-o", str(tmp_path / "o.pt"), *SHAPE, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("target", ["existing", "input"])
def test_an_existing_output_or_the_input_itself_is_never_overwritten(files, tmp_path, target) -> None:
    source = tmp_path / "r18.pth"
    source.write_bytes(files["r18.pth"].read_bytes())
    out = tmp_path / "existing.pth"
    out.write_bytes(b"keep me")
    path, flags = (out, []) if target == "existing" else (source, ["--force"])
    result = bnfold_cli("fold", str(source), "--arch", "resnet18", "-o", str(path), *flags, *SHAPE, cwd=tmp_path)
    assert result.returncode == 2 and ("--force" in result.stderr or "is the input file" in result.stderr)
    assert out.read_bytes() == b"keep me" and source.read_bytes() == files["r18.pth"].read_bytes()


def test_debug_shows_the_traceback(tmp_path) -> None:
    result = bnfold_cli("fold", "missing.pth", "--arch", "resnet18", "-o", "x.pth", "--debug", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr
