"""bnfold.benchmark(): the documented structure on a tiny model (speed is never asserted: timings are noise here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import bnfold
from conftest import randomize_norms


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    return randomize_norms(model).eval()


def test_benchmark_returns_the_documented_structure(tmp_path: Path) -> None:
    result = bnfold.benchmark(_tiny(), input_shape=(1, 3, 16, 16), batch_sizes=(1, 3), repeats=3, warmup=1,
                              channels_last=True)
    data = json.loads(result.to_json())
    assert set(data) == {"settings", "timings", "footprints", "skipped"}
    variants = {"original", "bnfold", "fx.fuse", "jit.freeze", "original+channels_last", "bnfold+channels_last"}
    assert {(t["variant"], t["batch_size"]) for t in data["timings"]} == {(v, b) for v in variants for b in (1, 3)}
    for timing in data["timings"]:
        assert timing["runs"] == 3 and timing["q1_ms"] <= timing["median_ms"] <= timing["q3_ms"]
        assert timing["per_image_ms"] == pytest.approx(timing["median_ms"] / timing["batch_size"])
    assert all(t["ratio"] == 1.0 for t in data["timings"] if t["variant"] == "original")
    footprints = {f["variant"]: f for f in data["footprints"]}
    assert footprints["original"]["parameters"] - footprints["bnfold"]["parameters"] == 16  # 2 BN x 4 x (gamma, beta)
    assert footprints["bnfold"]["norm_layers"] == 0 and footprints["original"]["norm_layers"] == 2
    assert footprints["jit.freeze"]["parameters"] is None
    assert footprints["bnfold"]["size_bytes"] < footprints["original"]["size_bytes"]
    assert data["settings"]["batch_sizes"] == [1, 3] and data["settings"]["repeats"] == 3
    png = result.plot(tmp_path / "chart.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bnfold" in str(result)


def test_a_peer_that_fails_is_skipped_with_its_reason() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _tiny()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.body(x)
            return y * 2 if y.sum() > 0 else y

    x = torch.randn(1, 3, 16, 16)
    result = bnfold.benchmark(Untraceable().eval(), x, repeats=2, warmup=0, peers=("fx.fuse",))
    assert "fx.fuse" in result.skipped and "TraceError" in result.skipped["fx.fuse"]
    assert {t.variant for t in result.timings} == {"original", "bnfold"}


def test_benchmark_rejects_bad_arguments() -> None:
    with pytest.raises(bnfold.InvalidInputError, match="input_shape"):
        bnfold.benchmark(_tiny())
    with pytest.raises(bnfold.InvalidInputError, match="unknown peer"):
        bnfold.benchmark(_tiny(), input_shape=(1, 3, 8, 8), peers=("onnx",))
    with pytest.raises(bnfold.InvalidInputError, match="eval"):
        bnfold.benchmark(_tiny().train(), input_shape=(1, 3, 8, 8))


def test_the_table_never_cuts_a_number_in_a_pipe_or_in_a_narrow_terminal() -> None:
    import io

    from rich.console import Console

    from bnfold.bench import BenchmarkResult, Footprint, Timing

    result = BenchmarkResult(settings={"model": "resnet18", "threads": 2, "repeats": 20})
    result.timings.append(Timing("jit.freeze", 1, 51.9, 23.33, 124.99, 51.896, 5.298, 20))
    result.footprints.append(Footprint("jit.freeze", 11_689_512, 46_840_000, 0))
    piped = io.StringIO()
    result.print(Console(file=piped, width=60))  # not a terminal: as wide as the widest row
    row = next(line for line in piped.getvalue().splitlines() if "jit.freeze" in line)
    assert all(cell in row for cell in ("51.90", "23.33-124.99", "51.896", "5.298", "11,689,512", "46.84"))
    narrow = io.StringIO()
    result.print(Console(file=narrow, width=60, force_terminal=True))  # a terminal: cells fold onto a next line
    assert "…" not in piped.getvalue() + narrow.getvalue()
