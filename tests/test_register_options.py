"""``monai-gradicon register`` options of uniGradICON's command and beyond, on a tiny bundle with per-scan modalities.

* per-scan modality (``--moving-modality``/``--fixed-modality``; ``--modality`` for both): each scan is
  preprocessed with its own window, computed here independently with numpy;
* ``--ct-window``/``--quantile-range`` through ``main([...])`` equal the bundle overrides and change the result;
* ``--io-sim``: the objective of instance optimisation uses the chosen similarity (its value equals one
  computed here from the loss classes), and the report names it;
* ``--loss-masking``: images are not multiplied; each direction's LNCC is averaged inside its target's mask
  (``L(A∘Φ_AB, B; mask_B) + L(B∘Φ_BA, A; mask_A)``, uniGradICON's ``GradientICONSparse``);
* segmentations and ``--dice-weight``: one step with the Dice term lowers the Dice loss, Dice per label in the report;
* ``--displacement-format learn2reg``: the field in fixed-grid voxels equals ``displacement_mm`` converted
  with the fixed affine (nibabel), and on a shared grid ``map_coordinates`` with it reproduces ``warped_moving``;
* bad input: one ``monai-gradicon: error:`` line, exit code 2.
"""

from __future__ import annotations

import json
import os
import re

import nibabel as nib
import numpy as np
import pytest
import torch

from registration_helpers import (
    TINY_SHAPE,
    blob_intensity,
    oblique_affine,
    read_field,
    sample_linear,
    save,
    world_points,
    write_random_weights,
    write_tiny_bundle,
    write_tiny_modality_bundle,
)

AFFINE = np.diag([1.5, 1.4, 1.6, 1.0])  # RAS, the network grid's shape: the resize is the identity
AFFINE[:3, 3] = (-12.0, 8.0, 3.0)
SHIFT = np.array([2.0, -1.5, 1.0])  # mm, the moving anatomy's offset


