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
from bnfold.core.apply import LayerTensors, Statistics, merge_one, merged_tensors, scale_shift
from bnfold.core.graph import (
    CONSTANT,
    INPUT,
    LAYER,
    NORM,
    OP,
    OUTPUT,
    Geometry,
    Graph,
    LayerFacts,
    NormFacts,
    Operand,
    OpFacts,
)
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


# ------------------------------------------------------------------ linear combinations: signs and scales


class _Access:
    """A WeightAccess on plain dicts: what merge_one reads (layers, norm statistics, constants) and writes."""

    def __init__(self, numerics: object, layers: dict[str, LayerTensors], statistics: dict[str, Statistics],
                 constants: dict[str, object]) -> None:
        self.numerics = numerics
        self.layers, self.stats, self.constants = layers, statistics, constants
        self.written: dict[str, tuple[object, object]] = {}

    def statistics(self, norm: str) -> Statistics:
        return self.stats[norm]

    def read(self, layer: str) -> LayerTensors:
        return self.layers[layer]

    def write(self, layer: str, weight: object, bias: object) -> None:
        self.written[layer] = (weight, bias)

    def remove_norm(self, norm: str) -> None:
        pass

    def constant(self, name: str) -> object:
        return self.constants[name]


@st.composite
def combinations(draw: st.DrawFn) -> dict[str, object]:
    """A random tree over conv / identity / norm terms of one input: sums, differences, negations, and products
    by a number or by a per-channel constant of shape (C, 1, 1) or (1, C, 1, 1)."""
    groups = draw(st.sampled_from([1, 2, 4]))
    channels = groups * draw(st.sampled_from([1, 2]))
    kinds = draw(st.lists(st.sampled_from(["conv", "identity", "norm"]), min_size=2, max_size=5))
    kernels = draw(st.lists(st.sampled_from([1, 3, 5]), min_size=len(kinds), max_size=len(kinds)))
    steps = [(draw(st.sampled_from(["add", "sub"])), draw(st.integers(0, 10**6)),
              draw(st.sampled_from(["none", "none", "number", "neg", "channels", "channels4"])))
             for _ in range(len(kinds) - 1)]
    return {"groups": groups, "channels": channels, "kinds": ["conv", *kinds[1:]], "kernels": kernels,
            "steps": steps, "seed": draw(st.integers(0, 2**16))}


