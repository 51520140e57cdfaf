"""The MONAI Deploy application: SDK-free pipeline logic, and the app run in-process on a small pair.

The in-process app test needs ``monai-deploy-app-sdk==4.0.0`` (+ ``holoscan-cli==4.2.0`` and
``highdicom``, see README.md, "MONAI Deploy application"); it is skipped where the SDK is not importable.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from registration_helpers import blob_intensity, oblique_affine, save, world_points, write_tiny_bundle

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
    return folder, bundle, affine


def test_find_pair_and_resolve_model(tmp_path, input_folder):
    from monai_gradicon.deploy import find_pair, resolve_model

    folder, bundle, _ = input_folder
    assert set(find_pair(str(folder))) == {"moving", "fixed"}
    with pytest.raises(FileNotFoundError, match="must contain moving.nii.gz and fixed.nii.gz"):
        find_pair(str(tmp_path))
    assert resolve_model(bundle) == (bundle, None)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    assert resolve_model(str(weights)) == ("knee", str(weights))


def test_run_registration_writes_outputs_with_fixed_header(tmp_path, input_folder):
    from monai_gradicon.deploy import run_registration

    folder, bundle, affine = input_folder
    report = run_registration(str(folder), str(tmp_path / "out"), bundle, device="cpu")
    warped = nib.load(tmp_path / "out" / "warped_moving.nii.gz")
    field = nib.load(tmp_path / "out" / "displacement_mm.nii.gz")
    np.testing.assert_allclose(warped.affine, affine, atol=1e-4)
    np.testing.assert_allclose(field.affine, affine, atol=1e-4)
    assert field.shape == (*SHAPE, 1, 3) and field.header.get_intent()[0] == "displacement vector"
    assert report["forward"]["folds"] == 0


def test_deploy_app_runs_in_process(tmp_path, input_folder):
    if os.environ.get("MONAI_GRADICON_REQUIRE_DEPLOY") == "1":  # the deploy CI environment: must run
        import monai.deploy.core  # noqa: F401
    else:
        pytest.importorskip("monai.deploy.core", reason="monai-deploy-app-sdk is not installed in this environment")
    from monai_gradicon.deploy.app import GradICONRegistrationApp

    folder, bundle, affine = input_folder
    out = tmp_path / "app_out"
    GradICONRegistrationApp(["python", "-i", str(folder), "-o", str(out), "-m", bundle]).run()
    warped = nib.load(out / "warped_moving.nii.gz")
    field = nib.load(out / "displacement_mm.nii.gz")
    np.testing.assert_allclose(warped.affine, affine, atol=1e-4)
    assert warped.shape == SHAPE and field.shape == (*SHAPE, 1, 3)
    assert np.abs(np.asarray(field.dataobj)).max() < 0.05  # untrained bundle: identity
    with open(out / "report.json") as f:
        assert json.load(f)["bundle"] == "bundle"
    assert os.path.isfile(out / "transform.h5")
