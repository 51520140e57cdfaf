"""``register`` end to end with a small test-only bundle whose weights deform (``write_random_weights``).

Three pairs:

* ``pair``: moving and fixed on one oblique, anisotropic grid (the blob shifted by 3.6 mm);
* ``two_grids``: the moving image on another oblique grid of another shape, plus a label map;
* ``grid_pair``: both images on the network's own grid (diagonal affine, shape = network shape), so that
  the written fields can be compared, voxel for voxel, with the network called directly and with a
  numpy Jacobian determinant, without any code of ``monai_gradicon.register``.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from registration_helpers import (
    TINY_SHAPE,
    blob_intensity,
    jacobian_determinant_numpy,
    load_bundle_network,
    oblique_affine,
    read_field,
    sample_linear,
    save,
    world_points,
    write_random_weights,
    write_tiny_bundle,
)

SHAPE = (22, 26, 18)
MOVING_SHAPE = (24, 20, 21)
GRID_SPACING = np.array([1.5, 1.2, 0.9])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    affine = oblique_affine()
    points = world_points(affine, SHAPE)
    centre = points.reshape(-1, 3).mean(0)
    fixed = save(str(root / "fixed.nii.gz"), blob_intensity(points, centre), affine)
    moving = save(str(root / "moving.nii.gz"), blob_intensity(points, centre + np.array([3.0, -2.0, 0.0])), affine)
    return root, moving, fixed


@pytest.fixture(scope="module")
def two_grids(tmp_path_factory):
    """Fixed on ``oblique_affine()`` (22×26×18); moving on another rotation, spacing and shape (24×20×21)."""
    root = tmp_path_factory.mktemp("two_grids")
    fixed_affine = oblique_affine()
    moving_affine = oblique_affine(spacing=(1.0, 1.4, 2.0), angles=(-0.15, 0.35, -0.3), origin=(0.0, 0.0, 0.0))
    fixed_pts = world_points(fixed_affine, SHAPE)
    centre = fixed_pts.reshape(-1, 3).mean(0)
    moving_affine[:3, 3] = centre - moving_affine[:3, :3] @ ((np.array(MOVING_SHAPE) - 1) / 2.0)
    moving_pts = world_points(moving_affine, MOVING_SHAPE)
    moving_blob = blob_intensity(moving_pts, centre + np.array([2.5, -1.5, 1.0]))
    fixed = save(str(root / "fixed.nii.gz"), blob_intensity(fixed_pts, centre), fixed_affine)
    moving = save(str(root / "moving.nii.gz"), moving_blob, moving_affine)
    labels = save(str(root / "labels.nii.gz"), (moving_blob > 0.6).astype(np.float32) + (moving_blob > 1.0), moving_affine)
    return root, moving, fixed, labels, moving_affine, fixed_affine


@pytest.fixture(scope="module")
def grid_pair(tmp_path_factory):
    """Both images on the network grid: RAS diagonal affine, shape ``TINY_SHAPE`` (= the bundle's network shape)."""
    root = tmp_path_factory.mktemp("grid_pair")
    affine = np.diag([*GRID_SPACING, 1.0])
    affine[:3, 3] = [-10.0, 4.0, 2.5]
    points = world_points(affine, TINY_SHAPE)
    centre = points.reshape(-1, 3).mean(0)
    fixed = save(str(root / "fixed.nii.gz"), blob_intensity(points, centre), affine)
    moving = save(str(root / "moving.nii.gz"), blob_intensity(points, centre + np.array([2.0, -3.0, 1.5])), affine)
    return root, moving, fixed, affine


def _bundle(root, kind: str = "smooth", std: float = 0.5, seed: int = 0, shape=TINY_SHAPE) -> str:
    bundle = write_tiny_bundle(str(root), shape=shape)
    write_random_weights(bundle, seed=seed, std=std, kind=kind)
    return bundle


@pytest.fixture(scope="module")
def smooth_bundle(tmp_path_factory):
    return _bundle(tmp_path_factory.mktemp("smooth_bundle"))


def _norm(path: str) -> np.ndarray:
    return np.linalg.norm(read_field(path), axis=0)


def test_untrained_bundle_warns_and_says_so_in_the_report(pair, tmp_path):
    from monai_gradicon.register import register

    root, moving, fixed = pair
    bundle = write_tiny_bundle(str(tmp_path / "untrained"))
    with pytest.warns(UserWarning, match="no trained weights"):
        outputs = register(moving, fixed, bundle, tmp_path / "out", progress=False)
    assert outputs.report["weights"] is None
    assert any("no trained weights" in note for note in outputs.report["notes"])


def test_identical_files_reach_the_network_as_identical_inputs(pair, tmp_path):
    """An image registered to itself gets zero displacement when the network maps equal inputs to zero.

    A GradICON network with arbitrary weights does *not* return the identity for two equal images (with
    the ``"smooth"`` random weights the identical pair moves by 4.2 mm on average, as much as the real
    pair); so here the weights are ``"antisymmetric"``: ``u = a·(moving − fixed)/10``. They deform the
    real pair (mean 2.7 mm, max 8.7 mm measured; asserted mean > 1 mm) and are exactly zero when the two
    network inputs agree voxel for voxel. The identical pair must then give < 1e-4 mm (measured 1.5e-6):
    this fails if ``register`` prepares the moving and the fixed image differently (orientation, resize,
    intensity) or if its conversion of a zero network field to mm on the oblique grid is not exactly 0.
    """
    from monai_gradicon.register import register

    root, moving, fixed = pair
    bundle = _bundle(tmp_path / "antisymmetric", kind="antisymmetric", std=2.0)
    real = register(moving, fixed, bundle, tmp_path / "real", progress=False)
    assert _norm(real.files["displacement"]).mean() > 1.0
    same = register(fixed, fixed, bundle, tmp_path / "same", progress=False)
    assert _norm(same.files["displacement"]).max() < 1e-4
    assert _norm(same.files["inverse_displacement"]).max() < 1e-4
    warped = np.asarray(nib.load(same.files["warped_moving"]).dataobj)
    assert np.abs(warped - np.asarray(nib.load(fixed).dataobj)).max() < 1e-5
    assert same.report["forward"]["folds"] == 0 and same.report["forward"]["jacobian_determinant_min"] > 0.9999


def test_instance_optimisation_on_an_identical_pair_approaches_the_identity(pair, tmp_path):
    """A real optimisation of the GradICON objective on (A, A) brings a deforming network back near the identity.

    The ``"smooth"`` random weights (on a 12×14×10 network grid, to keep 40 Adam steps at ~2 s) move
    the identical pair by 4.2 mm on average (asserted > 1 mm: the identity is not a given for a
    network that was not trained). 40 steps of instance optimisation (lr 1e-2) on that pair, inside
    ``register``, bring the mean displacement to 0.50 mm (ratio 0.12; seeds 1, 2: 0.13, 0.044;
    asserted < 0.3), the mean warped-image error from 0.148 to 0.012 (ratio 0.08, seeds 1, 2: 0.10,
    0.036; asserted < 0.3) and the objective from 0.475 to 0.013 (asserted < 0.2 of the start).
    This fails if the optimisation does not reach the written outputs, optimises another pair, or
    climbs instead of descending.
    """
    from monai_gradicon.register import register

    root, _, fixed = pair
    bundle = _bundle(tmp_path / "bundle", shape=(12, 14, 10))
    before = register(fixed, fixed, bundle, tmp_path / "before", progress=False)
    after = register(fixed, fixed, bundle, tmp_path / "after", io_steps=40, io_learning_rate=1e-2, progress=False)
    start, end = _norm(before.files["displacement"]).mean(), _norm(after.files["displacement"]).mean()
    assert start > 1.0
    assert end < 0.3 * start, (start, end)
    image = np.asarray(nib.load(fixed).dataobj)
    inner = (slice(2, -2),) * 3

    def warp_error(outputs):
        return np.abs(np.asarray(nib.load(outputs.files["warped_moving"]).dataobj) - image)[inner].mean()

    assert warp_error(after) < 0.3 * warp_error(before), (warp_error(before), warp_error(after))
    io = after.report["instance_optimization"]
    assert io["steps"] == 40 and io["objective_after"] < 0.2 * io["objective_before"], io
    assert after.report["similarity"]["after"] > before.report["similarity"]["after"]
    assert after.report["forward"]["folds"] == 0


def test_swapping_moving_and_fixed_gives_the_inverse_output(two_grids, smooth_bundle, tmp_path):
    """register(B, A) must give, as its forward field, what register(A, B) wrote as its inverse (and vice versa).

    Moving and fixed lie on different oblique grids of different shapes and fields of view, so even the
    untrained network's fields are ~10 mm (the two fields of view); what the ``"smooth"`` weights add on
    top is measured against that untrained run: mean 3.8 mm, max 9.8 mm (asserted mean > 1 mm). They
    deform differently for (A, B) and (B, A), so the files agree only if both runs put the same image
    in the same network slot and sample the result on the same grid: tolerance 1e-3 mm (measured 0).
    That Φ_AB and Φ_BA are one another's inverse in mm is checked with an exactly invertible deformation
    in test_register_itk_roundtrip.py; which of the two is the forward one, in
    ``test_written_fields_are_the_network_output_in_mm``.
    """
    from monai_gradicon.register import register

    root, moving, fixed, *_ = two_grids
    ab = register(moving, fixed, smooth_bundle, tmp_path / "ab", progress=False)
    ba = register(fixed, moving, smooth_bundle, tmp_path / "ba", progress=False)
    with pytest.warns(UserWarning, match="no trained weights"):
        untrained = register(moving, fixed, write_tiny_bundle(str(tmp_path / "untrained")), tmp_path / "u0", progress=False)
    assert ab.report["weights"]
    for key in ("displacement", "inverse_displacement"):
        network_part = np.linalg.norm(read_field(ab.files[key]) - read_field(untrained.files[key]), axis=0)
        assert network_part.mean() > 1.0, key
    inverse_of_ab = read_field(ab.files["inverse_displacement"])
    forward_of_ba = read_field(ba.files["displacement"])
    assert forward_of_ba.shape == (3, *MOVING_SHAPE)
    assert np.abs(inverse_of_ab - forward_of_ba).max() < 1e-3
    np.testing.assert_allclose(read_field(ba.files["inverse_displacement"]), read_field(ab.files["displacement"]), atol=1e-3)


def test_written_fields_are_the_network_output_in_mm(grid_pair, smooth_bundle, tmp_path):
    """On the network's own grid the written fields are the network's DDFs times the voxel size.

    The network is rebuilt from the bundle and called directly on the two image arrays (they already
    are its input: RAS, shape = network shape, ``align_corners=True``): ``forward(moving, fixed)`` gives
    Φ_AB, which must be ``displacement_mm / spacing``, and ``forward(fixed, moving)`` the inverse file
    (tolerance 1e-4 voxel, measured 3e-6). The DDFs reach 6.2 voxels and the two directions differ by
    up to 0.43 voxel (asserted > 0.1), so swapped directions, a lost sign or a wrong scale fail.
    """
    from monai_gradicon.register import register

    root, moving, fixed, affine = grid_pair
    outputs = register(moving, fixed, smooth_bundle, tmp_path / "out", progress=False)
    network = load_bundle_network(smooth_bundle)
    A = torch.from_numpy(np.asarray(nib.load(moving).dataobj, np.float32))[None, None]
    B = torch.from_numpy(np.asarray(nib.load(fixed).dataobj, np.float32))[None, None]
    with torch.no_grad():
        ddf_ab = network(A, B)[0].double().numpy()
        ddf_ba = network(B, A)[0].double().numpy()
    assert np.abs(ddf_ab - ddf_ba).max() > 0.1 and np.abs(ddf_ab).max() > 1.0
    spacing = GRID_SPACING.reshape(3, 1, 1, 1)
    np.testing.assert_allclose(read_field(outputs.files["displacement"]) / spacing, ddf_ab, atol=1e-4)
    np.testing.assert_allclose(read_field(outputs.files["inverse_displacement"]) / spacing, ddf_ba, atol=1e-4)


@pytest.mark.parametrize(
    "kind, std",
    [("smooth", 0.5), ("noisy", 0.1)],
    ids=["smooth-deforming", "folding"],
)
def test_fold_report_counts_the_negative_jacobians_of_the_written_fields(grid_pair, tmp_path, kind, std):
    """Folds, fold % and the determinant range of both directions equal a numpy count on the written fields.

    On the network grid, ``displacement_mm / spacing`` is the network DDF, so
    :func:`registration_helpers.jacobian_determinant_numpy` (``np.linalg.det`` of one-sided differences)
    gives the folds independently. ``"noisy"`` weights (std 0.1) really fold: 1649 forward and 1804
    inverse folds of 11,799 cells (seeds 1, 2: 1969/2021, 1237/1098; asserted > 100 each, and
    different, so the directions cannot be mixed up); ``"smooth"`` weights deform (max 6.9 mm, asserted > 1 mm) without a fold (det ≥ 0.61,
    asserted > 0.5). The determinants agree with the report to 1e-5.
    """
    from monai_gradicon.register import register

    root, moving, fixed, _ = grid_pair
    bundle = _bundle(tmp_path / "bundle", kind=kind, std=std)
    outputs = register(moving, fixed, bundle, tmp_path / "out", progress=False)
    spacing = GRID_SPACING.reshape(3, 1, 1, 1)
    counts = {}
    for direction, key in (("forward", "displacement"), ("inverse", "inverse_displacement")):
        det = jacobian_determinant_numpy(read_field(outputs.files[key]) / spacing)
        reported = outputs.report[direction]
        counts[direction] = int((det < 0).sum())
        assert reported["folds"] == counts[direction], (direction, reported["folds"], counts[direction])
        assert reported["folds_percent"] == pytest.approx(100.0 * counts[direction] / det.size, rel=1e-9)
        assert reported["jacobian_determinant_min"] == pytest.approx(det.min(), abs=1e-4)
        assert reported["jacobian_determinant_max"] == pytest.approx(det.max(), abs=1e-4)
    assert outputs.report["max_displacement_mm"] == pytest.approx(_norm(outputs.files["displacement"]).max(), rel=1e-5)
    if kind == "noisy":
        assert counts["forward"] > 100 and counts["inverse"] > 100
        assert counts["forward"] != counts["inverse"]
    else:
        assert counts == {"forward": 0, "inverse": 0}
        assert outputs.report["max_displacement_mm"] > 1.0 and outputs.report["forward"]["jacobian_determinant_min"] > 0.5


def test_written_images_and_labels_follow_the_written_displacement(two_grids, smooth_bundle, tmp_path):
    """The warped image, warped labels and inverse-warped image are the inputs sampled at ``x + u(x)``.

    Checked with scipy on every output voxel whose target lies inside the other grid (85 % and 83 %;
    asserted > 30 %): trilinear intensities to 1e-4 (measured 4e-7; with the displacement's sign lost
    the error is 1.06), nearest-neighbour labels equal on 100 % of the voxels (asserted ≥ 99.9 %: ties
    may round either way). This fails if the displacement file and the warped files disagree (a lost
    sign, a field written on the wrong grid), and
    :class:`~monai_gradicon.metrics.PhysicalDisplacementField` must read the file back as ``p + u``.
    """
    from monai_gradicon.metrics import PhysicalDisplacementField
    from monai_gradicon.register import register

    root, moving, fixed, labels, moving_affine, fixed_affine = two_grids
    outputs = register(moving, fixed, smooth_bundle, tmp_path / "out", moving_labels=labels, progress=False)
    cases = [
        ("displacement", "warped_moving", fixed_affine, SHAPE, moving, moving_affine, MOVING_SHAPE),
        ("inverse_displacement", "inverse_warped_fixed", moving_affine, MOVING_SHAPE, fixed, fixed_affine, SHAPE),
    ]
    for field_key, warped_key, source_affine, source_shape, target, target_affine, target_shape in cases:
        u = read_field(outputs.files[field_key])
        assert u.shape == (3, *source_shape)
        points = world_points(source_affine, source_shape).reshape(-1, 3)
        mapped = points + u.reshape(3, -1).T
        index = (mapped - target_affine[:3, 3]) @ np.linalg.inv(target_affine[:3, :3]).T
        inside = np.all((index >= 0) & (index <= np.array(target_shape) - 1), axis=1)
        assert inside.mean() > 0.3
        expected = sample_linear(np.asarray(nib.load(target).dataobj), index[inside])
        warped = np.asarray(nib.load(outputs.files[warped_key]).dataobj).reshape(-1)
        assert np.abs(warped[inside] - expected).max() < 1e-4, field_key
        field = PhysicalDisplacementField.from_nifti(outputs.files[field_key])
        np.testing.assert_allclose(field(points), mapped, atol=1e-5)
        if field_key == "displacement":
            expected_labels = sample_linear(np.asarray(nib.load(labels).dataobj), index[inside], order=0)
            warped_labels = np.asarray(nib.load(outputs.files["warped_moving_labels"]).dataobj).reshape(-1)[inside]
            assert len(np.unique(expected_labels)) == 3
            assert (warped_labels == expected_labels).mean() > 0.999


def test_instance_optimisation_lowers_loss_and_restores_weights(pair, smooth_bundle):
    from monai_gradicon.instance_optimization import instance_optimize
    from monai_gradicon.io import load_image
    from monai_gradicon.register import PairGeometry, _to_network
    from monai_gradicon.registration_model import load_registration_model

    root, moving, fixed = pair
    model = load_registration_model(smooth_bundle, device="cpu")
    geometry = PairGeometry.for_image(load_image(moving), model)
    A = _to_network(load_image(moving).array, geometry, torch.device("cpu"))
    B = _to_network(load_image(fixed).array, geometry, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.network.state_dict().items()}
    objective = model.objective()
    result = instance_optimize(model.deformation, model.network, A, B, objective, steps=8, learning_rate=1e-3,
                               progress=False, generator=torch.Generator().manual_seed(0))
    assert result.final_loss < 0.9 * result.losses[0]
    after = model.network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.network.training
    with torch.no_grad():
        untouched = model.deformation(A, B).ddf()
    assert untouched.abs().max() > 1.0  # the restored weights are the deforming ones
    assert (result.phi_AB.ddf() - untouched).abs().max() > 1e-2  # the returned map is the optimised one


def test_register_writes_labels_report_and_overview(two_grids, smooth_bundle, tmp_path):
    from monai_gradicon.register import register

    root, moving, fixed, labels, moving_affine, fixed_affine = two_grids
    outputs = register(moving, fixed, smooth_bundle, tmp_path / "full", moving_labels=labels, io_steps=2, overview=True,
                       progress=False)
    warped_labels = nib.load(outputs.files["warped_moving_labels"])
    assert warped_labels.shape == SHAPE
    assert set(np.unique(np.asarray(warped_labels.dataobj)).tolist()) == {0, 1, 2}
    np.testing.assert_allclose(warped_labels.affine, fixed_affine, atol=1e-4)
    with open(outputs.files["report"]) as f:
        report = json.load(f)
    assert report == json.loads(json.dumps(outputs.report))
    assert report["instance_optimization"]["steps"] == 2
    assert report["instance_optimization"]["learning_rate"] == 2e-5
    np.testing.assert_allclose(report["moving_affine_ras"], moving_affine, atol=1e-5)
    np.testing.assert_allclose(report["fixed_affine_ras"], fixed_affine, atol=1e-5)
    assert report["forward"]["folds"] == 0 and 0 < report["forward"]["jacobian_determinant_min"] < 1
    assert -1 <= report["similarity"]["before"] <= 1 and -1 <= report["similarity"]["after"] <= 1
    assert report["runtime_seconds"]["total"] >= report["runtime_seconds"]["network"] > 0
    assert set(report["files"]) == {*outputs.files, "report"}
    assert os.path.getsize(outputs.files["overview"]) > 1000
