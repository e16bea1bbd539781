"""One judge in every format (bnfold.judge): exact folds of saturating models pass, planted wrong folds fail,
models that draw random numbers are compared under one random state, and an original that cannot run is bad input.

The saturating model: duplicated filters, a norm that scales them by ~1e4, a 1x1 conv that takes their difference
and a sigmoid far in its tail. Folding rounds terms of ~1e4 that cancel, so the folded output differs by ~1e-3 of
its largest value, far above the fixed tolerance, while the fold is exact: the same rounding of the same weights in
the original (the noise floor) moves the output just as much. A scale off by 1e-3 on one channel moves it by
thousands of times more.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bnfold
from bnfold import judge
from bnfold.errors import UndecidedError, VerificationError
from helpers.cli import python_without
from helpers.planted import plant_wrong_scale

SHAPE = (1, 3, 16, 16)


def saturating() -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    first = nn.Conv2d(3, 8, 3, bias=False)
    norm = nn.BatchNorm2d(8)
    last = nn.Conv2d(8, 1, 1)

    def twice(values: torch.Tensor) -> torch.Tensor:  # channels 4..7 repeat channels 0..3
        return torch.cat([values, values])

    with torch.no_grad():
        base = torch.randn(4, 3, 3, 3, generator=generator)
        first.weight.copy_(torch.cat([base, base * (1 + 1e-5 * torch.randn(4, 1, 1, 1, generator=generator))]))
        norm.running_var.copy_(twice(1e-9 * (1 + torch.rand(4, generator=generator))))
        norm.running_mean.copy_(twice(0.1 * torch.randn(4, generator=generator)))
        norm.weight.copy_(twice(1 + 0.1 * torch.randn(4, generator=generator)))
        norm.bias.copy_(twice(torch.randn(4, generator=generator)))
        last.weight.copy_(torch.cat([torch.ones(4), -torch.ones(4)]).reshape(1, 8, 1, 1))
        last.bias.fill_(-14.0)
    return nn.Sequential(first, norm, last, nn.Sigmoid()).eval()


def _photo() -> torch.Tensor:
    from bnfold.examples import photo_batch

    return torch.from_numpy(photo_batch(SHAPE))


def test_the_rule_accepts_a_saturated_output_and_refuses_a_wrong_fold() -> None:
    # numbers of the PP-OCRv4 detector on random inputs: error 2.1e-7 on a map whose largest value is 1.5e-5
    exact = judge.output_error(error=2.1e-7, scale=1.55e-5, eps=1.19e-7, floor=2.0e-7)
    assert exact.relative > 1e-4 and exact.within(1e-4) and exact.allowance is not None
    assert exact.max_abs < exact.allowance  # passed by the allowance, not the tolerance
    assert "against allowance" in exact.describe(1e-4)
    wrong = judge.output_error(error=2.1e-4, scale=1.55e-5, eps=1.19e-7, floor=2.0e-7)
    assert not wrong.within(1e-4)
    assert not judge.output_error(1.0, 1.0, 1.19e-7, float("nan")).within(1e-4)  # a NaN floor allows one rounding


def test_pytorch_and_onnx_outputs_are_read_and_judged_by_one_comparison() -> None:
    """The same outputs as tensors and as numpy arrays give the same verdict and numbers (a float16 output keeps its
    own epsilon), an integer output is compared exactly in both (an index off by one of 50000 is no relative error
    of 2e-5), and a missing or reshaped output is a problem."""
    from bnfold.verification import compare_outputs

    values = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)).half()
    original = {"x": values, "i": torch.tensor([50000, 7])}
    folded = {"x": (values.float() * (1 + 2e-3)).half(), "i": torch.tensor([50001, 7])}
    perturbed = {"x": (values.float() * (1 + 1e-3)).half(), "i": original["i"]}
    from_torch = compare_outputs(original, folded, 1e-4, perturbed)

    def as_numpy(outputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {f"['{name}']": tensor.numpy() for name, tensor in outputs.items()}

    from_numpy = judge.compare(as_numpy(original), as_numpy(folded), 1e-4, as_numpy(perturbed))
    assert from_torch.to_dict() == from_numpy.to_dict()
    by_path = {e.path: e for e in from_numpy.outputs}
    assert by_path["['x']"].within(1e-4) and by_path["['x']"].allowance is not None  # within its float16 allowance
    assert (by_path["['i']"].max_abs, by_path["['i']"].relative) == (1.0, 1.0) and not from_numpy.passed
    shaped = judge.compare({"y": np.ones(3)}, {"y": np.ones(4)}, 1e-4)
    missing = judge.compare({"y": np.ones(3)}, {}, 1e-4)
    assert shaped.problems == ["output 'y' has shape [3] vs [4]"]
    assert missing.problems == ["output 'y' is missing in the folded model"]


def test_a_complex_output_is_judged_on_both_parts() -> None:
    """An imaginary part that differs fails in both formats (complex values were widened to their real part alone,
    so ``1+2j`` against ``1+3j`` passed), and a complex output within rounding passes."""
    from bnfold.verification import compare_outputs

    values = torch.randn(8, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    wrong = values + 1j * values.abs()
    rounded = values * (1 + 1e-7)
    for folded, passes in ((wrong, False), (rounded, True)):
        from_torch = compare_outputs(values, folded, 1e-4)
        from_numpy = judge.compare({"": values.numpy()}, {"": folded.numpy()}, 1e-4)
        assert from_torch.passed is from_numpy.passed is passes
        assert from_torch.to_dict() == from_numpy.to_dict()


class _CancellingWithNaN(nn.Module):
    """``(x + 1e7) - 1e7`` in float32 (off ``x`` by up to half a unit), or ``x`` itself when ``exact``; then a NaN."""

    def __init__(self, exact: bool) -> None:
        super().__init__()
        self.exact = exact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = x if self.exact else (x + 1e7) - 1e7
        return torch.cat([value, torch.full((1,), float("nan"), dtype=x.dtype)])


def test_an_output_holding_nan_is_refused_even_when_float64_explains_the_rest() -> None:
    """NaN leaves an output without a verdict (:func:`bnfold.judge.not_comparable`): the float64 second opinion,
    which skips non-finite values, must not pass it (the check of a file or graph did, on the finite values)."""
    from bnfold.verification import explained_by_rounding, judge_fold, run_seeded

    original, candidate, x = _CancellingWithNaN(False), _CancellingWithNaN(True), (torch.tensor([0.3, 0.7, 0.1]),)
    expected, actual = run_seeded(original, x), run_seeded(candidate, x)
    assert explained_by_rounding(original, x, expected, actual).passed  # the oracle: the finite part is rounding
    with pytest.raises(VerificationError, match="the candidate differs from the original: .*NaN"):
        judge_fold(original, candidate, [x], None, "the candidate")


def test_the_saturating_model_fails_the_fixed_tolerance_alone() -> None:
    """The oracle for the tests below, outside the judge: the fold differs by more than the tolerance."""
    model, x = saturating(), _photo()
    folded = bnfold.fold(model, verify=False)
    with torch.no_grad():
        expected, actual = model(x), folded(x)
    relative = float((expected - actual).abs().max() / expected.abs().max())
    assert relative > 1e-4, relative
    assert float(expected.max()) < 1e-2  # saturated: the sigmoid's tail


def test_modules_accept_the_exact_fold_and_refuse_a_planted_wrong_one(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = saturating(), _photo()
    folded = bnfold.fold(model, x)
    verification = bnfold.report_for(folded).verification
    assert verification["passed"] and "against allowance" in verification["judged"]
    plant_wrong_scale(monkeypatch)
    with pytest.raises(VerificationError):
        bnfold.fold(model, x)


def _onnx_file(model: nn.Module, path: Path) -> Path:
    torch.onnx.export(model, (torch.randn(*SHAPE),), str(path), input_names=["x"], output_names=["y"],
                      do_constant_folding=False, dynamo=False)
    return path


def test_onnx_accepts_the_exact_fold_and_refuses_a_planted_wrong_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime  # noqa: F401

    from bnfold import onnx as bo

    path = _onnx_file(saturating(), tmp_path / "s.onnx")
    result = bo.fold(path)
    verification = result.report.verification
    assert verification["passed"] and verification["max_relative"] > 1e-4  # passed by the allowance, not the tolerance
    worst = next(o for o in verification["outputs"] if o["path"] == verification["worst_output"])
    assert verification["max_abs"] <= worst["allowance"] and worst["passed"]
    assert verification["input_shapes"] == {"x": list(SHAPE)} and "photographs" in verification["inputs"]
    plant_wrong_scale(monkeypatch)
    with pytest.raises(VerificationError, match="against allowance"):
        bo.fold(path)


def test_pytorch_and_onnx_give_one_result_with_one_layout(tmp_path: Path) -> None:
    """``bnfold.verify`` and ``bnfold.onnx.verify`` of the same model (and the checks of ``fold`` in both) give one
    result type with the same keys, per output too; the ONNX one runs without torch."""
    from bnfold import onnx as bo
    from bnfold.verification import VerificationResult

    model, x = saturating(), _photo()
    path = _onnx_file(model, tmp_path / "s.onnx")
    folded_path = tmp_path / "folded.onnx"
    folded_onnx = bo.fold(path)
    folded_onnx.save(folded_path)
    folded = bnfold.fold(model, x)
    in_pytorch = bnfold.verify(model, folded, x)
    in_onnx = bo.verify(path, folded_onnx.model, inputs={"x": x.numpy()})
    assert isinstance(in_pytorch, VerificationResult) and isinstance(in_onnx, bnfold.VerificationResult)
    a, b = in_pytorch.to_dict(), in_onnx.to_dict()
    assert a.keys() == b.keys() == bnfold.report_for(folded).verification.keys() == folded_onnx.report.verification.keys()
    assert len(a["outputs"]) == len(b["outputs"]) == 1 and a["outputs"][0].keys() == b["outputs"][0].keys()
    assert a["outputs"][0]["shape"] == b["outputs"][0]["shape"] and (a["worst_output"], b["worst_output"]) == ("", "y")
    for result in (a, b):  # both beyond the tolerance, both within the allowance of the same rule
        assert result["passed"] and result["outputs"][0]["passed"] and result["max_relative"] > 1e-4
        assert "against allowance" in result["judged"] and result["perturbed_tensors"] > 0
    assert (a["input_shapes"], b["input_shapes"]) == ({"input": list(SHAPE)}, {"x": list(SHAPE)})
    assert (a["inputs"], b["inputs"]) == (None, "given inputs")
    code = (f"import bnfold.onnx as bo\nresult = bo.verify({str(path)!r}, {str(folded_path)!r})\n"
            f"assert result.passed and sorted(result.to_dict()) == {sorted(a)!r}, str(result)\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m]]\n")
    done = python_without(code, "torch")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_torchscript_and_pt2_files_judge_the_same_way(
    fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    from bnfold.app.cli import main

    model, x = saturating(), torch.randn(*SHAPE)
    source = tmp_path / f"s.{'ts' if fmt == 'torchscript' else 'pt2'}"
    if fmt == "torchscript":
        torch.jit.save(torch.jit.trace(model, x), str(source))
    else:
        torch.export.save(torch.export.export(model, (x,)), str(source))
    assert main(["fold", str(source), "-o", str(tmp_path / f"out{source.suffix}")]) == 0
    out = capsys.readouterr().out
    assert "against allowance" in out and "on input: 1x3x" in out
    plant_wrong_scale(monkeypatch)
    assert main(["fold", str(source), "-o", str(tmp_path / f"wrong{source.suffix}")]) == 1
    assert "more than rounding the folded weights explains" in capsys.readouterr().err
    assert not (tmp_path / f"wrong{source.suffix}").exists()


class NoisyHead(nn.Module):
    """A forward that draws random numbers in eval mode (noise injection), from torch's generator or elsewhere."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.conv, self.norm, self.source = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), source
        with torch.no_grad():
            self.norm.running_var.uniform_(0.5, 2.0)
            self.norm.running_mean.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(1) if self.source == "torch" else torch.tensor(random.gauss(0, 1))
        return self.norm(self.conv(x)) + noise


