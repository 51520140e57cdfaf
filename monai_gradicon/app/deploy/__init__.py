"""MONAI Deploy App SDK application for GradICON registration.

:mod:`.pipeline` works without the SDK; :mod:`.operators` and :mod:`.app` need
``monai-deploy-app-sdk==4.0.0`` (with ``holoscan-cli==4.2.0`` for ``monai-deploy package``).
"""

from .pipeline import find_pair, resolve_model, run_registration

__all__ = ["find_pair", "resolve_model", "run_registration"]
