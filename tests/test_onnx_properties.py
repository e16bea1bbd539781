"""Property tests: random layer shapes and attributes, forward and backward, always within float32 tolerance.

The hand-built cases of ``test_onnx.py`` pin one configuration per rule; here hypothesis varies what those
cases fix (rank, groups, strides, dilations, bias, Gemm flags), so a layout slip that only shows for, say,
grouped 3-D convolutions with stride 2 is found too. Few examples, small tensors: the suite runs on two cores.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnfold.onnx as bo
from helpers.onnx_cases import FLOAT32_TOLERANCE, Builder, bn_count

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def conv_configs(draw: st.DrawFn) -> dict:
    dims = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 4]))
    return {
        "dims": dims,
        "groups": groups,
        "cin": groups * draw(st.integers(1, 2)),
        "cout": groups * draw(st.integers(1, 3)),
        "kernel": draw(st.integers(1, 3)),
        "stride": draw(st.integers(1, 2)),
        "dilation": draw(st.integers(1, 2)),
        "bias": draw(st.booleans()),
        "transpose": draw(st.booleans()),
        "backward": draw(st.booleans()),
        "seed": draw(st.integers(0, 10_000)),
    }


@SETTINGS
@given(conv_configs())
def test_random_convolutions(config: dict) -> None:
    b = Builder(config["seed"])
    dims, groups, k = config["dims"], config["groups"], config["kernel"]
    cin, cout = config["cin"], config["cout"]
    op = "ConvTranspose" if config["transpose"] and not config["backward"] else "Conv"
    shape = (cin, cout // groups) if op == "ConvTranspose" else (cout, cin // groups)
    inputs = ["n" if config["backward"] else "x", b.weight("W", shape + (k,) * dims)]
    if config["bias"]:
        inputs.append(b.const("bias", b.rng.normal(size=cout)))
    attrs = {"group": groups, "strides": [config["stride"]] * dims, "dilations": [config["dilation"]] * dims}
    if config["backward"]:
        b.bn("bn", "x", "n", cin)
        b.node(op, inputs, ["y"], "conv", **attrs)
    else:
        b.node(op, inputs, ["c"], "conv", **attrs)
        b.bn("bn", "c", "y", cout)
    spatial = [7] * dims
    model = b.model([("x", [2, cin, *spatial])], [("y", [])])
    del model.graph.output[0].type.tensor_type.shape.dim[:]
    model.graph.output[0].type.tensor_type.ClearField("shape")
    result = bo.fold(model)
    assert bn_count(result.model) == 0, result.report
    assert result.report.verification["max_relative"] <= FLOAT32_TOLERANCE


@SETTINGS
@given(
    st.integers(0, 1),
    st.sampled_from([None, (), (6,), (1, 6), (3, 6), (3, 1)]),
    st.floats(-2, 2).filter(lambda v: abs(v) > 0.1),
    st.floats(-2, 2),
    st.booleans(),
    st.integers(0, 10_000),
)
def test_random_gemms(
    trans_b: int, c_shape: tuple | None, alpha: float, beta: float, backward: bool, seed: int
) -> None:
    b = Builder(seed)
    k, n = (6, 6) if backward else (5, 6)
    inputs = ["m" if backward else "a", b.weight("B", (n, k) if trans_b else (k, n))]
    if c_shape is not None:
        inputs.append(b.const("C", b.rng.normal(size=c_shape)))
    if backward:
        b.bn("bn", "a", "m", k)
        b.node("Gemm", inputs, ["y"], "gemm", transB=trans_b, alpha=alpha, beta=beta)
    else:
        b.node("Gemm", inputs, ["g"], "gemm", transB=trans_b, alpha=alpha, beta=beta)
        b.bn("bn", "g", "y", n)
    model = b.model([("a", [3, k if backward else 5])], [("y", [3, n])])
    result = bo.fold(model)
    assert bn_count(result.model) == 0, result.report
    assert result.report.verification["max_relative"] <= FLOAT32_TOLERANCE
    assert np.isfinite(result.report.verification["max_relative"])
