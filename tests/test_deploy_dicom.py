"""The MONAI Deploy application on a DICOM study: the geometry of a series, and the app run on two series.

The series are written here from a NIfTI volume with an oblique, anisotropic affine (CT Image Storage, one
file per slice, LPS geometry, rescale slope/intercept, files in shuffled order). The geometry helper is
checked against SimpleITK's own ``ImageSeriesReader`` on the same files (main run, needs pydicom and
SimpleITK); the app (marker ``deploy_sdk``, the Deploy environment) must give on the DICOM study the same
displacement field as on the NIfTI pair.
"""

from __future__ import annotations

import json
import os
import re

import nibabel as nib
import numpy as np
import pytest

from dependencies import REQUIRE_DEPLOY, REQUIRE_ITK, require, require_simpleitk
from registration_helpers import blob_intensity, oblique_affine, read_field, save, world_points, write_random_weights, write_tiny_bundle

SHAPE = (22, 26, 18)
SLOPE, INTERCEPT = 2.0 ** -10, -1.5  # exact in binary and as DICOM decimal strings
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _quantised(values: np.ndarray) -> np.ndarray:
    """The values a DICOM series stores exactly (int16 through the rescale), so both inputs hold the same numbers."""
    return (np.round((values - INTERCEPT) / SLOPE) * SLOPE + INTERCEPT).astype(np.float32)


def write_series(folder, volume: np.ndarray, affine: np.ndarray, series_number: int, description: str,
                 study_uid: str, seed: int = 0, positions: np.ndarray | None = None) -> str:
    """Write ``volume`` (NIfTI index order, RAS ``affine``) as a CT series, one file per slice, in shuffled order.

    ``positions`` overrides the ImagePositionPatient of each slice (LPS mm), for broken series.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    os.makedirs(folder, exist_ok=True)
    lps = LPS_TO_RAS @ affine
    column_step, row_step = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    orientation = np.concatenate([lps[:3, 0] / column_step, lps[:3, 1] / row_step])
    if positions is None:
        positions = lps[:3, 3] + np.arange(volume.shape[2])[:, None] * lps[:3, 2]
    series_uid, frame_uid = generate_uid(), generate_uid()
    stored = np.round((volume - INTERCEPT) / SLOPE).astype(np.int16)
    for k in np.random.default_rng(seed).permutation(len(positions)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.Modality = "Phantom^Registration", "P0001", "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.StudyDescription = "20260101", "120000", "1", "registration"
        ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = series_number, description, int(k) + 1
        ds.ImagePositionPatient = [f"{v:.10f}" for v in positions[k]]
        ds.ImageOrientationPatient = [f"{v:.12f}" for v in orientation]
        ds.PixelSpacing = [f"{row_step:.12f}", f"{column_step:.12f}"]
        ds.SliceThickness = f"{np.linalg.norm(lps[:3, 2]):.12f}"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = repr(SLOPE), repr(INTERCEPT), "HU"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # DICOM rows are NIfTI's second axis
        ds.save_as(os.path.join(folder, f"{series_uid[-8:]}_{k * 7919 % 1000:03d}.dcm"), enforce_file_format=True)
    return series_uid


def _datasets(folder):
    import pydicom

    return [pydicom.dcmread(os.path.join(folder, name)) for name in sorted(os.listdir(folder))]


def _pair_volumes():
    affine = oblique_affine()
    points = world_points(affine, SHAPE)
    centre = points.reshape(-1, 3).mean(0)
    fixed = _quantised(blob_intensity(points, centre))
    moving = _quantised(blob_intensity(points, centre + np.array([2.0, 0.0, 0.0])))
    return moving, fixed, affine


def test_series_geometry_equals_simpleitk_image_series_reader(tmp_path):
    """Affine (1e-4 mm) and voxel order of the helper equal SimpleITK's reading of the same files."""
    require("pydicom", REQUIRE_ITK)
    sitk = require_simpleitk()
    from monai_gradicon.app.deploy.dicom_geometry import series_geometry

    _, fixed, affine = _pair_volumes()
    folder = str(tmp_path / "series")
    write_series(folder, fixed, affine, 1, "fixed", "1.2.3.4")
    datasets = _datasets(folder)
    order, ours = series_geometry(datasets)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
    image = reader.Execute()
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    itk_lps = np.eye(4)
    itk_lps[:3, :3] = direction * np.asarray(image.GetSpacing())
    itk_lps[:3, 3] = image.GetOrigin()
    np.testing.assert_allclose(ours, LPS_TO_RAS @ itk_lps, atol=1e-4)
    np.testing.assert_allclose(ours, affine, atol=1e-4)  # and the NIfTI the series was written from
    # the slices in our order, transposed to (column, row, slice), are ITK's voxels
    stack = np.stack([datasets[i].pixel_array for i in order]).astype(np.float64) * SLOPE + INTERCEPT
    np.testing.assert_array_equal(stack.transpose(2, 1, 0), sitk.GetArrayFromImage(image).transpose(2, 1, 0))
    np.testing.assert_array_equal(stack.transpose(2, 1, 0), fixed)


