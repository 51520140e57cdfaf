"""MONAI Deploy App SDK operators for GradICON registration (needs ``monai-deploy-app-sdk``).

The SDK's generic ``MonaiBundleInferenceOperator`` cannot serve a registration network: it squeezes
and casts "image" outputs to uint8 (fatal for a displacement field) and its ``NiftiDataLoader`` drops
the affine. These operators keep the files' geometry end to end:

* :class:`RegistrationPairLoaderOperator` finds ``moving``/``fixed`` (and optional labels/masks) in the
  input folder and emits their paths;
* for a DICOM study, the SDK's ``DICOMDataLoaderOperator`` and ``DICOMSeriesSelectorOperator`` feed
  :class:`DICOMPairSelectionOperator`, which picks the moving and the fixed series (selection rules, or
  SeriesNumber order), checks each is one regular volume and hands each to its own SDK
  ``DICOMSeriesToVolumeOperator``; :class:`VolumePairWriterOperator` writes the two volumes as NIfTI with
  the series' physical geometry and emits their paths as the pair loader does;
* :class:`GradICONRegistrationOperator` registers them with :func:`monai_gradicon.register.register`
  and writes the warped image, the displacement field in mm (NIfTI, fixed header), ITK transforms,
  the inverse direction and ``report.json`` to the output folder; it emits the report.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from monai.deploy.core import ConditionType, Fragment, Operator, OperatorSpec
from monai.deploy.core.domain.dicom_series_selection import SelectedSeries, StudySelectedSeries

from monai_gradicon.app.deploy.dicom_geometry import LPS_TO_RAS, series_geometry
from monai_gradicon.app.deploy.pipeline import DICOM_RULES_VARIABLE, find_pair, run_registration
from monai_gradicon.app.errors import InputError

__all__ = ["RegistrationPairLoaderOperator", "DICOMPairSelectionOperator", "VolumePairWriterOperator",
           "GradICONRegistrationOperator"]

_ROLES = ("moving", "fixed")


class RegistrationPairLoaderOperator(Operator):
    """Emit ``{"input_dir": ..., "files": {role: path}}`` for the pair in ``input_folder`` (output port ``pair``)."""

    def __init__(self, fragment: Fragment, *args, input_folder: Path, **kwargs) -> None:
        self.input_folder = Path(input_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("pair")

    def compute(self, op_input, op_output, context) -> None:
        files = find_pair(str(self.input_folder))
        op_output.emit({"input_dir": str(self.input_folder), "files": files}, "pair")


def _describe(series) -> str:
    return (f"series {series.SeriesNumber} {series.SeriesDescription or ''!r} "
            f"(SeriesInstanceUID {series.SeriesInstanceUID}, {len(series.get_sop_instances())} files)")


class DICOMPairSelectionOperator(Operator):
    """The moving and the fixed series of the selected DICOM series, each checked to be one regular volume.

    Input port ``study_selected_series_list`` (the SDK selector's output). With selection rules (``rules=True``:
    the selector had selections named ``moving`` and ``fixed``, all matches kept) each selection must match
    exactly one series; without, the folder must hold exactly two series, ordered by SeriesNumber (the
    lower is moving). Output ports ``moving`` and ``fixed`` (each a one-series ``StudySelectedSeries`` list,
    what ``DICOMSeriesToVolumeOperator`` consumes) and ``geometry`` (role -> RAS affine, slice count and the
    series' identity). Bad input raises :class:`monai_gradicon.app.InputError`.
    """

    def __init__(self, fragment: Fragment, *args, input_folder: Path, rules: bool, **kwargs) -> None:
        self.input_folder = Path(input_folder)
        self.rules = rules
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study_selected_series_list")
        for name in (*_ROLES, "geometry"):
            spec.output(name)

    def _pick(self, selected: list[tuple[object, SelectedSeries]]) -> dict:
        if not selected:
            raise InputError(f"no DICOM series found in {str(self.input_folder)!r}.")
        if self.rules:
            picked = {}
            for role in _ROLES:
                matches = [(study, s) for study, s in selected if s.selection_name == role]
                if len(matches) != 1:
                    found = "; ".join(_describe(s.series) for _, s in matches) or "none"
                    raise InputError(f"the {role!r} selection of {DICOM_RULES_VARIABLE} must match exactly one DICOM "
                                     f"series in {str(self.input_folder)!r}; it matched {len(matches)}: {found}.")
                picked[role] = matches[0]
            if picked["moving"][1].series is picked["fixed"][1].series:
                raise InputError(f"the 'moving' and 'fixed' selections of {DICOM_RULES_VARIABLE} match the same "
                                 f"series, {_describe(picked['moving'][1].series)}.")
            return picked
        if len(selected) != 2:
            listed = sorted(selected, key=lambda item: (item[1].series.SeriesNumber is None, item[1].series.SeriesNumber or 0))
            found = "; ".join(_describe(s.series) for _, s in listed)
            raise InputError(f"a DICOM input folder must hold two series (moving, fixed) or selection rules in "
                             f"{DICOM_RULES_VARIABLE} must pick them; {str(self.input_folder)!r} holds {len(selected)}: {found}.")
        numbers = [s.series.SeriesNumber for _, s in selected]
        if None in numbers or numbers[0] == numbers[1]:
            raise InputError(f"the two DICOM series cannot be ordered by SeriesNumber (moving = lower) as they have "
                             f"SeriesNumber {numbers}; give selection rules in {DICOM_RULES_VARIABLE}.")
        ordered = sorted(selected, key=lambda item: int(item[1].series.SeriesNumber))
        return dict(zip(_ROLES, ordered))

    def compute(self, op_input, op_output, context) -> None:
        study_selected = op_input.receive("study_selected_series_list") or []
        selected = [(s.study, series) for s in study_selected for series in s.selected_series]
        geometry = {}
        for role, (study, chosen) in self._pick(selected).items():
            series = chosen.series
            what = f"the {role} DICOM {_describe(series)}"
            order, affine = series_geometry([i.get_native_sop_instance() for i in series.get_sop_instances()], what)
            geometry[role] = {"affine": affine, "slices": len(order), "what": what, "SeriesInstanceUID": series.SeriesInstanceUID,
                              "SeriesNumber": series.SeriesNumber, "SeriesDescription": series.SeriesDescription,
                              "StudyInstanceUID": study.StudyInstanceUID}
            one = StudySelectedSeries(study)
            one.add_selected_series(SelectedSeries(role, series, None))
            op_output.emit([one], role)
        op_output.emit(geometry, "geometry")


class VolumePairWriterOperator(Operator):
    """Write the moving and fixed volumes (SDK ``Image``) as NIfTI with their series' geometry; emit the pair.

    Input ports ``moving_image``, ``fixed_image`` (``DICOMSeriesToVolumeOperator`` outputs: arrays indexed
    (slice, row, column), slices ascending along the normal) and ``geometry`` (from
    :class:`DICOMPairSelectionOperator`). Writes ``<output>/dicom_as_nifti/moving.nii.gz``, ``fixed.nii.gz``
    (float32, arrays transposed to (column, row, slice), the affine of
    :func:`monai_gradicon.app.deploy.dicom_geometry.series_geometry`) and ``series.json`` (which series is
    which); output port ``pair`` as :class:`RegistrationPairLoaderOperator`'s.

    The SDK's own ``Image`` affine is not used: in SDK 4.0.0 it scales the row direction by
    ``PixelSpacing[0]`` (the spacing between rows), wrong for non-square pixels.
    """

    def __init__(self, fragment: Fragment, *args, output_folder: Path, **kwargs) -> None:
        self.folder = Path(output_folder) / "dicom_as_nifti"
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        for name in ("moving_image", "fixed_image", "geometry"):
            spec.input(name)
        spec.output("pair")

    def compute(self, op_input, op_output, context) -> None:
        import nibabel as nib

        geometry = op_input.receive("geometry")
        self.folder.mkdir(parents=True, exist_ok=True)
        files, identity = {}, {}
        for role in _ROLES:
            image = op_input.receive(f"{role}_image")
            array = np.asarray(image.asnumpy())
            geo = geometry[role]
            sdk_lps = np.asarray(image.metadata().get("dicom_affine_transform"), dtype=np.float64)
            ours_lps = LPS_TO_RAS @ geo["affine"]
            if array.ndim != 3 or array.shape[0] != geo["slices"] or not np.allclose(sdk_lps[:3, 2:], ours_lps[:3, 2:], atol=1e-4):
                raise RuntimeError(f"{geo['what']}: the SDK's volume (shape {array.shape}, first slice at "
                                   f"{sdk_lps[:3, 3]}) disagrees with the geometry of its slices.")
            path = str(self.folder / f"{role}.nii.gz")
            nifti = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0), dtype=np.float32), geo["affine"])
            nifti.set_qform(geo["affine"], code=1)
            nifti.set_sform(geo["affine"], code=1)
            nib.save(nifti, path)
            files[role] = path
            identity[role] = {k: geo[k] for k in ("SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
                                                  "StudyInstanceUID", "slices")} | {"nifti": path}
        with open(self.folder / "series.json", "w") as f:
            json.dump(identity, f, indent=2, default=str)
        op_output.emit({"input_dir": os.fspath(self.folder), "files": files}, "pair")


class GradICONRegistrationOperator(Operator):
    """Register the received pair and write the outputs (input port ``pair``, output port ``report``)."""

    def __init__(self, fragment: Fragment, *args, output_folder: Path, model_path: str | None, **kwargs) -> None:
        self.output_folder = Path(output_folder)
        self.model_path = model_path
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("pair")
        spec.output("report").condition(ConditionType.NONE)

    def compute(self, op_input, op_output, context) -> None:
        pair = op_input.receive("pair")
        report = run_registration(pair["files"], str(self.output_folder), self.model_path)
        self._logger.info(f"registration written to {self.output_folder}: folds {report['forward']['folds']}")
        op_output.emit(report, "report")
