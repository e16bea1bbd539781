"""bnfold.fold / plan / report_for / save: one call for every kind, the same kind back (bnfold/api.py).

Outputs are compared with the original by oracles outside bnfold: plain torch runs for PyTorch kinds, onnxruntime
for ONNX.
"""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import bnfold
from helpers.cli import NO_TORCH
from helpers.planted import plant_wrong_scale

X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn(self.conv(x)))))


def _net() -> Net:
    torch.manual_seed(0)
    model = Net().train()
    with torch.no_grad():
        for _ in range(3):  # running statistics that are not the defaults
            model(torch.randn(8, 3, 12, 12) * 2 + 1)
    return model.eval()


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _onnx_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    scale, bias = rng.uniform(0.5, 1.5, 8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    mean, var = rng.standard_normal(8).astype(np.float32), rng.uniform(0.5, 2, 8).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"]),
         helper.make_node("Relu", ["n"], ["y"])],
        "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 12, 12])],
        [numpy_helper.from_array(a, n) for a, n in ((weight, "w"), (scale, "s"), (bias, "b"), (mean, "m"), (var, "v"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _ort(model: onnx.ModelProto | str | Path, x: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------- the four kinds


def test_an_nn_module_comes_back_a_module_of_its_class() -> None:
    model = _net()
    state = copy.deepcopy(model.state_dict())
    folded = bnfold.fold(model, X)
    assert type(folded) is Net and _bn_count(folded) == 0 and _bn_count(model) == 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the caller's model untouched
    with torch.no_grad():
        _close(folded(X), model(X))
    report = bnfold.report_for(folded)
    assert len(report.folded) == 2 and report.verification is not None and report.verification["passed"]
    assert not bnfold.plan(model).applied


def test_a_printed_report_says_what_the_verification_found_in_one_line() -> None:
    """``print(report)`` and the rich table end with the verdict's line, not the verification's raw dict."""
    from rich.console import Console

    report = bnfold.report_for(bnfold.fold(_net(), X))
    verdict = report.verification["outputs"][0]
    line = (f"verified on input: {'x'.join(map(str, X.shape))}: error {verdict['max_abs']:.3g} against allowance "
            f"{verdict['allowance']:.3g}")
    console = Console(width=300, record=True, file=io.StringIO())
    console.print(report)
    for text in (str(report), console.export_text()):
        assert line in text and "{" not in text


def test_a_script_module_comes_back_a_script_module() -> None:
    model = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(model, X)
    before = {k: v.clone() for k, v in scripted.state_dict().items()}
    folded = bnfold.fold(scripted, X)
    assert isinstance(folded, torch.jit.ScriptModule)
    assert "batch_norm" not in str(folded.graph)
    assert all(torch.equal(v, scripted.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        _close(folded(X), model(X))
    report = bnfold.report_for(folded)
    assert len(report.folded) == 2 and report.verification["passed"]  # verified, as for the nn.Module
    assert bnfold.report_for(bnfold.fold(scripted)).verification is None  # no inputs: nothing to compare on
    planned = bnfold.plan(scripted, X)
    assert not planned.applied and len(planned.entries) == 2


def test_an_exported_program_comes_back_a_program_verified_on_its_own_inputs() -> None:
    model = _net()
    program = torch.export.export(model, (X,))
    state = {k: v.clone() for k, v in program.state_dict.items()}
    folded = bnfold.fold(program)  # its own example inputs: verified without being given any
    assert isinstance(folded, torch.export.ExportedProgram)
    assert not any("batch_norm" in str(n.target) for n in folded.graph.nodes)
    assert all(torch.equal(v, program.state_dict[k]) for k, v in state.items())
    with torch.no_grad():
        _close(folded.module()(X), model(X))
    report = bnfold.report_for(folded)
    assert len(report.folded) == 2 and report.verification["passed"]
    assert bnfold.report_for(bnfold.fold(program, verify=False)).verification is None
    assert not bnfold.plan(program).applied


def test_an_onnx_model_comes_back_a_model_proto() -> None:
    model = _onnx_model()
    serialised = model.SerializeToString()
    folded = bnfold.fold(model)  # the graph's example inputs: verified by default, as every format
    assert isinstance(folded, onnx.ModelProto)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"]
    assert model.SerializeToString() == serialised
    x = np.random.default_rng(1).standard_normal((1, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(_ort(folded, x), _ort(model, x), rtol=1e-4, atol=1e-5)
    report = bnfold.report_for(folded)
    assert len(report.folded) == 1 and report.verification["passed"]
    assert bnfold.report_for(bnfold.fold(model, {"x": x})).verification["inputs"] == "given inputs"
    assert not bnfold.plan(model).applied


# --------------------------------------------------------------------------------------------------- paths


def _files(tmp_path: Path) -> dict[str, Path]:
    model = _net()
    paths = {kind: tmp_path / f"model{suffix}" for kind, suffix in
             (("pickle", ".pt"), ("torchscript", ".ts"), ("exported", ".pt2"), ("onnx", ".onnx"))}
    torch.save(model, paths["pickle"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, X), str(paths["torchscript"]))
    torch.export.save(torch.export.export(model, (X,)), str(paths["exported"]))
    onnx.save(_onnx_model(), str(paths["onnx"]))
    return paths


@pytest.mark.parametrize("kind", ["pickle", "torchscript", "exported", "onnx"])
def test_a_path_returns_the_kind_the_file_holds_and_saves_beside_it(kind: str, tmp_path: Path) -> None:
    path = _files(tmp_path)[kind]
    content = path.read_bytes()
    options = {"trust_pickle": True} if kind == "pickle" else {}
    example = None if kind in ("exported", "onnx") else X
    folded = bnfold.fold(path, example, **options)
    expected = {"pickle": Net, "torchscript": torch.jit.ScriptModule, "exported": torch.export.ExportedProgram,
                "onnx": onnx.ModelProto}[kind]
    assert isinstance(folded, expected)
    report = bnfold.report_for(folded)
    assert report.folded and report.verification["passed"]
    assert bnfold.plan(path, example, **options).folded

    with pytest.raises(bnfold.InvalidInputError, match="never writes over a file it reads"):
        bnfold.save(folded, path, force=True)
    assert path.read_bytes() == content
    out = tmp_path / f"folded{path.suffix}"
    checked = bnfold.save(folded, out)
    assert checked is not None and checked["passed"]  # read back and judged
    with pytest.raises(bnfold.InvalidInputError, match="exists"):
        bnfold.save(folded, out)
    assert bnfold.save(folded, out, force=True) is not None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind

    original = _net()  # the oracle: the file read back by the format's own loader, against plain torch
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "pickle":
            _close(torch.load(out, weights_only=False)(X), original(X))
        elif kind == "torchscript":
            _close(torch.jit.load(str(out))(X), original(X))
        elif kind == "exported":
            _close(torch.export.load(str(out)).module()(X), original(X))
        else:
            x = np.random.default_rng(2).standard_normal((1, 3, 12, 12)).astype(np.float32)
            np.testing.assert_allclose(_ort(out, x), _ort(path, x), rtol=1e-4, atol=1e-5)


def test_a_pickled_module_needs_trust_and_a_state_dict_says_what_to_do(tmp_path: Path) -> None:
    path = _files(tmp_path)["pickle"]
    with pytest.raises(bnfold.InvalidInputError, match="trust_pickle=True"):
        bnfold.fold(path)
    weights = tmp_path / "weights.pt"
    torch.save(_net().state_dict(), weights)
    with pytest.raises(bnfold.InvalidInputError, match="load_state_dict"):
        bnfold.fold(weights)
    with pytest.raises(bnfold.InvalidInputError, match="no such file.*torch.nn.Module"):
        bnfold.fold("resnet50")


# ------------------------------------------------------------------------------------- one set of options


def test_unsupported_objects_and_options_are_refused_clearly() -> None:
    for thing in (42, torch.randn(3), {"x": 1}):
        with pytest.raises(bnfold.InvalidInputError, match="takes a torch.nn.Module, a torch.jit.ScriptModule"):
            bnfold.fold(thing)
        with pytest.raises(bnfold.InvalidInputError, match="takes a torch.nn.Module"):
            bnfold.plan(thing)
    with pytest.raises(bnfold.InvalidInputError, match="inplace= does not apply to this ONNX model"):
        bnfold.fold(_onnx_model(), inplace=True)
    with pytest.raises(bnfold.InvalidInputError, match="input_shape= does not apply to this nn.Module"):
        bnfold.fold(_net(), input_shape=(1, 3, 12, 12))
    with pytest.raises(bnfold.InvalidInputError, match="verify=True needs example_inputs"):
        bnfold.fold(torch.jit.script(_net()), verify=True)
    with pytest.raises(bnfold.InvalidInputError, match="not returned by bnfold.fold"):
        bnfold.report_for(_net())
    with pytest.raises(bnfold.InvalidInputError, match="not returned by bnfold.fold"):
        bnfold.report_for(_onnx_model())
    with pytest.raises(bnfold.InvalidInputError, match="not returned by bnfold.fold"):
        bnfold.save(_net(), "never.pt")


def test_a_wrong_fold_is_refused_in_every_format(monkeypatch: pytest.MonkeyPatch) -> None:
    """A planted error in the shared arithmetic: every kind's default check catches it (nothing returned)."""
    plant_wrong_scale(monkeypatch)
    model = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(model, X)
    for call in (lambda: bnfold.fold(model, X), lambda: bnfold.fold(scripted, X),
                 lambda: bnfold.fold(torch.export.export(model, (X,))), lambda: bnfold.fold(_onnx_model())):
        with pytest.raises(bnfold.VerificationError):
            call()


def test_the_onnx_registry_keeps_the_last_folds_by_identity() -> None:
    from bnfold import api

    model = _onnx_model()
    first = bnfold.fold(model, verify=False)
    assert bnfold.report_for(first).applied
    later = [bnfold.fold(model, verify=False) for _ in range(api.ONNX_KEPT)]
    with pytest.raises(bnfold.InvalidInputError, match=f"last {api.ONNX_KEPT}"):
        bnfold.report_for(first)
    assert all(bnfold.report_for(m).applied for m in later)


# ------------------------------------------------------------------------------- ONNX without PyTorch


_ONNX_SCRIPT = """
import sys, onnx, bnfold
model = onnx.load(sys.argv[1])
folded = bnfold.fold(model)
assert isinstance(folded, onnx.ModelProto) and bnfold.report_for(folded).verification["passed"]
by_path = bnfold.fold(sys.argv[1])
assert len(bnfold.plan(sys.argv[1]).folded) == 1
print(bnfold.save(by_path, sys.argv[2])["passed"], [n.op_type for n in folded.graph.node])
try:
    bnfold.fold(sys.argv[3])
except bnfold.InvalidInputError as error:
    print("refused:", error)
assert "torch" not in sys.modules
"""


def test_onnx_through_bnfold_fold_without_torch(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_TORCH)
    onnx.save(_onnx_model(), str(tmp_path / "model.onnx"))
    torch.save(_net().state_dict(), tmp_path / "weights.pt")
    source = str(Path(bnfold.__file__).resolve().parents[1])
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([source, str(site)]), "OMP_NUM_THREADS": "1"}
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=environment)
    assert "No module named 'torch'" in probe.stderr, "the blocker must work for this test to mean anything"
    run = subprocess.run([sys.executable, "-c", _ONNX_SCRIPT, str(tmp_path / "model.onnx"),
                          str(tmp_path / "folded.onnx"), str(tmp_path / "weights.pt")],
                         capture_output=True, text=True, env=environment, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "True ['Conv', 'Relu']" in run.stdout
    assert "pip install 'bnfold[torch]'" in run.stdout
    x = np.random.default_rng(3).standard_normal((1, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(_ort(tmp_path / "folded.onnx", x), _ort(_onnx_model(), x), rtol=1e-4, atol=1e-5)
