"""`bnfold reproduce` end to end on small real data: the report's figures, files, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bnfold.app import reproduce
from bnfold.app.cli import main as cli_main

QUICK = ["--epochs", "1", "--limit", "16", "--batch-size", "8", "--latency-size", "32", "--latency-repeats", "2"]


def _check_report(out: Path, models: list[str], classes: int) -> dict:
    results = json.loads((out / "report.json").read_text())
    assert list(results["models"]) == models and len(results["data"]["classes"]) == classes
    for name, figures in results["models"].items():
        assert figures["parameters_removed"] == reproduce.EXPECTED_REMOVED[name]
        assert figures["parameters_before"] - figures["parameters_after"] == figures["parameters_removed"]
        assert figures["norms_folded"] == figures["norms_total"] > 0
        assert figures["top1_agreement"] == 1.0 and figures["verification_passed"]
        assert figures["accuracy_before"] == figures["accuracy_after"]
        assert figures["latency_ms_before"] > 0 and figures["latency_ms_after"] > 0
        assert figures["latency_iqr_ms_before"][0] <= figures["latency_ms_before"] <= figures["latency_iqr_ms_before"][1]
    table = (out / "report.md").read_text()
    for name in models:
        assert f"| {name} | {results['models'][name]['parameters_before']:,} |" in table
        assert f"{name}: {reproduce.EXPECTED_REMOVED[name]:,}" in table
    assert (out / "latency.png").read_bytes()[:4] == b"\x89PNG"
    return results


def test_reproduce_on_digits_with_both_seed_models(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    assert cli_main(["reproduce", *QUICK, "--out", str(out)]) == 0
    results = _check_report(out, ["vgg16_bn", "resnet50"], classes=10)
    assert results["data"]["source"] == "scikit-learn digits" and results["data"]["train_samples"] == 16


def _image_folder(root: Path) -> Path:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 4), ("val", 2)):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (torch.rand(40, 48, 3, generator=generator) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_reproduce_on_an_image_folder(tmp_path: Path) -> None:
    data = _image_folder(tmp_path / "imagenette")
    out = tmp_path / "folder"
    args = [*QUICK, "--models", "resnet50", "--data", str(data), "--image-size", "32", "--out", str(out)]
    assert cli_main(["reproduce", *args]) == 0
    results = _check_report(out, ["resnet50"], classes=2)
    assert results["data"]["train_samples"] == 8 and results["data"]["val_samples"] == 4
    assert results["data"]["image_size"] == 32


@pytest.mark.parametrize("layout", ["missing", "no-val"])
def test_bad_data_folder_is_a_one_line_error_and_nothing_is_written(
    tmp_path: Path, layout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    if layout == "no-val":
        (data / "train" / "a").mkdir(parents=True)
    out = tmp_path / "out"
    assert cli_main(["reproduce", *QUICK, "--data", str(data), "--out", str(out)]) == 2
    message = capsys.readouterr().err
    assert len(message.strip().splitlines()) == 1 and message.startswith("error:") and ("no such directory" in message or "missing val/" in message)
    assert not out.exists()


def _results(latencies: dict[str, tuple[float, float]]) -> dict:
    models = {
        name: {"latency_ms_before": before, "latency_ms_after": after, "latency_ratio": after / before,
               "latency_iqr_ms_before": [0.97 * before, 1.04 * before], "latency_iqr_ms_after": [0.96 * after, 1.05 * after],
               "parameters_before": 138_365_992, "parameters_after": 138_357_544, "parameters_removed": 8_448,
               "norms_folded": 13, "norms_total": 13, "accuracy_before": 0.123456, "accuracy_after": 0.123456,
               "top1_agreement": 1.0}
        for name, (before, after) in latencies.items()
    }
    return {"settings": {"latency_size": 224}, "models": models}


def test_the_chart_draws_each_model_on_its_own_scale_with_the_ratio_as_headline() -> None:
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    results = _results({"vgg16_bn": (180.0, 171.0), "resnet50": (41.7, 36.2)})  # 4x apart, as on 2 CPU cores
    chart = reproduce.figure(results)
    try:
        assert len(chart.axes) == 2
        for axis, (name, figures) in zip(chart.axes, results["models"].items(), strict=True):
            tallest = figures["latency_iqr_ms_before"][1]
            low, high = axis.get_ylim()
            assert low == 0 and tallest <= high <= 1.25 * tallest, (name, high)  # its own scale, from zero
            heights = sorted(bar.get_height() for bar in axis.patches)
            assert heights == sorted([figures["latency_ms_before"], figures["latency_ms_after"]])
            assert axis.get_title("left") == name
            assert axis.get_title("right") == f"{figures['latency_ratio']:.2f}x"
            (headline,) = [t for t in axis.get_children() if isinstance(t, Text) and t.get_text() == axis.get_title("right")]
            assert headline.get_fontsize() >= 2 * axis.yaxis.label.get_fontsize()  # the largest text of the panel
    finally:
        plt.close(chart)


def test_the_table_in_a_pipe_cuts_nothing() -> None:
    import io

    from rich.console import Console

    from bnfold.report import print_whole

    results = _results({"vgg16_bn": (180.0, 171.0), "a_model_with_a_rather_long_name_for_a_table": (41.7, 36.2)})
    results["settings"]["latency_size"] = 224
    out = io.StringIO()
    print_whole(Console(file=out, width=60), reproduce.table(results))
    text = out.getvalue()
    assert "…" not in text and "a_model_with_a_rather_long_name_for_a_table" in text and "171.0" in text
