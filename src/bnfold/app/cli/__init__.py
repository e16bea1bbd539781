"""The ``bnfold`` command: fold batch norms in model files, check the result, measure it.

    bnfold inspect MODEL                 what folding would do with each norm; writes nothing
    bnfold fold MODEL -o OUT             fold, verify, write OUT (atomically), print the report
    bnfold verify ORIGINAL FOLDED        compare outputs on example inputs or on --data
    bnfold bench MODEL                   latency and size before / after (--peers: fx.fuse, jit.freeze)
    bnfold reproduce                     the seed's experiment (train, fold, report)

MODEL is an architecture name (``resnet50``, ``timm:efficientnet_b0``; random weights drawn from ``--seed``, the
same model in every command), a checkpoint holding a state_dict (with ``--arch``), a pickled module (with
``--trust-pickle``), a TorchScript archive, a ``.pt2`` program or an ONNX file. ``verify`` compares any pair of them
(FOLDED as ``fold`` wrote it; an ONNX file runs in onnxruntime). PyTorch is needed for everything but ONNX files.

Exit codes: 0 success; 1 the outputs differ (verification failed; nothing written); 2 bad input or usage (a
one-line ``error:`` names the problem and the fix; nothing written); 3 an internal error (a bug: rerun with
``--debug`` and report the traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ...errors import BnfoldError, VerificationError

EXIT_OK, EXIT_VERIFICATION_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

EPILOG = """exit codes: 0 success; 1 outputs differ (nothing written); 2 bad input or usage (nothing written);
3 internal error (rerun with --debug and report it); 130 interrupted (143 SIGTERM, 129 SIGHUP)"""


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape; write it like 1,3,224,224") from None
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape of positive sizes; write it like 1,3,224,224")
    return shape


def _tolerance(text: str) -> float:
    """A relative error bound: a finite number >= 0 (nan would pass nothing, inf and negatives make no sense)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; write it like 1e-4") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a tolerance; give a finite relative error >= 0, like 1e-4")
    return value


