"""Re-parameterisable timm models: bnfold without and with merge_branches, against timm's reparameterize_model.

    python benchmarks/merge_branches.py [--models mobileone_s0 repvgg_a0 ... yolov9t rtdetr-l] [--rounds 30]
                                        [--threads 2]

Per model (random weights, realistic norm statistics from three train-mode passes, then eval): the norms and the
convolutions / linear layers computed in one forward pass (calls, counted with a TorchFunctionMode), the latency of
batch 1 at 224 x 224 as a ratio of the unfolded model's (every variant timed in each round, in a rotating order,
under torch.inference_mode(); medians over the rounds, one run), and the largest relative error
``max|a - b| / max|a|`` against the unfolded model on a seeded batch. The ``.pt2`` row is the model exported with
torch.export and merged by ``fold_exported(..., merge_branches=True)`` (norm and convolution nodes left in its graph;
its unlifted module timed with the others). The TorchScript row is the model traced with ``torch.jit.trace`` and
merged by ``fold_script(..., merge_branches=True)`` (its norms and convolutions counted in the frozen graph). The
last row per model is the same model exported to ONNX and merged by ``bnfold.onnx`` (nodes left; error in
onnxruntime). Issue 13's targets: bnfold with the option has no more norms and no more convolutions than timm's
method, and a latency ratio at most timm's (within 3%).

ultralytics' detectors (yolov9t, rtdetr-l, yolov8n; built from their configs, random weights, norm statistics from
three train-mode passes over scikit-image's photographs) are measured at batch 1, 256 x 256, against ultralytics' own
``model.fuse()`` (the peer column): torch.fx cannot trace them as a whole, so bnfold merges them block by block.
Their error is measured on float64 copies of every variant (made the same way from the float64 model): a random
detector's box head is so badly conditioned that its float32 forward pass is ~1e-3 away from its own float64
evaluation, ``model.fuse()``'s as well, which would drown any comparison at float32's fold tolerance. Issue 21's
targets: no more convolutions and norms than ``model.fuse()`` leaves, every output within the fold tolerance, a
latency ratio at most ``model.fuse()``'s.
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import time
import warnings
from collections.abc import Callable

import onnx
import timm
import torch
from rich.console import Console
from rich.table import Table
from timm.utils import reparameterize_model
from torch import nn

import bnfold
from bnfold.backends.torchscript import fold_script
from from_tests import load_helper

counting, photos = load_helper("counting"), load_helper("photos")  # the tests' counters and detector calibration
LINEAR_FUNCTIONS, conv_calls, count_batch_norm_calls = counting.LINEAR_FUNCTIONS, counting.conv_calls, counting.count_batch_norm_calls
calibrated_on_photographs, photographs = photos.calibrated_on_photographs, photos.photographs

TIMM_MODELS = ["mobileone_s0", "repvgg_a0", "repvit_m0_9", "fastvit_t8", "repghostnet_100"]
ULTRALYTICS_MODELS = ["yolov9t", "rtdetr-l", "yolov8n"]
MODELS = TIMM_MODELS + ULTRALYTICS_MODELS
_SCRIPT = "bnfold TorchScript --merge-branches"


@torch.no_grad()
def calibrated(name: str, size: int) -> nn.Module:
    """The model with random affine norm parameters and running statistics from three train-mode passes."""
    torch.manual_seed(0)
    model = timm.create_model(name)
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            module.weight.copy_(1 + 0.2 * torch.randn(module.num_features, generator=generator))
            module.bias.copy_(0.2 * torch.randn(module.num_features, generator=generator))
            module.momentum = None
    model.train()
    for _ in range(3):
        model(torch.randn(4, 3, size, size, generator=generator))
    return model.eval()


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((other.double() - reference.double()).abs().max() / reference.double().abs().max())


def latencies(variants: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median seconds per forward pass of each variant, timed in interleaved rounds of a rotating order."""
    times: dict[str, list[float]] = {label: [] for label in variants}
    labels = list(variants)

    def once(model: nn.Module) -> float:
        start = time.perf_counter()
        model(x)
        return time.perf_counter() - start

    with torch.inference_mode():
        for model in variants.values():  # warm-up
            for _ in range(3):
                model(x)
        for index in range(rounds):
            shift = index % len(labels)
            for label in labels[shift:] + labels[:shift]:
                times[label].append(once(variants[label]))
    return {label: statistics.median(samples) for label, samples in times.items()}


