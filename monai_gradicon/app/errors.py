"""The errors that mean "the user asked for something that cannot be done", as opposed to internal failures.

The command line (:mod:`monai_gradicon.app.cli`) reports these with one line and exit code 2; any other
exception (out of memory, a bug) exits with code 1 and its traceback.
"""

from __future__ import annotations

from ..io import ImageReadError

__all__ = ["InputError", "MissingWeightsError", "USER_ERRORS"]


class InputError(ValueError):
    """Bad options or inputs: a bundle that does not exist, masks against the bundle's policy, weights that do not fit."""


class MissingWeightsError(FileNotFoundError):
    """A bundle's weights file is not there (the message says what to fetch, from where, to where)."""


USER_ERRORS = (InputError, ImageReadError, MissingWeightsError, FileNotFoundError)