def _integer(minimum: int, maximum: int | None = None, what: str = "a number") -> Callable[[str], int]:
    """An argparse type: an integer in ``[minimum, maximum]``, refused at parse time (exit 2) rather than deep in torch."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"{text} is not {what}; give a whole number {bound}")
        return value

    return parse


_SEED = _integer(0, 2**64 - 1, "a seed")  # what torch.Generator.manual_seed accepts, without its wrap-around of negatives


def _model_options(parser: argparse.ArgumentParser, weights: bool = True) -> None:
    group = parser.add_argument_group("model loading")
    group.add_argument("--arch", metavar="NAME", help="architecture of a state_dict file (torchvision or timm name)")
    if weights:
        group.add_argument("--weights", metavar="FILE", help="state_dict (.pt/.pth/.safetensors) for an architecture name")
    group.add_argument("--trust-pickle", action="store_true",
                       help="allow loading a whole pickled nn.Module (unpickling runs code from the file)")
    group.add_argument("--eval", action="store_true", help="switch a model saved in training mode to eval mode")
    group.add_argument("--input-shape", type=_shape, metavar="N,C,H,W",
                       help="example input shape (default: the architecture's, e.g. 1,3,224,224)")
    group.add_argument("--seed", type=_SEED, default=0,
                       help="seed of the random weights of an architecture name and of the random example inputs: "
                            "the same name and seed are the same model in every command (default: 0)")


def _input_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inputs to judge the fold on (default: photographs for N x 3 x H x W inputs, "
                                      "seeded random values for others)")
    group.add_argument("--input", metavar="FILE", help="an .npz of arrays by input name (numpy.savez), or an .npy for "
                                                      "the only input")
    group.add_argument("--data", metavar="DIR", help="a folder of images (resized to the input's H x W and normalised "
                                                     "as ImageNet models expect); for verify of PyTorch models also an "
                                                     "ImageFolder root with val/<class>/ (top-1 agreement)")
    group.add_argument("--limit", type=_integer(1, what="an image count"), metavar="N", default=None,
                       help="use at most N images of --data (default: 8; all of an ImageFolder's val/)")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout (for scripts)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error as one ``error:`` line on stderr and exit 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_BAD_INPUT)


FOLD_EXAMPLES = """examples:
  bnfold fold resnet18 -o resnet18-folded.pt
  bnfold fold checkpoint.pth --arch resnet18 -o folded.pth
  bnfold fold model.ts -o model-folded.ts
  bnfold fold model.onnx -o model-folded.onnx"""

VERIFY_EXAMPLES = """examples (each checks what the fold example of the same line wrote):
  bnfold verify resnet18 resnet18-folded.pt
  bnfold verify checkpoint.pth folded.pth --arch resnet18
  bnfold verify model.ts model-folded.ts
  bnfold verify model.onnx model-folded.onnx"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command (also used to render ``--help``)."""
    parser = _Parser(
        prog="bnfold", description="Fold BatchNorm into neighbouring conv / linear layers, losslessly.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    inspect = commands.add_parser("inspect", help="show what folding would do with each norm (writes nothing)",
                                  description="Show each batch norm and what folding would do with it, and parameter counts.",
                                  epilog="example: bnfold inspect resnet50", formatter_class=argparse.RawDescriptionHelpFormatter)
    inspect.add_argument("model", metavar="MODEL", help="architecture name or model file")
    inspect.add_argument("--merge-branches", action="store_true",
                         help="also show which summed parallel branches would merge into one layer (and why others "
                              "would not)")
    _model_options(inspect)
    _input_options(inspect)
    _common(inspect)

    fold = commands.add_parser("fold", help="fold, verify and write the folded model",
                               description="Fold every foldable batch norm, verify the outputs, write OUT atomically.",
                               epilog=FOLD_EXAMPLES,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    fold.add_argument("model", metavar="MODEL", help="architecture name or model file")
    fold.add_argument("-o", "--output", required=True, metavar="OUT", help="where to write the folded model")
    fold.add_argument("--format", choices=("state_dict", "safetensors", "pickle", "torchscript", "pt2", "onnx"),
                      help="output format (default: the input's; for an architecture name, from OUT's extension)")
    fold.add_argument("--force", action="store_true", help="replace OUT if it exists")
    fold.add_argument("--tolerance", type=_tolerance, help="largest accepted relative output error (default: from the dtype)")
    fold.add_argument("--merge-branches", action="store_true",
                      help="also merge summed parallel branches (RepVGG / MobileOne / RepViT blocks) into one layer; "
                           "PyTorch modules, TorchScript, .pt2 programs and ONNX files")
    _model_options(fold)
    _input_options(fold)
    _common(fold)

    verify = commands.add_parser("verify", help="compare the outputs of two models",
                                 description="Compare ORIGINAL and FOLDED on example inputs, --input or --data. "
                                 "FOLDED may be any file bnfold fold wrote from ORIGINAL, in any format (an ONNX "
                                 "file runs in onnxruntime); a state_dict among them is read as the architecture "
                                 "ORIGINAL names, or --arch.",
                                 epilog=VERIFY_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("original", metavar="ORIGINAL", help="architecture name or model file")
    verify.add_argument("folded", metavar="FOLDED", help="model file (what bnfold fold wrote)")
    verify.add_argument("--tolerance", type=_tolerance, help="largest accepted relative output error (default: from the dtype)")
    _model_options(verify)
    _input_options(verify)
    _common(verify)

    bench = commands.add_parser("bench", help="latency and footprint before / after folding",
                                description="Time the model before and after folding, interleaved, medians and IQR.",
                                epilog="example: bnfold bench resnet50 --batch-sizes 1 32 --peers --plot latency.png",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("model", metavar="MODEL", help="architecture name or model file")
    bench.add_argument("--batch-sizes", type=_integer(1, what="a batch size"), nargs="+", default=[1], metavar="B", help="batch sizes (default: 1)")
    bench.add_argument("--threads", type=_integer(1, what="a thread count"), help="intra-op threads (default: PyTorch's)")
    bench.add_argument("--peers", action="store_true", help="also time torch.fx fuse and torch.jit.freeze")
    bench.add_argument("--channels-last", action="store_true", help="also time channels-last variants")
    bench.add_argument("--compile", action="store_true", help="also time torch.compile variants")
    bench.add_argument("--warmup", type=_integer(0, what="a round count"), default=3, help="untimed rounds (default: 3)")
    bench.add_argument("--repeats", type=_integer(1, what="a round count"), default=20, help="timed interleaved rounds (default: 20)")
    bench.add_argument("--plot", metavar="PNG", help="write a latency chart")
    bench.add_argument("--tolerance", type=_tolerance, help=argparse.SUPPRESS)
    _model_options(bench)
    _common(bench)

    from ..reproduce import __doc__ as reproduce_doc
    from ..reproduce import add_arguments

    reproduce = commands.add_parser("reproduce", help="the seed's experiment: train, fold, report",
                                    description=(reproduce_doc or "").split("\n\n")[0],
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(reproduce)
    reproduce.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


class _Interrupts:
    """SIGINT raised as ``KeyboardInterrupt``, and remembered.

    Remembered because not every library lets the exception through: an interrupt during ``import torch`` can be
    swallowed by an import guard (the run then went on as if nothing happened) or turn into an unrelated
    ``ImportError`` later ("cannot load module more than once"). With the flag, Ctrl-C is honoured either way.
    """

    def __init__(self) -> None:
        self.seen = False
        self._previous: Any = None
        try:
            self._previous = signal.signal(signal.SIGINT, self)
        except ValueError:  # main() called outside the main thread: signals are not ours to handle
            self._previous = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


_NEEDS_TORCH = (
    "bnfold {command} needs PyTorch for anything but ONNX files, and it is not installed here: pip install "
    "'bnfold[torch]' (and 'bnfold[vision]' for architecture names like resnet50); ONNX files need only 'bnfold[onnx]'"
)


def _interrupted() -> int:
    sys.stderr.write("interrupted; nothing was written\n")
    return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (documented in the module docstring; SIGTERM / SIGHUP: 128 + signal).

    Ctrl-C is one line and exit 130 wherever it lands, also while PyTorch is still being imported (the first
    second or two of every run), not a traceback through the import machinery. Commands on ONNX files alone run
    without importing PyTorch at all.
    """
    interrupts = _Interrupts()
    try:
        try:
            from rich.console import Console

            from . import commands

            words = list(sys.argv[1:] if argv is None else argv)
            args = build_parser().parse_args(words)
            if commands.needs_torch(args):
                import torch  # noqa: F401  here, where a missing PyTorch and an interrupted import are handled
        except BaseException as error:  # an import broken by an interrupt fails with whatever error it hits
            if interrupts.seen or isinstance(error, KeyboardInterrupt):
                return _interrupted()
            if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] == "torch":
                _fail(Console(stderr=True), "error", _NEEDS_TORCH.format(command=words[0]))
                return EXIT_BAD_INPUT
            raise
        if interrupts.seen:  # swallowed during an import
            return _interrupted()
        return _run(args, Console(stderr=bool(getattr(args, "json", False))), Console(stderr=True), interrupts)
    except KeyboardInterrupt:
        return _interrupted()
    finally:
        interrupts.restore()


def _run(args: argparse.Namespace, console: Any, errors: Any, interrupts: _Interrupts) -> int:
    from ...files import describe_os_error
    from . import commands
    from .signals import Terminated, stop_as_exception

    handler: Any = getattr(commands, args.command)
    try:
        with stop_as_exception():  # SIGTERM / SIGHUP raise, so half-written files are cleaned up as for Ctrl-C
            return handler(args, console)
    except Terminated as stop:
        errors.print(f"interrupted by {stop.name}; nothing was written", highlight=False)
        return 128 + stop.signum
    except KeyboardInterrupt:
        errors.print("interrupted; nothing was written")
        return EXIT_INTERRUPTED
    except BnfoldError as error:
        if args.debug:
            raise
        # an error that knows its command-line wording (options, not Python keywords; no runtime internals) uses it
        _fail(errors, "error", getattr(error, "cli_message", None) or str(error))
        return EXIT_VERIFICATION_FAILED if isinstance(error, VerificationError) else EXIT_BAD_INPUT
    except OSError as error:  # the environment (a full disk, a read-only folder, permissions), not a bug
        if args.debug:
            raise
        _fail(errors, "error", describe_os_error(error))
        return EXIT_BAD_INPUT
    except Exception as error:
        if interrupts.seen:  # e.g. a lazy import that an interrupt broke half way
            errors.print("interrupted; nothing was written")
            return EXIT_INTERRUPTED
        if args.debug:
            raise
        first = (str(error).strip().splitlines() or [""])[0]
        _fail(errors, "internal error", f"{type(error).__name__}: {first} (rerun with --debug for the traceback, and please report it)")
        return EXIT_INTERNAL_ERROR


def _fail(console: Any, label: str, message: str) -> None:
    """One line on stderr; the message is printed as text (brackets in it are not rich markup)."""
    from rich.text import Text

    console.print(Text.assemble((f"{label}: ", "bold red"), message), soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
