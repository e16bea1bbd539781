"""Latency of the seed's two models before and after folding, beside torch.fx's fuse and torch.jit.freeze.

    python benchmarks/seed_latency.py [--models resnet50 vgg16_bn] [--batch-sizes 1 32] [--repeats 7] [--out DIR]

Each model is built with random weights, its norms given random affine parameters and statistics measured on real
images (scikit-image's samples), then timed with :func:`bnfold.benchmark`: all variants interleaved round by round,
medians and interquartile ranges, ratios to the original measured side by side in one run. Writes
``bench-<model>.json`` and ``bench-<model>.png`` to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torchvision
from rich.console import Console

import bnfold
from bnfold.app.calibration import calibrate, randomize_norm_affine, sample_images
from bnfold.files import write_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16_bn"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    console = Console(width=max(Console().width, 120))
    images = sample_images(16, args.size, seed=0)
    for name in args.models:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None)
        randomize_norm_affine(model, seed=1)
        calibrate(model, images)
        model.eval()
        start = time.perf_counter()
        result = bnfold.benchmark(model, images[:1], batch_sizes=tuple(args.batch_sizes), threads=args.threads,
                                  repeats=args.repeats, warmup=1)
        result.settings["model"] = name
        result.print(console)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            result.plot(args.out / f"bench-{name}.png")
            text = result.to_json()
            write_atomic(args.out / f"bench-{name}.json", lambda handle, text=text: handle.write(text), binary=False)
        console.print(f"{name}: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
