"""Landmark TRE in mm through a physical displacement field, Dice of label maps, folder evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from registration_helpers import analytic_transform, oblique_affine, save, world_points

SHAPE = (30, 28, 24)


def _write_analytic_field(tmp_path):
    from monai_gradicon.io import write_displacement_nifti

    affine = oblique_affine()
    points = world_points(affine, SHAPE)
    u = np.moveaxis(analytic_transform(points) - points, -1, 0)
    path = write_displacement_nifti(u, affine, tmp_path / "u.nii.gz")
    return path, affine


def test_tre_of_analytic_deformation_equals_known_offset(tmp_path):
    """Moving landmarks = T(fixed landmarks) + a 2 mm offset -> every TRE is 2 mm (± 0.02 mm interpolation)."""
    from monai_gradicon.metrics import (
        PhysicalDisplacementField,
        landmarks_to_physical,
        read_landmarks,
        target_registration_error,
        tre_summary,
    )

    path, affine = _write_analytic_field(tmp_path)
    rng = np.random.default_rng(1)
    fixed_index = rng.uniform(4, np.array(SHAPE) - 5, size=(40, 3))
    fixed_mm = fixed_index @ affine[:3, :3].T + affine[:3, 3]
    offset = rng.normal(size=(40, 3))
    offset = 2.0 * offset / np.linalg.norm(offset, axis=1, keepdims=True)
    moving_mm = analytic_transform(fixed_mm) + offset
    # write them as DirLab-style 1-based voxel-index files (the moving image shares the grid here)
    moving_index = (moving_mm - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    np.savetxt(tmp_path / "fixed.txt", fixed_index + 1, delimiter="\t")
    np.savetxt(tmp_path / "moving.txt", moving_index + 1, delimiter="\t")
    fixed_read = landmarks_to_physical(read_landmarks(tmp_path / "fixed.txt"), affine=affine)
    moving_read = landmarks_to_physical(read_landmarks(tmp_path / "moving.txt"), affine=affine)
    errors = target_registration_error(fixed_read, moving_read, PhysicalDisplacementField.from_nifti(path))
    np.testing.assert_allclose(errors, 2.0, atol=0.02)
    summary = tre_summary(errors)
    assert abs(summary["mean"] - 2.0) < 0.02 and summary["count"] == 40
    # without the transform the errors are not the 2 mm offsets: the transform really was applied
    assert np.abs(np.linalg.norm(moving_read - fixed_read, axis=1) - 2.0).max() > 1.0


def test_tre_rejects_mismatched_landmark_counts():
    from monai_gradicon.metrics import target_registration_error

    with pytest.raises(ValueError, match="correspond one to one.*3 fixed and 4 moving"):
        target_registration_error(np.zeros((3, 3)), np.zeros((4, 3)), lambda p: p)


def test_dirlab_spacing_convention_is_lps_origin_zero():
    from monai_gradicon.metrics import landmarks_to_physical

    points = landmarks_to_physical(np.array([[1.0, 1.0, 1.0], [3.0, 2.0, 5.0]]), spacing=[0.625, 0.625, 2.5])
    np.testing.assert_allclose(points, [[0, 0, 0], [-1.25, -0.625, 10.0]])  # RAS of LPS (1.25, 0.625, 10)
    with pytest.raises(ValueError, match="exactly one"):
        landmarks_to_physical(np.ones((1, 3)))


def test_read_landmarks_rejects_ragged_files(tmp_path):
    from monai_gradicon.metrics import read_landmarks

    (tmp_path / "bad.txt").write_text("1 2 3\n4 5\n")
    with pytest.raises(ValueError, match="2 or 3 numbers"):
        read_landmarks(tmp_path / "bad.txt")


def test_label_dice_values():
    from monai_gradicon.metrics import label_dice, mean_label_dice

    reference = np.zeros((10, 10), int)
    reference[:5] = 1
    reference[5:, :4] = 2
    prediction = reference.copy()
    prediction[:5, :5] = 0  # half of label 1 lost
    scores = label_dice(prediction, reference)
    assert scores[1] == pytest.approx(2 * 25 / (25 + 50)) and scores[2] == 1.0
    assert mean_label_dice(prediction, reference) == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(ValueError, match="same shape"):
        label_dice(prediction[:5], reference)


def test_evaluate_folder_of_pairs(tmp_path):
    """evaluate_pairs on an identity registration: TRE equals the landmark offsets, Dice of identical labels is 1."""
    from monai_gradicon.metrics import evaluate_pairs
    from registration_helpers import blob_intensity, write_tiny_bundle

    affine = oblique_affine()
    shape = (22, 26, 18)
    points = world_points(affine, shape)
    image = blob_intensity(points, points.reshape(-1, 3).mean(0))
    save(str(tmp_path / "img.nii.gz"), image, affine)
    save(str(tmp_path / "lab.nii.gz"), (image > 0.6).astype(np.float32) + (image > 1.0), affine)
    bundle = write_tiny_bundle(str(tmp_path / "bundle"))
    index = np.array([[5.0, 6.0, 7.0], [10.0, 12.0, 9.0], [15.0, 20.0, 12.0]])
    np.savetxt(tmp_path / "f.txt", index)
    np.savetxt(tmp_path / "m.txt", index + [1.0, 0.0, 0.0])  # one voxel along i: 1.2 mm
    pairs = [{"name": "case1", "moving": "img.nii.gz", "fixed": "img.nii.gz", "moving_labels": "lab.nii.gz",
              "fixed_labels": "lab.nii.gz", "moving_landmarks": "m.txt", "fixed_landmarks": "f.txt"}]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    with pytest.warns(UserWarning):
        result = evaluate_pairs(str(tmp_path / "pairs.json"), str(tmp_path / "eval"), bundle=bundle, progress=False)
    case = result["pairs"][0]
    assert case["tre_forward"]["mean"] == pytest.approx(1.2, abs=0.01)
    assert case["tre_inverse"]["mean"] == pytest.approx(1.2, abs=0.01)
    assert case["dice_mean"] == pytest.approx(1.0)
    assert result["summary"]["mtre_forward"]["pairs"] == 1 and result["summary"]["folds_forward"] == 0
    assert (tmp_path / "eval" / "evaluation.json").is_file()
    np.savetxt(tmp_path / "m.txt", index[:2])
    with pytest.raises(ValueError, match="2 moving landmarks but 3 fixed"):
        evaluate_pairs(str(tmp_path / "pairs.json"), str(tmp_path / "eval2"), bundle=bundle, progress=False)
