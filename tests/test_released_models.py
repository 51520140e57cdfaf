"""The five released-model bundles against the authors' own registration path, in physical space.

For each bundle (``knee``, ``lung``, ``brain``, ``unigradicon``, ``multigradicon``; uni/multiGradICON in both
``modality`` ``ct`` and ``mri``, uniGradICON CT once more with masks, multiGradICON on an MR moving / CT fixed
pair with a modality per scan — ``register(..., moving_modality="mri", fixed_modality="ct")`` against
``preprocess(moving, "mri")`` and ``preprocess(fixed, "ct")``):

* **A checkpoint in the released format**: the authors' own 4-step network — ``icon_registration``'s
  ``pretrained_models.lung_ct.make_network()`` (the knee, lung and brain factories all build it), or
  ``unigradicon.make_network(input_shape, include_last_step=True)`` — with every parameter perturbed by a
  seeded ``torch.Generator`` (``N(0, σ²)``, σ = 0.025–0.03, :data:`WEIGHT_STD`; the last convolution of
  each ``tallUNet2`` is zero-initialised, so without this the map is the identity), in ``eval()`` mode;
  its ``regis_net.state_dict()`` is written with ``torch.save`` as a ``.trch`` (the released format;
  uniGradICON's own loader reads it back ``strict=True, weights_only=True``).
* **A small network grid**: the released grids are 80×192×192, 175³ and 130×155×130; here both sides run on
  65×66×67 (the smallest the 4-step net accepts is 65 per axis: its quarter-resolution U-Net needs 17),
  ours through the bundle setting ``image_shape`` (``overrides={"image_shape": [65, 66, 67]}``), which
  is the grid the bundle's ``ToNetworkGridd`` resizes to (the report's ``network_shape`` is checked).
* **A volume pair**: NIfTI, oblique (rotated about three axes; axis codes ``LPS`` for both), anisotropic
  voxels, grids 40×50×30 (fixed) and 44×36×33 (moving), unlike each other and unlike the network grid.
  Intensities in each model's domain: MR-like positive values (knee, brain, uni/multi MRI); CT in HU
  within [−1100, 300] with a lung-like mask (lung, uni/multi CT).
* **The authors' path**: the same files read with ``itk.imread``, their preprocessing, then
  ``icon_registration.itk_wrapper.register_pair(net, moving, fixed)``:

  - knee: the authors have no preprocessing function (their OAI evaluation passes raw intensities); the
    bundle's 1st/99th-percentile window → [0, 1] (clamped) is applied with numpy (``np.percentile``,
    linear interpolation, as MONAI's ``ScaleIntensityRangePercentiles``) to the ITK image array;
  - lung: ``icon_registration.pretrained_models.lung_network_preprocess(image, segmentation)``;
  - brain: ``icon_registration.pretrained_models.brain_network_preprocess(image)``;
  - uni/multiGradICON: ``unigradicon.preprocess(image, modality, mask)`` (1.0.6; the mask cast to
    ``short`` as its CLI does).
* **Our path**: ``register(moving, fixed, "<short name>", out, weights=<the .trch>, overrides=...,
  moving_mask=, fixed_mask=)``, then our ``transform.h5`` read back with ``itk.transformread``.

Oracle (as in ``test_register_reference_itk_wrapper.py``): for a multi-step network the authors' returned
``CompositeTransform`` holds the composed map sampled at the network nodes only (ITK interpolates it in
between), so "the authors' Φ_AB" is that composite with its displacement field replaced by their own map
``model.phi_AB`` — the closure ``register_pair`` samples — i.e. exactly what their network computes, at
any point. Points: 100 fixed voxel centres ≥ 2 voxels inside the fixed image (forward, ``transform.h5``)
and 100 moving voxel centres (inverse, ``inverse_transform.h5`` vs their ``phi_BA``).

Tolerance: **1e-3 mm** between ours and the authors' exact map (float32 rounding through four composed
steps of a rough random field, and of two implementations of each preprocessing: ITK filters vs
MONAI/torch; it grows with the displacement and with the CPU's float kernels, hence 7× the largest value
measured here). Against the authors' returned composite as is, ours must lie within their own
interpolation error of the composed network-grid field (which bounds the difference between nodes)
+ 1e-3 mm. The network's own part of the map (beyond the fixed-box → moving-box alignment
of their two ``CenteredAffine`` transforms) must reach ≥ 3 mm (mean ≥ 1 mm). Measured (one thread, CPU):

====================  ====================  ====================  ===================
case                  forward: error / max  inverse: error / max  their interpolation
====================  ====================  ====================  ===================
knee                  4.2e-5 mm / 5.8 mm    3.5e-5 mm / 7.2 mm    1.9 mm
lung (masks)          2.9e-5 mm / 5.7 mm    2.4e-5 mm / 5.7 mm    1.1 mm
brain                 2.5e-5 mm / 4.8 mm    2.4e-5 mm / 5.3 mm    1.0 mm
unigradicon ct        6.7e-5 mm / 7.5 mm    6.2e-5 mm / 9.5 mm    3.0 mm
unigradicon ct+masks  2.1e-5 mm / 5.1 mm    1.8e-5 mm / 5.6 mm    0.95 mm
unigradicon mri       1.4e-4 mm / 12.7 mm   1.4e-4 mm / 14.5 mm   3.6 mm
multigradicon ct      2.0e-5 mm / 4.8 mm    1.5e-5 mm / 4.4 mm    0.51 mm
multigradicon mri     3.1e-5 mm / 6.2 mm    1.9e-5 mm / 6.4 mm    0.92 mm
multigradicon mr→ct   2.2e-5 mm / 5.6 mm    1.9e-5 mm / 5.8 mm    0.90 mm
====================  ====================  ====================  ===================

("max" is the network's own displacement; mean 2.3–7.1 mm.) Defects injected into a private copy of the
repository (on ``PYTHONPATH``) fail these tests by > 800× the tolerance: the lung bundle's window
``[-1000, 0]`` → ``[-1000, 1000]`` HU (lung: 1.5 mm); the knee window's upper percentile 99 → 99.5
(knee: 0.92 mm); the brain scale 0.9/max → 1.0/max (brain: 1.1 mm); the ``modality`` override ignored
(uni/multi MRI: 10.5 / 3.2 mm); for the MR (moving) → CT (fixed) pair, the two scans' modalities swapped
(4.2 mm) or one modality for both (``ByModalityd`` ignoring the scan's own, 2.6 mm); ``align_corners`` flipped in ``PairGeometry.from_affine`` (every case:
0.81–5.2 mm); axis order ``"file"`` for ``"itk"`` (every case: 4.4–20 mm, and the report test). Editing a
bundle's ``convention`` instead is refused: the ``.trch`` is in the authors' release format, which
``RegistrationModel`` accepts only under their convention (an ``InputError``).

The one deliberate departure from the authors' path — a moving image stored in other axis codes than the
fixed one is reoriented to the fixed image's codes; ``register_pair`` feeds it as stored — is the last test.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import torch

from dependencies import require, require_itk, require_reference
from registration_helpers import oblique_affine, world_points

itk = require_itk()
icon = require_reference()
unigradicon = require("unigradicon", "MONAI_GRADICON_REQUIRE_REFERENCE")

from icon_registration import config as icon_config  # noqa: E402
from icon_registration import itk_wrapper  # noqa: E402
from icon_registration.pretrained_models import brain_network_preprocess, lung_network_preprocess  # noqa: E402
from icon_registration.pretrained_models.lung_ct import make_network as authors_make_network  # noqa: E402
from reference_oracle import authors_exact_map, transform_points  # noqa: E402

NETWORK_SHAPE = (65, 66, 67)  # identity-map (ITK array) order; the released grids are larger
FIXED_SHAPE = (40, 50, 30)  # nibabel (i, j, k)
MOVING_SHAPE = (44, 36, 33)
# std of the weight perturbation: large enough that the network moves points by several mm; the masked
# CT inputs (lung, uniGradICON with masks) are mostly zero and need a little more
WEIGHT_STD = {"knee": 0.025, "lung": 0.03, "brain": 0.025, "unigradicon": 0.03, "multigradicon": 0.025}
N_POINTS = 100
BORDER = 2  # voxels kept away from the image border
LPS = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS

POINT_TOL_MM = 1e-3  # ours vs the authors' exact map; measured ≤ 1.4e-4 mm (uniGradICON MRI, 14.5 mm displacement)
NETWORK_PART_MIN_MM = 3.0  # the network's own displacement must reach this (measured 4.4-14.5 mm)

# case -> (bundle short name, the authors' model factory, intensity domain, our overrides, masks)
CASES = {
    "knee": ("knee", "icon", "mr", {}, False),
    "lung": ("lung", "icon", "ct", {}, True),
    "brain": ("brain", "icon", "mr", {}, False),
    "unigradicon-ct": ("unigradicon", "uni", "ct", {"modality": "ct"}, False),
    "unigradicon-ct-masks": ("unigradicon", "uni", "ct", {"modality": "ct"}, True),
    "unigradicon-mri": ("unigradicon", "uni", "mr", {"modality": "mri"}, False),
    "multigradicon-ct": ("multigradicon", "uni", "ct", {"modality": "ct"}, False),
    "multigradicon-mri": ("multigradicon", "uni", "mr", {"modality": "mri"}, False),
    # a multimodal pair: MR moving, CT fixed, each scan its own modality (register's moving_/fixed_modality)
    "multigradicon-mr-ct": ("multigradicon", "uni", ("mr", "ct"), {"moving_modality": "mri", "fixed_modality": "ct"}, False),
}
SCAN_MODALITY_KEYS = ("moving_modality", "fixed_modality")  # register keywords, not bundle settings
SEEDS = {"knee": 11, "lung": 12, "brain": 13, "unigradicon": 14, "multigradicon": 15}
MEASURED: dict = {}  # case -> measured values, printed at the end with -s (the table in the module docstring)


# --- the volume pair ---------------------------------------------------------------------------------

def _affines() -> tuple[np.ndarray, np.ndarray]:
    fixed = oblique_affine(spacing=(1.1, 0.9, 1.9), angles=(0.2, -0.15, 3.0), origin=(30.0, 25.0, -10.0))
    moving = oblique_affine(spacing=(1.0, 1.25, 1.6), angles=(-0.1, 0.25, 2.8), origin=(0.0, 0.0, 0.0))
    centre = world_points(fixed, FIXED_SHAPE).reshape(-1, 3).mean(0)
    # the moving box overlaps the fixed one, offset by a few mm
    moving[:3, 3] = centre - moving[:3, :3] @ ((np.array(MOVING_SHAPE) - 1) / 2.0) + [2.0, -3.0, 1.5]
    return fixed, moving


def _mr(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """MR-like positive intensities (here 1–980) with structure at several scales."""
    r = points - centre
    return (
        300.0
        + 550.0 * np.exp(-np.sum((r / np.array([14.0, 11.0, 16.0])) ** 2, axis=-1))
        + 120.0 * np.sin(r[..., 0] / 5.0) * np.cos(r[..., 1] / 7.0)
        + 90.0 * np.cos(r[..., 2] / 4.0 + r[..., 0] / 9.0)
        + 4.0 * r[..., 1]
    )


def _lungs(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    r = points - centre
    left = np.sum(((r - [-10.5, 0.0, 0.0]) / np.array([9.0, 14.0, 24.0])) ** 2, axis=-1) < 1.0
    right = np.sum(((r - [10.5, 0.0, 0.0]) / np.array([9.0, 14.0, 24.0])) ** 2, axis=-1) < 1.0
    return left | right


def _ct(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """CT in HU within [−1100, 300]: air outside a soft-tissue body, two lungs with vessel-like texture."""
    r = points - centre
    body = np.sum((r / np.array([24.0, 20.0, 40.0])) ** 2, axis=-1) < 1.0
    texture = np.sin(r[..., 0] / 3.0) * np.cos(r[..., 1] / 4.0) * np.sin(r[..., 2] / 5.0)
    hu = np.where(body, 40.0 + 120.0 * texture + 2.0 * r[..., 2], -1000.0 - 60.0 * (1.0 + texture))
    hu = np.where(_lungs(points, centre), -850.0 + 150.0 * texture + 3.0 * r[..., 1], hu)
    return np.clip(hu, -1100.0, 300.0)


def _write_pairs(root) -> dict:
    fixed_affine, moving_affine = _affines()
    assert nib.aff2axcodes(fixed_affine) == nib.aff2axcodes(moving_affine) == ("L", "P", "S")
    fixed_pts = world_points(fixed_affine, FIXED_SHAPE)
    moving_pts = world_points(moving_affine, MOVING_SHAPE)
    centre = fixed_pts.reshape(-1, 3).mean(0)
    shifted = centre + np.array([2.5, -2.0, 3.0])  # the moving anatomy is displaced
    files = {}
    for kind, intensity in (("mr", _mr), ("ct", _ct)):
        for role, pts, affine, c in (("fixed", fixed_pts, fixed_affine, centre), ("moving", moving_pts, moving_affine, shifted)):
            path = str(root / f"{role}_{kind}.nii.gz")
            nib.save(nib.Nifti1Image(intensity(pts, c).astype(np.float32), affine), path)
            files[(kind, role)] = path
    for role, pts, affine, c in (("fixed", fixed_pts, fixed_affine, centre), ("moving", moving_pts, moving_affine, shifted)):
        path = str(root / f"{role}_lung_mask.nii.gz")
        nib.save(nib.Nifti1Image(_lungs(pts, c).astype(np.uint8), affine), path)
        files[("mask", role)] = path
    return {"files": files, "fixed_affine": fixed_affine, "moving_affine": moving_affine}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # both sides on one thread
    root = tmp_path_factory.mktemp("released_models")
    yield {"root": root, **_write_pairs(root)}
    _RUNS.clear()
    _drop_reference()
    torch.set_num_threads(threads)
    for case, numbers in MEASURED.items():
        print(case, {k: float(f"{v:.3g}") for k, v in numbers.items()})


# --- the authors' side -------------------------------------------------------------------------------

_REFERENCE: dict = {}  # the last built reference network (one 4-step net is 283 MB: keep one)


def _drop_reference() -> None:
    """Forget the cached network and delete its 283 MB ``.trch`` (pytest keeps its last temporary folders)."""
    for _, weights in _REFERENCE.values():
        if os.path.exists(weights):
            os.remove(weights)
    _REFERENCE.clear()


def _reference(bundle: str, factory: str, root) -> tuple:
    """The authors' network for ``bundle`` with seeded random weights, and its ``.trch`` (released format)."""
    if bundle in _REFERENCE:
        return _REFERENCE[bundle]
    _drop_reference()
    weights = str(root / f"{bundle}_random_weights.trch")
    input_shape = [1, 1, *NETWORK_SHAPE]
    with torch.random.fork_rng():
        torch.manual_seed(SEEDS[bundle])
        net = authors_make_network() if factory == "icon" else unigradicon.make_network(input_shape, include_last_step=True)
    generator = torch.Generator().manual_seed(SEEDS[bundle] + 100)
    with torch.no_grad():
        for p in net.regis_net.parameters():  # the last conv of each tallUNet2 is zero: perturb everything
            p.add_(torch.randn(p.shape, generator=generator) * WEIGHT_STD[bundle])
    torch.save(net.regis_net.state_dict(), weights)
    if factory == "uni":  # as get_unigradicon / get_multigradicon read the release file
        net.regis_net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    net.assign_identity_map(input_shape)
    net.eval()
    _REFERENCE[bundle] = (net, weights)
    return net, weights


