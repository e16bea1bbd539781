"""ultralytics' detectors merged block by block: torch.fx cannot trace them as a whole (their forward loops over the
layers, ``for m in self.model``), but each block of re-parameterisable branches traces on its own.

yolov9t (``RepConv`` in ``RepNCSPELAN4``) and rtdetr-l (``RepConv`` in ``RepC3``) built from their configs (random
weights, no download), norm statistics calibrated on photographs, compared with the unmerged model and with
ultralytics' own ``model.fuse()``: no more convolutions and norms than it leaves, the same outputs. Compared in
float64: a random detector's box head is so badly conditioned that its float32 forward pass is ~1e-3 away from its
own float64 evaluation (``model.fuse()`` is as far), which no comparison at float32's fold tolerance could see
through. The exported formats (TorchScript, ``.pt2``, ONNX) merge in their graphs, as any model does.
"""

from __future__ import annotations

import copy
import io
import os
import warnings

import pytest
import torch
from torch import fx, nn

os.environ.setdefault("YOLO_OFFLINE", "1")  # never download anything
ultralytics = pytest.importorskip("ultralytics", reason="ultralytics is not installed (pip install -e '.[test]')")

import bnfold  # noqa: E402
from bnfold import judge  # noqa: E402
from bnfold.verification import TOLERANCES  # noqa: E402
from conftest import assert_same_outputs  # noqa: E402
from helpers.counting import conv_calls, count_batch_norm_calls  # noqa: E402
from helpers.photos import calibrated_on_photographs, photograph_arrays, photographs  # noqa: E402

SIZE = 128


def built(config: str) -> nn.Module:
    """The detection model of an ultralytics config, random weights, statistics calibrated on photographs."""
    torch.manual_seed(0)
    wrapper = ultralytics.RTDETR(config) if config.startswith("rtdetr") else ultralytics.YOLO(config)
    return calibrated_on_photographs(wrapper.model, SIZE)


@pytest.fixture(scope="module")
def yolov9t() -> nn.Module:
    return built("yolov9t.yaml")


def fused(model: nn.Module) -> nn.Module:
    """ultralytics' own fold and merge, on a copy."""
    return copy.deepcopy(model).fuse(verbose=False)


def check_merged_as_far_as_fuse(model: nn.Module, merged_blocks: int, regions: set[str]) -> nn.Module:
    """Merge ``model`` in float64 and check it against the original and ``model.fuse()``; return the merge."""
    model = copy.deepcopy(model).double()
    x = photographs(SIZE, 2).double()
    merged = bnfold.fold(model, x, merge_branches=True)  # verified against the model at float64's tolerance
    assert type(merged) is type(model)
    assert_same_outputs(model, merged, x, dtype=torch.float64)
    peer = fused(model)
    assert conv_calls(merged, x) <= conv_calls(peer, x)
    assert count_batch_norm_calls(merged, [x]) == 0 <= count_batch_norm_calls(peer, [x])
    report = bnfold.report_for(merged)
    assert report.verification is not None and report.verification["max_relative"] <= TOLERANCES[torch.float64]
    assert [e.status for e in report.merges] == ["merged"] * merged_blocks
    assert {e.region for e in report.merges} == regions
    assert all(isinstance(merged.get_submodule(region), fx.GraphModule) for region in regions)
    assert report.left == []
    assert any("was not merged as a whole, torch.fx cannot trace it" in note for note in report.notes)
    return merged


def test_yolov9t_merges_block_by_block_as_far_as_ultralytics_fuse(yolov9t: nn.Module) -> None:
    regions = {f"model.{layer}.{part}" for layer in (4, 6, 8, 12, 15, 18, 21) for part in ("cv2", "cv3")}
    merged = check_merged_as_far_as_fuse(yolov9t, 42, regions)  # 3 RepConvN in each RepCSP
    assert conv_calls(merged, photographs(SIZE, 1).double()) == 186  # what the issue measured for model.fuse()


def test_rtdetr_l_merges_block_by_block_as_far_as_ultralytics_fuse() -> None:
    merged = check_merged_as_far_as_fuse(built("rtdetr-l.yaml"), 12, {"model.16", "model.21", "model.24", "model.27"})
    assert [type(merged.model[i]).__name__ for i in (16, 21, 24, 27)] == ["RepC3"] * 4  # GraphModules named so
    assert [merged.model[i].i for i in (16, 21, 24, 27)] == [16, 21, 24, 27]  # what the model's loop reads


def test_yolov8n_has_no_block_to_merge_and_comes_back_as_folded() -> None:
    model = built("yolov8n.yaml")
    x = photographs(SIZE, 1)
    merged = bnfold.fold(model, x, merge_branches=True, verify=False)
    plain = bnfold.fold(model, x, verify=False)
    assert not any(isinstance(m, fx.GraphModule) for m in merged.modules())
    assert merged.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), plain.state_dict().values(), strict=True))
    assert conv_calls(merged, x) == conv_calls(fused(model), x) == 64 and count_batch_norm_calls(merged, [x]) == 0
    assert bnfold.report_for(merged).merges == []