PT2 = "bnfold .pt2 --merge-branches"


def exported_merged(model: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    """The model exported with torch.export, folded and merged by bnfold's .pt2 adapter."""
    from bnfold.backends.exported import fold_exported

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (x,))
    return fold_exported(program, merge_branches=True)[0]


def graph_counts(program: torch.export.ExportedProgram) -> tuple[int, int]:
    """Norm and convolution / linear nodes of a program's graph (its module calls ATen ops, which a
    TorchFunctionMode does not see by these names)."""
    from bnfold.backends.exported import op_name

    names = [op_name(node) for node in program.graph.nodes]
    norms = sum(n in ("batch_norm", "_native_batch_norm_legit_no_training") for n in names)
    return norms, sum(n in LINEAR_FUNCTIONS for n in names)


def merged_script(model: nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    """The model traced, then folded and merged as a TorchScript file would be."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)
    return fold_script(traced, example_inputs=x, merge_branches=True)[0]


def script_counts(module: torch.jit.ScriptModule) -> tuple[int, int]:
    """Norms and convolutions / linear layers in a frozen graph (its forward computes each node once)."""
    kinds = [node.kind().removeprefix("aten::") for node in module.graph.nodes()]
    return kinds.count("batch_norm"), sum(kinds.count(k) for k in LINEAR_FUNCTIONS)


def onnx_row(model: nn.Module, x: torch.Tensor, reference: torch.Tensor) -> tuple[str, int, int, float | None, float]:
    """The model exported to ONNX, folded and merged by bnfold.onnx: nodes left, and the error in onnxruntime
    against the PyTorch original (no latency: another runtime)."""
    import onnxruntime

    from bnfold import onnx as bnfold_onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, input_names=["x"], output_names=["y"], do_constant_folding=False,
                          dynamo=False)
    merged = bnfold_onnx.fold(onnx.load_from_string(buffer.getvalue()), merge_branches=True, verify=False).model
    ops = [node.op_type for node in merged.graph.node]
    session = onnxruntime.InferenceSession(merged.SerializeToString(), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"x": x.numpy()})
    return ("bnfold.onnx --merge-branches", ops.count("BatchNormalization"),
            sum(ops.count(op) for op in ("Conv", "Gemm", "MatMul")), None,
            relative_error(reference, torch.from_numpy(output)))


TIMM = "timm reparameterize_model"


def measure(name: str, rounds: int) -> list[tuple[str, int, int, float | None, float]]:
    model = calibrated(name, 224)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    builders: dict[str, Callable[[], nn.Module]] = {
        "bnfold": lambda: bnfold.fold(model, x),
        "bnfold --merge-branches": lambda: bnfold.fold(model, x, merge_branches=True),
        TIMM: lambda: reparameterize_model(copy.deepcopy(model)),
    }
    variants: dict[str, nn.Module] = {"unfolded": model} | {label: build() for label, build in builders.items()}
    program = exported_merged(model, x)
    variants[PT2] = program.module()
    variants[_SCRIPT] = merged_script(model, x)
    seconds = latencies(variants, x, rounds)
    with torch.no_grad():
        reference = model(x)
        errors = {label: relative_error(reference, variant(x)) for label, variant in variants.items()}
    rows: list[tuple[str, int, int, float | None, float]] = []
    for label, variant in variants.items():
        if label == PT2:
            norms, convs = graph_counts(program)
        elif isinstance(variant, torch.jit.ScriptModule):
            norms, convs = script_counts(variant)
        else:
            norms, convs = count_batch_norm_calls(variant, [x]), conv_calls(variant, x)
        rows.append((label, norms, convs, seconds[label] / seconds["unfolded"], errors[label]))
    return [*rows, onnx_row(model, x, reference)]


FUSE = "ultralytics model.fuse()"
DETECTOR_SIZE = 256


def detector(name: str) -> nn.Module:
    """An ultralytics detection model from its config, norm statistics calibrated on photographs."""
    import os

    os.environ.setdefault("YOLO_OFFLINE", "1")  # never download anything
    import ultralytics

    torch.manual_seed(0)
    wrapper = ultralytics.RTDETR(f"{name}.yaml") if name.startswith("rtdetr") else ultralytics.YOLO(f"{name}.yaml")
    return calibrated_on_photographs(wrapper.model, DETECTOR_SIZE)


def largest_relative_error(reference: object, other: object) -> float:
    """The largest ``max|a - b| / max|a|`` over the outputs (tensors of tuples, lists, dicts)."""
    pairs = zip(torch.utils._pytree.tree_leaves(reference), torch.utils._pytree.tree_leaves(other), strict=True)
    return max(relative_error(a, b) for a, b in pairs if isinstance(a, torch.Tensor) and a.is_floating_point())


def measure_detector(name: str, rounds: int) -> list[tuple[str, int, int, float | None, float]]:
    model = detector(name)
    x = photographs(DETECTOR_SIZE, 1)
    builders: dict[str, Callable[[nn.Module, torch.Tensor], nn.Module]] = {
        "unfolded": lambda m, _: m,
        "bnfold": lambda m, inputs: bnfold.fold(m, inputs, verify=False),
        "bnfold --merge-branches": lambda m, inputs: bnfold.fold(m, inputs, merge_branches=True, verify=False),
        FUSE: lambda m, _: copy.deepcopy(m).fuse(verbose=False),
    }
    variants = {label: build(model, x) for label, build in builders.items()}
    seconds = latencies(variants, x, rounds)
    model64, x64 = copy.deepcopy(model).double(), x.double()
    with torch.no_grad():
        reference = model64(x64)
        errors = {label: largest_relative_error(reference, build(model64, x64)(x64)) for label, build in builders.items()}
    return [(label, count_batch_norm_calls(variant, [x]), conv_calls(variant, x), seconds[label] / seconds["unfolded"],
             errors[label]) for label, variant in variants.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    table = Table(title=f"Branch merges, batch 1 at 224x224 (ultralytics' at {DETECTOR_SIZE}x{DETECTOR_SIZE}), "
                        f"{args.rounds} interleaved rounds, {args.threads} thread(s), torch {torch.__version__}, "
                        f"timm {timm.__version__}; x peer: the latency ratio over timm's reparameterize_model's or "
                        f"ultralytics' model.fuse()'s; (f64): error of float64 copies")
    for column in ("model", "variant", "BN", "convs", "latency ratio", "x peer", "max rel. error"):
        table.add_column(column, justify="left" if column in ("model", "variant") else "right")
    for name in args.models:
        is_detector = name in ULTRALYTICS_MODELS
        rows = measure_detector(name, args.rounds) if is_detector else measure(name, args.rounds)
        peer_ratio = next(ratio for label, _, _, ratio, _ in rows if label in (TIMM, FUSE))
        for label, norms, convs, ratio, error in rows:
            shown = "-" if ratio is None else f"{ratio:.3f}"
            # the two medians of the same rounds side by side: what the target (at most the peer's) is about
            against_peer = "-" if ratio is None or peer_ratio is None else f"{ratio / peer_ratio:.3f}"
            table.add_row(name, label, str(norms), str(convs), shown, against_peer,
                          f"{error:.1e}" + (" (f64)" if is_detector else ""))
        table.add_section()
    Console(width=140).print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
