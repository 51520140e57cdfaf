"""``register`` end to end with a small test-only bundle whose weights deform (``write_random_weights``).

Three pairs:

* ``pair``: moving and fixed on one oblique, anisotropic grid (the blob shifted by 3.6 mm);
* ``two_grids``: the moving image on another oblique grid of another shape, plus a label map;
* ``grid_pair``: both images on the network's own grid (diagonal affine, shape = network shape), so that
  the written fields can be compared, voxel for voxel, with the network called directly and with a
  numpy Jacobian determinant, without any code of ``monai_gradicon.app``.

Also: the weights policy (a bundle without weights is refused unless ``allow_untrained``), the same pair
stored with other axis codes, the masks reaching the network, and ``register_pairs`` on a datalist.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from registration_helpers import (
    AUTHORS_CONVENTION,
    RAS_CONVENTION,
    TINY_SHAPE,
    blob_intensity,
    jacobian_determinant_numpy,
    load_bundle_network,
    oblique_affine,
    read_field,
    sample_linear,
    save,
    world_points,
    write_large_files,
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


def test_untrained_bundle_is_refused_naming_the_weights_file(pair, tmp_path):
    """A bundle without its weights file is refused (no result, no output folder); the message names the file.

    With a ``large_files.yml`` that lists the file, the message also says where to download it from.
    """
    import re

    from monai_gradicon.app import MissingWeightsError, register

    root, moving, fixed = pair
    bundle = write_tiny_bundle(str(tmp_path / "untrained"))
    weights = os.path.join(bundle, "models", "model.pt")
    with pytest.raises(MissingWeightsError, match=re.escape(weights)) as refused:
        register(moving, fixed, bundle, tmp_path / "out", progress=False)
    assert "https://" not in str(refused.value)
    assert not (tmp_path / "out").exists()
    write_large_files(bundle, "https://example.org/w.pt")
    with pytest.raises(MissingWeightsError) as refused:
        register(moving, fixed, bundle, tmp_path / "out", progress=False)
    message = str(refused.value)
    assert "https://example.org/w.pt" in message and f"put it at {weights}" in message, message
    assert not (tmp_path / "out").exists()


def test_untrained_bundle_runs_when_allowed_and_the_report_says_it_is_not_a_registration(pair, tmp_path):
    from monai_gradicon.app import register

    root, moving, fixed = pair
    bundle = write_tiny_bundle(str(tmp_path / "untrained"))
    outputs = register(moving, fixed, bundle, tmp_path / "out", progress=False, allow_untrained=True)
    assert outputs.report["weights"] is None
    assert any("no trained weights" in note and "not a registration" in note for note in outputs.report["notes"])
    with open(outputs.files["report"]) as f:
        assert json.load(f)["notes"] == outputs.report["notes"]
    assert os.path.isfile(outputs.files["displacement"])


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
    from monai_gradicon.app import register

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
    from monai_gradicon.app import register

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
    from monai_gradicon.app import register

    root, moving, fixed, *_ = two_grids
    ab = register(moving, fixed, smooth_bundle, tmp_path / "ab", progress=False)
    ba = register(fixed, moving, smooth_bundle, tmp_path / "ba", progress=False)
    untrained = register(moving, fixed, write_tiny_bundle(str(tmp_path / "untrained")), tmp_path / "u0", progress=False,
                         allow_untrained=True)
    assert any("no trained weights" in note for note in untrained.report["notes"])
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
    from monai_gradicon.app import register

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
    from monai_gradicon.app import register

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
    from monai_gradicon.app import register

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
    from monai_gradicon.app import load_registration_model
    from monai_gradicon.app.instance_optimization import instance_optimize
    from monai_gradicon.io import load_image
    from monai_gradicon.transforms import PairGeometry

    root, moving, fixed = pair
    model = load_registration_model(smooth_bundle, device="cpu")
    image = load_image(moving)
    geometry = PairGeometry.from_affine(image.spatial_shape, image.affine, model.network_shape, **model.convention)
    A = geometry.to_network(image.array[None])
    B = geometry.to_network(load_image(fixed).array[None])
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
    from monai_gradicon.app import register

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
    resampling = report["resampling"]
    assert {k: resampling[k] for k in ("order", "align_corners", "axcodes")} == RAS_CONVENTION
    for key in ("moving", "fixed"):
        assert resampling[key]["align_corners"] is True and sorted(resampling[key]["network_axis_to_file_axis"]) == [0, 1, 2]
    assert report["axis_codes"]["network_input"] == "RAS"
    assert report["masks"] == {"policy": "unused", "moving": False, "fixed": False}


# --- the same anatomy stored with other axis codes -----------------------------------------------------

MOVING_FROM_FIXED = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]])  # fixed-layout index = P @ other-layout index + t


def _stored_differently(array: np.ndarray) -> np.ndarray:
    """``other[a, b, c] = array[b, N_j − 1 − a, c]``: axes 0 and 1 swapped, the new axis 0 read backwards."""
    return np.ascontiguousarray(np.flip(np.asarray(array).transpose(1, 0, 2), axis=0))


def _affine_stored_differently(affine: np.ndarray, shape) -> np.ndarray:
    to_fixed_layout = np.eye(4)
    to_fixed_layout[:3, :3], to_fixed_layout[:3, 3] = MOVING_FROM_FIXED, (0, shape[1] - 1, 0)
    return affine @ to_fixed_layout


@pytest.fixture(scope="module")
def reoriented_pair(tmp_path_factory, pair):
    """The moving image of ``pair`` stored a second time, transposed and flipped, with the affine that keeps its anatomy."""
    from monai_gradicon.transforms import axis_codes

    root, moving, fixed = pair
    other_root = tmp_path_factory.mktemp("reoriented")
    image = nib.load(moving)
    array, affine = np.asarray(image.dataobj, np.float64), image.affine
    other_affine = _affine_stored_differently(affine, array.shape)
    # the construction keeps every voxel where it was in mm
    other_points = world_points(other_affine, (array.shape[1], array.shape[0], array.shape[2]))
    points = world_points(affine, array.shape)
    np.testing.assert_allclose(other_points, np.stack([_stored_differently(points[..., i]) for i in range(3)], -1), atol=1e-9)
    assert axis_codes(other_affine) != axis_codes(affine) == "RAS"
    other = save(str(other_root / "moving_other_axes.nii.gz"), _stored_differently(array), other_affine)
    return moving, other, fixed, other_affine


@pytest.mark.parametrize("convention", [AUTHORS_CONVENTION, RAS_CONVENTION], ids=["authors", "ras"])
def test_moving_image_stored_with_other_axis_codes_gives_the_same_physical_result(reoriented_pair, tmp_path, convention):
    """A moving scan stored with permuted, flipped axes (same anatomy in mm) is registered exactly as if stored alike.

    ``register`` brings it to the bundle's axis codes (RAS), or with the authors' convention (no axis
    codes of its own) to the fixed image's, by a permutation and flips, no interpolation: the network
    sees the same arrays, so with deforming weights (mean displacement > 1 mm asserted) the forward
    displacement in mm and the warped image on the fixed grid are the same (1e-4 mm), and the inverse
    outputs on the moving grid are the alike-stored ones rearranged the same way. The report says the
    moving image was reoriented. Fails if the moving array reaches the network in its stored order, or
    if the way back from the network grid misses a flip or a permutation.
    """
    from monai_gradicon.app import register
    from monai_gradicon.transforms import axis_codes

    moving, other, fixed, other_affine = reoriented_pair
    bundle = write_tiny_bundle(str(tmp_path / "bundle"), convention=convention)
    write_random_weights(bundle)
    alike = register(moving, fixed, bundle, tmp_path / "alike", progress=False)
    moved = register(other, fixed, bundle, tmp_path / "other", progress=False)
    forward = read_field(alike.files["displacement"])
    assert np.linalg.norm(forward, axis=0).mean() > 1.0
    np.testing.assert_allclose(read_field(moved.files["displacement"]), forward, atol=1e-4)
    np.testing.assert_allclose(np.asarray(nib.load(moved.files["warped_moving"]).dataobj),
                               np.asarray(nib.load(alike.files["warped_moving"]).dataobj), atol=1e-5)
    inverse = read_field(alike.files["inverse_displacement"])
    np.testing.assert_allclose(read_field(moved.files["inverse_displacement"]),
                               np.stack([_stored_differently(c) for c in inverse]), atol=1e-4)
    np.testing.assert_allclose(np.asarray(nib.load(moved.files["inverse_warped_fixed"]).dataobj),
                               _stored_differently(np.asarray(nib.load(alike.files["inverse_warped_fixed"]).dataobj)), atol=1e-5)
    codes = moved.report["axis_codes"]
    assert codes["moving_stored"] == axis_codes(other_affine) != "RAS"
    assert codes["fixed_stored"] == "RAS" and codes["network_input"] == "RAS"
    assert codes["moving_reoriented"] is True and codes["fixed_reoriented"] is False
    assert alike.report["axis_codes"]["moving_reoriented"] is False
    assert moved.report["resampling"]["moving"]["flipped_file_axes"] != []
    assert {k: moved.report["resampling"][k] for k in ("order", "align_corners", "axcodes")} == convention


def test_both_images_stored_with_other_axis_codes_under_a_ras_bundle(reoriented_pair, tmp_path):
    """A RAS bundle brings the fixed image to RAS as well: its outputs are the alike-stored ones, rearranged.

    Moving and fixed are both stored with permuted, flipped axes (not RAS); the forward displacement and
    warped image (on the fixed grid) are those of the RAS-stored pair rearranged the same way (1e-4 mm),
    and the report says both images were reoriented to RAS.
    """
    from monai_gradicon.app import register

    moving, other, fixed, other_affine = reoriented_pair
    image = nib.load(fixed)
    other_fixed = save(str(tmp_path / "fixed_other_axes.nii.gz"), _stored_differently(np.asarray(image.dataobj)),
                       _affine_stored_differently(image.affine, image.shape))
    bundle = write_tiny_bundle(str(tmp_path / "bundle"), convention=RAS_CONVENTION)
    write_random_weights(bundle)
    alike = register(moving, fixed, bundle, tmp_path / "alike", progress=False)
    both = register(other, other_fixed, bundle, tmp_path / "both", progress=False)
    forward = read_field(alike.files["displacement"])
    assert np.linalg.norm(forward, axis=0).mean() > 1.0
    np.testing.assert_allclose(read_field(both.files["displacement"]), np.stack([_stored_differently(c) for c in forward]), atol=1e-4)
    np.testing.assert_allclose(np.asarray(nib.load(both.files["warped_moving"]).dataobj),
                               _stored_differently(np.asarray(nib.load(alike.files["warped_moving"]).dataobj)), atol=1e-5)
    np.testing.assert_allclose(read_field(both.files["inverse_displacement"]),
                               np.stack([_stored_differently(c) for c in read_field(alike.files["inverse_displacement"])]), atol=1e-4)
    codes = both.report["axis_codes"]
    assert codes["network_input"] == "RAS" and codes["moving_reoriented"] is True and codes["fixed_reoriented"] is True
    assert codes["fixed_stored"] == codes["moving_stored"] != "RAS"


# --- masks reach the network as image × (mask > 0) -----------------------------------------------------

APPLY_MASK = [{"_target_": "monai_gradicon.transforms.ApplyMaskd", "keys": "image", "mask_key": "mask", "required": True}]


@pytest.fixture(scope="module")
def masked_pair(tmp_path_factory, pair):
    """Masks (values 0 and 2) of the ``pair`` images, and the images multiplied by ``mask > 0`` as files."""
    root, moving, fixed = pair
    out = tmp_path_factory.mktemp("masked")
    files = {}
    for key, path in (("moving", moving), ("fixed", fixed)):
        image = nib.load(path)
        array = np.asarray(image.dataobj, np.float64)
        mask = 2.0 * (array > 0.3)
        assert 0.1 < (mask > 0).mean() < 0.9
        files[f"{key}_mask"] = save(str(out / f"{key}_mask.nii.gz"), mask, image.affine)
        files[f"{key}_masked"] = save(str(out / f"{key}_masked.nii.gz"), array * (mask > 0), image.affine)
    return moving, fixed, files


def test_required_masks_reach_the_network_as_image_times_mask(masked_pair, tmp_path):
    """With a ``"required"`` bundle, what the network sees is image × (mask > 0), resampled; so is the result.

    ``model.prepare`` of a scan with its mask (values 0 and 2: ``× mask`` would double the image) equals
    the network-grid resampling of ``image × (mask > 0)``, which differs from the unmasked image
    (asserted > 0.1); and ``register`` with the masks writes the field that a mask-free bundle with the
    same weights writes for the pre-multiplied files (1e-5 mm), which is not the field of the unmasked
    files (> 0.1 mm). Fails if the masks are dropped on the way, applied as ``× mask``, or to one image only.
    """
    from monai.data import MetaTensor

    from monai_gradicon.app import load_registration_model, register
    from monai_gradicon.io import load_image

    moving, fixed, files = masked_pair
    required = write_tiny_bundle(str(tmp_path / "required"), masks="required", intensity=APPLY_MASK)
    plain = write_tiny_bundle(str(tmp_path / "plain"))
    write_random_weights(required)
    write_random_weights(plain)

    model = load_registration_model(required, device="cpu")
    image, mask = load_image(moving), load_image(files["moving_mask"])
    scan = {"image": MetaTensor(image.array, affine=torch.as_tensor(image.affine)),
            "mask": MetaTensor(mask.array, affine=torch.as_tensor(mask.affine)), "axcodes": "RAS"}
    A, geometry, _ = model.prepare(scan)
    expected = geometry.to_network((image.array * (mask.array > 0))[None])
    torch.testing.assert_close(A, expected, rtol=1e-6, atol=1e-6)
    assert (A - geometry.to_network(image.array[None])).abs().max() > 0.1

    masked = register(moving, fixed, required, tmp_path / "masked", moving_mask=files["moving_mask"],
                      fixed_mask=files["fixed_mask"], progress=False)
    premultiplied = register(files["moving_masked"], files["fixed_masked"], plain, tmp_path / "pre", progress=False)
    unmasked = register(moving, fixed, plain, tmp_path / "unmasked", progress=False)
    field = read_field(masked.files["displacement"])
    np.testing.assert_allclose(field, read_field(premultiplied.files["displacement"]), atol=1e-5)
    np.testing.assert_allclose(read_field(masked.files["inverse_displacement"]),
                               read_field(premultiplied.files["inverse_displacement"]), atol=1e-5)
    assert np.abs(field - read_field(unmasked.files["displacement"])).max() > 0.1
    assert masked.report["masks"] == {"policy": "required", "moving": True, "fixed": True}
    assert masked.report["moving_mask"] == os.path.abspath(files["moving_mask"])


# --- a datalist of pairs -------------------------------------------------------------------------------


def test_register_pairs_writes_one_folder_per_pair_named_by_id_or_index(grid_pair, smooth_bundle, tmp_path):
    """``register_pairs`` registers each datalist entry into ``out/<id>`` (``out/<index>`` without an id).

    The first entry (with id and a label map) equals ``register`` called on it (1e-6 mm); the second
    (moving and fixed swapped, no id) goes to ``out/1`` and its forward field is the first's inverse.
    """
    from monai_gradicon.app import load_registration_model, register, register_pairs

    root, moving, fixed, affine = grid_pair
    labels = save(str(tmp_path / "labels.nii.gz"), (np.asarray(nib.load(moving).dataobj) > 0.6).astype(np.float32), affine)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"testing": [
        {"id": "first", "moving": moving, "fixed": fixed, "moving_label": labels},
        {"moving": fixed, "fixed": moving},
    ]}))
    model = load_registration_model(smooth_bundle, device="cpu")
    reports = register_pairs(model, str(datalist), str(tmp_path / "out"), section="testing", progress=False)
    assert len(reports) == 2 and sorted(os.listdir(tmp_path / "out")) == ["1", "first", "registrations.json", "summary.csv"]
    assert reports[0]["moving"] == moving and reports[1]["moving"] == fixed
    assert os.path.isfile(tmp_path / "out" / "first" / "warped_moving_labels.nii.gz")
    assert not os.path.exists(tmp_path / "out" / "1" / "warped_moving_labels.nii.gz")
    listing = json.loads((tmp_path / "out" / "registrations.json").read_text())
    assert [entry["id"] for entry in listing] == ["first", "1"]
    direct = register(moving, fixed, smooth_bundle, tmp_path / "direct", moving_labels=labels, progress=False)
    first = read_field(str(tmp_path / "out" / "first" / "displacement_mm.nii.gz"))
    assert np.linalg.norm(first, axis=0).mean() > 1.0
    np.testing.assert_allclose(first, read_field(direct.files["displacement"]), atol=1e-6)
    np.testing.assert_allclose(read_field(str(tmp_path / "out" / "1" / "displacement_mm.nii.gz")),
                               read_field(direct.files["inverse_displacement"]), atol=1e-3)
