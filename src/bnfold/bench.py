"""Measure what folding buys: inference latency, parameters and size on disk, before and after, beside the peers.

Timings on shared machines drift; a ratio is only meaningful when both sides ran under the same conditions. So
every variant runs **interleaved**: each round times one forward pass of every variant, in a rotating order,
after a warm-up; the result gives the median, the interquartile range and the ratio of each median to the
original's median at the same batch size. The ``channels_last`` and ``torch.compile`` variants let the gain be
read where deployment runs (folded + compile against compile alone).
"""

from __future__ import annotations

import copy
import io
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InvalidInputError
from .files import write_png
from .report import RichPrintable

ORIGINAL = "original"
BNFOLD = "bnfold"
PEERS = ("fx.fuse", "jit.freeze")


@dataclass(frozen=True)
class Timing:
    """Latency of one variant at one batch size (milliseconds per forward pass)."""

    variant: str
    batch_size: int
    median_ms: float
    q1_ms: float
    q3_ms: float
    per_image_ms: float
    ratio: float  # median / the original's median at this batch size (< 1 is faster)
    runs: int


@dataclass(frozen=True)
class Footprint:
    """Parameters and serialised size of one variant."""

    variant: str
    parameters: int | None  # None for a frozen TorchScript module, whose weights became constants
    size_bytes: int
    norm_layers: int  # batch-norm-like modules left in the module tree (not meaningful for scripted variants)


