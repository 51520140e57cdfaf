"""MONAI Deploy App SDK application for GradICON registration (a NIfTI pair, or a DICOM study of two series).

:mod:`.pipeline` and :mod:`.dicom_geometry` work without the SDK; :mod:`.operators` and :mod:`.app` need
``monai-deploy-app-sdk==4.0.0`` (with ``holoscan-cli==4.2.0`` for ``monai-deploy package``, and pydicom).
"""

from .pipeline import DICOM_RULES_VARIABLE, dicom_selection_rules, find_pair, input_kind, resolve_model, run_registration

__all__ = ["DICOM_RULES_VARIABLE", "dicom_selection_rules", "find_pair", "input_kind", "resolve_model", "run_registration"]
