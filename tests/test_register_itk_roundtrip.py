"""Physical-space correctness of ``register``'s outputs, checked against an analytic deformation and real ITK.

A known smooth deformation ``T`` (fixed -> moving points, closed-form inverse) is fed through the
whole pipeline by a network that returns its network-grid displacement, handed to ``register`` as a
``RegistrationModel`` (``registration_helpers.analytic_model``) whose scan preprocessing is one
``ToNetworkGridd`` in the RAS convention (``order="file"``, ``align_corners=True``, ``axcodes="RAS"``:
MONAI ``Orientationd`` + ``Resized``). Both images are oblique (rotated about three axes) and
anisotropic, on different grids. Tolerances:

* displacement written in mm vs ``T(p) − p``: ≤ 0.02 mm (max |u| ≈ 4 mm; the remaining error is the
  trilinear interpolation of the field between network voxels);
* warped moving vs the analytic intensity ``g(T(p))`` at voxels mapped ≥ 1 voxel inside the moving
  image: ≤ 0.03 (intensity range ≈ 2; linear interpolation of ``g`` on 2.5 mm voxels);
* ITK and SimpleITK resampling with ``transform.h5`` vs our warped image: ≤ 1e-4 at every voxel
  (same transform, same interpolation rules);
* ``TransformPoint`` of ITK/SimpleITK (LPS) vs the analytic ``T`` at voxel centres: ≤ 0.02 mm;
* ``T_AB(T_BA(q))`` vs ``q`` (inverse output): ≤ 0.03 mm.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from dependencies import require_itk, require_simpleitk
from registration_helpers import (
    RAS_CONVENTION,
    analytic_inverse,
    analytic_model,
    analytic_transform,
    blob_intensity,
    oblique_affine,
    save,
    world_points,
)

itk = require_itk()
sitk = require_simpleitk()

FIXED_SHAPE = (22, 26, 18)
MOVING_SHAPE = (24, 20, 21)
NETWORK_SHAPE = (24, 28, 30)
CENTRE = np.array([-9.0, 20.0, 26.0])


@pytest.fixture(scope="module")
def analytic_run(tmp_path_factory):
    import torch

    from monai_gradicon.app import register

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("roundtrip")
    fixed_affine = oblique_affine()
    moving_affine = oblique_affine(spacing=(1.0, 1.4, 2.0), angles=(-0.15, 0.35, -0.3), origin=(0.0, 0.0, 0.0))
    fixed_pts = world_points(fixed_affine, FIXED_SHAPE)
    # centre the moving grid on the fixed one so that the two fields of view overlap
    moving_centre = moving_affine[:3, :3] @ ((np.array(MOVING_SHAPE) - 1) / 2.0)
    moving_affine[:3, 3] = fixed_pts.reshape(-1, 3).mean(0) - moving_centre
    moving_pts = world_points(moving_affine, MOVING_SHAPE)
    # moving is brighter (+10) so that the analytic network can tell the two directions apart
    save(str(root / "fixed.nii.gz"), blob_intensity(fixed_pts, CENTRE), fixed_affine)
    save(str(root / "moving.nii.gz"), 10.0 + blob_intensity(moving_pts, CENTRE), moving_affine)
    model = analytic_model(moving_affine, MOVING_SHAPE, fixed_affine, FIXED_SHAPE, NETWORK_SHAPE, RAS_CONVENTION)
    assert model.convention == RAS_CONVENTION
    assert model.notes == ["network used as given (no weights file)"]
    outputs = register(root / "moving.nii.gz", root / "fixed.nii.gz", model, root / "out", progress=False)
    return root, outputs, fixed_affine, moving_affine, fixed_pts, moving_pts


def test_displacement_nifti_matches_analytic_deformation_in_mm(analytic_run):
    root, outputs, fixed_affine, _, fixed_pts, _ = analytic_run
    image = nib.load(outputs.files["displacement"])
    assert image.header.get_intent()[0] == "displacement vector"
    np.testing.assert_allclose(image.affine, fixed_affine, atol=1e-4)
    u = np.asarray(image.dataobj)[:, :, :, 0, :]
    expected = analytic_transform(fixed_pts) - fixed_pts
    assert np.abs(expected).max() > 2.0  # a real deformation, not a near-identity
    assert np.abs(u - expected).max() < 0.02


def test_warped_image_has_fixed_header_and_matches_analytic_intensity(analytic_run):
    root, outputs, fixed_affine, moving_affine, fixed_pts, _ = analytic_run
    warped = nib.load(outputs.files["warped_moving"])
    assert warped.shape == FIXED_SHAPE
    np.testing.assert_allclose(warped.affine, fixed_affine, atol=1e-4)
    target = analytic_transform(fixed_pts)
    target_index = (target - moving_affine[:3, 3]) @ np.linalg.inv(moving_affine[:3, :3]).T
    inside = np.all((target_index >= 1) & (target_index <= np.array(MOVING_SHAPE) - 2), axis=-1)
    assert inside.mean() > 0.3
    expected = 10.0 + blob_intensity(target, CENTRE)
    assert np.abs(np.asarray(warped.dataobj) - expected)[inside].max() < 0.03


def test_itk_and_simpleitk_resampling_with_written_transform_reproduce_warped_image(analytic_run):
    root, outputs, *_ = analytic_run
    ours = np.asarray(nib.load(outputs.files["warped_moving"]).dataobj)
    moving = itk.imread(str(root / "moving.nii.gz"), itk.F)
    fixed = itk.imread(str(root / "fixed.nii.gz"), itk.F)
    transform = itk.transformread(outputs.files["transform"])[0]
    assert "DisplacementFieldTransform" in type(transform).__name__
    resampled = itk.resample_image_filter(
        moving,
        transform=transform,
        use_reference_image=True,
        reference_image=fixed,
        interpolator=itk.LinearInterpolateImageFunction.New(moving),
        default_pixel_value=0.0,
    )
    by_itk = itk.array_from_image(resampled).transpose(2, 1, 0)  # ITK arrays are (k, j, i)
    assert np.abs(by_itk - ours).max() < 1e-4

    s_moving = sitk.ReadImage(str(root / "moving.nii.gz"), sitk.sitkFloat32)
    s_fixed = sitk.ReadImage(str(root / "fixed.nii.gz"), sitk.sitkFloat32)
    s_transform = sitk.ReadTransform(outputs.files["transform"])
    by_sitk = sitk.GetArrayFromImage(sitk.Resample(s_moving, s_fixed, s_transform, sitk.sitkLinear, 0.0)).transpose(2, 1, 0)
    assert np.abs(by_sitk - ours).max() < 1e-4


def test_itk_transform_points_follow_analytic_deformation_in_lps(analytic_run):
    root, outputs, _, _, fixed_pts, _ = analytic_run
    transform = itk.transformread(outputs.files["transform"])[0]
    s_transform = sitk.ReadTransform(outputs.files["transform"])
    flip = np.array([-1.0, -1.0, 1.0])
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = fixed_pts[tuple(rng.integers(0, n) for n in FIXED_SHAPE)]
        expected = analytic_transform(p) * flip
        assert np.abs(np.array(transform.TransformPoint((p * flip).tolist())) - expected).max() < 0.02
        assert np.abs(np.array(s_transform.TransformPoint((p * flip).tolist())) - expected).max() < 0.02


def test_displacement_nifti_read_by_simpleitk_is_the_same_transform(analytic_run):
    root, outputs, _, _, fixed_pts, _ = analytic_run
    field = sitk.ReadImage(outputs.files["displacement"], sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    flip = np.array([-1.0, -1.0, 1.0])
    p = fixed_pts[5, 7, 9]
    assert np.abs(np.array(transform.TransformPoint((p * flip).tolist())) - analytic_transform(p) * flip).max() < 0.02


def test_inverse_outputs_invert_the_forward_transform_in_mm(analytic_run):
    from monai_gradicon.metrics import PhysicalDisplacementField

    root, outputs, _, moving_affine, _, moving_pts = analytic_run
    forward = PhysicalDisplacementField.from_nifti(outputs.files["displacement"])
    inverse = PhysicalDisplacementField.from_nifti(outputs.files["inverse_displacement"])
    q = moving_pts.reshape(-1, 3)
    back = inverse(q)
    np.testing.assert_allclose(back, analytic_inverse(q), atol=0.02)
    # round trip only where T_BA(q) lands inside the fixed grid (elsewhere ITK semantics give u = 0)
    fixed_index = (back - analytic_run[2][:3, 3]) @ np.linalg.inv(analytic_run[2][:3, :3]).T
    inside = np.all((fixed_index >= 0) & (fixed_index <= np.array(FIXED_SHAPE) - 1), axis=1)
    assert inside.mean() > 0.3
    assert np.linalg.norm(forward(back[inside]) - q[inside], axis=1).max() < 0.03
    warped_fixed = nib.load(outputs.files["inverse_warped_fixed"])
    assert warped_fixed.shape == MOVING_SHAPE
    np.testing.assert_allclose(warped_fixed.affine, moving_affine, atol=1e-4)


def test_report_lists_files_and_folds(analytic_run):
    root, outputs, *_ = analytic_run
    with open(outputs.files["report"]) as f:
        report = json.load(f)
    assert report["forward"]["folds"] == 0 and report["inverse"]["folds"] == 0
    assert report["forward"]["jacobian_determinant_min"] > 0
    assert report["max_displacement_mm"] > 2.0
    for key in ("warped_moving", "displacement", "transform", "inverse_displacement", "inverse_transform"):
        assert os.path.isfile(report["files"][key])
    assert not [n for n in os.listdir(root / "out") if n.startswith(".monai-gradicon-partial")]


def test_swapped_pair_forward_is_the_inverse_and_composes_to_identity_in_mm(analytic_run, tmp_path):
    """Inverse consistency in mm: register(B, A)'s forward transform undoes register(A, B)'s (≤ 0.03 mm)."""
    from monai_gradicon.metrics import PhysicalDisplacementField
    from monai_gradicon.app import register

    root, outputs, fixed_affine, moving_affine, fixed_pts, _ = analytic_run
    model = analytic_model(moving_affine, MOVING_SHAPE, fixed_affine, FIXED_SHAPE, NETWORK_SHAPE, RAS_CONVENTION)
    swapped = register(root / "fixed.nii.gz", root / "moving.nii.gz", model, tmp_path / "swapped", progress=False)
    forward = PhysicalDisplacementField.from_nifti(outputs.files["displacement"])
    backward = PhysicalDisplacementField.from_nifti(swapped.files["displacement"])
    p = fixed_pts[2:-2, 2:-2, 2:-2].reshape(-1, 3)
    moved = forward(p)
    moving_index = (moved - moving_affine[:3, 3]) @ np.linalg.inv(moving_affine[:3, :3]).T
    inside = np.all((moving_index >= 0) & (moving_index <= np.array(MOVING_SHAPE) - 1), axis=1)
    assert inside.mean() > 0.3
    assert np.linalg.norm(backward(moved[inside]) - p[inside], axis=1).max() < 0.03