def _knee_window(image):
    """The knee bundle's window on an ITK image: 1st/99th percentiles (linear) → [0, 1], clamped (numpy)."""
    array = itk.array_from_image(image).astype(np.float32)
    low, high = np.percentile(array, [1.0, 99.0])
    scaled = np.clip((array - low) / (high - low), 0.0, 1.0).astype(np.float32)
    out = itk.image_from_array(scaled)
    out.CopyInformation(image)
    return out


def _authors_preprocess(case: str, image, mask, role: str = "moving"):
    bundle, factory, _, overrides, _ = CASES[case]
    if bundle == "knee":
        return _knee_window(image)
    if bundle == "lung":
        return lung_network_preprocess(image, mask)
    if bundle == "brain":
        return brain_network_preprocess(image)
    if mask is not None:  # unigradicon-register casts masks to short
        mask = itk.CastImageFilter[type(mask), itk.Image[itk.SS, 3]].New()(mask)
    return unigradicon.preprocess(image, overrides.get(f"{role}_modality", overrides.get("modality")), mask)




def _interior_lps(affine, shape, seed) -> np.ndarray:
    index = np.stack(np.meshgrid(*[np.arange(BORDER, n - BORDER) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    index = index[np.random.default_rng(seed).choice(len(index), N_POINTS, replace=False)].astype(np.float64)
    return (index @ affine[:3, :3].T + affine[:3, 3]) * LPS


# --- both sides on one case --------------------------------------------------------------------------

_RUNS: dict = {}


def _run(pairs, case: str) -> dict:
    """Both paths on the case's pair (cached); keeps only points, never the 283 MB networks."""
    if case in _RUNS:
        return _RUNS[case]
    from monai_gradicon.app import register

    bundle, factory, kind, overrides, masks = CASES[case]
    root, files = pairs["root"], pairs["files"]
    net, weights = _reference(bundle, factory, root)
    moving_kind, fixed_kind = kind if isinstance(kind, tuple) else (kind, kind)
    moving, fixed = files[(moving_kind, "moving")], files[(fixed_kind, "fixed")]
    scan_modalities = {k: v for k, v in overrides.items() if k in SCAN_MODALITY_KEYS}
    overrides = {k: v for k, v in overrides.items() if k not in SCAN_MODALITY_KEYS}
    mask_paths = (files[("mask", "moving")], files[("mask", "fixed")]) if masks else (None, None)

    image_A, image_B = itk.imread(moving), itk.imread(fixed)  # as the authors' CLI / evaluation read them
    mask_A, mask_B = (itk.imread(p) if p else None for p in mask_paths)
    device = icon_config.device
    icon_config.device = torch.device("cpu")
    try:
        phi_AB, phi_BA = itk_wrapper.register_pair(
            net, _authors_preprocess(case, image_A, mask_A, "moving"), _authors_preprocess(case, image_B, mask_B, "fixed")
        )
    finally:
        icon_config.device = device
    ours = register(
        moving, fixed, bundle, root / f"out_{case}",
        moving_mask=mask_paths[0], fixed_mask=mask_paths[1], weights=weights,
        overrides={"image_shape": list(NETWORK_SHAPE), **overrides}, device="cpu", progress=False, **scan_modalities,
    )
    transform = itk.transformread(ours.files["transform"])[0]
    inverse = itk.transformread(ours.files["inverse_transform"])[0]
    forward_points = _interior_lps(pairs["fixed_affine"], FIXED_SHAPE, seed=1)
    inverse_points = _interior_lps(pairs["moving_affine"], MOVING_SHAPE, seed=2)
    run = {"report": ours.report}
    for direction, points, theirs, closure, mine in (
        ("forward", forward_points, phi_AB, net.phi_AB, transform),
        ("inverse", inverse_points, phi_BA, net.phi_BA, inverse),
    ):
        exact, box_only = authors_exact_map(theirs, closure, points, NETWORK_SHAPE)
        run[direction] = {
            "exact": exact, "box_only": box_only,
            "composite": transform_points(theirs, points), "ours": transform_points(mine, points),
        }
    _RUNS[case] = run
    return run


def _measure(case: str, key: str, value: float) -> float:
    MEASURED.setdefault(case, {})[key] = value
    return value


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_written_transform_matches_authors_path(pairs, case, direction):
    """Our ``transform.h5`` (forward, fixed voxels) / ``inverse_transform.h5`` (moving voxels) = the authors' map."""
    run = _run(pairs, case)[direction]
    network_part = np.linalg.norm(run["exact"] - run["box_only"], axis=1)
    _measure(case, f"{direction}_network_part_max_mm", network_part.max())
    _measure(case, f"{direction}_network_part_mean_mm", network_part.mean())
    assert network_part.max() > NETWORK_PART_MIN_MM and network_part.mean() > 1.0  # the network really deforms
    error = np.linalg.norm(run["ours"] - run["exact"], axis=1)
    _measure(case, f"{direction}_max_error_mm", error.max())
    assert error.max() < POINT_TOL_MM, f"{case} {direction}: max |ours - authors' map| = {error.max():.3g} mm"


@pytest.mark.parametrize("case", list(CASES))
def test_written_transform_within_authors_interpolation_of_their_composite(pairs, case):
    """The authors' returned ``CompositeTransform`` as is: equal up to their interpolation of the composed field."""
    run = _run(pairs, case)["forward"]
    their_sampling = np.linalg.norm(run["composite"] - run["exact"], axis=1)  # their own interpolation error
    _measure(case, "their_interpolation_max_mm", their_sampling.max())
    error = np.linalg.norm(run["ours"] - run["composite"], axis=1)
    np.testing.assert_array_less(
        error, their_sampling + POINT_TOL_MM,
        err_msg=f"{case}: ours differs from the authors' transform by more than their own interpolation error",
    )


@pytest.mark.parametrize("case", list(CASES))
def test_report_states_the_bundle_grid_convention_and_masks(pairs, case):
    bundle, _, _, _, masks = CASES[case]
    report = _run(pairs, case)["report"]
    assert report["network_shape"] == list(NETWORK_SHAPE)  # image_shape is the grid ToNetworkGridd resizes to
    assert (report["resampling"]["order"], report["resampling"]["align_corners"], report["resampling"]["axcodes"]) == ("itk", False, None)
    assert report["resampling"]["fixed"]["network_axis_to_file_axis"] == [2, 1, 0]
    assert not report["axis_codes"]["moving_reoriented"]
    assert report["masks"]["moving"] is masks and report["masks"]["fixed"] is masks
    assert report["weights"].endswith(f"{bundle}_random_weights.trch")
    overrides = CASES[case][3]
    expected = {
        role: overrides.get(f"{role}_modality", overrides.get("modality")) for role in ("moving", "fixed")
    } if bundle in ("unigradicon", "multigradicon") else {"moving": None, "fixed": None}
    assert report["modalities"] == expected  # each scan's preprocessing, as the report states it
    assert report["forward"]["folds"] >= 0 and report["max_displacement_mm"] > NETWORK_PART_MIN_MM


def test_moving_stored_in_other_axis_codes_gives_the_same_transform_unlike_the_authors_path(pairs):
    """Where the two files' axis codes differ, ``register`` reorients the moving image to the fixed image's codes.

    The one place our bundles leave the authors' path on purpose: ``register_pair`` feeds each ITK array as
    stored, so the same moving image written with its first index axis reversed (codes ``RPS`` instead of
    ``LPS``; identical voxels in physical space) reaches their network mirrored relative to the fixed image,
    and their map changes (measured 45 mm here: with zero displacement their two ``CenteredAffine``
    transforms already map a point to its mirror image); ours still equals their result for the file as
    stored (measured 4.2e-5 mm; 2e-6 mm from our own result for it).
    """
    from monai_gradicon.app import register

    stored = _run(pairs, "knee")["forward"]
    root, files = pairs["root"], pairs["files"]
    image = nib.load(files[("mr", "moving")])
    reverse = np.eye(4)
    reverse[0, 0], reverse[0, 3] = -1.0, image.shape[0] - 1
    flipped = str(root / "moving_mr_first_axis_reversed.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[::-1].copy(), image.affine @ reverse), flipped)
    assert nib.aff2axcodes(image.affine @ reverse) == ("R", "P", "S")

    net, weights = _reference("knee", "icon", root)
    ours = register(
        flipped, files[("mr", "fixed")], "knee", root / "out_knee_reversed", weights=weights,
        overrides={"image_shape": list(NETWORK_SHAPE)}, device="cpu", progress=False,
    )
    assert ours.report["axis_codes"]["moving_reoriented"] and ours.report["axis_codes"]["network_input"] == "LPS"
    points = _interior_lps(pairs["fixed_affine"], FIXED_SHAPE, seed=1)  # the points of _run's forward direction
    mapped = transform_points(itk.transformread(ours.files["transform"])[0], points)
    error = np.linalg.norm(mapped - stored["exact"], axis=1)
    _measure("knee-moving-reversed", "ours_vs_authors_as_stored_mm", error.max())
    assert error.max() < POINT_TOL_MM

    device = icon_config.device
    icon_config.device = torch.device("cpu")
    try:
        phi_AB, _ = itk_wrapper.register_pair(
            net, _knee_window(itk.imread(flipped)), _knee_window(itk.imread(files[("mr", "fixed")]))
        )
    finally:
        icon_config.device = device
    theirs, _ = authors_exact_map(phi_AB, net.phi_AB, points, NETWORK_SHAPE)
    change = np.linalg.norm(theirs - stored["exact"], axis=1)
    _measure("knee-moving-reversed", "authors_change_mm", change.max())
    assert change.max() > 10.0  # the authors' result depends on the storage order
