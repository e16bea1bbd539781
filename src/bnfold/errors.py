"""Typed errors for users: each says what was wrong and what to do about it.

Everything bnfold raises on purpose derives from :class:`BnfoldError`, so callers (and the CLI) can catch the
whole family and show the message without a traceback.
"""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), or its type's name: what a one-line error
    quotes of a library's failure (their messages run on with tracebacks and advice)."""
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


class BnfoldError(Exception):
    """Base class of every error bnfold raises on purpose."""


class InvalidInputError(BnfoldError, ValueError):
    """An argument is of the wrong kind or shape (not a module, example inputs of the wrong type, ...)."""


class TrainingModeError(BnfoldError):
    """The model (or one of its norm layers) is in training mode, where batch norm uses batch statistics."""


class NonFiniteStatisticsError(BnfoldError):
    """A norm layer's running statistics or affine parameters hold NaN or infinity."""


class NonFiniteOutputError(BnfoldError):
    """The original model's own output is NaN on the example inputs, so no comparison can judge the fold."""


class UndecidedError(BnfoldError):
    """No verdict is possible: the original's own outputs differ from run to run on the same inputs and random state
    (it draws random numbers bnfold cannot replay), by as much as the fold's difference."""


class CaptureError(BnfoldError):
    """bnfold could not learn the model's dataflow (it cannot be traced, and the forward pass failed or was not given)."""


class VerificationError(BnfoldError):
    """The folded model's outputs differ from the original's by more than the tolerance."""


class OriginalRunError(InvalidInputError):
    """The original model does not run on the example inputs, so there is nothing to compare the fold with.

    Bad input (the command line's exit 2), never a failed verification: the fold was not judged at all. ``str()``
    gives the cause and the Python keywords to fix it; :attr:`cli_message` the same without the runtime's own text
    (the command line shows that with ``--debug``) and with the command-line options instead.
    """

    def __init__(self, what: str, shapes: str, cause: str, api_hint: str, cli_hint: str) -> None:
        super().__init__(f"{what} does not run on example inputs of shape {shapes} ({cause}); {api_hint}")
        self.cli_message = f"{what} does not run on example inputs of shape {shapes}; {cli_hint}"
