"""``register`` end to end with a small test-only bundle: identity pair, swapped pair, instance optimisation."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from registration_helpers import blob_intensity, oblique_affine, save, world_points, write_random_weights, write_tiny_bundle

SHAPE = (22, 26, 18)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    affine = oblique_affine()
    points = world_points(affine, SHAPE)
    centre = points.reshape(-1, 3).mean(0)
    fixed = save(str(root / "fixed.nii.gz"), blob_intensity(points, centre), affine)
    moving = save(str(root / "moving.nii.gz"), blob_intensity(points, centre + np.array([3.0, -2.0, 0.0])), affine)
    labels = save(str(root / "labels.nii.gz"), (blob_intensity(points, centre + np.array([3.0, -2.0, 0.0])) > 0.6), affine)
    bundle = write_tiny_bundle(str(root / "bundle"))
    return root, moving, fixed, labels, bundle


def test_identity_pair_gives_near_zero_displacement_and_no_folds(pair):
    from monai_gradicon.register import register

    root, _, fixed, _, bundle = pair
    with pytest.warns(UserWarning, match="no trained weights"):
        outputs = register(fixed, fixed, bundle, root / "identity", progress=False)
    u = np.asarray(nib.load(outputs.files["displacement"]).dataobj)
    assert np.abs(u).max() < 0.05  # mm; zero-initialised last layer -> exactly the identity up to rounding
    assert outputs.report["forward"]["folds"] == 0 and outputs.report["inverse"]["folds"] == 0
    warped = np.asarray(nib.load(outputs.files["warped_moving"]).dataobj)
    original = np.asarray(nib.load(fixed).dataobj)
    assert np.abs(warped - original).max() < 1e-3


def test_swapping_moving_and_fixed_gives_the_inverse_output(pair, tmp_path):
    """register(B, A) must give, as its forward field, what register(A, B) wrote as its inverse.

    The bundle gets random last-layer weights (``models/model.pt``) so that the network deforms
    (> 0.3 mm); both runs see the same preprocessed images, so the fields agree to float rounding:
    tolerance 1e-3 mm. (That Φ_AB and Φ_BA compose to the identity in mm is checked with an exactly
    invertible deformation in test_register_itk_roundtrip.py.)
    """
    from monai_gradicon.metrics import PhysicalDisplacementField
    from monai_gradicon.register import register

    root, moving, fixed, _, _ = pair
    bundle = write_tiny_bundle(str(tmp_path / "weighted"))
    write_random_weights(bundle)
    ab = register(moving, fixed, bundle, tmp_path / "ab", progress=False)
    ba = register(fixed, moving, bundle, tmp_path / "ba", progress=False)
    assert ab.report["weights"] and ab.report["max_displacement_mm"] > 0.3
    inverse_of_ab = np.asarray(nib.load(ab.files["inverse_displacement"]).dataobj)
    forward_of_ba = np.asarray(nib.load(ba.files["displacement"]).dataobj)
    assert np.abs(inverse_of_ab - forward_of_ba).max() < 1e-3
    assert PhysicalDisplacementField.from_nifti(ba.files["displacement"]).displacement.shape == (3, *SHAPE)


def test_instance_optimisation_lowers_loss_and_restores_weights(pair):
    from monai_gradicon.instance_optimization import instance_optimize
    from monai_gradicon.register import PairGeometry, _to_network
    from monai_gradicon.io import load_image
    from monai_gradicon.registration_model import load_registration_model

    root, moving, fixed, _, bundle = pair
    model = load_registration_model(bundle, device="cpu")
    geometry = PairGeometry(SHAPE, model.spatial_shape, True)
    A = _to_network(load_image(moving).array, geometry, torch.device("cpu"))
    B = _to_network(load_image(fixed).array, geometry, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.network.state_dict().items()}
    objective = model.objective()
    result = instance_optimize(model.deformation, model.network, A, B, objective, steps=8, learning_rate=1e-3,
                               progress=False, generator=torch.Generator().manual_seed(0))
    assert result.final_loss < result.losses[0] - 1e-4
    after = model.network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.network.training
    with torch.no_grad():
        untouched = model.deformation(A, B).ddf()
    assert (result.phi_AB.ddf() - untouched).abs().max() > 1e-3  # the returned map is the optimised one


def test_register_writes_labels_report_and_overview(pair):
    from monai_gradicon.register import register

    root, moving, fixed, labels, bundle = pair
    outputs = register(moving, fixed, bundle, root / "full", moving_labels=labels, io_steps=2, overview=True, progress=False)
    warped_labels = nib.load(outputs.files["warped_moving_labels"])
    assert set(np.unique(np.asarray(warped_labels.dataobj)).tolist()) <= {0, 1}
    np.testing.assert_allclose(warped_labels.affine, oblique_affine(), atol=1e-4)
    with open(outputs.files["report"]) as f:
        report = json.load(f)
    assert report["instance_optimization"]["steps"] == 2
    assert report["instance_optimization"]["learning_rate"] == 2e-5
    for key in ("folds", "folds_percent", "jacobian_determinant_min", "jacobian_determinant_max"):
        assert key in report["forward"]
    assert {"before", "after"} <= set(report["similarity"]) and report["runtime_seconds"]["total"] > 0
    assert os.path.getsize(outputs.files["overview"]) > 1000
