"""The merge arithmetic (bnfold.core.apply.merged_tensors) against torch's own convolutions, for random geometries.

The planner places the kernels (bnfold.core.merge); the arithmetic sums them. Each example builds branches that the
planner accepts, merges them with torch and with numpy numerics, and compares one convolution with the merged kernel
against the sum of the branches computed separately, all in float64: the only differences are the summation order
of a few float64 terms, so the tolerance is a small multiple of float64's epsilon.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnfold.backends.modules import TorchNumerics
from bnfold.core.apply import LayerTensors, Statistics, merged_tensors, scale_shift
from bnfold.core.graph import INPUT, LAYER, NORM, OP, OUTPUT, Geometry, Graph, LayerFacts, NormFacts, OpFacts
from bnfold.core.merge import plan_merges
from bnfold.onnx.adapter import NumpyNumerics

CONV = {1: F.conv1d, 2: F.conv2d}
FLOAT64_TOLERANCE = 64 * torch.finfo(torch.float64).eps  # relative: a few dozen float64 terms summed per output


@st.composite
def blocks(draw: st.DrawFn) -> dict[str, object]:
    dims = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2, 3]))
    depthwise = draw(st.booleans())
    per_group = 1 if depthwise else draw(st.integers(1, 3))
    channels = groups * per_group
    identities = draw(st.integers(0, 2))
    out_channels = channels if identities or draw(st.booleans()) else groups * draw(st.integers(1, 3))
    stride = 1 if identities else draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    kernels = draw(st.lists(st.sampled_from([1, 3, 5]), min_size=1 if identities else 2, max_size=4))
    return {"dims": dims, "groups": groups, "channels": channels, "out": out_channels, "stride": stride,
            "dilation": dilation, "kernels": kernels, "identities": identities,
            "biases": draw(st.lists(st.booleans(), min_size=len(kernels), max_size=len(kernels))),
            "seed": draw(st.integers(0, 2**16))}


def planned(block: dict[str, object]) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    """The offsets and identity tap the planner gives these branches (centred: padding d * (k - 1) / 2)."""
    dims, d, s = int(block["dims"]), int(block["dilation"]), int(block["stride"])  # type: ignore[call-overload]
    graph = Graph(method="test")
    x = graph.add_node(OP, "the operation relu", [graph.add_node(INPUT, "input").index], op=OpFacts("other")).index
    terms = []
    for i, k in enumerate(block["kernels"]):  # type: ignore[attr-defined]
        pad = d * (k - 1) // 2
        geometry = Geometry((k,) * dims, (s,) * dims, ((pad, pad),) * dims, (d,) * dims, int(block["groups"]))  # type: ignore[call-overload]
        graph.add_unit(f"conv{i}", LAYER, "Conv", layer=LayerFacts(block["out"], block["channels"], 1, geometry=geometry))  # type: ignore[arg-type]
        terms.append(graph.add_node(LAYER, f"conv{i}", [x], unit=f"conv{i}").index)
    for i in range(int(block["identities"])):  # type: ignore[call-overload]
        graph.add_unit(f"bn{i}", NORM, "BN", norm=NormFacts(block["channels"]))  # type: ignore[arg-type]
        terms.append(graph.add_node(NORM, f"bn{i}", [x], unit=f"bn{i}").index)
    total = terms[0]
    for term in terms[1:]:
        total = graph.add_node(OP, "the operation add", [total, term], op=OpFacts("add")).index
    graph.add_node(OUTPUT, "output", [total])
    plan = plan_merges(graph)
    assert plan.refusals == [], plan.refusals
    (merge,) = plan.merges
    by_name = {branch.layer: branch.offset for branch in merge.branches}
    order = sorted(by_name, key=lambda name: name != merge.into)
    return [by_name[name] for name in order], (merge.identities[0].tap if merge.identities else ())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks())
def test_merged_kernel_computes_the_sum_of_the_branches(block: dict[str, object]) -> None:
    generator = torch.Generator().manual_seed(int(block["seed"]))  # type: ignore[call-overload]
    dims, groups, channels, out = (int(block[k]) for k in ("dims", "groups", "channels", "out"))  # type: ignore[call-overload]
    d, s = int(block["dilation"]), int(block["stride"])  # type: ignore[call-overload]
    kernels: list[int] = block["kernels"]  # type: ignore[assignment]
    x = torch.randn((2, channels) + (11,) * dims, generator=generator, dtype=torch.float64)
    conv = CONV[dims]
    weights = [torch.randn((out, channels // groups) + (k,) * dims, generator=generator, dtype=torch.float64)
               for k in kernels]
    biases = [torch.randn(out, generator=generator, dtype=torch.float64) if b else None
              for b in block["biases"]]  # type: ignore[attr-defined]
    statistics = [Statistics(torch.randn(channels, generator=generator, dtype=torch.float64),
                             0.2 + 2 * torch.rand(channels, generator=generator, dtype=torch.float64), 1e-5,
                             torch.randn(channels, generator=generator, dtype=torch.float64),
                             torch.randn(channels, generator=generator, dtype=torch.float64))
                  for _ in range(int(block["identities"]))]  # type: ignore[call-overload]
    expected = sum(conv(x, w, b, stride=s, padding=d * (w.shape[-1] - 1) // 2, dilation=d, groups=groups)
                   for w, b in zip(weights, biases, strict=True))
    maps = [scale_shift(stats, TorchNumerics()) for stats in statistics]
    for scale, shift in maps:
        view = (1, channels) + (1,) * dims
        expected = expected + x * scale.reshape(view) + shift.reshape(view)

    offsets, tap = planned(block)
    largest = max(range(len(kernels)), key=lambda i: (kernels[i], -i))
    order = [largest] + [i for i in range(len(kernels)) if i != largest]
    branches = [(LayerTensors(weights[i], biases[i], 0, groups), offset) for i, offset in zip(order, offsets, strict=True)]
    weight, bias = merged_tensors(branches, maps, tap, TorchNumerics())
    k = kernels[largest]
    actual = conv(x, weight, bias, stride=s, padding=d * (k - 1) // 2, dilation=d, groups=groups)
    error = float((actual - expected).abs().max() / expected.abs().max())
    assert error <= FLOAT64_TOLERANCE * len(kernels) * max(1, k**dims), error

    # numpy numerics give the same tensors: the arithmetic is written once for both
    numpy_branches = [(LayerTensors(t.weight.numpy(), None if t.bias is None else t.bias.numpy(), 0, groups), o)
                      for t, o in branches]
    numpy_maps = [(scale.numpy(), shift.numpy()) for scale, shift in maps]
    numpy_weight, numpy_bias = merged_tensors(numpy_branches, numpy_maps, tap, NumpyNumerics())
    np.testing.assert_array_equal(numpy_weight, weight.numpy())
    np.testing.assert_array_equal(numpy_bias, bias.numpy())


def test_merge_is_rounded_once_to_the_layers_dtype() -> None:
    """float32 branches are summed in float64 and rounded once: the merged kernel is the correctly rounded sum."""
    generator = torch.Generator().manual_seed(0)
    big = torch.randn(4, 4, 3, 3, generator=generator)
    small = torch.randn(4, 4, 1, 1, generator=generator) * 1e-7  # lost if added to big in float32 one by one
    bias = torch.randn(4, generator=generator)
    weight, merged_bias = merged_tensors(
        [(LayerTensors(big, bias, 0), (0, 0)), (LayerTensors(small, None, 0), (1, 1)),
         (LayerTensors(small, None, 0), (1, 1))],
        [], (), TorchNumerics(),
    )
    exact = big.double()
    exact[:, :, 1, 1] += 2 * small.double()[:, :, 0, 0]
    assert weight.dtype == torch.float32 and merged_bias.dtype == torch.float32
    assert torch.equal(weight, exact.float())
    assert torch.equal(merged_bias, bias)


def test_identity_kernel_is_per_group() -> None:
    """A depthwise (groups = channels) and a grouped identity: one 1 per output channel, on its own input."""
    for groups, channels in ((6, 6), (2, 6)):
        per_group = channels // groups
        zero = torch.zeros(channels, per_group, 3, 3)
        weight, bias = merged_tensors([(LayerTensors(zero, None, 0, groups), (0, 0))], [(None, None)], (1, 1),
                                      TorchNumerics())
        x = torch.randn(1, channels, 5, 5, generator=torch.Generator().manual_seed(1))
        assert torch.equal(F.conv2d(x, weight, bias, padding=1, groups=groups), x)
