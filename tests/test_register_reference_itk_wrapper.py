"""``register``'s ITK outputs against the authors' own ``icon_registration.itk_wrapper.register_pair`` (1.1.9).

An oracle that shares no code with ``register``. The reference network — ``TwoStepRegistration(
DownsampleRegistration(FunctionFromVectorField(tallUNet2)), FunctionFromVectorField(tallUNet2))`` inside
``GradientICONSparse(LNCC(σ=5), λ=1.5)``: the two-step version of the released knee/lung layout, on a
36×40×38 network grid so that the file runs in about 30 s of CPU time — gets random weights that really
deform (all parameters perturbed, the last conv of tallUNet2 is zero-initialised). Its
``regis_net.state_dict()`` is saved with ``torch.save``, the released ``.trch`` format, and reaches our
side only by the public path a user takes: ``register(moving, fixed, <bundle dir>, weights=<that .trch>)``.
The bundle directory's ``configs/inference.json`` defines a ``registration_model`` whose scan
preprocessing is a single ``ToNetworkGridd`` in the authors' resampling convention (``order="itk"`` =
ITK-array axis order, ``align_corners=False``, ``axcodes=None``: stored axis codes, the same for both
images here). The reference reads the same NIfTI files with ``itk.imread(path, itk.F)`` (LPS). Both
images are oblique and anisotropic, on grids that differ from each other and from the network grid
(shape, spacing, direction, origin). No intensity transform on our side; ``register_pair`` does none, so
both networks see the same raw intensities. Instance optimisation is off except in the last test.

Points are voxel centres ≥ 2 voxels inside the image the transform is defined on: our ``transform.h5``
is a displacement field on the fixed voxels, exact there and linearly interpolated in between.

* "the authors' Φ_AB" is the authors' returned ``phi_AB`` (an ITK ``CompositeTransform``
  ``[CenteredAffine to moving, DisplacementField, inverse CenteredAffine from fixed]``) with its middle
  displacement field replaced by their own map ``model.phi_AB``, the Python closure that
  ``register_pair`` samples on the network grid: what their network computes, at any point. At the
  network nodes it equals their returned transform (the oracle's self-check, measured 5e-6 mm).
  Ours vs it: tolerance 1e-4 mm (measured ≤ 1.5e-5 mm, float32 maps), forward (fixed voxels) and
  inverse (moving voxels). The part of the displacement that the network contributes, beyond the
  fixed-box → moving-box alignment of the two ``CenteredAffine`` transforms, is checked to be ≥ 2 mm
  (measured max 4.1 mm, mean 1.6 mm; ≈ 6 network voxels at most).
* The warped moving image vs ITK's ``LinearInterpolateImageFunction`` of the moving image at the points
  of the authors' Φ_AB, where they land ≥ 1 voxel inside it: tolerance 1e-5 (measured 1.2e-6; range 1.8).
* The authors' returned ``CompositeTransform`` itself (``TransformPoint``) and
  ``itk.resample_image_filter(image_A, transform=phi_AB, use_reference_image=True, reference_image=image_B)``.
  For a multi-step network their displacement field holds the composed map sampled at the network nodes
  only, and ITK interpolates it linearly in between, whereas ``register`` evaluates the composition
  exactly at each fixed voxel. Between nodes the two differ by that interpolation of the composed field
  (measured up to 0.49 mm here, 0.054 in the warped image: the random weights make a rough field) — a
  property of the authors' output, not a defect; the two-step test therefore bounds ours by their own
  interpolation error + 1e-4 mm. With a one-step network nothing is composed and their outputs are exact:
  tolerance 5e-5 mm on ``TransformPoint`` (measured 5.8e-6 mm), 1e-5 on the warped image (measured 4.8e-7).
* Instance optimisation, 2 Adam steps at lr 2e-5 (ours ``io_steps=2``, theirs ``finetune_steps=2``): the
  GradICON perturbation is made identical by seeding — ours draws it from
  ``torch.Generator().manual_seed(seed)``, the reference from the global RNG, ``torch.manual_seed(seed)``
  just before ``register_pair``, in the same shape and order. With the U-Nets in the reference's memory
  layout (``channels_last: false`` in the bundle's network) tolerance 2.5e-4 mm (measured 2.7e-5 mm);
  the two steps change the result by 1.3 mm, checked ≥ 50× the tolerance. In the default channels-last
  layout the convolutions round differently and Adam turns that into ±lr steps of near-zero gradients:
  tolerance 1e-2 mm (measured 2.2e-3 mm; 0.05 voxel would be 0.04 mm), also ≥ 50× below the change.

Defects injected into ``register`` make these tests fail by far more: ``align_corners`` flipped in the
resize to the network grid 0.066 mm; axes not reversed 5.4 mm; ``N`` for ``N − 1`` in the network-grid
scaling 1.3–1.6 mm; a sign flip of the written displacement 44 mm, of the network's displacement 8 mm
(measured before the application layer moved to ``monai_gradicon.app``). Re-measured on the bundle-driven
pipeline, in a private copy of the repository: ``align_corners`` flipped in
``PairGeometry.from_affine`` (resize and coordinates alike) 0.47 mm forward, 0.72 mm inverse, 0.034 in
the warped image; axis order ``"file"`` for ``"itk"`` 5.4 mm forward, 6.4 mm inverse, 0.36 in the warped image. Writing
``align_corners: true`` or ``order: "file"`` into the bundle instead is refused outright: these ``.trch``
weights are in the authors' release format, which ``RegistrationModel`` accepts only under their convention.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from dependencies import require_itk, require_reference
from registration_helpers import (
    AUTHORS_CONVENTION,
    blob_intensity,
    grid_transform,
    oblique_affine,
    registration_model_item,
    save,
    world_points,
)

itk = require_itk()
icon = require_reference()

import icon_registration.losses as icon_losses  # noqa: E402
from icon_registration import config as icon_config  # noqa: E402
from icon_registration import itk_wrapper  # noqa: E402

from reference_oracle import authors_exact_map, reference_network, transform_points  # noqa: E402

FIXED_SHAPE = (30, 26, 22)  # nibabel (i, j, k)
MOVING_SHAPE = (27, 31, 20)
NETWORK_SHAPE = (36, 40, 38)  # the reference identity map's spatial shape = ITK array order (k, j, i)
TWO_STEP = (1, 0)  # halvings per step: half resolution, then full resolution
ONE_STEP = (0,)
WEIGHT_STD = 0.03
SEED = 0
LPS = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS
N_POINTS = 200
BORDER = 2  # voxels kept away from the image border

POINT_TOL_MM = 1e-4  # measured ≤ 1.5e-5 mm
DIRECT_TOL_MM = 5e-5  # measured 5.8e-6 mm
NODE_TOL_MM = 5e-5  # measured 5.4e-6 mm (the oracle's self-check)
IMAGE_TOL = 1e-5  # measured ≤ 1.2e-6 (intensity range ≈ 1.9)
IO_TOL_MM = 2.5e-4  # measured ≤ 3.5e-5 mm, the reference's layout
IO_CHANNELS_LAST_TOL_MM = 1e-2  # measured 2.2e-3 mm


def _write_pair(root) -> dict:
    fixed_affine = oblique_affine(spacing=(1.3, 0.8, 2.1), angles=(0.3, -0.2, 0.25), origin=(-20.0, 14.0, 7.5))
    moving_affine = oblique_affine(spacing=(1.1, 0.95, 1.8), angles=(-0.15, 0.35, -0.3), origin=(0.0, 0.0, 0.0))
    fixed_pts = world_points(fixed_affine, FIXED_SHAPE)
    # the moving box overlaps the fixed one, offset by a few mm
    centre = fixed_pts.reshape(-1, 3).mean(0)
    moving_affine[:3, 3] = centre - moving_affine[:3, :3] @ ((np.array(MOVING_SHAPE) - 1) / 2.0) + [1.5, -2.0, 1.0]
    moving_pts = world_points(moving_affine, MOVING_SHAPE)
    save(str(root / "fixed.nii.gz"), blob_intensity(fixed_pts, centre), fixed_affine)
    save(str(root / "moving.nii.gz"), blob_intensity(moving_pts, centre + np.array([3.0, -2.0, 2.5])), moving_affine)
    return {"fixed_affine": fixed_affine, "moving_affine": moving_affine}


def _write_bundle(folder, levels, convention=None, channels_last=True) -> str:
    """A bundle directory stating the authors' convention; its network is our P-step network (no intensity transform)."""
    os.makedirs(os.path.join(folder, "configs"), exist_ok=True)
    config = {
        "network_def": {
            "_target_": "monai_gradicon.networks.multistep_network",
            "spatial_dims": 3,
            "levels": list(levels),
            "channels_last": channels_last,
        },
        "weights_file": "$@bundle_root + '/models/model.pt'",
        "allow_untrained": False,
        "scan_preprocessing": [grid_transform(NETWORK_SHAPE, convention or AUTHORS_CONVENTION)],
        "registration_model": registration_model_item(os.path.basename(str(folder)), lmbda=1.5, lncc_sigma=5, sparse=True),
    }
    with open(os.path.join(folder, "configs", "inference.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


def _reference_model(levels, weights_path):
    """The authors' network with random weights that deform; the weights saved as a released ``.trch``."""
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        regis_net = reference_network(3, levels)
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for p in regis_net.parameters():  # the last conv of tallUNet2 is zero: perturb everything
            p.add_(torch.randn(p.shape, generator=generator) * WEIGHT_STD)
    torch.save(regis_net.state_dict(), weights_path)
    model = icon_losses.GradientICONSparse(regis_net, icon.LNCC(sigma=5), 1.5)
    model.assign_identity_map([1, 1, *NETWORK_SHAPE])
    model.eval()
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # both sides on one thread (2 threads on 2 shared cores are slower)
    root = tmp_path_factory.mktemp("reference_itk_wrapper")
    geometry = _write_pair(root)
    image_A = itk.imread(str(root / "moving.nii.gz"), itk.F)
    image_B = itk.imread(str(root / "fixed.nii.gz"), itk.F)
    yield {"root": root, "image_A": image_A, "image_B": image_B, **geometry}
    _RUNS.clear()
    _REFERENCE_RUNS.clear()
    torch.set_num_threads(threads)


_RUNS: dict = {}
_REFERENCE_RUNS: dict = {}


def _reference_run(pair, levels, io_steps: int) -> dict:
    """The authors' side on the pair (cached): ``register_pair`` with the weights saved as a released ``.trch``."""
    key = (tuple(levels), io_steps)
    if key not in _REFERENCE_RUNS:
        weights = str(pair["root"] / f"steps{''.join(map(str, levels))}.trch")
        model = _reference_model(levels, weights)
        device = icon_config.device
        icon_config.device = torch.device("cpu")
        try:
            with torch.random.fork_rng():
                torch.manual_seed(SEED)  # the reference's GradICON perturbation: the global RNG
                phi_AB, phi_BA = itk_wrapper.register_pair(
                    model, pair["image_A"], pair["image_B"], finetune_steps=io_steps or None, learning_rate=2e-5
                )
        finally:
            icon_config.device = device
        # the authors' maps on [0, 1] network coordinates (closures of the last forward pass)
        _REFERENCE_RUNS[key] = {"model": model, "weights": weights, "phi_AB": phi_AB, "phi_BA": phi_BA, "map_AB": model.phi_AB, "map_BA": model.phi_BA}
    return _REFERENCE_RUNS[key]


def _run(pair, levels, io_steps: int = 0, channels_last: bool = True) -> dict:
    """Both sides on the pair (cached): ours through ``register``, theirs through ``register_pair``."""
    key = (tuple(levels), io_steps, channels_last)
    if key in _RUNS:
        return _RUNS[key]
    from monai_gradicon.app import register

    reference = _reference_run(pair, levels, io_steps)
    root = pair["root"]
    name = "steps" + "".join(map(str, levels)) + ("" if channels_last else "_reference_layout")
    ours = register(
        root / "moving.nii.gz",
        root / "fixed.nii.gz",
        _write_bundle(root / f"bundle_{name}", levels, channels_last=channels_last),
        root / f"out_{name}_io{io_steps}",
        weights=reference["weights"],
        io_steps=io_steps,
        io_learning_rate=2e-5,
        device="cpu",
        progress=False,
        seed=SEED,
    )
    run = {
        **reference,
        "ours": ours,
        "transform": itk.transformread(ours.files["transform"])[0],
        "inverse_transform": itk.transformread(ours.files["inverse_transform"])[0],
    }
    _RUNS[key] = run
    return run


def _interior_voxels(shape, count=None, seed=0) -> np.ndarray:
    index = np.stack(np.meshgrid(*[np.arange(BORDER, n - BORDER) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    if count is not None:
        index = index[np.random.default_rng(seed).choice(len(index), count, replace=False)]
    return index.astype(np.float64)


def _lps(affine, index) -> np.ndarray:
    return (index @ affine[:3, :3].T + affine[:3, 3]) * LPS


def _inside(points_lps, affine, shape, margin) -> np.ndarray:
    index = (points_lps * LPS - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    return np.all((index >= margin) & (index <= np.array(shape) - 1 - margin), axis=1)


def test_forward_transform_matches_authors_phi_AB_at_fixed_voxels(pair):
    run = _run(pair, TWO_STEP)
    points = _lps(pair["fixed_affine"], _interior_voxels(FIXED_SHAPE, N_POINTS))
    expected, box_only = authors_exact_map(run["phi_AB"], run["map_AB"], points, NETWORK_SHAPE)
    ours = transform_points(run["transform"], points)
    network_part = np.linalg.norm(expected - box_only, axis=1)
    assert network_part.max() > 2.0 and network_part.mean() > 0.5  # the network really deforms (mm)
    model = run["model"]
    voxels = (model.phi_AB_vectorfield - model.identity_map) * (torch.tensor(NETWORK_SHAPE) - 1.0).reshape(1, 3, 1, 1, 1)
    assert voxels.abs().max() > 3.0  # several network voxels (measured ≈ 6)
    error = np.linalg.norm(ours - expected, axis=1)
    assert error.max() < POINT_TOL_MM, f"max |ours - authors' Φ_AB| = {error.max():.3g} mm"


def test_authors_itk_composite_equals_their_map_at_network_nodes(pair):
    """The oracle itself: at the network nodes the authors' sampled field is their map (no interpolation)."""
    run = _run(pair, TWO_STEP)
    to_fixed = itk_wrapper.resampling_transform(pair["image_B"], list(reversed(NETWORK_SHAPE)))
    nodes = _interior_voxels(tuple(reversed(NETWORK_SHAPE)), N_POINTS, seed=1)  # ITK (x, y, z) network indices
    points = transform_points(to_fixed, nodes)
    expected, _ = authors_exact_map(run["phi_AB"], run["map_AB"], points, NETWORK_SHAPE)
    error = np.linalg.norm(transform_points(run["phi_AB"], points) - expected, axis=1)
    assert error.max() < NODE_TOL_MM


def test_inverse_transform_matches_authors_phi_BA_at_moving_voxels(pair):
    run = _run(pair, TWO_STEP)
    points = _lps(pair["moving_affine"], _interior_voxels(MOVING_SHAPE, N_POINTS, seed=2))
    expected, box_only = authors_exact_map(run["phi_BA"], run["map_BA"], points, NETWORK_SHAPE)
    assert np.linalg.norm(expected - box_only, axis=1).max() > 2.0
    error = np.linalg.norm(transform_points(run["inverse_transform"], points) - expected, axis=1)
    assert error.max() < POINT_TOL_MM, f"max |ours - authors' Φ_BA| = {error.max():.3g} mm"


def test_warped_moving_matches_moving_sampled_at_authors_phi_AB(pair):
    run = _run(pair, TWO_STEP)
    index = _interior_voxels(FIXED_SHAPE)
    mapped, _ = authors_exact_map(run["phi_AB"], run["map_AB"], _lps(pair["fixed_affine"], index), NETWORK_SHAPE)
    inside = _inside(mapped, pair["moving_affine"], MOVING_SHAPE, 1.0)
    assert inside.mean() > 0.5
    interpolator = itk.LinearInterpolateImageFunction.New(pair["image_A"])
    expected = np.array([interpolator.Evaluate(p.tolist()) for p in mapped[inside]])
    warped = np.asarray(nib.load(run["ours"].files["warped_moving"]).dataobj)
    ours = warped[tuple(index[inside].astype(int).T)]
    assert np.ptp(expected) > 1.0
    assert np.abs(ours - expected).max() < IMAGE_TOL


def test_one_step_transform_and_warped_image_equal_authors_itk_outputs(pair):
    """Nothing composed: the authors' returned ``CompositeTransform`` and ITK resampling are exact oracles."""
    run = _run(pair, ONE_STEP)
    points = _lps(pair["fixed_affine"], _interior_voxels(FIXED_SHAPE, N_POINTS, seed=3))
    theirs = transform_points(run["phi_AB"], points)
    _, box_only = authors_exact_map(run["phi_AB"], run["map_AB"], points, NETWORK_SHAPE)
    assert np.linalg.norm(theirs - box_only, axis=1).max() > 1.0
    error = np.linalg.norm(transform_points(run["transform"], points) - theirs, axis=1)
    assert error.max() < DIRECT_TOL_MM, f"max |ours - authors' phi_AB| = {error.max():.3g} mm"

    resampled = itk.resample_image_filter(
        pair["image_A"], transform=run["phi_AB"], use_reference_image=True, reference_image=pair["image_B"]
    )
    theirs_image = itk.array_from_image(resampled).transpose(2, 1, 0)  # ITK arrays are (k, j, i)
    ours_image = np.asarray(nib.load(run["ours"].files["warped_moving"]).dataobj)
    interior = (slice(BORDER, -BORDER),) * 3
    assert np.ptp(theirs_image[interior]) > 1.0
    assert np.abs(ours_image - theirs_image)[interior].max() < IMAGE_TOL


def test_two_step_transform_near_authors_itk_composite(pair):
    """The authors' returned transform, as is: equal up to their linear interpolation of the composed field."""
    run = _run(pair, TWO_STEP)
    points = _lps(pair["fixed_affine"], _interior_voxels(FIXED_SHAPE, N_POINTS))
    theirs = transform_points(run["phi_AB"], points)
    exact, _ = authors_exact_map(run["phi_AB"], run["map_AB"], points, NETWORK_SHAPE)
    their_sampling = np.linalg.norm(theirs - exact, axis=1)  # the authors' own interpolation error
    error = np.linalg.norm(transform_points(run["transform"], points) - theirs, axis=1)
    np.testing.assert_array_less(error, their_sampling + POINT_TOL_MM, err_msg="ours differs from the authors' transform by more than their own interpolation error")


@pytest.mark.parametrize("channels_last", [False, True], ids=["reference_layout", "channels_last"])
def test_instance_optimisation_matches_authors_finetune(pair, channels_last):
    tolerance = IO_CHANNELS_LAST_TOL_MM if channels_last else IO_TOL_MM
    run = _run(pair, TWO_STEP, io_steps=2, channels_last=channels_last)
    points = _lps(pair["fixed_affine"], _interior_voxels(FIXED_SHAPE, N_POINTS, seed=4))
    expected, _ = authors_exact_map(run["phi_AB"], run["map_AB"], points, NETWORK_SHAPE)
    ours = transform_points(run["transform"], points)
    error = np.linalg.norm(ours - expected, axis=1)
    assert error.max() < tolerance, f"max |ours - authors' Φ_AB| after 2 IO steps = {error.max():.3g} mm"
    without_io = transform_points(_run(pair, TWO_STEP)["transform"], points)
    assert np.linalg.norm(ours - without_io, axis=1).max() > 50 * tolerance  # the two steps changed the result
    assert run["ours"].report["instance_optimization"]["steps"] == 2
