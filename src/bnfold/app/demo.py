"""The demo: fold torchvision's vgg16_bn and resnet50 (random weights, statistics from real images) and report.

Run ``python -m bnfold.app.demo``. It prints, per model, the fold report table, the parameters removed and the largest
output difference between the original and the folded model on real images.
"""

from __future__ import annotations

import argparse

import torch

from .. import fold, report_for
from .calibration import calibrate, randomize_norm_affine, sample_images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["vgg16_bn", "resnet50"], help="torchvision model names")
    parser.add_argument("--size", type=int, default=224, help="input image size")
    args = parser.parse_args(argv)

    import torchvision
    from rich.console import Console

    console = Console()
    torch.manual_seed(0)
    images = sample_images(16, args.size, seed=0)
    for name in args.models:
        model = torchvision.models.get_model(name, weights=None)
        randomize_norm_affine(model, seed=1)
        calibrate(model, images)
        folded = fold(model, images[:4])
        report = report_for(folded)
        console.print(report)
        assert report.verification is not None
        console.print(
            f"[bold]{name}[/]: {report.parameters_removed:,} parameters removed, max relative output error "
            f"{report.verification['max_relative']:.2e} (max abs {report.verification['max_abs']:.2e}) on real images\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
