"""The MONAI Deploy application: SDK-free pipeline logic, and the app run in-process on a small pair.

The bundle's weights deform (``write_random_weights``, ~3 mm), so "the outputs equal what ``register``
writes for the same pair" is a real check. The in-process app test (marker ``deploy_sdk``) needs
``monai-deploy-app-sdk==4.0.0`` (+ ``holoscan-cli==4.2.0`` and ``highdicom``, see README.md, "MONAI
Deploy application"); it runs in the separate deploy environment and is skipped where the SDK is not
importable, unless ``MONAI_GRADICON_REQUIRE_DEPLOY=1``.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from dependencies import REQUIRE_DEPLOY, require
from registration_helpers import blob_intensity, oblique_affine, read_field, save, world_points, write_random_weights, write_tiny_bundle

SHAPE = (22, 26, 18)


@pytest.fixture()
def input_folder(tmp_path):
    affine = oblique_affine()
    points = world_points(affine, SHAPE)
    centre = points.reshape(-1, 3).mean(0)
    folder = tmp_path / "input"
    folder.mkdir()
    save(str(folder / "fixed.nii.gz"), blob_intensity(points, centre), affine)
    save(str(folder / "moving.nii.gz"), blob_intensity(points, centre + np.array([2.0, 0.0, 0.0])), affine)
    bundle = write_tiny_bundle(str(tmp_path / "bundle"))
    write_random_weights(bundle)
    return folder, bundle, affine


def _same_as_register(out, folder, bundle, reference_dir, atol=1e-5):
    """The files in ``out`` equal those ``register`` writes for the pair of ``folder`` (and deform)."""
    from monai_gradicon.app import register

    expected = register(str(folder / "moving.nii.gz"), str(folder / "fixed.nii.gz"), bundle, reference_dir,
                        device="cpu", progress=False)
    field = read_field(str(out / "displacement_mm.nii.gz"))
    assert np.linalg.norm(field, axis=0).mean() > 1.0  # the weights deform: the comparison means something
    np.testing.assert_allclose(field, read_field(expected.files["displacement"]), atol=atol)
    np.testing.assert_allclose(read_field(str(out / "inverse_displacement_mm.nii.gz")),
                               read_field(expected.files["inverse_displacement"]), atol=atol)
    warped = np.asarray(nib.load(out / "warped_moving.nii.gz").dataobj)
    np.testing.assert_allclose(warped, np.asarray(nib.load(expected.files["warped_moving"]).dataobj), atol=atol)
    return expected


def test_find_pair_and_resolve_model(tmp_path, input_folder):
    from monai_gradicon.app.deploy import find_pair, resolve_model

    folder, bundle, _ = input_folder
    assert set(find_pair(str(folder))) == {"moving", "fixed"}
    with pytest.raises(FileNotFoundError, match="must contain moving.nii.gz and fixed.nii.gz"):
        find_pair(str(tmp_path))
    assert resolve_model(bundle) == (bundle, None)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    assert resolve_model(str(weights)) == ("knee", str(weights))


def test_run_registration_writes_outputs_with_fixed_header(tmp_path, input_folder, monkeypatch):
    from monai_gradicon.app.deploy import find_pair, run_registration

    folder, bundle, affine = input_folder
    monkeypatch.delenv("MONAI_GRADICON_IO_STEPS", raising=False)
    report = run_registration(find_pair(str(folder)), str(tmp_path / "out"), bundle, device="cpu")
    warped = nib.load(tmp_path / "out" / "warped_moving.nii.gz")
    field = nib.load(tmp_path / "out" / "displacement_mm.nii.gz")
    np.testing.assert_allclose(warped.affine, affine, atol=1e-4)
    np.testing.assert_allclose(field.affine, affine, atol=1e-4)
    assert field.shape == (*SHAPE, 1, 3) and field.header.get_intent()[0] == "displacement vector"
    expected = _same_as_register(tmp_path / "out", folder, bundle, tmp_path / "register")
    assert report["forward"] == expected.report["forward"] and report["instance_optimization"] is None
    assert report["moving"] == str(folder / "moving.nii.gz") and report["fixed"] == str(folder / "fixed.nii.gz")


def test_run_registration_reads_instance_optimisation_steps_from_the_environment(tmp_path, input_folder, monkeypatch):
    from monai_gradicon.app.deploy import find_pair, run_registration

    folder, bundle, _ = input_folder
    monkeypatch.setenv("MONAI_GRADICON_IO_STEPS", "2")
    report = run_registration(find_pair(str(folder)), str(tmp_path / "out"), bundle, device="cpu")
    assert report["instance_optimization"]["steps"] == 2
    assert report["instance_optimization"]["objective_after"] < report["instance_optimization"]["objective_before"]


def test_find_pair_lists_every_role_file_of_the_folder(input_folder):
    from monai_gradicon.app.deploy import find_pair

    folder, _, affine = input_folder
    image = np.asarray(nib.load(folder / "moving.nii.gz").dataobj)
    save(str(folder / "moving_labels.nii.gz"), (image > 0.6).astype(np.float32), affine)
    save(str(folder / "fixed_mask.nii"), np.ones(SHAPE, np.float32), affine)
    found = find_pair(str(folder))
    assert found == {"moving": str(folder / "moving.nii.gz"), "fixed": str(folder / "fixed.nii.gz"),
                     "moving_labels": str(folder / "moving_labels.nii.gz"), "fixed_mask": str(folder / "fixed_mask.nii")}


def test_run_registration_uses_every_file_it_is_handed(tmp_path, input_folder, monkeypatch):
    """The operator's role -> file mapping is used as given: files named otherwise, anywhere, and nothing dropped.

    A label map handed over is warped (its file is written); a mask handed to a bundle that uses none is
    refused (``InputError``, a user error), not ignored.
    """
    from monai_gradicon.app import InputError
    from monai_gradicon.app.deploy import run_registration

    folder, bundle, affine = input_folder
    monkeypatch.delenv("MONAI_GRADICON_IO_STEPS", raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    image = np.asarray(nib.load(folder / "moving.nii.gz").dataobj)
    labels = save(str(elsewhere / "segmentation.nii.gz"), (image > 0.6).astype(np.float32), affine)
    pair = {"moving": str(folder / "moving.nii.gz"), "fixed": str(folder / "fixed.nii.gz"), "moving_labels": labels}
    report = run_registration(pair, str(tmp_path / "out"), bundle, device="cpu")
    assert report["moving_labels"] == labels
    warped = np.asarray(nib.load(tmp_path / "out" / "warped_moving_labels.nii.gz").dataobj)
    assert set(np.unique(warped).tolist()) == {0, 1}
    mask = save(str(elsewhere / "mask.nii.gz"), np.ones(SHAPE, np.float32), affine)
    with pytest.raises(InputError, match="does not use masks"):
        run_registration(dict(pair, fixed_mask=mask), str(tmp_path / "refused"), bundle, device="cpu")


def test_run_registration_with_a_weights_file_for_the_bundle_named_by_the_environment(tmp_path, input_folder, monkeypatch):
    """``-m`` a weights file (or a folder with one): the bundle is ``MONAI_GRADICON_BUNDLE``'s, the weights the file's."""
    import shutil

    from monai_gradicon.app.deploy import find_pair, resolve_model, run_registration

    folder, bundle, _ = input_folder
    monkeypatch.delenv("MONAI_GRADICON_IO_STEPS", raising=False)
    monkeypatch.setenv("MONAI_GRADICON_BUNDLE", bundle)
    models = tmp_path / "models"
    models.mkdir()
    weights = shutil.copy(os.path.join(bundle, "models", "model.pt"), models / "deformer.pt")
    os.remove(os.path.join(bundle, "models", "model.pt"))  # only the handed-over file can make it deform
    assert resolve_model(str(models)) == (bundle, str(weights))
    report = run_registration(find_pair(str(folder)), str(tmp_path / "out"), str(models), device="cpu")
    assert report["weights"] == str(weights)
    shutil.copy(weights, os.path.join(bundle, "models", "model.pt"))
    _same_as_register(tmp_path / "out", folder, bundle, tmp_path / "register")


@pytest.mark.deploy_sdk
def test_deploy_app_runs_in_process(tmp_path, input_folder, monkeypatch):
    require("monai.deploy.core", REQUIRE_DEPLOY)
    from monai_gradicon.app.deploy.app import GradICONRegistrationApp

    folder, bundle, affine = input_folder
    monkeypatch.delenv("MONAI_GRADICON_IO_STEPS", raising=False)
    out = tmp_path / "app_out"
    GradICONRegistrationApp(["python", "-i", str(folder), "-o", str(out), "-m", bundle]).run()
    warped = nib.load(out / "warped_moving.nii.gz")
    field = nib.load(out / "displacement_mm.nii.gz")
    np.testing.assert_allclose(warped.affine, affine, atol=1e-4)
    np.testing.assert_allclose(field.affine, affine, atol=1e-4)
    assert warped.shape == SHAPE and field.shape == (*SHAPE, 1, 3)
    # the app may run on CUDA where the deploy environment has it: float tolerance against the CPU run
    expected = _same_as_register(out, folder, bundle, tmp_path / "register", atol=1e-3)
    with open(out / "report.json") as f:
        report = json.load(f)
    assert report["bundle"] == "bundle" and report["weights"] == expected.report["weights"]
    assert report["forward"]["folds"] == expected.report["forward"]["folds"]
    assert os.path.isfile(out / "transform.h5") and os.path.isfile(out / "inverse_transform.h5")
