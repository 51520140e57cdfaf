"""Optional test dependencies that CI must have: a missing one skips locally but fails where CI requires it.

``scripts/run_tests.sh`` (the README test command) sets ``MONAI_GRADICON_REQUIRE_ITK=1`` and
``MONAI_GRADICON_REQUIRE_REFERENCE=1`` in the main environment and ``MONAI_GRADICON_REQUIRE_DEPLOY=1`` in
the Deploy environment, so there a missing ITK, SimpleITK, reference package (the authors'
``icon_registration``) or MONAI Deploy App SDK is an import error (a failed test), never a silent skip.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

REQUIRE_ITK = "MONAI_GRADICON_REQUIRE_ITK"
REQUIRE_DEPLOY = "MONAI_GRADICON_REQUIRE_DEPLOY"
REQUIRE_REFERENCE = "MONAI_GRADICON_REQUIRE_REFERENCE"


def require(module: str, env_var: str) -> ModuleType:
    """Import ``module``; where ``env_var`` is ``"1"`` a failed import raises, elsewhere the test is skipped."""
    if os.environ.get(env_var) == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed ({env_var}=1 makes this a failure)")


def require_itk() -> ModuleType:
    return require("itk", REQUIRE_ITK)


def require_simpleitk() -> ModuleType:
    return require("SimpleITK", REQUIRE_ITK)


def require_reference() -> ModuleType:
    """The authors' ``icon_registration`` 1.1.9, the parity oracle."""
    return require("icon_registration", REQUIRE_REFERENCE)
