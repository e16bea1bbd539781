"""The ``bnfold`` command run as a subprocess on real files: results that load and match, and bad input refused.

Every error case checks the exit code, that the message is one line naming the problem (no traceback), and that
nothing was written. The models are torchvision ResNet-18s at 32 x 32 with calibrated statistics, small enough to
keep each run at a few seconds (most of it is importing torch).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import bnfold
from bnfold.app.calibration import calibrate, randomize_norm_affine
from bnfold.verification import TOLERANCES
from helpers.cli import NO_TORCH, bnfold_cli

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


# ------------------------------------------------------------------ one model per name and seed, in every command


def test_an_architecture_name_and_seed_are_one_model_and_leave_the_global_random_state_alone() -> None:
    from bnfold.app.cli.loading import load_model

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, again = (load_model("resnet18", seed=4).module.state_dict() for _ in range(2))
    other = load_model("resnet18", seed=5).module.state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["conv1.weight"], other["conv1.weight"])
    torch.manual_seed(4)  # the documented meaning of --seed 4: the weights of torch.manual_seed(4); then build
    oracle = torchvision.models.resnet18().state_dict()
    assert all(torch.equal(first[k], oracle[k]) for k in first)


def _run_written(path: Path, x: torch.Tensor) -> torch.Tensor:
    """The output of a file bnfold wrote, run by its own runtime (not by bnfold)."""
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        if path.suffix == ".pt2":
            return torch.export.load(str(path)).module()(x)
        if path.suffix == ".ts":
            return torch.jit.load(str(path))(x)
        skeleton = bnfold.fold(torchvision.models.resnet18().eval(), verify=False)
        skeleton.load_state_dict(torch.load(path, weights_only=True))
        return skeleton.eval()(x)


def test_fold_of_a_name_writes_one_model_in_every_format_and_verify_checks_each_against_the_name(tmp_path) -> None:
    torch.manual_seed(7)
    original = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = original(x)
    for name in ("r18.pt", "r18.pt2", "r18.ts", "r18.onnx"):
        written = bnfold_cli("fold", "resnet18", "--seed", "7", "-o", name, *SHAPE, cwd=tmp_path)
        assert written.returncode == 0, written.stderr
        assert "random weights drawn from --seed 7" in " ".join(written.stdout.split())
        assert _relative(expected, _run_written(tmp_path / name, x)) < TOLERANCE, name
        checked = bnfold_cli("verify", "resnet18", name, "--seed", "7", *SHAPE, cwd=tmp_path)
        assert checked.returncode == 0 and "PASSED" in checked.stdout, (name, checked.stdout, checked.stderr)
    same_arch = bnfold_cli("verify", "resnet18", "r18.pt", "--arch", "resnet18", "--seed", "7", *SHAPE, cwd=tmp_path)
    assert same_arch.returncode == 0, same_arch.stderr
    other_seed = bnfold_cli("verify", "resnet18", "r18.pt", *SHAPE, cwd=tmp_path)  # --seed 0: another model
    assert other_seed.returncode == 1 and "FAILED" in other_seed.stdout
    assert "pass the --seed or --weights it was folded with" in " ".join(other_seed.stdout.split())
    other_arch = bnfold_cli("verify", "resnet18", "r18.pt", "--arch", "resnet34", *SHAPE, cwd=tmp_path)
    assert other_arch.returncode == 2 and "name different architectures" in other_arch.stderr


def test_verify_a_state_dict_against_the_onnx_file_folded_from_it(files, tmp_path) -> None:
    """--arch is the architecture of whichever of the two files holds a state_dict, whatever the other one is (the
    .ts and .pt2 cases load the same way; ONNX is the one that runs in another runtime)."""
    for name in ("folded.onnx",):
        assert bnfold_cli("fold", str(files["r18.pth"]), "--arch", "resnet18", "-o", name, *SHAPE,
                          cwd=tmp_path).returncode == 0
        checked = bnfold_cli("verify", str(files["r18.pth"]), name, "--arch", "resnet18", *SHAPE, cwd=tmp_path)
        assert checked.returncode == 0 and "PASSED" in checked.stdout, (name, checked.stderr)


@pytest.fixture(scope="module")
def conv_bn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a conv + BN model as m.onnx (exported unfolded) and m.ts, and x.npy, a batch it takes."""
    root = tmp_path_factory.mktemp("conv_bn")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    randomize_norm_affine(model, seed=1)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(root / "m.onnx"), dynamo=False, do_constant_folding=False)
        torch.jit.save(torch.jit.script(model), root / "m.ts")
    np.save(root / "x.npy", x.numpy())
    return root