@dataclass
class BenchmarkResult(RichPrintable):
    """Latency per variant and batch size, footprints, skipped variants with reasons, and the settings used.

    ``to_dict()`` keys: ``settings`` (model, input_shape, batch_sizes, threads, warmup, repeats, device, torch),
    ``timings`` (a list of :class:`Timing` as dicts), ``footprints`` (list of :class:`Footprint` as dicts),
    ``skipped`` ({variant: reason}).
    """

    settings: dict[str, Any]
    timings: list[Timing] = field(default_factory=list)
    footprints: list[Footprint] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def timing(self, variant: str, batch_size: int) -> Timing | None:
        return next((t for t in self.timings if t.variant == variant and t.batch_size == batch_size), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _table_rows(self) -> list[tuple[str, ...]]:
        sizes = {f.variant: f for f in self.footprints}
        rows = []
        for t in self.timings:
            f = sizes.get(t.variant)
            rows.append((
                t.variant, str(t.batch_size), f"{t.median_ms:.2f}", f"{t.q1_ms:.2f}-{t.q3_ms:.2f}", f"{t.per_image_ms:.3f}",
                f"{t.ratio:.3f}", f"{f.parameters:,}" if f and f.parameters is not None else "-", f"{f.size_bytes / 1e6:.2f}" if f else "",
            ))
        return rows

    _COLUMNS = ("variant", "batch", "median ms", "IQR ms", "ms/image", "x original", "parameters", "MB")

    def __str__(self) -> str:
        head = f"benchmark of {self.settings.get('model')} ({self.settings.get('threads')} threads, {self.settings.get('repeats')} interleaved rounds)"
        lines = [head, "  " + " | ".join(self._COLUMNS)]
        lines += ["  " + " | ".join(row) for row in self._table_rows()]
        lines += [f"  skipped {variant}: {reason}" for variant, reason in self.skipped.items()]
        return "\n".join(lines)

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(
            title=f"{self.settings.get('model')}: latency (interleaved medians, {self.settings.get('repeats')} rounds, "
            f"{self.settings.get('threads')} threads) and footprint",
            title_justify="left",
        )
        for column in self._COLUMNS:
            table.add_column(column, justify="left" if column == "variant" else "right", overflow="fold")
        for row in self._table_rows():
            table.add_row(*row)
        notes = [Text(f"skipped {variant}: {reason}", style="yellow") for variant, reason in self.skipped.items()]
        return Group(table, *notes)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Write a bar chart of per-image latency per variant and batch size to ``path`` (PNG), atomically."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        variants = list(dict.fromkeys(t.variant for t in self.timings))
        batch_sizes = sorted({t.batch_size for t in self.timings})
        figure, axes = plt.subplots(1, len(batch_sizes), figsize=(4 + 3 * len(batch_sizes), 4), squeeze=False)
        for axis, batch in zip(axes[0], batch_sizes, strict=True):
            timings = [self.timing(v, batch) for v in variants]
            shown = [(v, t) for v, t in zip(variants, timings, strict=True) if t is not None]
            bars = axis.bar(range(len(shown)), [t.per_image_ms for _, t in shown],
                            yerr=[[(t.median_ms - t.q1_ms) / t.batch_size for _, t in shown],
                                  [(t.q3_ms - t.median_ms) / t.batch_size for _, t in shown]],
                            color=["#999999" if v.startswith(ORIGINAL) else "#2a7ab9" for v, _ in shown], capsize=3)
            axis.set_xticks(range(len(shown)), [v for v, _ in shown], rotation=30, ha="right")
            axis.set_title(f"batch {batch}")
            axis.set_ylabel("ms per image (median, IQR)")
            for bar, (_, t) in zip(bars, shown, strict=True):
                axis.annotate(f"{t.ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                              ha="center", va="bottom", fontsize=8)
        figure.suptitle(f"{self.settings.get('model')}: latency before and after folding")
        figure.tight_layout()
        return write_png(path, figure)


# ---------------------------------------------------------------------------------------------- variants


def _serialised_size(model: Any) -> int:
    buffer = io.BytesIO()
    if isinstance(model, torch.jit.ScriptModule):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated, but it is how a scripted model ships
            torch.jit.save(model, buffer)
    else:
        torch.save(model.state_dict(), buffer)
    return buffer.tell()


def _norm_layers(model: nn.Module) -> int:
    from .layers import DEFAULT_REGISTRY

    if isinstance(model, torch.jit.ScriptModule):
        return 0
    return sum(DEFAULT_REGISTRY.is_norm_candidate(m) for m in model.modules())


def _peer(name: str, model: nn.Module, example: tuple[Any, ...]) -> nn.Module:
    if name == "fx.fuse":
        from torch.fx.experimental.optimization import fuse

        return fuse(model)
    if name == "jit.freeze":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated; it is still the peer
            return torch.jit.freeze(torch.jit.script(copy.deepcopy(model)))
    raise InvalidInputError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")


def _example(example_inputs: Any, input_shape: Sequence[int] | None, model: nn.Module) -> tuple[Any, ...]:
    if example_inputs is not None:
        return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if input_shape is None:
        raise InvalidInputError("benchmark() needs example_inputs or input_shape (e.g. input_shape=(1, 3, 224, 224))")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    return (torch.randn(*input_shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype),)


def _at_batch(example: tuple[Any, ...], batch_size: int) -> tuple[Any, ...]:
    """The example inputs with their first dimension repeated or cut to ``batch_size``."""
    resized = []
    for value in example:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            repeats = -(-batch_size // value.shape[0])
            value = value.repeat(repeats, *([1] * (value.dim() - 1)))[:batch_size].contiguous()
        resized.append(value)
    return tuple(resized)


def _channels_last(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(v.contiguous(memory_format=torch.channels_last) if isinstance(v, torch.Tensor) and v.dim() == 4 else v
                 for v in inputs)


def benchmark(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    input_shape: Sequence[int] | None = None,
    batch_sizes: Sequence[int] = (1,),
    threads: int | None = None,
    peers: Sequence[str] = PEERS,
    channels_last: bool = False,
    compile: bool = False,
    warmup: int = 3,
    repeats: int = 20,
    folded: nn.Module | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchmarkResult:
    """Time ``model`` before and after folding (and the peers), interleaved, at each batch size.

    Args:
        model: the original model in eval mode (not changed).
        example_inputs: a tensor or tuple of positional inputs; its first dimension is resized to each batch size.
        input_shape: instead of ``example_inputs``, the shape of one random input (``(1, 3, 224, 224)``).
        batch_sizes: batch sizes to time.
        threads: intra-op threads for the run (restored afterwards); default: leave PyTorch's setting.
        peers: other folders to time beside bnfold: ``"fx.fuse"``
            (``torch.fx.experimental.optimization.fuse``), ``"jit.freeze"``
            (``torch.jit.freeze(torch.jit.script(model))``). A peer that fails on this model is listed in
            ``skipped`` with the reason.
        channels_last: also time the original and bnfold models in channels-last memory format.
        compile: also time ``torch.compile`` of the original and of the bnfold model.
        warmup / repeats: untimed rounds first, then timed interleaved rounds (one pass of each variant per round).
        folded: an already folded model (default: ``bnfold.fold`` of a copy, verified on the example inputs).
        progress: called with a short description before each stage.
    """
    from .engine import fold

    if repeats < 1 or warmup < 0 or not batch_sizes or any(b < 1 for b in batch_sizes):
        raise InvalidInputError("repeats must be >= 1, warmup >= 0 and batch sizes >= 1")
    if model.training:
        raise InvalidInputError("benchmark the model in eval mode: call model.eval() first")
    say = progress or (lambda message: None)
    example = _example(example_inputs, input_shape, model)
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        say("folding")
        if folded is None:
            folded = fold(model, example)
        variants: dict[str, Any] = {ORIGINAL: model, BNFOLD: folded}
        skipped: dict[str, str] = {}
        for peer in peers:
            say(f"preparing {peer}")
            try:
                variants[peer] = _peer(peer, model, example)
            except InvalidInputError:
                raise
            except Exception as error:  # each peer fails in its own way on models it cannot handle
                skipped[peer] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if str(error) else type(error).__name__
        if channels_last:
            for name in (ORIGINAL, BNFOLD):
                variants[f"{name}+channels_last"] = copy.deepcopy(variants[name]).to(memory_format=torch.channels_last)
        if compile:
            for name in (ORIGINAL, BNFOLD):
                say(f"compiling {name}")
                variants[f"{name}+compile"] = torch.compile(copy.deepcopy(variants[name]))
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        result = BenchmarkResult(
            settings={
                "model": type(model).__name__,
                "input_shape": [list(v.shape) for v in example if isinstance(v, torch.Tensor)],
                "batch_sizes": list(batch_sizes),
                "threads": torch.get_num_threads(),
                "warmup": warmup,
                "repeats": repeats,
                "device": str(device),
                "torch": torch.__version__,
                "channels_last": channels_last,
                "compile": compile,
            },
            skipped=skipped,
        )
        for name, variant in variants.items():
            if name.endswith("+compile"):
                continue
            scripted = isinstance(variant, torch.jit.ScriptModule)
            parameters = None if scripted else sum(p.numel() for p in variant.parameters())
            result.footprints.append(Footprint(name, parameters, _serialised_size(variant), _norm_layers(variant)))
        for batch in batch_sizes:
            say(f"timing batch {batch}")
            inputs = _at_batch(example, batch)
            per_variant = {name: _channels_last(inputs) if name.endswith("+channels_last") else inputs for name in variants}
            samples = _interleaved(variants, per_variant, warmup, repeats, device)
            base = statistics.median(samples[ORIGINAL])
            for name, times in samples.items():
                # inclusive: quartiles within the measured times (the default extrapolates below the fastest
                # round on few rounds, down to negative latencies)
                quartiles = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
                median = statistics.median(times)
                result.timings.append(Timing(
                    name, batch, median * 1e3, quartiles[0] * 1e3, quartiles[2] * 1e3, median * 1e3 / batch,
                    median / base if base > 0 else float("nan"), len(times),
                ))
        return result
    finally:
        torch.set_num_threads(saved_threads)


def _interleaved(
    variants: dict[str, Any], inputs: dict[str, tuple[Any, ...]], warmup: int, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Time one forward pass of each variant per round, rotating the order every round."""
    names = list(variants)
    synchronise = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for round_number in range(warmup + repeats):
            shift = round_number % len(names)
            for name in names[shift:] + names[:shift]:
                synchronise()
                start = time.perf_counter()
                variants[name](*inputs[name])
                synchronise()
                if round_number >= warmup:
                    samples[name].append(time.perf_counter() - start)
    return samples
