"""Landmark TRE in mm through a physical displacement field, Dice of label maps, evaluation of a pair datalist."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from registration_helpers import analytic_inverse, analytic_model, analytic_transform, oblique_affine, save, world_points

SHAPE = (30, 28, 24)
MOVING_AFFINE = oblique_affine(spacing=(1.0, 1.4, 2.0), angles=(-0.15, 0.35, -0.3), origin=(-22.0, 10.0, 4.0))


def _write_analytic_field(tmp_path):
    from monai_gradicon.io import write_displacement_nifti

    affine = oblique_affine()
    points = world_points(affine, SHAPE)
    u = np.moveaxis(analytic_transform(points) - points, -1, 0)
    path = write_displacement_nifti(u, affine, tmp_path / "u.nii.gz")
    return path, affine


def _to_index(points_mm, affine):
    return (points_mm - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T


def test_tre_of_analytic_deformation_equals_known_offsets(tmp_path):
    """Moving landmarks = T(fixed landmarks) + offsets of known, different lengths -> each TRE is its offset.

    The moving landmarks are written as 1-based indices of another grid than the fixed ones (other
    rotation, spacing and origin), so reading them 0-based, placing them with the wrong affine, mixing
    up which set is mapped through T, or reordering the axes all change the errors by far more than the
    0.02 mm interpolation tolerance (each of those mistakes is computed below as a check of the test).
    """
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
    direction = rng.normal(size=(40, 3))
    lengths = rng.uniform(0.5, 3.0, size=40)
    offset = lengths[:, None] * direction / np.linalg.norm(direction, axis=1, keepdims=True)
    moving_mm = analytic_transform(fixed_mm) + offset
    # DirLab-style 1-based voxel-index files, each on its own image's grid
    np.savetxt(tmp_path / "fixed.txt", fixed_index + 1, delimiter="\t")
    np.savetxt(tmp_path / "moving.txt", _to_index(moving_mm, MOVING_AFFINE) + 1, delimiter="\t")
    fixed_read = landmarks_to_physical(read_landmarks(tmp_path / "fixed.txt"), affine=affine)
    moving_read = landmarks_to_physical(read_landmarks(tmp_path / "moving.txt"), affine=MOVING_AFFINE)
    np.testing.assert_allclose(fixed_read, fixed_mm, atol=1e-9)
    np.testing.assert_allclose(moving_read, moving_mm, atol=1e-9)
    field = PhysicalDisplacementField.from_nifti(path)
    errors = target_registration_error(fixed_read, moving_read, field)
    np.testing.assert_allclose(errors, lengths, atol=0.02)
    summary = tre_summary(errors)
    assert summary["mean"] == pytest.approx(lengths.mean(), abs=0.02) and summary["count"] == 40
    assert summary["p50"] == pytest.approx(np.median(lengths), abs=0.02)
    # the mistakes this test must catch all move the errors well beyond the tolerance
    wrong = {
        "no transform": np.linalg.norm(moving_read - fixed_read, axis=1),
        "roles swapped": target_registration_error(moving_read, fixed_read, field),
        "0-based read": target_registration_error(
            landmarks_to_physical(read_landmarks(tmp_path / "fixed.txt") + 1, affine=affine),
            landmarks_to_physical(read_landmarks(tmp_path / "moving.txt") + 1, affine=MOVING_AFFINE), field),
        "one affine for both": target_registration_error(
            fixed_read, landmarks_to_physical(read_landmarks(tmp_path / "moving.txt"), affine=affine), field),
        "axes reversed": target_registration_error(
            landmarks_to_physical(read_landmarks(tmp_path / "fixed.txt")[:, ::-1].copy(), affine=affine),
            landmarks_to_physical(read_landmarks(tmp_path / "moving.txt")[:, ::-1].copy(), affine=MOVING_AFFINE), field),
    }
    for name, values in wrong.items():
        assert np.abs(values - lengths).max() > 0.5, name


def test_tre_rejects_mismatched_landmark_counts():
    from monai_gradicon.metrics import target_registration_error

    with pytest.raises(ValueError, match="correspond one to one.*3 fixed and 4 moving"):
        target_registration_error(np.zeros((3, 3)), np.zeros((4, 3)), lambda p: p)


def test_dirlab_spacing_convention_is_lps_origin_zero():
    from monai_gradicon.metrics import landmarks_to_physical

    # three different voxel sizes and an asymmetric point: axis order, 1-based indices and LPS all show
    points = landmarks_to_physical(np.array([[1.0, 1.0, 1.0], [3.0, 2.0, 5.0]]), spacing=[0.6, 0.7, 2.5])
    np.testing.assert_allclose(points, [[0, 0, 0], [-1.2, -0.7, 10.0]])  # RAS of LPS (1.2, 0.7, 10)
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


FIXED_SHAPE = (22, 26, 18)
MOVING_SHAPE = (24, 20, 21)
NETWORK_SHAPE = (24, 28, 30)
CENTRE = np.array([-9.0, 20.0, 26.0])


def _analytic_case(tmp_path):
    """The pair of :func:`test_evaluate_datalist_of_pairs` (files in ``tmp_path``) and its exact expected values."""
    from monai_gradicon.metrics import label_dice
    from registration_helpers import blob_intensity

    fixed_affine = oblique_affine()
    moving_affine = oblique_affine(spacing=(1.0, 1.4, 2.0), angles=(-0.15, 0.35, -0.3), origin=(0.0, 0.0, 0.0))
    fixed_pts = world_points(fixed_affine, FIXED_SHAPE)
    moving_affine[:3, 3] = fixed_pts.reshape(-1, 3).mean(0) - moving_affine[:3, :3] @ ((np.array(MOVING_SHAPE) - 1) / 2.0)
    moving_pts = world_points(moving_affine, MOVING_SHAPE)
    save(str(tmp_path / "fixed.nii.gz"), blob_intensity(fixed_pts, CENTRE), fixed_affine)
    save(str(tmp_path / "moving.nii.gz"), 10.0 + blob_intensity(moving_pts, CENTRE), moving_affine)  # brighter: A
    fixed_blob = blob_intensity(fixed_pts, CENTRE + np.array([1.0, -2.0, 0.5]))
    moving_blob = blob_intensity(moving_pts, CENTRE + np.array([-1.5, 1.0, 2.0]))
    fixed_labels = (fixed_blob > 0.5).astype(np.float32) + (fixed_blob > 0.9)
    moving_labels = (moving_blob > 0.6).astype(np.float32) + (moving_blob > 1.0)
    save(str(tmp_path / "fixed_labels.nii.gz"), fixed_labels, fixed_affine)
    save(str(tmp_path / "moving_labels.nii.gz"), moving_labels, moving_affine)

    fixed_index = np.array([[8.0, 9.0, 7.0], [12.0, 14.0, 9.0], [14.0, 11.0, 10.0], [9.0, 15.0, 8.0], [11.0, 12.0, 11.0]])
    fixed_mm = fixed_index @ fixed_affine[:3, :3].T + fixed_affine[:3, 3]
    offsets = np.array([[0.5, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.5], [1.2, 1.6, 0.0], [0.0, 0.0, 0.0]])
    moving_mm = analytic_transform(fixed_mm) + offsets
    moving_index = _to_index(moving_mm, moving_affine)
    assert np.all((moving_index > 1) & (moving_index < np.array(MOVING_SHAPE) - 2))
    np.savetxt(tmp_path / "f.txt", fixed_index + 1)
    np.savetxt(tmp_path / "m.txt", moving_index + 1)

    expected = {
        "tre_forward": np.linalg.norm(offsets, axis=1),  # 0.5, 1, 1.5, 2, 0 mm
        "tre_inverse": np.linalg.norm(fixed_mm - analytic_inverse(moving_mm), axis=1),
        "tre_before": np.linalg.norm(moving_mm - fixed_mm, axis=1),
    }
    # what the mistakes would give instead: the forward map used for the inverse TRE, no registration
    assert np.linalg.norm(fixed_mm - analytic_transform(moving_mm), axis=1).mean() > expected["tre_inverse"].mean() + 1.0
    assert expected["tre_before"].mean() > expected["tre_forward"].mean() + 0.5
    # labels: moving labels at T(x), nearest neighbour, 0 beyond half a voxel outside (ITK)
    target = _to_index(analytic_transform(fixed_pts), moving_affine)
    inside = np.all((target >= -0.5) & (target <= np.array(MOVING_SHAPE) - 0.5), axis=-1)
    nearest = np.clip(np.rint(target).astype(int), 0, np.array(MOVING_SHAPE) - 1)
    warped = np.where(inside, moving_labels[nearest[..., 0], nearest[..., 1], nearest[..., 2]], 0)
    expected["dice"] = label_dice(warped, fixed_labels)
    entry = {"id": "case1", "moving": "moving.nii.gz", "fixed": "fixed.nii.gz", "moving_label": "moving_labels.nii.gz",
             "fixed_label": "fixed_labels.nii.gz", "moving_landmarks": "m.txt", "fixed_landmarks": "f.txt"}
    model = analytic_model(moving_affine, MOVING_SHAPE, fixed_affine, FIXED_SHAPE, NETWORK_SHAPE)
    return entry, model, expected, moving_index


def _check_case(case, expected):
    for key in ("tre_forward", "tre_inverse", "tre_before"):
        assert case[key]["mean"] == pytest.approx(expected[key].mean(), abs=0.02), key
        assert case[key]["p75"] == pytest.approx(np.percentile(expected[key], 75), abs=0.02), key
        assert case[key]["count"] == 5
    assert set(case["dice"]) == {"1", "2"}
    for label, value in expected["dice"].items():
        assert 0.2 < value < 0.95
        assert case["dice"][str(label)] == pytest.approx(value, abs=0.01), label
    assert case["dice_mean"] == pytest.approx(np.mean(list(expected["dice"].values())), abs=0.01)


def test_evaluate_datalist_of_pairs(tmp_path):
    """evaluate_pairs on the bundles' pair datalist and an exactly known registration: every TRE and Dice as computed.

    The pair is registered with :func:`registration_helpers.analytic_model` (the closed-form deformation
    ``T``) on two different oblique grids. Landmark offsets have different lengths, the landmark files
    are 1-based indices of their own grids, and the labels differ between the two images, so the
    expected values (from ``T``, ``T⁻¹`` and nearest-neighbour label sampling in numpy) are not 1, 0 or
    equal to each other: using the forward field for the inverse TRE, the fixed affine for the moving
    landmarks, 0-based indices, or unwarped labels changes them. The pair is registered into
    ``<out>/<id>``; evaluated again from that folder (``registration``, no bundle) it gives the same values.
    """
    from monai_gradicon.app import evaluate_pairs

    entry, model, expected, moving_index = _analytic_case(tmp_path)
    (tmp_path / "pairs.json").write_text(json.dumps({"testing": [entry]}))
    result = evaluate_pairs(str(tmp_path / "pairs.json"), str(tmp_path / "eval"), bundle=model, progress=False)
    case = result["pairs"][0]
    assert case["id"] == "case1" and case["registration"] == str(tmp_path / "eval" / "case1")
    assert os.path.isfile(tmp_path / "eval" / "case1" / "warped_moving_labels.nii.gz")
    _check_case(case, expected)
    summary = result["summary"]
    assert summary["mtre_forward"]["pairs"] == 1 and summary["mtre_forward"]["mean"] == pytest.approx(case["tre_forward"]["mean"])
    assert summary["folds_forward"] == 0 and summary["folds_inverse"] == 0
    with open(tmp_path / "eval" / "evaluation.json") as f:
        assert json.load(f)["pairs"][0]["tre_forward"] == case["tre_forward"]

    # the same pair from its registration folder, in another section, without a bundle and without images
    done = {k: v for k, v in entry.items() if k not in ("moving", "fixed")} | {"registration": "eval/case1"}
    (tmp_path / "done.json").write_text(json.dumps({"validation": [done]}))
    again = evaluate_pairs(str(tmp_path / "done.json"), str(tmp_path / "eval_again"), section="validation", progress=False)
    assert again["pairs"][0]["registration"] == str(tmp_path / "eval" / "case1")
    _check_case(again["pairs"][0], expected)
    assert sorted(os.listdir(tmp_path / "eval_again")) == ["evaluation.json"]  # nothing registered anew

    np.savetxt(tmp_path / "m.txt", moving_index[:2] + 1)
    with pytest.raises(ValueError, match="2 moving landmarks but 5 fixed"):
        evaluate_pairs(str(tmp_path / "pairs.json"), str(tmp_path / "eval2"), bundle=model, progress=False)


@pytest.mark.parametrize(
    "content, message",
    [
        ([{"moving": "moving.nii.gz", "fixed": "fixed.nii.gz"}], "has no section 'testing'"),
        ({"testing": [{"name": "case1", "moving": "moving.nii.gz", "fixed": "fixed.nii.gz"}]}, r"unknown key\(s\) \['name'\]"),
        ({"testing": [{"moving": "moving.nii.gz", "fixed": "fixed.nii.gz", "moving_labels": "moving.nii.gz"}]},
         r"unknown key\(s\) \['moving_labels'\]"),
        ({"testing": [{"moving": "moving.nii.gz", "fixed": "fixed.nii.gz", "fixed_labels": "fixed.nii.gz"}]},
         r"unknown key\(s\) \['fixed_labels'\]"),
        ({"testing": [{"moving": "moving.nii.gz", "fixed": "gone.nii.gz"}]}, "key 'fixed' .* file not found: .*gone.nii.gz"),
        ({"training": [{"moving": "moving.nii.gz", "fixed": "fixed.nii.gz"}]}, r"has no section 'testing' \(found: \['training'\]\)"),
    ],
    ids=["plain list", "old key name", "old key moving_labels", "old key fixed_labels", "missing file", "other section"],
)
def test_evaluate_refuses_datalists_outside_the_schema(tmp_path, content, message):
    """The old pairs-file keys (``name``, ``moving_labels``, ``fixed_labels``) and a plain list are refused, never ignored."""
    from monai_gradicon.app import evaluate_pairs

    for name in ("moving", "fixed"):
        save(str(tmp_path / f"{name}.nii.gz"), np.zeros((4, 4, 4)), np.eye(4))
    (tmp_path / "pairs.json").write_text(json.dumps(content))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        evaluate_pairs(str(tmp_path / "pairs.json"), str(tmp_path / "eval"), bundle="knee", progress=False)
    assert not (tmp_path / "eval").exists()


def test_evaluate_command_on_a_datalist(tmp_path, capsys):
    """``monai-gradicon evaluate --pairs`` on the datalist: exit 0, the summary printed, evaluation.json written.

    The pairs' existing registrations are evaluated (no bundle needed); a pair that has neither a
    registration nor a bundle to make one is one error line, exit 2.
    """
    from monai_gradicon.app import register
    from monai_gradicon.app.cli import main

    entry, model, expected, _ = _analytic_case(tmp_path)
    register(str(tmp_path / "moving.nii.gz"), str(tmp_path / "fixed.nii.gz"), model, tmp_path / "reg",
             moving_labels=str(tmp_path / "moving_labels.nii.gz"), progress=False)
    done = {k: v for k, v in entry.items() if k not in ("moving", "fixed")} | {"registration": "reg"}
    (tmp_path / "pairs.json").write_text(json.dumps({"testing": [done]}))
    assert main(["evaluate", "--pairs", str(tmp_path / "pairs.json"), "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["mtre_forward"]["mean"] == pytest.approx(expected["tre_forward"].mean(), abs=0.02)
    assert printed["dice_mean"]["mean"] == pytest.approx(np.mean(list(expected["dice"].values())), abs=0.01)
    with open(tmp_path / "eval" / "evaluation.json") as f:
        _check_case(json.load(f)["pairs"][0], expected)
    (tmp_path / "todo.json").write_text(json.dumps({"testing": [entry]}))
    assert main(["evaluate", "--pairs", str(tmp_path / "todo.json"), "--out", str(tmp_path / "eval2"), "--quiet"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("monai-gradicon: error:")]
    assert len(errors) == 1 and "give a bundle to register it" in errors[0], errors