def test_verify_an_onnx_file_against_a_pytorch_model_on_given_inputs_in_either_order(conv_bn, capsys) -> None:
    """The --input batches are tensors for the model that runs in PyTorch, whichever of the two it is (with
    ORIGINAL the ONNX file, they were made as arrays by input name and the comparison in PyTorch got none)."""
    from bnfold.app.cli import main

    for pair in (["m.onnx", "m.ts"], ["m.ts", "m.onnx"]):
        files = [str(conv_bn / name) for name in pair]
        code = main(["verify", *files, "--input", str(conv_bn / "x.npy"), "--json"])
        captured = capsys.readouterr()
        assert code == 0 and json.loads(captured.out)["passed"], (pair, captured.err)


def test_data_reads_at_most_8_images_by_default_for_onnx_files_as_for_pytorch_models(conv_bn, tmp_path,
                                                                                    capsys) -> None:
    from PIL import Image

    from bnfold.app.cli import main

    rng = np.random.default_rng(0)
    for index in range(10):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{index}.png")
    batches = {}
    for pair in (["m.onnx", "m.onnx"], ["m.ts", "m.ts"], ["m.onnx", "m.ts"]):  # one image a batch (1x3x8x8)
        code = main(["verify", *(str(conv_bn / name) for name in pair), "--data", str(tmp_path), "--json"])
        captured = capsys.readouterr()
        assert code == 0, (pair, captured.err)
        batches[pair[0], pair[1]] = json.loads(captured.out)["batches"]
    assert set(batches.values()) == {8}, batches


def _examples(command: str) -> list[str]:
    from bnfold.app.cli import build_parser

    parser = build_parser()
    (subcommands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    text = subcommands.choices[command].format_help()
    return [line.strip() for line in text.splitlines() if line.strip().startswith(f"bnfold {command} ")]


def test_the_helps_fold_and_verify_examples_run_as_written_and_pass(files, tmp_path) -> None:
    """Each line of ``bnfold fold --help``'s examples, then the same line of ``bnfold verify --help``'s."""
    model = _trained_resnet18()
    model.load_state_dict(torch.load(files["r18.pth"], weights_only=True))
    torch.save(model.state_dict(), tmp_path / "checkpoint.pth")
    (tmp_path / "model.ts").write_bytes(files["r18.ts"].read_bytes())
    (tmp_path / "model.onnx").write_bytes(files["r18.onnx"].read_bytes())
    folds, verifies = _examples("fold"), _examples("verify")
    assert len(folds) == len(verifies) == 4
    for fold_line, verify_line in zip(folds, verifies, strict=True):
        written = bnfold_cli(*shlex.split(fold_line)[1:], cwd=tmp_path)
        assert written.returncode == 0, (fold_line, written.stderr)
        checked = bnfold_cli(*shlex.split(verify_line)[1:], cwd=tmp_path)
        assert checked.returncode == 0 and "PASSED" in checked.stdout, (verify_line, checked.stdout, checked.stderr)


@pytest.mark.slow
def test_the_readmes_fold_and_verify_examples_run_as_written_and_pass(tmp_path) -> None:
    from PIL import Image

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Command line", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith(("bnfold fold", "bnfold verify"))]
    assert [line.split()[1] for line in lines] == ["fold", "verify"]
    torch.manual_seed(0)
    checkpoint = torchvision.models.resnet50()
    randomize_norm_affine(checkpoint, seed=1)
    calibrate(checkpoint, torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2)))
    torch.save({"epoch": 3, "state_dict": checkpoint.state_dict()}, tmp_path / "checkpoint.pth")
    generator = torch.Generator().manual_seed(3)
    for label in ("cat", "dog"):  # the layout of imagenette2-160: val/<class>/<image>
        folder = tmp_path / "imagenette2-160" / "val" / label
        folder.mkdir(parents=True)
        pixels = (torch.rand(160, 160, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / "0.png")
    for line in lines:
        result = bnfold_cli(*shlex.split(line)[1:], cwd=tmp_path)
        assert result.returncode == 0, (line, result.stdout, result.stderr)
    assert "PASSED" in result.stdout


# ------------------------------------------------------------------ tables outside a terminal: nothing cut


def _long_names_script(path: Path) -> list[str]:
    names = ["encoder_stage_one_depthwise_separable_convolution_block_with_a_long_name",
             "encoder_stage_one_depthwise_separable_convolution_block_normalisation_layer",
             "classifier_head_convolution_with_an_equally_long_and_descriptive_module_name",
             "classifier_head_normalisation_with_an_equally_long_and_descriptive_module_name"]
    model = torch.nn.Sequential()
    model.add_module(names[0], torch.nn.Conv2d(3, 8, 3, padding=1))
    model.add_module(names[1], torch.nn.BatchNorm2d(8))
    model.add_module("relu", torch.nn.ReLU())
    model.add_module(names[2], torch.nn.Conv2d(8, 4, 3, padding=1))
    model.add_module(names[3], torch.nn.BatchNorm2d(4))
    calibrate(model, torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model.eval()), path)
    return names