def test_series_geometry_refuses_what_is_not_one_regular_volume(tmp_path):
    require("pydicom", REQUIRE_ITK)
    from monai_gradicon.app import InputError
    from monai_gradicon.app.deploy.dicom_geometry import series_geometry

    _, fixed, affine = _pair_volumes()
    write_series(str(tmp_path / "one"), fixed[:, :, :1], affine, 1, "single", "1.2.3.4")
    with pytest.raises(InputError, match=r"is not a volume: it has 1 slice\(s\)"):
        series_geometry(_datasets(str(tmp_path / "one")))
    lps = LPS_TO_RAS @ affine
    gap = lps[:3, 3] + np.array([0, 1, 2, 4, 5])[:, None] * lps[:3, 2]  # slice 3 missing
    write_series(str(tmp_path / "gap"), fixed[:, :, :5], affine, 2, "gap", "1.2.3.4", positions=gap)
    with pytest.raises(InputError, match="not evenly spaced"):
        series_geometry(_datasets(str(tmp_path / "gap")), what="the moving series")
    same = np.repeat(lps[None, :3, 3], 3, axis=0)
    write_series(str(tmp_path / "same"), fixed[:, :, :3], affine, 3, "same", "1.2.3.4", positions=same)
    with pytest.raises(InputError, match="two slices lie at the same position"):
        series_geometry(_datasets(str(tmp_path / "same")))


def test_input_kind_and_selection_rules(tmp_path, monkeypatch):
    """NIfTI pair first, else DICOM (a Part-10 file anywhere below), else a clear error; rules text or file, checked."""
    from monai_gradicon.app import InputError
    from monai_gradicon.app.deploy.pipeline import dicom_selection_rules, input_kind

    (tmp_path / "dicom" / "sub").mkdir(parents=True)
    (tmp_path / "dicom" / "sub" / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\2\0")
    assert input_kind(str(tmp_path / "dicom")) == "dicom"
    (tmp_path / "dicom" / "fixed.nii.gz").write_bytes(b"")
    assert input_kind(str(tmp_path / "dicom")) == "nifti"  # then find_pair names what is missing
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "IM0001").write_bytes(b"\0" * 128 + b"DICX")
    with pytest.raises(InputError, match="holds neither a NIfTI pair .* nor DICOM files .found .'IM0001'.."):
        input_kind(str(tmp_path / "other"))
    with pytest.raises(FileNotFoundError, match="input folder not found"):
        input_kind(str(tmp_path / "absent"))
    monkeypatch.delenv("MONAI_GRADICON_DICOM_RULES", raising=False)
    assert dicom_selection_rules() == ""
    rules = json.dumps({"selections": [{"name": "fixed", "conditions": {"SeriesNumber": 2}},
                                       {"name": "moving", "conditions": {"SeriesNumber": 1}}]})
    (tmp_path / "rules.json").write_text(rules)
    for value in (rules, str(tmp_path / "rules.json")):
        monkeypatch.setenv("MONAI_GRADICON_DICOM_RULES", value)
        assert json.loads(dicom_selection_rules()) == json.loads(rules)
    for value, message in ((str(tmp_path / "nope.json"), "must be JSON selection rules or a JSON file"),
                           ("{not json", "not valid JSON"),
                           ('{"selections": [{"name": "moving", "conditions": {"SeriesNumber": 1}}]}', r"named \['moving'\]"),
                           ('{"selections": [{"name": "moving"}, {"name": "fixed"}]}', "each with conditions")):
        monkeypatch.setenv("MONAI_GRADICON_DICOM_RULES", value)
        with pytest.raises(InputError, match=message):
            dicom_selection_rules()


