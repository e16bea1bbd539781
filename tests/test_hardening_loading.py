"""Attacks on what bnfold reads: model files, command-line values, the start-up path (issue 12, part A).

Every refusal is checked the same way (:func:`_refused`): the exit code, a single ``error:`` line on stderr, no
traceback, no file left behind, and every input byte-identical (sha256) afterwards. The ``.pt2`` attacks are real:
:func:`test_the_crafted_archives_do_run_code_in_torch_export_load` shows torch itself runs each of them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import tomllib
import torch
from torch import nn

import bnfold
from bnfold.backends.pt2_safety import unsafe_records

SMALL = ["--input-shape", "1,3,32,32"]


def _cli(*args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    source = str(Path(bnfold.__file__).resolve().parents[1])
    path = os.pathsep.join([source, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    environment = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})}
    return subprocess.run([sys.executable, "-m", "bnfold", *args], cwd=cwd, capture_output=True, text=True,
                          env=environment, timeout=timeout)


def _digests(paths: list[Path]) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


def _refused(run: Callable[[], subprocess.CompletedProcess[str]], inputs: list[Path], folder: Path, code: int,
             *expected: str) -> str:
    """Run, and assert: exit ``code``, one ``error:`` line holding ``expected``, no traceback, nothing written."""
    before_files = sorted(folder.iterdir())
    before = _digests(inputs)
    result = run()
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert sorted(folder.iterdir()) == before_files
    assert _digests(inputs) == before
    return lines[0]


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) * torch.tensor(2.0)  # the literal becomes a lifted tensor constant in .pt2


def _small() -> nn.Module:
    torch.manual_seed(0)
    model = _Small()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    model = _small()
    made = {name: root / name for name in ("small.pt2", "small.pth", "small.pt", "small.ts", "small.onnx", "r18.pth")}
    # a dynamic batch, so that the program holds symbolic-shape expressions (one of the attacks rides on them)
    program = torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, made["small.pt2"])
    torch.save(model.state_dict(), made["small.pth"])
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()  # a class the subprocess can import
    torch.save(plain, made["small.pt"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), made["small.ts"])
        torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(made["small.onnx"]), dynamo=False)
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), made["r18.pth"])
    return made


# ------------------------------------------------------------------------- 1. a .pt2 must not run code


class _Marker:
    """Unpickling this creates ``path``: the smallest proof that a pickle ran code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def _pickled(value: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _rewrite(source: Path, target: Path, change: Callable[[str, bytes], list[tuple[str, bytes]]]) -> Path:
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as out:
        for name in archive.namelist():
            for new_name, data in change(name, archive.read(name)):
                out.writestr(new_name, data)
    return target


def _evil(kind: str, source: Path, target: Path, marker: Path) -> Path:
    """A copy of ``source`` with one record that runs code (creates ``marker``) when torch.export.load reads it."""

    def change(name: str, data: bytes) -> list[tuple[str, bytes]]:
        if kind == "sample inputs" and name.endswith("data/sample_inputs/model.pt"):
            return [(name, _pickled(((_Marker(marker),), {})))]
        if kind == "pickled weight":
            if name.endswith("model_weights_config.json"):
                config = json.loads(data)
                config["config"]["conv.weight"]["use_pickle"] = True
                return [(name, json.dumps(config).encode())]
            if name.endswith("data/weights/" + json.loads(_config(source, "weights"))["config"]["conv.weight"]["path_name"]):
                return [(name, _pickled(_Marker(marker)))]
        if kind == "object constant":
            if name.endswith("model_constants_config.json"):
                config = json.loads(data)
                (entry,) = config["config"].values()
                entry.update(path_name="opaque_obj_0", use_pickle=True)
                return [(name, json.dumps(config).encode())]
            if "/data/constants/tensor_" in name:
                import pickle

                return [(name.rsplit("/", 1)[0] + "/opaque_obj_0", pickle.dumps(_Marker(marker)))]
        if kind in ("guard", "shape expression") and name.endswith("models/model.json"):
            program = json.loads(data)
            if kind == "guard":
                program["guards_code"] = [f"open({str(marker)!r}, 'w') is not None"]
                return [(name, json.dumps(program).encode())]
            # an expression sympify evaluates: the batch size's symbol, with code riding on it
            text = data.decode()
            symbol = re.search(r'"expr_str": "(Symbol\([^"]*\))"', text)
            assert symbol is not None, "the program needs a symbolic shape"
            evil = f"{symbol.group(1)} if open({str(marker)!r}, 'w') else 0"
            return [(name, text.replace(symbol.group(0), json.dumps({"expr_str": evil})[1:-1], 1).encode())]
        return [(name, data)]

    return _rewrite(source, target, change)


def _config(source: Path, which: str) -> bytes:
    with zipfile.ZipFile(source) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(f"model_{which}_config.json")]
        return archive.read(name)