def test_tables_printed_to_a_pipe_cut_no_number_and_no_name(tmp_path) -> None:
    """An 80-column pipe, as in a CI log: every cell whole on its row, never an ellipsis."""
    names = _long_names_script(tmp_path / "long.ts")
    runs = {
        "bench": bnfold_cli("bench", "resnet18", "--peers", *SHAPE, "--repeats", "2", "--warmup", "1",
                            cwd=tmp_path, columns="80"),
        "inspect": bnfold_cli("inspect", "long.ts", "--input-shape", "1,3,16,16", cwd=tmp_path, columns="80"),
        "fold": bnfold_cli("fold", "long.ts", "-o", "out.ts", "--input-shape", "1,3,16,16", cwd=tmp_path, columns="80"),
    }
    for command, result in runs.items():
        assert result.returncode == 0, (command, result.stderr)
        assert "…" not in result.stdout and "..." not in result.stdout, (command, result.stdout)
    bench_rows = {line.split()[1]: line for line in runs["bench"].stdout.splitlines() if line.startswith("│")}
    assert set(bench_rows) == {"original", "bnfold", "fx.fuse", "jit.freeze"}
    assert "11,689,512" in bench_rows["original"] and "11,684,712" in bench_rows["bnfold"]
    assert all(re.search(r"│ +\d+\.\d\d-\d+\.\d\d │", row) for row in bench_rows.values())  # the IQR whole
    for command in ("inspect", "fold"):
        rows = [line for line in runs[command].stdout.splitlines() if names[1] in line or names[3] in line]
        assert len(rows) == 2 and names[0] in rows[0] and names[2] in rows[1], runs[command].stdout
    plain = bnfold_cli("bench", "resnet18", *SHAPE, "--repeats", "2", "--warmup", "0", "--json", cwd=tmp_path, columns="80")
    assert {t["variant"] for t in json.loads(plain.stdout)["timings"]} == {"original", "bnfold"}  # --json unchanged


# ------------------------------------------------------------------ ONNX without PyTorch installed


def test_the_onnx_commands_run_where_torch_cannot_be_imported(files, tmp_path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_TORCH)
    work = tmp_path / "work"
    work.mkdir()
    (work / "model.onnx").write_bytes(files["r18.onnx"].read_bytes())

    def run(*arguments: str) -> subprocess.CompletedProcess[str]:
        return bnfold_cli(*arguments, cwd=work, path=[str(site)])

    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(site)})
    assert "No module named 'torch'" in probe.stderr, "the blocker must work for this test to mean anything"
    for arguments in (["--help"], ["fold", "--help"], ["reproduce", "--help"]):
        assert run(*arguments).returncode == 0
    folded = run("fold", "model.onnx", "-o", "folded.onnx", "--json")
    assert folded.returncode == 0, folded.stderr
    assert json.loads(folded.stdout)["report"]["summary"]["folded"] == 20
    assert run("inspect", "model.onnx").returncode == 0
    previewed = run("inspect", "model.onnx", "--merge-branches", "--json")  # the preview folds a copy
    assert previewed.returncode == 0 and json.loads(previewed.stdout)["applied"] is False, previewed.stderr
    checked = run("verify", "model.onnx", "folded.onnx")
    assert checked.returncode == 0 and "PASSED" in checked.stdout
    np.save(work / "x.npy", np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32))
    given = run("verify", "model.onnx", "folded.onnx", "--input", "x.npy")
    assert given.returncode == 0 and "(given inputs)" in given.stdout, given.stderr
    for arguments in (["inspect", "resnet18"], ["reproduce"]):
        refused = run(*arguments)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1 and "pip install 'bnfold[torch]'" in lines[0], refused.stderr
    library = subprocess.run(
        [sys.executable, "-c", "import bnfold, bnfold.onnx\nbnfold.fold\ntry:\n    bnfold.verify\nexcept ImportError as e:\n    print(e)"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(bnfold.__file__).resolve().parents[1]), str(site)])})
    assert library.returncode == 0 and "pip install 'bnfold[torch]'" in library.stdout, library.stderr


def test_torch_is_an_extra_and_the_onnx_extra_does_not_pull_it_in() -> None:
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0] for r in requirements}

    extras = project["optional-dependencies"]
    assert "torch" not in names(project["dependencies"]) and "torch" in names(extras["torch"])
    assert not names(extras["onnx"]) & {"torch", "bnfold"}
    for extra in ("vision", "all"):
        assert any("torch" in r for r in extras[extra]), extra  # directly or through bnfold[torch]
    assert "bnfold[all]" in extras["test"]