# --- the Deploy app on a DICOM study (marker deploy_sdk: the Deploy environment) -------------------------

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture()
def pair_inputs(tmp_path):
    """A NIfTI pair, the same pair as a DICOM study (moving = SeriesNumber 3, fixed = 7), and a deforming bundle."""
    moving, fixed, affine = _pair_volumes()
    nifti = tmp_path / "nifti"
    nifti.mkdir()
    save(str(nifti / "moving.nii.gz"), moving, affine)
    save(str(nifti / "fixed.nii.gz"), fixed, affine)
    study = tmp_path / "study"
    write_series(str(study / "b"), fixed, affine, 7, "follow-up", STUDY_UID, seed=1)
    write_series(str(study / "a"), moving, affine, 3, "baseline", STUDY_UID, seed=2)
    bundle = write_tiny_bundle(str(tmp_path / "bundle"))
    write_random_weights(bundle)
    return nifti, study, bundle, affine


def _run_app(input_dir, out, bundle, monkeypatch, rules=None) -> int:
    require("monai.deploy.core", REQUIRE_DEPLOY)
    from monai_gradicon.app.deploy.app import main

    monkeypatch.delenv("MONAI_GRADICON_IO_STEPS", raising=False)
    if rules is None:
        monkeypatch.delenv("MONAI_GRADICON_DICOM_RULES", raising=False)
    else:
        monkeypatch.setenv("MONAI_GRADICON_DICOM_RULES", rules)
    return main(["python", "-i", str(input_dir), "-o", str(out), "-m", bundle])


@pytest.mark.deploy_sdk
def test_deploy_app_on_dicom_series_gives_the_displacement_of_the_nifti_pair(tmp_path, pair_inputs, monkeypatch):
    """Same displacement (mm, both directions) and warped image, 1e-5, as the app on the NIfTI pair; fixed header."""
    nifti, study, bundle, affine = pair_inputs
    assert _run_app(nifti, tmp_path / "from_nifti", bundle, monkeypatch) == 0
    assert _run_app(study, tmp_path / "from_dicom", bundle, monkeypatch) == 0
    out, expected = tmp_path / "from_dicom", tmp_path / "from_nifti"
    assert np.linalg.norm(read_field(str(expected / "displacement_mm.nii.gz")), axis=0).mean() > 1.0  # it deforms
    for name in ("displacement_mm.nii.gz", "inverse_displacement_mm.nii.gz"):
        np.testing.assert_allclose(read_field(str(out / name)), read_field(str(expected / name)), atol=1e-5)
    np.testing.assert_allclose(nib.load(out / "displacement_mm.nii.gz").affine, affine, atol=1e-4)
    np.testing.assert_allclose(np.asarray(nib.load(out / "warped_moving.nii.gz").dataobj),
                               np.asarray(nib.load(expected / "warped_moving.nii.gz").dataobj), atol=1e-5)
    for name in ("moving", "fixed"):  # the volumes handed to register: the NIfTI pair's voxels and geometry
        converted = nib.load(out / "dicom_as_nifti" / f"{name}.nii.gz")
        np.testing.assert_array_equal(np.asarray(converted.dataobj), np.asarray(nib.load(nifti / f"{name}.nii.gz").dataobj))
        np.testing.assert_allclose(converted.affine, affine, atol=1e-4)
    with open(out / "dicom_as_nifti" / "series.json") as f:
        series = json.load(f)
    assert (series["moving"]["SeriesNumber"], series["fixed"]["SeriesNumber"]) == (3, 7)
    with open(out / "report.json") as f:
        report = json.load(f)
    assert report["fixed"] == str(out / "dicom_as_nifti" / "fixed.nii.gz")
    assert os.path.isfile(out / "transform.h5") and os.path.isfile(out / "inverse_transform.h5")


@pytest.mark.deploy_sdk
def test_deploy_app_selection_rules_pick_moving_and_fixed_among_three_series(tmp_path, pair_inputs, monkeypatch):
    """Rules by SeriesDescription override the SeriesNumber order and leave a third series out."""
    _, study, bundle, affine = pair_inputs
    moving, fixed, _ = _pair_volumes()
    write_series(str(study / "c"), moving[:, :, ::2], affine @ np.diag([1, 1, 2, 1]), 1, "scout", STUDY_UID)
    rules = json.dumps({"selections": [{"name": "moving", "conditions": {"SeriesDescription": "(?i)^follow"}},
                                       {"name": "fixed", "conditions": {"SeriesDescription": "(?i)^baseline"}}]})
    assert _run_app(study, tmp_path / "out", bundle, monkeypatch, rules=rules) == 0
    converted = tmp_path / "out" / "dicom_as_nifti"
    np.testing.assert_array_equal(np.asarray(nib.load(converted / "moving.nii.gz").dataobj), fixed)
    np.testing.assert_array_equal(np.asarray(nib.load(converted / "fixed.nii.gz").dataobj), moving)
    assert os.path.isfile(tmp_path / "out" / "displacement_mm.nii.gz")