EVIL = ["sample inputs", "pickled weight", "object constant", "guard", "shape expression"]


@pytest.mark.parametrize("kind", EVIL)
def test_the_crafted_archives_do_run_code_in_torch_export_load(files, tmp_path, kind) -> None:
    """The attacks are real: plain torch.export.load (and running its module, for guards) runs them."""
    marker = tmp_path / "ran"
    evil = _evil(kind, files["small.pt2"], tmp_path / "evil.pt2", marker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.export.load(str(evil)).module()(torch.randn(2, 3, 32, 32))
        except Exception:  # noqa: S110 - what happens after the code ran does not matter here
            pass
    assert marker.exists()
    assert unsafe_records(evil.read_bytes()), "the check must name the record"


@pytest.mark.parametrize("command", ["inspect", "fold"])
@pytest.mark.parametrize("kind", EVIL)
def test_a_pt2_that_would_run_code_is_refused_without_trust_pickle(files, tmp_path, kind, command) -> None:
    marker = tmp_path / "ran"
    evil = _evil(kind, files["small.pt2"], tmp_path / "evil.pt2", marker)
    extra = ["-o", str(tmp_path / "out.pt2")] if command == "fold" else []
    line = _refused(lambda: _cli(command, str(evil), *extra, cwd=tmp_path), [evil], tmp_path, 2,
                    "--trust-pickle", "record ", "run code")
    assert not marker.exists(), line


def test_a_normal_pt2_with_guards_and_dynamic_shapes_has_no_unsafe_record(tmp_path) -> None:
    """torch's own guards (sizes, //, %, torch.sym_max) and expressions pass the whitelist."""

    class Reshaping(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return y.reshape(y.shape[0] // 2, -1) if x.shape[0] > 2 else y

    auto = torch.export.Dim.AUTO
    program = torch.export.export(Reshaping().eval(), (torch.randn(4, 3, 8, 8),),
                                  dynamic_shapes=({0: auto, 2: auto, 3: auto},))
    assert program._guards_code, "the test needs a program with guards"
    path = tmp_path / "dynamic.pt2"
    torch.export.save(program, path)
    assert unsafe_records(path.read_bytes()) == []
    loaded = bnfold.backends.pt2_safety.load_exported(path)
    x = torch.randn(6, 3, 10, 10)
    torch.testing.assert_close(loaded.module()(x), program.module()(x), rtol=0, atol=0)


def test_a_duplicated_record_is_refused(files, tmp_path) -> None:
    """Two copies of one name: torch's reader might read the copy the check did not."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        doubled = _rewrite(files["small.pt2"], tmp_path / "twice.pt2",
                           lambda n, d: [(n, d), (n, d)] if "sample_inputs" in n else [(n, d)])
        problems = unsafe_records(doubled.read_bytes())
    assert problems and "more than once" in problems[0][1]


# ------------------------------------------------------------------------- 2. pipes, devices, sockets


def test_a_fifo_a_device_or_a_socket_is_refused_at_once(files, tmp_path) -> None:
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    _refused(lambda: _cli("inspect", str(fifo), cwd=tmp_path, timeout=60), [], tmp_path, 2, "named pipe")
    _refused(lambda: _cli("inspect", "/dev/zero", cwd=tmp_path, timeout=60), [], tmp_path, 2, "character device")
    _refused(lambda: _cli("inspect", "resnet18", "--weights", str(fifo), cwd=tmp_path, timeout=60), [], tmp_path, 2,
             "named pipe")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        address = tmp_path / "model.sock"
        server.bind(str(address))
        _refused(lambda: _cli("inspect", str(address), cwd=tmp_path, timeout=60), [], tmp_path, 2, "socket")


# ------------------------------------------------------------------------- 3. numbers on the command line


USAGE = {
    "negative tolerance": (["fold", "{small.pth}", "-o", "out.pth", "--tolerance", "-1"], "--tolerance"),
    "nan tolerance": (["fold", "{small.pth}", "-o", "out.pth", "--tolerance", "nan"], "--tolerance"),
    "infinite tolerance": (["verify", "{small.pth}", "{small.pth}", "--tolerance", "inf"], "--tolerance"),
    "negative threads": (["bench", "resnet18", "--threads", "-1"], "--threads"),
    "zero threads": (["bench", "resnet18", "--threads", "0"], "--threads"),
    "seed beyond 64 bits": (["inspect", "resnet18", "--seed", str(2**70)], "--seed"),
    "negative seed": (["inspect", "resnet18", "--seed", "-1"], "--seed"),
    "zero batch size": (["bench", "resnet18", "--batch-sizes", "1", "0"], "--batch-sizes"),
    "zero repeats": (["bench", "resnet18", "--repeats", "0"], "--repeats"),
    "input too large to allocate": (["inspect", "resnet18", "--input-shape", "1000000,3,224,224"], "smaller --input-shape"),
}


@pytest.mark.parametrize("case", list(USAGE))
def test_bad_numbers_are_usage_errors(files, tmp_path, case) -> None:
    arguments, expected = USAGE[case]
    arguments = [str(files[a[1:-1]]) if a.startswith("{") else a for a in arguments]
    _refused(lambda: _cli(*arguments, cwd=tmp_path), list(files.values()), tmp_path, 2, expected)


# ------------------------------------------------------------------------- 4. input shapes


@pytest.mark.parametrize("shape", ["1,3,32", "1,4,32,32", ",".join(["1"] * 12)])
def test_a_wrong_input_shape_is_one_line_without_torch_traceback(files, tmp_path, shape) -> None:
    line = _refused(lambda: _cli("fold", str(files["r18.pth"]), "--arch", "resnet18", "-o", "out.pth",
                                 "--input-shape", shape, cwd=tmp_path),
                    list(files.values()), tmp_path, 2, f"shape {shape}", "--input-shape")
    assert "ShapeProp" not in line


def test_when_the_default_input_does_not_fit_the_error_suggests_input_shape(tmp_path) -> None:
    model = tmp_path / "mlp.pt"
    torch.save(nn.Sequential(nn.Linear(10, 4), nn.BatchNorm1d(4)).eval(), model)
    _refused(lambda: _cli("inspect", str(model), "--trust-pickle", cwd=tmp_path), [model], tmp_path, 2,
             "default 1,3,224,224", "pass --input-shape")


def test_the_library_prints_nothing_when_the_example_input_does_not_fit(capfd) -> None:
    """torch.fx's ShapeProp prints the model's traceback before raising; bnfold must not let it through."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(bnfold.CaptureError):
        bnfold.fold(model, torch.randn(1, 5, 8, 8))
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


# ------------------------------------------------------------------------- 5. Ctrl-C while importing


def _wait_until_torch_is_loading(pid: int) -> None:
    """Return once process ``pid`` has begun to import torch (its shared libraries are mapped), so that a signal sent
    next lands in the middle of that import, as the test means, and not in Python's own start-up before bnfold
    handles signals (a fixed sleep lands there on a loaded machine). Where /proc is missing, a short sleep."""
    maps = Path(f"/proc/{pid}/maps")
    if not maps.exists():
        time.sleep(0.3)
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if "libtorch" in maps.read_text():
                return
        except OSError:  # the process ended
            return
        time.sleep(0.005)


def test_ctrl_c_during_the_imports_is_one_line_and_exit_130(tmp_path) -> None:
    source = str(Path(bnfold.__file__).resolve().parents[1])
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, "-m", "bnfold", "inspect", "resnet50"], cwd=tmp_path, env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_until_torch_is_loading(process.pid)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["interrupted; nothing was written"]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- 6. options that do not apply


MISPLACED = {
    "--arch with ONNX": (["{small.onnx}", "--arch", "resnet18"], "--arch does not apply"),
    "--arch with TorchScript": (["{small.ts}", "--arch", "resnet18"], "--arch does not apply"),
    "--arch with .pt2": (["{small.pt2}", "--arch", "resnet18"], "--arch does not apply"),
    "--arch with a pickled module": (["{small.pt}", "--trust-pickle", "--arch", "resnet18"], "--arch does not apply"),
    "--arch with an architecture name": (["resnet18", "--arch", "resnet18"], "--arch does not apply"),
    "--weights with ONNX": (["{small.onnx}", "--weights", "{small.pth}"], "--weights does not apply"),
    "--weights with TorchScript": (["{small.ts}", "--weights", "{small.pth}"], "--weights does not apply"),
    "--weights with .pt2": (["{small.pt2}", "--weights", "{small.pth}"], "--weights does not apply"),
    "--weights with a pickled module": (["{small.pt}", "--trust-pickle", "--weights", "{small.pth}"], "--weights does not apply"),
    "--weights with a state_dict file": (["{r18.pth}", "--arch", "resnet18", "--weights", "{r18.pth}"], "--weights does not apply"),
}


@pytest.mark.parametrize("case", list(MISPLACED))
def test_an_option_that_does_not_apply_is_an_error_naming_it(files, tmp_path, case) -> None:
    arguments, expected = MISPLACED[case]
    arguments = [str(files[a[1:-1]]) if a.startswith("{") else a for a in arguments]
    _refused(lambda: _cli("fold", *arguments, "-o", str(tmp_path / "out"), *SMALL, cwd=tmp_path),
             list(files.values()), tmp_path, 2, expected)


# ------------------------------------------------------------------------- 7. a state_dict of one's own model


def test_a_bare_state_dict_of_an_own_model_says_how_to_proceed(files, tmp_path) -> None:
    line = _refused(lambda: _cli("fold", str(files["small.pth"]), "-o", "out.pth", cwd=tmp_path),
                    list(files.values()), tmp_path, 2, "--arch", "--trust-pickle", "bnfold.fold(model)")
    assert "torch.save(model)" in line
    _refused(lambda: _cli("fold", str(files["small.pth"]), "--arch", "my_own_net", "-o", "out.pth", cwd=tmp_path),
             list(files.values()), tmp_path, 2, "my_own_net", "--trust-pickle", "bnfold.fold(model)")


# ------------------------------------------------------------------------- 8. verify --data needs only val/


def _val_only_folder(root: Path) -> Path:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for label in ("cat", "dog"):
        folder = root / "val" / label
        folder.mkdir(parents=True)
        for index in range(3):
            pixels = (torch.rand(40, 40, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def test_verify_data_needs_only_the_val_folder(files, tmp_path) -> None:
    import torchvision

    data = _val_only_folder(tmp_path / "data")
    work = tmp_path / "work"
    work.mkdir()
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(files["r18.pth"], weights_only=True))
    folded_path = work / "folded.pth"
    torch.save(bnfold.fold(model.eval(), verify=False).state_dict(), folded_path)
    before = _digests([files["r18.pth"], folded_path])
    result = _cli("verify", str(files["r18.pth"]), str(folded_path), "--arch", "resnet18", "--data", str(data),
                  *SMALL, cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "PASSED" in result.stdout
    assert _digests([files["r18.pth"], folded_path]) == before
    # without val/, --data is a plain folder of images (compared batch by batch); one without images is refused
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(lambda: _cli("verify", str(files["r18.pth"]), str(folded_path), "--arch", "resnet18", "--data",
                          str(empty), *SMALL, cwd=work), [files["r18.pth"], folded_path], work, 2, "holds no images")


# ------------------------------------------------------------------------- 9. installed without extras


_BLOCKER = """
import importlib.abc, sys

EXTRAS = {extras!r}


class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in EXTRAS:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""

EXTRA_MODULES = ("torchvision", "timm", "onnx", "onnxruntime", "onnxscript", "matplotlib", "sklearn", "skimage", "PIL",
                 "safetensors", "onnxoptimizer", "hypothesis")


def test_the_command_line_starts_without_any_extra(files, tmp_path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(_BLOCKER.format(extras=EXTRA_MODULES)))
    work = tmp_path / "work"
    work.mkdir()
    blocked = {"PYTHONPATH": os.pathsep.join([str(Path(bnfold.__file__).resolve().parents[1]), str(site)])}
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], env={**os.environ, **blocked},
                           capture_output=True, text=True)
    assert "No module named 'torchvision'" in probe.stderr, "the blocker must work for this test to mean anything"
    for arguments in (["--help"], ["fold", "--help"], ["reproduce", "--help"]):
        result = _cli(*arguments, cwd=work, env=blocked)
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-2000:]
    _refused(lambda: _cli("inspect", str(files["small.onnx"]), cwd=work, env=blocked), [files["small.onnx"]], work, 2,
             "pip install 'bnfold[onnx]'")
    _refused(lambda: _cli("inspect", "resnet18", cwd=work, env=blocked), [], work, 2, "pip install 'bnfold[vision]'")


def test_what_the_command_line_needs_to_start_is_a_core_dependency() -> None:
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    core = {requirement.split(">")[0].split("=")[0].split("[")[0].strip() for requirement in project["dependencies"]}
    assert "rich" in core  # torch is not: the command line starts without it (tests/test_cli.py runs it so)