def _combination_graph(spec: dict[str, object]) -> tuple[Graph, dict[str, object]]:
    """The core graph of ``spec`` and what evaluating it needs (weights, statistics, constants, the float64 result
    computed by torch on an input)."""
    generator = torch.Generator().manual_seed(int(spec["seed"]))  # type: ignore[call-overload]
    groups, channels = int(spec["groups"]), int(spec["channels"])  # type: ignore[call-overload]
    x = torch.randn(2, channels, 9, 9, generator=generator, dtype=torch.float64)
    graph = Graph(method="test")
    source = graph.add_node(OP, "the operation relu", [graph.add_node(INPUT, "input").index], op=OpFacts("other")).index
    layers: dict[str, LayerTensors] = {}
    statistics: dict[str, Statistics] = {}
    constants: dict[str, torch.Tensor] = {}
    terms: list[tuple[int, torch.Tensor]] = []  # (node, its value on x)
    for i, (kind, k) in enumerate(zip(spec["kinds"], spec["kernels"], strict=True)):  # type: ignore[call-overload]
        if kind == "conv":
            weight = torch.randn(channels, channels // groups, k, k, generator=generator, dtype=torch.float64)
            bias = torch.randn(channels, generator=generator, dtype=torch.float64)
            layers[f"conv{i}"] = LayerTensors(weight, bias, 0, groups)
            geometry = Geometry((k, k), (1, 1), ((k // 2, k // 2),) * 2, (1, 1), groups)
            graph.add_unit(f"conv{i}", LAYER, "Conv", layer=LayerFacts(channels, channels, 1, geometry=geometry))
            node = graph.add_node(LAYER, f"conv{i}", [source], unit=f"conv{i}", shape=tuple(x.shape)).index
            terms.append((node, F.conv2d(x, weight, bias, padding=k // 2, groups=groups)))
        elif kind == "identity":
            terms.append((source, x))
        else:
            stats = Statistics(torch.randn(channels, generator=generator, dtype=torch.float64),
                               0.2 + 2 * torch.rand(channels, generator=generator, dtype=torch.float64), 1e-5,
                               torch.randn(channels, generator=generator, dtype=torch.float64),
                               torch.randn(channels, generator=generator, dtype=torch.float64))
            statistics[f"bn{i}"] = stats
            graph.add_unit(f"bn{i}", NORM, "BN", norm=NormFacts(channels))
            node = graph.add_node(NORM, f"bn{i}", [source], unit=f"bn{i}", shape=tuple(x.shape)).index
            scale, shift = scale_shift(stats, TorchNumerics())
            terms.append((node, x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)))
    (total, value), rest = terms[0], terms[1:]
    for (op, number_seed, scaling), (term, term_value) in zip(spec["steps"], rest, strict=True):  # type: ignore[call-overload]
        operands = (Operand(input=0), Operand(input=1))
        total = graph.add_node(OP, op, [total, term], op=OpFacts(op, {"alpha": 1, "scalars": (), "operands": operands}),
                               shape=tuple(x.shape)).index
        value = value + term_value if op == "add" else value - term_value
        if scaling == "number":
            number = (number_seed % 2001 - 1000) / 250
            value = value * number
            total = graph.add_node(OP, "mul", [total], op=OpFacts("mul", {"operands": (
                Operand(number=number), Operand(input=0))}), shape=tuple(x.shape)).index
        elif scaling == "neg":
            value = -value
            total = graph.add_node(OP, "neg", [total], op=OpFacts("mul", {"operands": (
                Operand(input=0), Operand(number=-1.0))}), shape=tuple(x.shape)).index
        elif scaling.startswith("channels"):
            name = f"gamma{len(constants)}"
            shape = (channels, 1, 1) if scaling == "channels" else (1, channels, 1, 1)
            gamma = torch.randn(shape, generator=generator, dtype=torch.float64)
            constants[name] = gamma
            value = value * gamma
            read = graph.add_node(CONSTANT, f"the tensor '{name}'", shape=shape).index
            total = graph.add_node(OP, "mul", [total, read], op=OpFacts("mul", {"operands": (
                Operand(input=0), Operand(input=1, constant=name, shape=shape))}), shape=tuple(x.shape)).index
    graph.add_node(OUTPUT, "output", [total])
    return graph, {"x": x, "expected": value, "layers": layers, "statistics": statistics, "constants": constants}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(combinations())
def test_merged_kernel_computes_the_signed_and_scaled_combination(spec: dict[str, object]) -> None:
    """Planner coefficients and arithmetic together: one convolution with the merged kernel computes the tree."""
    graph, values = _combination_graph(spec)
    plan = plan_merges(graph)
    assert plan.refusals == [], plan.refusals
    (merge,) = plan.merges
    access = _Access(TorchNumerics(), values["layers"], values["statistics"], values["constants"])  # type: ignore[arg-type]
    merge_one(merge, access)  # type: ignore[arg-type]
    weight, bias = access.written[merge.into]
    x, expected = values["x"], values["expected"]
    k = weight.shape[-1]  # type: ignore[attr-defined]
    actual = F.conv2d(x, weight, bias, padding=k // 2, groups=int(spec["groups"]))  # type: ignore[arg-type, call-overload]
    # float64 products and a few dozen terms per output; scales of up to 4 per step make magnitudes vary, so the
    # error is taken against the largest term's magnitude
    error = float((actual - expected).abs().max()) / max(float(expected.abs().max()), 1.0)  # type: ignore[union-attr]
    assert error <= FLOAT64_TOLERANCE * 4 * k * k, error

    # numpy numerics: the same arithmetic, the same tensors
    numpy_access = _Access(NumpyNumerics(), {
        name: LayerTensors(t.weight.numpy(), t.bias.numpy(), 0, t.groups) for name, t in access.layers.items()
    }, {name: Statistics(*(a.numpy() if isinstance(a, torch.Tensor) else a for a in (
        s.mean, s.var, s.eps, s.gamma, s.beta))) for name, s in access.stats.items()},
        {name: c.numpy() for name, c in access.constants.items()})  # type: ignore[attr-defined]
    merge_one(merge, numpy_access)  # type: ignore[arg-type]
    numpy_weight, numpy_bias = numpy_access.written[merge.into]
    # numpy and torch may round a norm's (var + eps) ** -0.5 one ulp apart; every term is a product of a few
    # float64 factors of magnitude up to ~10, summed over at most five terms
    allowance = 64 * torch.finfo(torch.float64).eps
    for ours, theirs in ((numpy_weight, weight), (numpy_bias, bias)):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=0,  # type: ignore[attr-defined]
                                   atol=allowance * max(1.0, float(theirs.abs().max())))  # type: ignore[attr-defined]


def test_a_float32_coefficient_times_a_float32_weight_is_rounded_once() -> None:
    """c * W is exact in float64 for float32 factors: the merged float32 kernel is the correctly rounded sum."""
    generator = torch.Generator().manual_seed(0)
    big = torch.randn(4, 4, 3, 3, generator=generator)
    small = torch.randn(4, 4, 1, 1, generator=generator)
    gamma = torch.randn(4, generator=generator) * 1e-7
    weight, _ = merged_tensors([(LayerTensors(big, None, 0), (0, 0)), (LayerTensors(small, None, 0), (1, 1))], [], (),
                               TorchNumerics(), branch_coefficients=[None, gamma.double()])
    exact = big.double()
    exact[:, :, 1, 1] += gamma.double().reshape(4, 1) * small.double()[:, :, 0, 0]
    assert torch.equal(weight, exact.float())