def test_a_model_drawing_from_torchs_generator_is_compared_under_one_random_state() -> None:
    torch.manual_seed(0)
    model, x = NoisyHead("torch").eval(), torch.randn(2, 3, 8, 8)
    folded = bnfold.fold(model, x)
    verification = bnfold.report_for(folded).verification
    assert verification["passed"] and verification["max_relative"] < 1e-5  # the same draw on both sides: rounding


def test_a_model_drawing_random_numbers_bnfold_cannot_replay_is_undecided() -> None:
    torch.manual_seed(0)
    random.seed(0)  # draws that happen to be close would pass as rounding: the test fixes them
    model, x = NoisyHead("python").eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(UndecidedError, match="differ from run to run"):
        bnfold.fold(model, x)
    assert isinstance(model.norm, nn.BatchNorm2d)


def test_cli_an_onnx_original_that_cannot_run_is_bad_input_with_the_option_to_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from bnfold.app.cli import main

    # a dynamic-size model whose reshape wants exactly 5 x 5 pixels: no usual size runs
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w")
    stats = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
             (("s", rng.random(4) + 0.5), ("b", rng.standard_normal(4)), ("m", rng.standard_normal(4)),
              ("v", rng.random(4) + 0.5))]
    shape = numpy_helper.from_array(np.array([1, 100], dtype=np.int64), "shape")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"], name="bn"),
             helper.make_node("Reshape", ["n", "shape"], ["y"], name="flat")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 100])],
                              [weight, *stats, shape])
    source = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), source)
    assert main(["fold", str(source), "-o", str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert "does not run on example inputs" in err and "--input-shape" in err and "--input FILE.npz" in err
    assert "inputs=" not in err and "verify=False" not in err and "ONNXRuntimeError" not in err
    assert not (tmp_path / "out.onnx").exists()
    # the user's own inputs: --input-shape, or an .npz of arrays by input name
    assert main(["fold", str(source), "-o", str(tmp_path / "a.onnx"), "--input-shape", "1,3,5,5"]) == 0
    np.savez(tmp_path / "x.npz", x=rng.standard_normal((1, 3, 5, 5)).astype(np.float32))
    assert main(["fold", str(source), "-o", str(tmp_path / "b.onnx"), "--input", str(tmp_path / "x.npz")]) == 0
    assert "given inputs" in capsys.readouterr().out
    assert main(["verify", str(source), str(tmp_path / "b.onnx"), "--input", str(tmp_path / "x.npz")]) == 0


def test_cli_folds_and_verifies_on_a_folder_of_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    PIL = pytest.importorskip("PIL.Image")
    from bnfold.app.cli import main
    from bnfold.examples import photographs

    folder = tmp_path / "images"
    folder.mkdir()
    for number, photo in enumerate(photographs()):
        PIL.fromarray(photo).save(folder / f"{number}.png")
    source = _onnx_file(saturating(), tmp_path / "s.onnx")
    assert main(["fold", str(source), "-o", str(tmp_path / "o.onnx"), "--data", str(folder)]) == 0
    assert "2 batches" in capsys.readouterr().out
    model = tmp_path / "m.pt"
    torch.save(saturating(), model)
    assert main(["fold", str(model), "--trust-pickle", "-o", str(tmp_path / "o.pt"), "--data", str(folder),
                 "--input-shape", "1,3,16,16"]) == 0
    assert main(["verify", str(model), str(tmp_path / "o.pt"), "--trust-pickle", "--data", str(folder),
                 "--input-shape", "1,3,16,16"]) == 0