def _dicomdir_only(folder):
    """A folder whose one DICOM file is a media directory (DICOMDIR): DICOM, but no series."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    os.makedirs(folder)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.1.3.10", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, STUDY_UID
    ds.save_as(os.path.join(folder, "DICOMDIR"), enforce_file_format=True)


@pytest.mark.deploy_sdk
def test_deploy_app_bad_dicom_input_is_one_line_and_exit_code_2(tmp_path, pair_inputs, monkeypatch, capsys):
    _, study, bundle, affine = pair_inputs
    moving, fixed, _ = _pair_volumes()
    lps = LPS_TO_RAS @ affine
    cases = {}
    _dicomdir_only(str(tmp_path / "no_series"))
    cases["no_series"] = (None, "no DICOM series found in")
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "notes.txt").write_text("not an image")
    cases["neither"] = (None, r"holds neither a NIfTI pair \(moving.nii.gz and fixed.nii.gz\) nor DICOM files")
    three = tmp_path / "three"
    for number, name in enumerate("abc"):
        write_series(str(three / name), fixed, affine, number + 1, name, STUDY_UID)
    rules = json.dumps({"selections": [{"name": "moving", "conditions": {"SeriesDescription": "^a$"}},
                                       {"name": "fixed", "conditions": {"SeriesDescription": "^z$"}}]})
    cases["three"] = (None, r"must hold two series \(moving, fixed\).* holds 3: series 1 'a'")
    single = tmp_path / "single"
    write_series(str(single / "a"), moving, affine, 1, "volume", STUDY_UID)
    write_series(str(single / "b"), fixed[:, :, :1], affine, 2, "one slice", STUDY_UID)
    cases["single"] = (None, r"the fixed DICOM series 2 'one slice' .* is not a volume: it has 1 slice\(s\)")
    gap = tmp_path / "gap"
    write_series(str(gap / "a"), moving[:, :, :5], affine, 1, "gap", STUDY_UID,
                 positions=lps[:3, 3] + np.array([0, 1, 2, 4, 5])[:, None] * lps[:3, 2])
    write_series(str(gap / "b"), fixed, affine, 2, "volume", STUDY_UID)
    cases["gap"] = (None, "the moving DICOM series 1 'gap' .* slice positions are not evenly spaced")
    cases["rules_match_none"] = (rules, r"the 'fixed' selection of MONAI_GRADICON_DICOM_RULES must match exactly one .* matched 0")
    cases["rules_invalid"] = ('{"selections": [{"name": "moving"}]}', "one selection named 'moving' and one named 'fixed'")
    for case, (case_rules, message) in cases.items():
        folder = tmp_path / case if (tmp_path / case).is_dir() else three
        capsys.readouterr()
        assert _run_app(folder, tmp_path / f"out_{case}", bundle, monkeypatch, rules=case_rules) == 2, case
        # the SDK logs to stderr too; the app's own report is one line, the last
        err = capsys.readouterr().err.strip().splitlines()
        ours = [line for line in err if line.startswith("monai-gradicon-deploy:")]
        assert len(ours) == 1 and ours[0] == err[-1] and ours[0].startswith("monai-gradicon-deploy: error: "), (case, err[-3:])
        assert re.search(message, ours[0]), (case, ours[0])
        assert not os.path.exists(tmp_path / f"out_{case}" / "displacement_mm.nii.gz")


@pytest.mark.deploy_sdk
def test_deploy_app_command_line_exits_2_on_a_folder_without_images(tmp_path):
    """``python -m monai_gradicon.app.deploy`` as a process: exit code 2, the app's one-line error last on stderr."""
    import subprocess
    import sys

    require("monai.deploy.core", REQUIRE_DEPLOY)
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "report.pdf").write_bytes(b"%PDF-1.4")
    env = dict(os.environ, MONAI_GRADICON_DICOM_RULES="")
    result = subprocess.run([sys.executable, "-m", "monai_gradicon.app.deploy", "-i", str(tmp_path / "input"),
                             "-o", str(tmp_path / "out"), "-m", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("monai-gradicon-deploy: error: input folder ") and "holds neither a NIfTI pair" in last
    assert "Traceback" not in result.stderr