def marked_fused(model: nn.Module) -> nn.Module:
    """What ultralytics' predictor needs of a model bnfold folded (it calls ``model.fuse()``, which reads every
    ``Conv.bn`` as a BatchNorm): each folded ``Conv`` marked fused the way ``fuse()`` marks it."""
    from ultralytics.nn.modules import Conv

    for module in model.modules():
        if isinstance(module, Conv) and type(getattr(module, "bn", None)) is nn.Identity:
            del module.bn
            module.forward = module.forward_fuse
    return model


def one_rounding_step(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every floating-point tensor moved to a neighbouring float (up or down, seeded): the
    original's own rounding noise, the yardstick of :mod:`bnfold.judge` (a merge touches nearly every tensor)."""
    moved = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(judge.PERTURB_SEED)
    with torch.no_grad():
        for tensor in [*moved.parameters(), *moved.buffers()]:
            if tensor.is_floating_point():
                up = torch.rand(tensor.shape, generator=generator) < 0.5
                tensor.copy_(torch.nextafter(tensor, torch.where(up, float("inf"), float("-inf")).to(tensor.dtype)))
    return moved


def test_the_ultralytics_predictor_runs_the_merged_model(yolov9t: nn.Module) -> None:
    image = photograph_arrays()[0]
    merged = marked_fused(bnfold.fold(yolov9t, photographs(SIZE, 1), merge_branches=True))

    def boxes(model: nn.Module) -> object:
        predictor = ultralytics.YOLO("yolov9t.yaml")
        predictor.model = model
        # ultralytics' default confidence: at 0.05 the 200-box cap and exact score ties among the weakest boxes make
        # the kept set and its order a coin toss that one rounding step of the weights already flips
        (result,) = predictor.predict(image, imgsz=SIZE, conf=0.25, verbose=False)
        return result.boxes

    before, after, noisy = boxes(copy.deepcopy(yolov9t)), boxes(merged), boxes(one_rounding_step(yolov9t))
    assert type(merged) is type(yolov9t)
    assert len(after) == len(before) == len(noisy) > 0
    assert torch.equal(after.cls, before.cls)
    # float32: a random head's boxes move by up to a pixel under one rounding step of its weights (the floor); the
    # merged model may differ by what bnfold's judge allows every fold, FLOOR_FACTOR floors (plus float32's eps)
    for field in ("xyxy", "conf"):
        floor = (getattr(noisy, field) - getattr(before, field)).abs().max().item()
        error = (getattr(after, field) - getattr(before, field)).abs().max().item()
        assert error <= judge.FLOOR_FACTOR * floor + 1e-6 * getattr(before, field).abs().max().item(), field


def exportable(model: nn.Module, how: str) -> nn.Module:
    """``model`` set up as ultralytics' exporter sets it up (the head returns one tensor), in float64."""
    model = copy.deepcopy(model).double()
    for module in model.modules():
        if isinstance(module, ultralytics.nn.modules.head.Detect):
            module.export, module.format, module.dynamic, module.shape = True, how, False, None
    return model


@pytest.mark.slow
def test_yolov9t_merges_as_torchscript(yolov9t: nn.Module) -> None:
    from bnfold.backends.torchscript import fold_script

    model = exportable(yolov9t, "torchscript")
    x = photographs(SIZE, 1).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the trace check would call the head again, with its anchors cached)
        traced = torch.jit.trace(model, x, check_trace=False)
    merged = fold_script(traced, example_inputs=x, merge_branches=True)[0]
    kinds = [node.kind() for node in merged.graph.nodes()]
    assert kinds.count("aten::batch_norm") == 0 and kinds.count("aten::_convolution") == 186
    assert_same_outputs(model, merged, x, dtype=torch.float64)


@pytest.mark.slow
def test_yolov9t_merges_as_pt2(yolov9t: nn.Module) -> None:
    from bnfold.backends.exported import fold_exported, op_name

    model = exportable(yolov9t, "torchscript")
    x = photographs(SIZE, 1).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (x,))
    merged = fold_exported(program, merge_branches=True)[0]
    names = [op_name(node) for node in merged.graph.nodes]
    assert sum(n in ("batch_norm", "_native_batch_norm_legit_no_training") for n in names) == 0
    assert sum(n in ("conv2d", "convolution") for n in names) == 186
    assert_same_outputs(model, merged.module(), x, dtype=torch.float64)


@pytest.mark.slow
def test_yolov9t_merges_as_onnx(yolov9t: nn.Module) -> None:
    """onnxruntime has no float64 convolution: the merged file is judged against the float64 model by the noise
    floor of the unmerged file in the same runtime (a wrong merge is off by the size of the outputs)."""
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from bnfold import onnx as bnfold_onnx

    model = exportable(yolov9t, "onnx").float()
    x = photographs(SIZE, 1)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, input_names=["x"], do_constant_folding=False, dynamo=False)
    original = onnx.load_from_string(buffer.getvalue())
    merged = bnfold_onnx.fold(original, merge_branches=True, verify=False).model
    ops = [node.op_type for node in merged.graph.node]
    assert ops.count("BatchNormalization") == 0 and ops.count("Conv") == 186

    def run(graph: object) -> torch.Tensor:
        session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"x": x.numpy()})[0]).double()

    with torch.no_grad():
        exact = exportable(yolov9t, "onnx")(x.double())

    def error(output: torch.Tensor) -> float:
        return float((output - exact).abs().max() / exact.abs().max())

    assert error(run(merged)) <= 2 * error(run(original)) + TOLERANCES[torch.float64]
