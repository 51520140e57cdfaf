"""MONAI Deploy application: register a NIfTI pair or two DICOM series with a GradICON bundle.

Run::

    python -m monai_gradicon.app.deploy -i INPUT_DIR -o OUTPUT_DIR -m BUNDLE_DIR_OR_WEIGHTS

``INPUT_DIR`` holds either ``moving.nii.gz`` and ``fixed.nii.gz`` (see :mod:`monai_gradicon.app.deploy.pipeline`)
or a DICOM study with two image series, one file per slice, any file names and sub-folders. The DICOM
series are found by the SDK's ``DICOMDataLoaderOperator`` and ``DICOMSeriesSelectorOperator``; without
selection rules the series with the lower SeriesNumber is the moving image. ``MONAI_GRADICON_DICOM_RULES``
(JSON text or file; SDK selection-rule format with selections named ``moving`` and ``fixed``) picks them
otherwise, e.g.::

    MONAI_GRADICON_DICOM_RULES='{"selections": [
        {"name": "moving", "conditions": {"SeriesDescription": "(?i)baseline"}},
        {"name": "fixed", "conditions": {"SeriesDescription": "(?i)follow"}}]}'

Each series becomes a volume (SDK ``DICOMSeriesToVolumeOperator``, rescale slope/intercept applied) written
as ``OUTPUT_DIR/dicom_as_nifti/{moving,fixed}.nii.gz`` with the series' geometry (LPS -> RAS), and
``series.json`` says which series is which. The outputs are those of the NIfTI input: ``warped_moving.nii.gz``,
``displacement_mm.nii.gz`` (on the fixed series' grid), ``transform.h5``, the inverse direction and
``report.json``.

Bad input (no series, more than two without rules, a series that is not one regular volume, a folder with
neither NIfTI pair nor DICOM) ends with one ``monai-gradicon-deploy: error: ...`` line on stderr and exit
code 2 (:func:`main`).

Package as a MONAI Application Package with ``monai-deploy package`` (needs Docker and network access,
not available in this project's CI; see README.md, "MONAI Deploy application").
"""

from __future__ import annotations

import gc
import logging
import sys
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator

from monai_gradicon.app.deploy.operators import (
    DICOMPairSelectionOperator,
    GradICONRegistrationOperator,
    RegistrationPairLoaderOperator,
    VolumePairWriterOperator,
)
from monai_gradicon.app.deploy.pipeline import dicom_selection_rules, input_kind

__all__ = ["GradICONRegistrationApp", "main"]


class GradICONRegistrationApp(Application):
    """Pair loader (NIfTI) or DICOM series -> volumes -> GradICON registration (warped image, displacement in mm, transforms, report)."""

    def _dicom_pair(self, input_folder: Path, output_folder: Path) -> VolumePairWriterOperator:
        rules = dicom_selection_rules()
        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=input_folder,
                                         must_load=False, name="dicom_loader")
        selector = DICOMSeriesSelectorOperator(self, rules=rules, all_matched=True, name="series_selector")
        pair = DICOMPairSelectionOperator(self, input_folder=input_folder, rules=bool(rules), name="pair_selection")
        writer = VolumePairWriterOperator(self, output_folder=output_folder, name="volume_writer")
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, pair, {("study_selected_series_list", "study_selected_series_list")})
        for role in ("moving", "fixed"):
            volume = DICOMSeriesToVolumeOperator(self, name=f"{role}_volume")
            self.add_flow(pair, volume, {(role, "study_selected_series_list")})
            self.add_flow(volume, writer, {("image", f"{role}_image")})
        self.add_flow(pair, writer, {("geometry", "geometry")})
        return writer

    def compose(self) -> None:
        argv = list(self.argv)
        if not argv or argv[0].startswith("-"):  # holoscan drops argv[0] when argv is passed explicitly
            argv.insert(0, "monai-gradicon-deploy")
        app_context = Application.init_app_context(argv)
        input_folder, output_folder = Path(app_context.input_path), Path(app_context.output_path)
        if input_kind(str(input_folder)) == "dicom":
            loader = self._dicom_pair(input_folder, output_folder)
        else:
            loader = RegistrationPairLoaderOperator(self, CountCondition(self, 1), input_folder=input_folder,
                                                    name="pair_loader")
        registration = GradICONRegistrationOperator(
            self, output_folder=output_folder, model_path=app_context.model_path or None, name="gradicon_registration",
        )
        self.add_flow(loader, registration, {("pair", "pair")})
        logging.getLogger(__name__).info(f"composed with {app_context}")


def main(argv: list[str] | None = None) -> int:
    """Run the application; bad input ends with one line on stderr and exit code 2.

    Args:
        argv: the command line (default ``sys.argv``), ``-i INPUT -o OUTPUT -m MODEL``.

    Returns:
        the exit code: 0 on success, 2 on bad input (:data:`monai_gradicon.app.USER_ERRORS`); an internal
        failure raises with its traceback.
    """
    from monai_gradicon.app.errors import USER_ERRORS, raised_inside

    app = GradICONRegistrationApp(list(sys.argv if argv is None else argv))
    try:
        app.run()
    except Exception as error:
        user_error = raised_inside(error, USER_ERRORS)
        if user_error is None:
            raise
        message = " ".join(str(user_error).split())
        del user_error  # its traceback holds the application
    else:
        return 0
    del app  # the SDK logs the end of its graph when the application goes: before our line, not after it
    gc.collect()
    print(f"monai-gradicon-deploy: error: {message}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
