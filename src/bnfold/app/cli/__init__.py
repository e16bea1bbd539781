"""The ``bnfold`` command: fold batch norms in model files, check the result, measure it.

    bnfold inspect MODEL                 what folding would do with each norm; writes nothing
    bnfold fold MODEL -o OUT             fold, verify, write OUT (atomically), print the report
    bnfold verify ORIGINAL FOLDED        compare outputs on example inputs or on --data
    bnfold bench MODEL                   latency and size before / after (--peers: fx.fuse, jit.freeze)
    bnfold reproduce                     the seed's experiment (train, fold, report)

MODEL is an architecture name or a model file of any kind (:mod:`bnfold.app.cli.loading`); ``verify`` compares
any pair of them (FOLDED as ``fold`` wrote it). PyTorch is needed for everything but ONNX files. Exit codes:
see :data:`EPILOG`; bad input is one ``error:`` line that names the problem and the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from ...errors import BnfoldError, VerificationError

EXIT_OK, EXIT_VERIFICATION_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

EPILOG = """exit codes: 0 success; 1 outputs differ (nothing written); 2 bad input or usage (nothing written);
3 internal error (rerun with --debug and report it); 130 interrupted (143 SIGTERM, 129 SIGHUP)"""


def _parsed(text: str, convert: Callable[[str], Any], what: str) -> Any:
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def _shape(text: str) -> tuple[int, ...]:
    shape = _parsed(text, lambda t: tuple(int(part) for part in t.replace("x", ",").split(",")),
                    "a shape; write it like 1,3,224,224")
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape of positive sizes; write it like 1,3,224,224")
    return shape


def _tolerance(text: str) -> float:
    """A relative error bound: a finite number >= 0 (nan would pass nothing, inf and negatives make no sense)."""
    value = _parsed(text, float, "a number; write it like 1e-4")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a tolerance; give a finite relative error >= 0, like 1e-4")
    return value


def _integer(minimum: int, maximum: int | None = None, what: str = "a number") -> Callable[[str], int]:
    """An argparse type: an integer in ``[minimum, maximum]``, refused at parse time (exit 2) rather than deep in torch."""

    def parse(text: str) -> int:
        value = _parsed(text, int, "a whole number")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"{text} is not {what}; give a whole number {bound}")
        return value

    return parse


_SEED = _integer(0, 2**64 - 1, "a seed")  # what torch.Generator.manual_seed accepts, without its wrap-around of negatives


def _model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model loading")
    group.add_argument("--arch", metavar="NAME", help="architecture of a state_dict file (torchvision or timm name)")
    group.add_argument("--weights", metavar="FILE",
                       help="state_dict (.pt/.pth/.safetensors) for an architecture name")
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

    def command(name: str, help: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    inspect = command("inspect", "show what folding would do with each norm (writes nothing)",
                      "Show each batch norm and what folding would do with it, and parameter counts.",
                      "example: bnfold inspect resnet50")
    inspect.add_argument("model", metavar="MODEL", help="architecture name or model file")
    inspect.add_argument("--merge-branches", action="store_true",
                         help="also show which summed parallel branches would merge into one layer (and why others "
                              "would not)")

    fold = command("fold", "fold, verify and write the folded model",
                   "Fold every foldable batch norm, verify the outputs, write OUT atomically.", FOLD_EXAMPLES)
    fold.add_argument("model", metavar="MODEL", help="architecture name or model file")
    fold.add_argument("-o", "--output", required=True, metavar="OUT", help="where to write the folded model")
    fold.add_argument("--format", choices=("state_dict", "safetensors", "pickle", "torchscript", "pt2", "onnx"),
                      help="output format (default: the input's; for an architecture name, from OUT's extension)")
    fold.add_argument("--force", action="store_true", help="replace OUT if it exists")
    fold.add_argument("--tolerance", type=_tolerance, help="largest accepted relative output error (default: from the dtype)")
    fold.add_argument("--merge-branches", action="store_true",
                      help="also merge summed parallel branches (RepVGG / MobileOne / RepViT blocks) into one layer; "
                           "PyTorch modules, TorchScript, .pt2 programs and ONNX files")

    verify = command("verify", "compare the outputs of two models",
                     "Compare ORIGINAL and FOLDED on example inputs, --input or --data. FOLDED may be any "
                     "file bnfold fold wrote from ORIGINAL, in any format (an ONNX file runs in onnxruntime);"
                     " a state_dict among them is read as the architecture ORIGINAL names, or --arch.",
                     VERIFY_EXAMPLES)
    verify.add_argument("original", metavar="ORIGINAL", help="architecture name or model file")
    verify.add_argument("folded", metavar="FOLDED", help="model file (what bnfold fold wrote)")
    verify.add_argument("--tolerance", type=_tolerance, help="largest accepted relative output error (default: from the dtype)")

    bench = command("bench", "latency and footprint before / after folding",
                    "Time the model before and after folding, interleaved, medians and IQR.",
                    "example: bnfold bench resnet50 --batch-sizes 1 32 --peers --plot latency.png")
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
    for sub in (inspect, fold, verify, bench):
        _model_options(sub)
        if sub is not bench:
            _input_options(sub)
        _common(sub)

    from ..reproduce import __doc__ as reproduce_doc
    from ..reproduce import add_arguments

    reproduce = command("reproduce", "the seed's experiment: train, fold, report",
                        (reproduce_doc or "").split("\n\n")[0])
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
        with contextlib.suppress(ValueError):  # outside the main thread, signals are not ours to handle
            self._previous = signal.signal(signal.SIGINT, self)

    def __call__(self, signum: int, frame: Any) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM or SIGHUP while a command ran (:func:`stop_as_exception`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM / SIGHUP raise :class:`Terminated`; the previous handlers return afterwards.

    By default these signals kill the process on the spot, and the hidden staging folder of a file being
    written (:mod:`bnfold.files`) would stay behind. As a ``KeyboardInterrupt``, code that cleans up after
    Ctrl-C cleans up after them too; the command line then exits with ``128 + signal number``, the shell's
    convention (143 for SIGTERM, 129 for SIGHUP). A second signal during the clean-up falls back to the
    default action. Only the main thread may set signal handlers; elsewhere (a command run from a thread) the
    block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]

    def raise_terminated(signum: int, frame: Any) -> None:
        for number in signums:  # a second signal during the clean-up: the default action
            signal.signal(number, signal.SIG_DFL)
        raise Terminated(signum)

    previous = {number: signal.signal(number, raise_terminated) for number in signums}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)


_NEEDS_TORCH = (
    "bnfold {command} needs PyTorch for anything but ONNX files, and it is not installed here: pip install "
    "'bnfold[torch]' (and 'bnfold[vision]' for architecture names like resnet50); ONNX files need only 'bnfold[onnx]'"
)


def _what_was_written(since: int | None) -> str:
    """The end of the interrupt's line: what the command wrote (:data:`bnfold.files.COMMITTED` from ``since``;
    ``None``: no command ran) before the signal landed, whole and checked, or that it wrote nothing."""
    from ...files import COMMITTED

    written = COMMITTED[since:] if since is not None else []
    return f"{', '.join(map(str, written))} had been written completely" if written else "nothing was written"


def _interrupted(since: int | None = None) -> int:
    sys.stderr.write(f"interrupted; {_what_was_written(since)}\n")
    return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (:data:`EPILOG`; SIGTERM / SIGHUP: 128 + signal number).

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
    from ...files import COMMITTED, describe_os_error
    from . import commands

    handler: Any = getattr(commands, args.command)
    since = len(COMMITTED)
    try:
        with stop_as_exception():  # SIGTERM / SIGHUP raise, so half-written files are cleaned up as for Ctrl-C
            return handler(args, console)
    except Terminated as stop:
        errors.print(f"interrupted by {signal.Signals(stop.signum).name}; {_what_was_written(since)}",
                     highlight=False)
        return 128 + stop.signum
    except KeyboardInterrupt:
        return _interrupted(since)
    except Exception as error:
        if interrupts.seen and not isinstance(error, (BnfoldError, OSError)):  # an import it broke
            return _interrupted(since)
        if args.debug:
            raise
        if isinstance(error, BnfoldError):  # in its command-line wording (options, not keywords), if any
            _fail(errors, "error", getattr(error, "cli_message", None) or str(error))
            return EXIT_VERIFICATION_FAILED if isinstance(error, VerificationError) else EXIT_BAD_INPUT
        if isinstance(error, OSError):  # the environment (a full disk, a read-only folder...), not a bug
            _fail(errors, "error", describe_os_error(error))
            return EXIT_BAD_INPUT
        first = (str(error).strip().splitlines() or [""])[0]
        _fail(errors, "internal error", f"{type(error).__name__}: {first} (rerun with --debug for the traceback, and please report it)")
        return EXIT_INTERNAL_ERROR


def _fail(console: Any, label: str, message: str) -> None:
    """One line on stderr; the message is printed as text (brackets in it are not rich markup)."""
    from rich.text import Text

    console.print(Text.assemble((f"{label}: ", "bold red"), message), soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
