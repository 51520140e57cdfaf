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