def _labels(points, centre):
    """Two nested ellipsoids (labels 2 inside 1) about ``centre``."""
    r = np.linalg.norm((points - centre) / np.array([9.0, 10.0, 11.0]), axis=-1)
    return np.where(r < 0.55, 2, np.where(r < 1.0, 1, 0)).astype(np.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("register_options")
    points = world_points(AFFINE, TINY_SHAPE)
    centre = points.reshape(-1, 3).mean(0)
    blob_f, blob_m = blob_intensity(points, centre), blob_intensity(points, centre + SHIFT)
    files = {
        "fixed_ct": save(str(root / "fixed_ct.nii.gz"), -200.0 + 600.0 * blob_f, AFFINE),
        "moving_ct": save(str(root / "moving_ct.nii.gz"), -200.0 + 600.0 * blob_m, AFFINE),
        "moving_mr": save(str(root / "moving_mr.nii.gz"), 300.0 + 400.0 * blob_m, AFFINE),
        "fixed_mr": save(str(root / "fixed_mr.nii.gz"), 300.0 + 400.0 * blob_f, AFFINE),
        "fixed_mask": save(str(root / "fixed_mask.nii.gz"), (blob_f > 0.2).astype(np.float32), AFFINE),
        "moving_mask": save(str(root / "moving_mask.nii.gz"), (blob_m > 0.2).astype(np.float32), AFFINE),
        "fixed_seg": save(str(root / "fixed_seg.nii.gz"), _labels(points, centre), AFFINE),
        # labels displaced against the intensities (-2 SHIFT): the Dice term pulls where the similarity does not
        "moving_seg": save(str(root / "moving_seg.nii.gz"), _labels(points, centre - 2.0 * SHIFT), AFFINE),
        "fixed_seg_3": save(str(root / "fixed_seg_3.nii.gz"), _labels(points, centre) + (blob_f > 0.9) * 1.0, AFFINE),
    }
    bundle = write_tiny_modality_bundle(str(root / "bundle"))
    write_random_weights(bundle)  # "smooth": the field follows the preprocessed intensities
    plain = write_tiny_bundle(str(root / "plain"))  # no modalities, no ct_window
    write_random_weights(plain)
    return {"root": root, "files": files, "bundle": bundle, "plain": plain}


def _model(bundle, **overrides):
    from monai_gradicon.app import load_registration_model

    return load_registration_model(bundle, device="cpu", overrides=overrides or None)


def _array(path):
    return np.asarray(nib.load(path).dataobj, dtype=np.float64)


def _mr_window(x):
    """uniGradICON's MR window, computed here: the minimum to the k-th smallest value, k = int(0.99 n)."""
    flat = np.sort(x.reshape(-1))
    low, high = flat[0], flat[int(0.99 * flat.size) - 1]
    return np.clip((x - low) / (high - low), 0.0, 1.0)


def _ct_window(x, low=-1000.0, high=1000.0):
    return np.clip((x - low) / (high - low), 0.0, 1.0)


# --- per-scan modality ---------------------------------------------------------------------------

def test_each_scan_is_preprocessed_with_its_own_modality(setup):
    from monai_gradicon.app import prepare_pair

    files = setup["files"]
    model = _model(setup["bundle"])
    assert model.modalities == ("ct", "mri") and model.default_modality == "ct"
    pair = prepare_pair(model, files["moving_mr"], files["fixed_ct"], moving_modality="mri", fixed_modality="ct")
    assert pair.modalities == {"moving": "mri", "fixed": "ct"}
    expected_A, expected_B = _mr_window(_array(files["moving_mr"])), _ct_window(_array(files["fixed_ct"]))
    np.testing.assert_allclose(pair.A[0, 0].numpy(), expected_A, atol=2e-6)
    np.testing.assert_allclose(pair.B[0, 0].numpy(), expected_B, atol=2e-6)
    # the bundle's default (ct) for a scan that names none, and a swap changes both scans
    default = prepare_pair(model, files["moving_mr"], files["fixed_ct"])
    assert default.modalities == {"moving": "ct", "fixed": "ct"}
    np.testing.assert_allclose(default.A[0, 0].numpy(), _ct_window(_array(files["moving_mr"])), atol=2e-6)
    swapped = prepare_pair(model, files["moving_mr"], files["fixed_ct"], moving_modality="ct", fixed_modality="mri")
    assert float((swapped.A - pair.A).abs().max()) > 0.2 and float((swapped.B - pair.B).abs().max()) > 0.2


def test_a_datalist_entry_names_each_scans_modality_for_register_pairs(setup, tmp_path):
    """``moving_modality``/``fixed_modality`` (or ``modality``) of a pair entry reach ``prepare_pair`` in batch registration.

    The MR→CT pair through ``register_pairs`` equals ``register(..., moving_modality="mri", fixed_modality="ct")``;
    the same entry without them (bundle default ct for both) differs; a contradiction is that pair's bad input.
    """
    from registration_helpers import read_field

    from monai_gradicon.app import FailedPairsError, register, register_pairs

    files = setup["files"]
    model = _model(setup["bundle"])
    entries = [
        {"id": "per_scan", "moving": files["moving_mr"], "fixed": files["fixed_ct"], "moving_modality": "mri", "fixed_modality": "ct"},
        {"id": "default", "moving": files["moving_mr"], "fixed": files["fixed_ct"]},
        {"id": "contradiction", "moving": files["moving_mr"], "fixed": files["fixed_ct"], "modality": "ct", "moving_modality": "mri"},
    ]
    datalist = tmp_path / "pairs.json"
    datalist.write_text(json.dumps({"testing": entries}))
    with pytest.raises(FailedPairsError, match="contradiction.*moving_modality 'mri' contradicts modality 'ct'"):
        register_pairs(model, str(datalist), str(tmp_path / "batch"), progress=False)
    expected = register(files["moving_mr"], files["fixed_ct"], model, tmp_path / "alone", progress=False,
                        moving_modality="mri", fixed_modality="ct")
    ours = read_field(str(tmp_path / "batch" / "per_scan" / "displacement_mm.nii.gz"))
    np.testing.assert_allclose(ours, read_field(expected.files["displacement"]), rtol=0, atol=1e-5)
    default = read_field(str(tmp_path / "batch" / "default" / "displacement_mm.nii.gz"))
    assert np.abs(default - ours).max() > 1e-3
    report = json.loads((tmp_path / "batch" / "per_scan" / "report.json").read_text())
    assert report["modalities"] == {"moving": "mri", "fixed": "ct"}


def test_ct_window_and_quantile_range_on_the_command_line_equal_the_bundle_settings(setup, tmp_path, capsys):
    from monai_gradicon.app import register
    from monai_gradicon.app.cli import main

    files, bundle = setup["files"], setup["bundle"]
    argv = ["register", "--moving", files["moving_mr"], "--fixed", files["fixed_ct"], "--bundle", bundle,
            "--moving-modality", "mri", "--fixed-modality", "ct", "--ct-window=-400,600", "--quantile-range=0.05,0.9",
            "--device", "cpu", "--quiet", "--out", str(tmp_path / "cli")]
    assert main(argv) == 0, capsys.readouterr().err
    common = dict(device="cpu", progress=False, moving_modality="mri", fixed_modality="ct")
    expected = register(files["moving_mr"], files["fixed_ct"], bundle, tmp_path / "api",
                        overrides={"ct_window": [-400.0, 600.0], "quantile_range": [0.05, 0.9]}, **common)
    default = register(files["moving_mr"], files["fixed_ct"], bundle, tmp_path / "default", **common)
    field = read_field(str(tmp_path / "cli" / "displacement_mm.nii.gz"))
    np.testing.assert_allclose(field, read_field(expected.files["displacement"]), atol=1e-5)
    assert np.abs(field - read_field(default.files["displacement"])).max() > 0.05  # the windows change the result
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert report["modalities"] == {"moving": "mri", "fixed": "ct"}


# --- bad input -----------------------------------------------------------------------------------

BAD = [
    ("unknown modality", {"moving_modality": "pet"}, r"moving modality must be one of \['ct', 'mri'\] .* got 'pet'"),
    ("unknown --modality", {"modality": "pet"}, r"--modality must be 'ct' or 'mri', got 'pet'"),
    ("per-scan modality on a bundle without", {"bundle": "plain", "fixed_modality": "ct"}, r"no per-scan modality; --fixed-modality"),
    ("contradicting modalities", {"modality": "ct", "moving_modality": "mri"}, r"--moving-modality 'mri' contradicts --modality 'ct'"),
    ("unknown io-sim", {"io_sim": "ssd", "io_steps": 1}, r"--io-sim\) must be one of \['lncc', 'lncc2', 'mind'\], got 'ssd'"),
    ("io-sim without io", {"io_sim": "mind"}, r"--io-sim act on instance optimisation: give --io-steps N > 0"),
    ("loss masking without masks", {"loss_masking": True, "io_steps": 1}, r"--loss-masking needs both --moving-mask and --fixed-mask"),
    ("loss masking without io", {"loss_masking": True, "moving_mask": "moving_mask", "fixed_mask": "fixed_mask"}, r"--loss-masking act on"),
    ("label sets differ", {"moving_segmentation": "moving_seg", "fixed_segmentation": "fixed_seg_3"},
     r"same labels: moving segmentation \[1, 2\], fixed segmentation \[1, 2, 3\]"),
    ("one segmentation", {"moving_segmentation": "moving_seg"}, r"give both --moving-segmentation and --fixed-segmentation"),
    ("dice weight without segmentations", {"dice_weight": 1.0, "io_steps": 1}, r"--dice-weight needs both"),
    ("dice weight without io", {"dice_weight": 1.0, "moving_segmentation": "moving_seg", "fixed_segmentation": "fixed_seg"},
     r"--dice-weight act on instance optimisation"),
    ("ct window on a bundle without", {"bundle": "plain", "ct_window": "-1000,1000"}, r"has no setting 'ct_window'"),
    ("ct window, one number", {"ct_window": "-1000"}, r"--ct-window takes two numbers LOW,HIGH .* got -1000"),
    ("ct window reversed", {"ct_window": "500,-500"}, r"--ct-window needs LOW < HIGH"),
    ("quantiles outside [0, 1]", {"quantile_range": "0.1,99"}, r"--quantile-range takes quantiles in \[0, 1\]"),
    ("ct window with MR scans only", {"modality": "mri", "ct_window": "-500,500"}, r"--ct-window applies to ct scans, .* \['mri'\]"),
    ("unknown displacement format", {"displacement_format": "voxels"}, r"displacement format must be one of \['mm', 'learn2reg'\]"),
]


@pytest.mark.parametrize("case, extra, message", BAD, ids=[b[0] for b in BAD])
def test_bad_options_one_error_line_exit_2(setup, tmp_path, capsys, case, extra, message):
    from monai_gradicon.app.cli import main

    files = setup["files"]
    args = {"moving": files["moving_ct"], "fixed": files["fixed_ct"], "bundle": setup["bundle"], "out": str(tmp_path / "out")}
    for key, value in extra.items():
        args[key] = setup[value] if key == "bundle" else (files[value] if isinstance(value, str) and value in files else value)
    argv = ["register", "--device", "cpu", "--quiet"]
    for key, value in args.items():
        flag = f"--{key.replace('_', '-')}"
        argv += [flag] if value is True else [f"{flag}={value}"]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("monai-gradicon: error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), errors
    assert not os.path.isdir(args["out"]) or os.listdir(args["out"]) == []


def test_mind_is_refused_for_a_2d_model():
    from monai_gradicon.app import InputError, RegistrationModel
    from monai_gradicon.networks import GradICONUNet, multistep_network
    from registration_helpers import scan_preprocessing

    network = multistep_network(2, levels=[0], subnetwork=lambda: GradICONUNet(2, down_channels=[4, 4], up_channels=[4, 4]))
    model = RegistrationModel(network=network, scan_preprocessing=scan_preprocessing((16, 16)), name="flat")
    assert model.objective("lncc2").similarity.squared
    with pytest.raises(InputError, match=r"MIND-SSC similarity is defined for 3D images only; the 'flat' model registers 2D"):
        model.objective("mind")


# --- the instance-optimisation objective ----------------------------------------------------------

def _untouched_objective(model, pair, similarity, seed, masks=None):
    """The objective at the untouched network, computed here from the loss classes (not through the app's wrapper)."""
    from monai_gradicon.losses import GradICONLoss
    from monai_gradicon.maps import identity_grid, sample

    with torch.no_grad():
        phi_AB, phi_BA = model.deformation(pair.A, pair.B), model.deformation(pair.B, pair.A)
        grid = identity_grid(model.network_shape)
        warped_A, warped_B = sample(pair.A, phi_AB(grid)), sample(pair.B, phi_BA(grid))
        mask_A, mask_B = masks if masks is not None else ((), ())
        sim = similarity(warped_A, pair.B, *mask_B) + similarity(warped_B, pair.A, *mask_A)
        regularizer = GradICONLoss(3, sparse=model.sparse)
        regularizer.generator = torch.Generator().manual_seed(seed)
        return float(sim + model.lmbda * regularizer(phi_AB, phi_BA))


@pytest.mark.parametrize("io_sim", ["lncc", "lncc2", "mind"])
def test_io_objective_uses_the_chosen_similarity(setup, tmp_path, io_sim):
    from monai_gradicon.app import prepare_pair, register
    from monai_gradicon.losses import LNCCLoss, MINDSSCLoss

    files, bundle = setup["files"], setup["bundle"]
    outputs = register(files["moving_ct"], files["fixed_ct"], bundle, tmp_path / io_sim, io_steps=1, io_similarity=io_sim,
                       seed=4, device="cpu", progress=False)
    io = outputs.report["instance_optimization"]
    assert io["similarity"].startswith(f"{io_sim}:")
    model = _model(bundle)
    pair = prepare_pair(model, files["moving_ct"], files["fixed_ct"])
    measures = {"lncc": LNCCLoss(3, sigma=model.lncc_sigma), "lncc2": LNCCLoss(3, sigma=model.lncc_sigma, squared=True), "mind": MINDSSCLoss(3)}
    values = {name: _untouched_objective(model, pair, m, seed=4) for name, m in measures.items()}
    assert io["objective_before"] == pytest.approx(values[io_sim], rel=1e-5)
    assert all(abs(values[io_sim] - v) > 1e-3 for k, v in values.items() if k != io_sim)  # the others differ


def test_loss_masking_masks_the_similarity_not_the_images(setup, tmp_path):
    from monai_gradicon.app import prepare_pair, register
    from monai_gradicon.losses import LNCCLoss

    files, bundle = setup["files"], setup["bundle"]
    masks = dict(moving_mask=files["moving_mask"], fixed_mask=files["fixed_mask"])
    outputs = register(files["moving_ct"], files["fixed_ct"], bundle, tmp_path / "lm", io_steps=1, loss_masking=True,
                       seed=5, device="cpu", progress=False, **masks)
    assert outputs.report["instance_optimization"]["loss_masking"] is True
    assert outputs.report["mask_use"].startswith("restrict the similarity")
    model = _model(bundle)
    pair = prepare_pair(model, files["moving_ct"], files["fixed_ct"], loss_masking=True, **masks)
    plain = prepare_pair(model, files["moving_ct"], files["fixed_ct"])
    multiplied = prepare_pair(model, files["moving_ct"], files["fixed_ct"], **masks)
    torch.testing.assert_close(pair.A, plain.A)  # the images are not multiplied by the masks
    assert float((multiplied.A - plain.A).abs().max()) > 0.1
    mask_A, mask_B = pair.loss_masks
    np.testing.assert_array_equal(mask_B[0, 0].numpy(), _array(files["fixed_mask"]) > 0)
    lncc = LNCCLoss(3, sigma=model.lncc_sigma)
    right = _untouched_objective(model, pair, lncc, 5, masks=((mask_A,), (mask_B,)))
    swapped = _untouched_objective(model, pair, lncc, 5, masks=((mask_B,), (mask_A,)))
    unmasked = _untouched_objective(model, pair, lncc, 5)
    assert outputs.report["instance_optimization"]["objective_before"] == pytest.approx(right, rel=1e-5)
    assert abs(right - swapped) > 1e-3 and abs(right - unmasked) > 1e-3


# --- segmentations and the Dice term ---------------------------------------------------------------

def test_one_io_step_with_the_dice_term_lowers_the_dice_loss(setup, tmp_path):
    """One Adam step (lr 1e-3) with ``W = 1`` lowers the Dice loss; the same step with ``W = 0`` does not.

    The segmentations are displaced against the intensities, so the similarity's step does not align
    them; ``"antisymmetric"`` weights (``u = a·(A − B)/10``). Measured: Dice loss 1.3230 before,
    1.3134 after the step with the Dice term, 1.3234 after the step without.
    """
    from monai_gradicon.app import prepare_pair, register
    from monai_gradicon.app.instance_optimization import DiceTerm
    from monai_gradicon.app.register import network_one_hot
    from monai_gradicon.metrics import label_dice

    files = setup["files"]
    bundle = write_tiny_modality_bundle(str(tmp_path / "antisymmetric"))
    write_random_weights(bundle, kind="antisymmetric")
    segs = dict(moving_segmentation=files["moving_seg"], fixed_segmentation=files["fixed_seg"])
    common = dict(io_steps=1, io_learning_rate=1e-3, seed=6, device="cpu", progress=False, **segs)
    moving, fixed = files["moving_ct"], files["fixed_ct"]
    with_dice = register(moving, fixed, bundle, tmp_path / "w", dice_weight=1.0, moving_labels=files["moving_seg"], **common)
    without = register(moving, fixed, bundle, tmp_path / "0", **common)
    model = _model(bundle)
    pair = prepare_pair(model, moving, fixed, **segs)
    assert pair.segmentation_labels == [1, 2]
    dice = DiceTerm(*(network_one_hot(s, g, [1, 2], "cpu") for s, g in zip(pair.segmentations, (pair.geometry_A, pair.geometry_B))))
    with torch.no_grad():
        before = float(dice(model.deformation(pair.A, pair.B), model.deformation(pair.B, pair.A)))
        after = float(dice(with_dice.phi_AB, with_dice.phi_BA))
        after_without = float(dice(without.phi_AB, without.phi_BA))
    io = with_dice.report["instance_optimization"]
    assert io["dice_weight"] == 1.0 and io["dice_loss_before"] == pytest.approx(before, rel=1e-5)
    assert io["dice_loss_after"] == pytest.approx(after, rel=1e-5)
    assert after < before - 5e-3 and after < after_without - 5e-3  # the Dice term, not the step, lowers it
    assert without.report["instance_optimization"]["dice_loss_before"] is None
    # the report's Dice per label: the warped label map written, scored here with monai_gradicon.metrics
    report = with_dice.report["segmentation_dice"]
    assert report["labels"] == [1, 2] and report["dice_term_weight"] == 1.0
    scored = label_dice(_array(with_dice.files["warped_moving_labels"]), _array(files["fixed_seg"]), [1, 2])
    assert report["after"] == pytest.approx({str(k): v for k, v in scored.items()}, abs=1e-9)
    unregistered = label_dice(_array(files["moving_seg"]), _array(files["fixed_seg"]), [1, 2])  # one grid: as stored
    assert report["before"] == pytest.approx({str(k): v for k, v in unregistered.items()}, abs=1e-9)
    assert without.report["segmentation_dice"]["dice_term"].startswith("not used")


# --- the Learn2Reg displacement ---------------------------------------------------------------------

def test_learn2reg_displacement_is_the_mm_field_in_fixed_voxels(setup, tmp_path):
    from monai_gradicon.app import register

    root = setup["root"]
    fixed_affine = oblique_affine(spacing=(1.3, 1.1, 1.7), angles=(0.2, -0.1, 0.3), origin=(-10.0, 5.0, 2.0))
    moving_affine = oblique_affine(spacing=(1.0, 1.4, 1.5), angles=(-0.15, 0.1, 0.2), origin=(-8.0, 4.0, 1.0))
    fixed_shape, moving_shape = (18, 22, 16), (20, 18, 19)
    fp, mp = world_points(fixed_affine, fixed_shape), world_points(moving_affine, moving_shape)
    centre = fp.reshape(-1, 3).mean(0)
    fixed = save(str(root / "l2r_fixed.nii.gz"), -200 + 600 * blob_intensity(fp, centre), fixed_affine)
    moving = save(str(root / "l2r_moving.nii.gz"), -200 + 600 * blob_intensity(mp, centre + SHIFT), moving_affine)
    out = register(moving, fixed, setup["bundle"], tmp_path / "oblique", displacement_format="learn2reg", device="cpu", progress=False)
    image = nib.load(out.files["displacement_learn2reg"])
    np.testing.assert_allclose(image.affine, fixed_affine, atol=1e-5)  # the fixed header
    field = np.asarray(image.dataobj, dtype=np.float64)
    assert field.shape == (*fixed_shape, 3)
    mm = read_field(out.files["displacement"])  # (3, X, Y, Z) RAS mm
    expected = np.moveaxis(np.tensordot(np.linalg.inv(fixed_affine[:3, :3]), mm, axes=1), 0, -1)
    np.testing.assert_allclose(field, expected, atol=1e-4)
    assert np.abs(field).max() > 0.5  # a real displacement, in voxels


def test_learn2reg_displacement_warps_like_map_coordinates_on_a_shared_grid(setup, tmp_path):
    from monai_gradicon.app import register

    files = setup["files"]
    out = register(files["moving_ct"], files["fixed_ct"], setup["bundle"], tmp_path / "shared", displacement_format="learn2reg",
                   device="cpu", progress=False)
    field = np.asarray(nib.load(out.files["displacement_learn2reg"]).dataobj, dtype=np.float64)  # (X, Y, Z, 3)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in TINY_SHAPE], indexing="ij"), -1).reshape(-1, 3)
    target = index + field.reshape(-1, 3)
    inside = np.all((target >= 0) & (target <= np.array(TINY_SHAPE) - 1), axis=1)
    assert inside.mean() > 0.5 and np.abs(field).max() > 0.5  # measured: 77 % of the voxels map inside
    warped = sample_linear(_array(files["moving_ct"]), target[inside])
    np.testing.assert_allclose(warped, _array(out.files["warped_moving"]).reshape(-1)[inside], rtol=1e-4, atol=1e-2)
