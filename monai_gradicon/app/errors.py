"""The errors that mean "the user asked for something that cannot be done", as opposed to internal failures.

The command line (:mod:`monai_gradicon.app.cli`) reports these with one line and exit code 2; any other
exception (out of memory, a bug) exits with code 1 and its traceback.
"""

from __future__ import annotations

from ..io import ImageReadError

__all__ = ["InputError", "MissingWeightsError", "USER_ERRORS", "raised_inside"]


class InputError(ValueError):
    """Bad options or inputs: a bundle that does not exist, masks against the bundle's policy, weights that do not fit."""


class MissingWeightsError(FileNotFoundError):
    """A bundle's weights file is not there (the message says what to fetch, from where, to where)."""


USER_ERRORS = (InputError, ImageReadError, MissingWeightsError, FileNotFoundError)


def raised_inside(error: BaseException, types: type | tuple[type, ...]) -> BaseException | None:
    """The first exception of ``types`` in the chain of ``error`` (itself, then its causes), or ``None``.

    MONAI wraps what a transform or a config-built constructor raised in a ``RuntimeError``; this finds
    the original, so that bad input stays reported as bad input.

    Args:
        error: the exception caught.
        types: the exception class(es) looked for.

    Returns:
        that exception, or ``None`` when the chain holds none.
    """
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, types):
        cause = cause.__cause__ or cause.__context__
    return cause
