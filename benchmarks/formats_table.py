"""The same small models saved in every format and folded with ``bnfold fold``, as a user would: one table.

Each model (random weights, norm statistics from three train-mode passes) is saved as a pickled ``nn.Module``
(folded through the module API, ``--trust-pickle``), a traced TorchScript archive, a ``.pt2`` program and an ONNX
file; ``bnfold fold FILE -o OUT --json`` folds each, and the table shows, per format, how many norms were folded
(or the error the command printed, with its exit code). The rows are those of issue 11.

    python benchmarks/formats_table.py [--out DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class _Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.norm = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1), nn.BatchNorm2d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(torch.cat([self.a(x), self.b(x)], 1)))


def _conv_op_bn(op: nn.Module) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(nn.Conv2d(3, 8, 3), op, nn.BatchNorm2d(8), nn.ReLU())


ROWS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str | None]] = {
    # name: (model, input shape, what is done to it before saving)
    "conv -> AvgPool -> BN": (_conv_op_bn(nn.AvgPool2d(2)), (2, 3, 12, 12), None),
    "conv -> MaxPool -> BN": (_conv_op_bn(nn.MaxPool2d(2)), (2, 3, 12, 12), "positive gamma"),
    "conv -> Upsample -> BN": (_conv_op_bn(nn.Upsample(scale_factor=2.0)), (2, 3, 8, 8), None),
    "conv -> Dropout -> BN": (_conv_op_bn(nn.Dropout(0.2)), (2, 3, 8, 8), None),
    "BN -> flatten -> Linear": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                                      nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 5)), (2, 3, 8, 8), None),
    "BN -> conv with reflect padding": (lambda: nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3),
                                                              nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")),
                                        (2, 3, 8, 8), None),
    "cat(conv_a, conv_b) -> BN": (_Cat, (2, 3, 8, 8), None),
    "Linear -> BatchNorm1d": (lambda: nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU()), (2, 6), None),
    "NaN in running_var": (_conv_op_bn(nn.Identity()), (2, 3, 8, 8), "nan"),
    "model in training mode": (_conv_op_bn(nn.Identity()), (2, 3, 8, 8), "train"),
}


def _prepared(build: Callable[[], nn.Module], shape: tuple[int, ...], change: str | None) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, x = build(), torch.randn(shape)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.weight.data = torch.randn(module.num_features)
            if change == "positive gamma":
                module.weight.data.abs_()
            module.bias.data = torch.randn(module.num_features)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + torch.randn(x.shape))
    model.eval()
    if change == "nan":
        next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).running_var[0] = float("nan")
    if change == "train":
        model.train()
    return model, x


def _save_all(model: nn.Module, x: torch.Tensor, folder: Path) -> dict[str, Path]:
    paths = {"module API": folder / "model.pt", "TorchScript": folder / "model.ts", ".pt2": folder / "model.pt2",
             "ONNX": folder / "model.onnx"}
    torch.save(model, paths["module API"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, (x,), check_trace=False), paths["TorchScript"])
        torch.export.save(torch.export.export(model, (x,)), paths[".pt2"])
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE)
    paths["ONNX"].write_bytes(buffer.getvalue())
    return paths


def _fold(path: Path, x: torch.Tensor, out: Path) -> str:
    command = [sys.executable, "-m", "bnfold", "fold", str(path), "-o", str(out), "--json",
               "--input-shape", ",".join(map(str, x.shape))]
    if path.suffix == ".pt":
        command.append("--trust-pickle")
    if path.suffix in (".pt2", ".onnx"):
        command = command[:-2]  # these formats carry their own input shape
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    if done.returncode != 0:
        line = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"exit {done.returncode}: {line.split(':', 2)[1].strip() if ':' in line else line}"[:60]
    report = json.loads(done.stdout)["report"]
    folded = sum(entry["status"] == "folded" for entry in report["entries"])
    return f"folded {folded}/{len(report['entries'])}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="keep the files here (default: a temporary folder)")
    args = parser.parse_args(argv)
    folder = args.out or Path(tempfile.mkdtemp(prefix="bnfold-formats-"))
    # The rows' classes as `formats_table.X` (this script's folder is sys.path[0]), importable by the `bnfold` process
    # that unpickles them (HERE on its PYTHONPATH)
    import formats_table
    formats = ("module API", "TorchScript", ".pt2", "ONNX")
    print(f"| model | {' | '.join(formats)} |")
    print(f"| --- | {' | '.join('---' for _ in formats)} |")
    for index, (name, (build, shape, change)) in enumerate(formats_table.ROWS.items()):
        model, x = _prepared(build, shape, change)
        row = folder / f"row{index}"
        row.mkdir(parents=True, exist_ok=True)
        paths = _save_all(model, x, row)
        cells = [_fold(paths[f], x, row / f"folded{paths[f].suffix}") for f in formats]
        print(f"| {name} | {' | '.join(cells)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
