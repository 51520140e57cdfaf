"""MONAI Deploy application: register a NIfTI pair with a GradICON bundle.

Run::

    python -m monai_gradicon.app.deploy.app -i INPUT_DIR -o OUTPUT_DIR -m BUNDLE_DIR_OR_WEIGHTS

``INPUT_DIR`` holds ``moving.nii.gz`` and ``fixed.nii.gz`` (see :mod:`monai_gradicon.app.deploy.pipeline`).
Package as a MONAI Application Package with ``monai-deploy package`` (needs Docker and network
access; see README.md, "MONAI Deploy application").
"""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application

from monai_gradicon.app.deploy.operators import GradICONRegistrationOperator, RegistrationPairLoaderOperator

__all__ = ["GradICONRegistrationApp", "main"]


class GradICONRegistrationApp(Application):
    """Pair loader -> GradICON registration (writes warped image, displacement in mm, transforms, report)."""

    def compose(self) -> None:
        argv = list(self.argv)
        if not argv or argv[0].startswith("-"):  # holoscan drops argv[0] when argv is passed explicitly
            argv.insert(0, "monai-gradicon-deploy")
        app_context = Application.init_app_context(argv)
        loader = RegistrationPairLoaderOperator(
            self, CountCondition(self, 1), input_folder=Path(app_context.input_path), name="pair_loader"
        )
        registration = GradICONRegistrationOperator(
            self, output_folder=Path(app_context.output_path), model_path=app_context.model_path or None,
            name="gradicon_registration",
        )
        self.add_flow(loader, registration, {("pair", "pair")})
        logging.getLogger(__name__).info(f"composed with {app_context}")


def main() -> None:
    GradICONRegistrationApp().run()


if __name__ == "__main__":
    main()
