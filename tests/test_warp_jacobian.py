"""``monai-gradicon warp`` and ``monai-gradicon jacobian`` (``monai_gradicon.app.transform_files``).

Physical checks use a known smooth analytic map ``T`` (fixed -> moving points, RAS mm) written with
``write_itk_displacement_transform`` exactly as ``register`` writes ``transform.h5``; parity checks run
the authors' ``unigradicon.warp_command`` / ``compute_jacobian_map_command`` with ``sys.argv`` patched.
"""

from __future__ import annotations

import os
import sys
from unittest import mock

import nibabel as nib
import numpy as np
import pytest
from dependencies import require_itk, require_reference
from registration_helpers import blob_intensity, oblique_affine, save, world_points

itk = require_itk()

from monai_gradicon.app.cli import main  # noqa: E402
from monai_gradicon.io import write_itk_displacement_transform  # noqa: E402

FIXED_SHAPE = (14, 16, 18)
MOVING_SHAPE = (34, 34, 34)
CENTRE = np.array([-6.0, 20.0, 24.0])


def analytic_map(points: np.ndarray) -> np.ndarray:
    """``T(p) = p + 0.08 (p − c) + smooth sines`` (RAS mm); det(∂T/∂p) varies in about [1.0, 1.5]."""
    r = np.asarray(points, np.float64) - CENTRE
    wave = np.stack([2.0 * np.sin(r[..., 1] / 9.0) + 2.0 * np.sin(r[..., 0] / 8.0), 1.5 * np.sin(r[..., 2] / 11.0), 1.8 * np.sin(r[..., 0] / 10.0)], -1)
    return points + 0.08 * r + wave


def folding_map(points: np.ndarray) -> np.ndarray:
    """A map that folds: ``x`` gets ``−12 sin(x/6)``, so ``∂T_x/∂x = 1 − 2 cos(x/6)`` is negative in bands."""
    r = np.asarray(points, np.float64) - CENTRE
    out = np.array(points, np.float64)
    out[..., 0] += -12.0 * np.sin(r[..., 0] / 6.0)
    return out


def finite_difference_det(mapping, points: np.ndarray, h: float = 1e-3) -> np.ndarray:
    """``det(∂T/∂p)`` of an analytic map by numpy central differences in world space (step ``h`` mm)."""
    columns = []
    for axis in range(3):
        step = np.zeros(3)
        step[axis] = h
        columns.append((mapping(points + step) - mapping(points - step)) / (2 * h))
    return np.linalg.det(np.stack(columns, axis=-1))


def write_field(mapping, affine: np.ndarray, shape, path: str) -> str:
    points = world_points(affine, shape)
    return write_itk_displacement_transform(np.moveaxis(mapping(points) - points, -1, 0), affine, path)


FIXED_OBLIQUE = oblique_affine(spacing=(2.0, 1.8, 2.2), angles=(0.3, -0.2, 0.25), origin=(-12.3, 10.8, 0.0))
FIXED_LPS_IDENTITY = np.diag([-2.0, -1.8, 2.2, 1.0])  # RAS affine of an ITK image whose LPS direction is the identity
FIXED_LPS_IDENTITY[:3, 3] = (8.0, 34.0, 6.0)
MOVING_AFFINE = oblique_affine(spacing=(1.8, 1.8, 1.8), angles=(-0.1, 0.15, -0.2), origin=(0.0, 0.0, 0.0))
MOVING_AFFINE[:3, 3] = CENTRE - MOVING_AFFINE[:3, :3] @ (np.array(MOVING_SHAPE) - 1) / 2  # centred on the blob


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("warp_jacobian")
    out = {"root": str(root)}
    for name, affine in (("oblique", FIXED_OBLIQUE), ("lps", FIXED_LPS_IDENTITY)):
        out[f"fixed_{name}"] = save(str(root / f"fixed_{name}.nii.gz"), np.zeros(FIXED_SHAPE), affine)
        out[f"transform_{name}"] = write_field(analytic_map, affine, FIXED_SHAPE, str(root / f"transform_{name}.h5"))
    out["folding"] = write_field(folding_map, FIXED_OBLIQUE, FIXED_SHAPE, str(root / "folding.h5"))
    moving_points = world_points(MOVING_AFFINE, MOVING_SHAPE)
    out["moving"] = save(str(root / "moving.nii.gz"), blob_intensity(moving_points, CENTRE), MOVING_AFFINE)
    r = moving_points - CENTRE
    labels = np.where(np.sin(r[..., 0] / 5.0) * np.cos(r[..., 1] / 6.0) > 0.3, 3, 0)
    labels = np.where(np.sin(r[..., 2] / 4.0) > 0.5, 7, labels)
    out["labels_array"] = labels
    for dtype in (np.uint8, np.int16):
        path = str(root / f"labels_{np.dtype(dtype).name}.nii.gz")
        image = nib.Nifti1Image(labels.astype(dtype), MOVING_AFFINE)
        image.set_data_dtype(dtype)
        nib.save(image, path)
        out[f"labels_{np.dtype(dtype).name}"] = path
    text = root / "not_a_transform.txt"
    text.write_text("this is not a transform\n")
    out["text"] = str(text)
    return out


def authors(function_name: str, argv: list[str]) -> None:
    """Run one of the authors' uniGradICON console commands in-process, with ``sys.argv`` as the console would set it."""
    require_reference()
    unigradicon = pytest.importorskip("unigradicon")
    with mock.patch.object(sys, "argv", ["unigradicon", *argv]):
        getattr(unigradicon, function_name)()


def read(path: str):
    image = nib.load(path)
    return np.asarray(image.dataobj), image


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def inside_moving(points_ras: np.ndarray, margin: float = 1.0) -> np.ndarray:
    index = (points_ras - MOVING_AFFINE[:3, 3]) @ np.linalg.inv(MOVING_AFFINE[:3, :3]).T
    return np.all((index > margin) & (index < np.array(MOVING_SHAPE) - 1 - margin), axis=-1), index


# --- warp --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nearest", [False, True])
def test_warp_equals_authors_warp_command(files, capsys, nearest):
    """``warp`` == ``unigradicon-warp`` (same ITK filters) on our transform.h5: exactly equal arrays (tolerance 0), same header."""
    ours, theirs = os.path.join(files["root"], f"ours_{nearest}.nii.gz"), os.path.join(files["root"], f"theirs_{nearest}.nii.gz")
    moving = files["labels_uint8"] if nearest else files["moving"]
    args = ["warp", "--moving", moving, "--fixed", files["fixed_oblique"], "--transform", files["transform_oblique"], "--out", ours]
    code, out, err = cli(args + (["--nearest"] if nearest else []), capsys)
    assert code == 0, err
    authors("warp_command", ["--fixed", files["fixed_oblique"], "--moving", moving, "--transform", files["transform_oblique"],
                             "--warped_moving_out", theirs, "--nearest_neighbor" if nearest else "--linear"])
    a, image_a = read(ours)
    b, image_b = read(theirs)
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(image_a.affine, image_b.affine, atol=1e-5)
    np.testing.assert_allclose(image_a.affine, FIXED_OBLIQUE, atol=1e-4)  # the fixed header
    assert np.ptp(a) > 0.5  # the warp landed on the image, not on the zero background


def test_warp_composite_transform_equals_authors(files, capsys):
    """A composite ``[affine, displacement]`` file (the shape of ``unigradicon-register`` output) warps as the authors' tool does (exact)."""
    affine = itk.AffineTransform[itk.D, 3].New()
    affine.Rotate3D([0.0, 0.0, 1.0], 0.1)
    affine.Translate([1.0, -2.0, 0.5])
    displacement = itk.transformread(files["transform_oblique"])[0]
    composite = itk.CompositeTransform[itk.D, 3].New()
    composite.AddTransform(affine)
    composite.AddTransform(displacement)
    path = os.path.join(files["root"], "composite.h5")
    itk.transformwrite([composite], path)
    ours, theirs = os.path.join(files["root"], "ours_c.nii.gz"), os.path.join(files["root"], "theirs_c.nii.gz")
    code, _, err = cli(["warp", "--moving", files["moving"], "--fixed", files["fixed_oblique"], "--transform", path, "--out", ours], capsys)
    assert code == 0, err
    authors("warp_command", ["--fixed", files["fixed_oblique"], "--moving", files["moving"], "--transform", path,
                             "--warped_moving_out", theirs, "--linear"])
    np.testing.assert_array_equal(read(ours)[0], read(theirs)[0])


def test_warp_linear_samples_the_analytic_map(files, tmp_path):
    """warped(x) == blob(T(x)) at the fixed voxels whose T(x) lies inside the moving grid: |error| < 0.03 (blob range ~2; linear interpolation, 1.8 mm voxels)."""
    from monai_gradicon.app import warp_image

    path = warp_image(files["moving"], files["fixed_oblique"], str(tmp_path / "w.nii.gz"), transform=files["transform_oblique"])
    warped, _ = read(path)
    target = analytic_map(world_points(FIXED_OBLIQUE, FIXED_SHAPE))
    inside, _ = inside_moving(target)
    assert inside.mean() > 0.5
    error = np.abs(warped - blob_intensity(target, CENTRE))[inside]
    assert error.max() < 0.03, error.max()


@pytest.mark.parametrize("dtype", ["uint8", "int16"])
def test_warp_nearest_keeps_label_dtype_and_set(files, tmp_path, dtype):
    """``--nearest`` on a {0, 3, 7} label map: same dtype, labels ⊂ {0, 3, 7}, and each label is the moving voxel nearest T(x)."""
    from monai_gradicon.app import warp_image

    path = warp_image(files[f"labels_{dtype}"], files["fixed_oblique"], str(tmp_path / "l.nii.gz"),
                      transform=files["transform_oblique"], nearest=True)
    warped, image = read(path)
    assert image.get_data_dtype() == np.dtype(dtype) and warped.dtype == np.dtype(dtype)
    assert set(np.unique(warped)) <= {0, 3, 7}
    assert {3, 7} <= set(np.unique(warped))
    inside, index = inside_moving(analytic_map(world_points(FIXED_OBLIQUE, FIXED_SHAPE)))
    clear = inside & np.all(np.abs(index - np.floor(index) - 0.5) > 1e-3, axis=-1)  # not at a rounding tie
    nearest_index = np.rint(index[clear]).astype(int)
    expected = files["labels_array"][tuple(nearest_index.T)]
    np.testing.assert_array_equal(warped[clear], expected)


def test_warp_without_transform_is_a_plain_resample(files, tmp_path):
    """No transform: trilinear resample of moving at the fixed voxel centres; == scipy map_coordinates(order=1) to 1e-5 (float32)."""
    from scipy.ndimage import map_coordinates

    from monai_gradicon.app import warp_image

    path = warp_image(files["moving"], files["fixed_oblique"], str(tmp_path / "r.nii.gz"))
    resampled, image = read(path)
    np.testing.assert_allclose(image.affine, FIXED_OBLIQUE, atol=1e-4)
    inside, index = inside_moving(world_points(FIXED_OBLIQUE, FIXED_SHAPE), margin=0.0)
    assert inside.mean() > 0.5
    moving = np.asarray(nib.load(files["moving"]).dataobj, np.float64)
    expected = map_coordinates(moving, index[inside].T, order=1)
    np.testing.assert_allclose(resampled[inside], expected, atol=1e-5)


# --- jacobian ----------------------------------------------------------------------------------------


def test_jacobian_equals_analytic_determinant(files, capsys):
    """On an oblique grid the map equals the finite-difference det(∂T/∂p) of the analytic map: |error| < 5e-3 inside, < 0.05 on the border voxels."""
    out = os.path.join(files["root"], "jac_oblique.nii.gz")
    code, stdout, err = cli(["jacobian", "--transform", files["transform_oblique"], "--fixed", files["fixed_oblique"], "--out", out], capsys)
    assert code == 0, err
    assert f"folds 0 of {np.prod(FIXED_SHAPE)} voxels (0.0000 %)" in stdout
    det, image = read(out)
    np.testing.assert_allclose(image.affine, FIXED_OBLIQUE, atol=1e-4)
    expected = finite_difference_det(analytic_map, world_points(FIXED_OBLIQUE, FIXED_SHAPE))
    assert expected.max() - expected.min() > 0.3  # a field whose determinant varies
    inner = (slice(1, -1),) * 3
    assert np.abs(det - expected)[inner].max() < 5e-3
    assert np.abs(det - expected).max() < 0.05


def test_jacobian_equals_authors_inside_identity_direction_grid(files, tmp_path):
    """Where the grid's LPS direction is the identity, ``unigradicon-jacobian`` agrees inside (|diff| < 1e-5, float32); on a
    RAS grid (any oblique one too) the authors' map is off by > 0.05 (ITK's filter ignores the direction) and ours is not."""
    from monai_gradicon.app import jacobian_map

    for name, must_agree in (("lps", True), ("oblique", False)):
        ours, theirs = str(tmp_path / f"ours_{name}.nii.gz"), str(tmp_path / f"theirs_{name}.nii.gz")
        jacobian_map(files[f"transform_{name}"], files[f"fixed_{name}"], ours)
        authors("compute_jacobian_map_command", ["--transform", files[f"transform_{name}"], "--fixed", files[f"fixed_{name}"], "--jacob", theirs])
        a, b = read(ours)[0], read(theirs)[0]
        inner = (slice(1, -1),) * 3
        difference = np.abs(a - b)[inner].max()
        if must_agree:
            assert difference < 1e-5, difference
        else:
            assert difference > 0.05, difference
    expected = finite_difference_det(analytic_map, world_points(FIXED_LPS_IDENTITY, FIXED_SHAPE))
    assert np.abs(read(str(tmp_path / "ours_lps.nii.gz"))[0] - expected)[inner].max() < 5e-3


def test_jacobian_folds_and_log(files, capsys):
    """A folding map: the summary counts det <= 0 as the analytic map does (± 2 % of voxels); ``--log`` writes log(det), NaN on folds, and warns."""
    plain, logged = os.path.join(files["root"], "jac_fold.nii.gz"), os.path.join(files["root"], "logjac_fold.nii.gz")
    code, stdout, err = cli(["jacobian", "--transform", files["folding"], "--fixed", files["fixed_oblique"], "--out", plain], capsys)
    assert code == 0, err
    det = read(plain)[0]
    folds = int(np.count_nonzero(det <= 0))
    expected = finite_difference_det(folding_map, world_points(FIXED_OBLIQUE, FIXED_SHAPE))
    assert folds > 0 and abs(folds - np.count_nonzero(expected <= 0)) <= 0.02 * det.size
    assert f"folds {folds} of {det.size} voxels ({100 * folds / det.size:.4f} %)" in stdout
    with pytest.warns(UserWarning, match=f"{folds} voxel"):
        code = main(["jacobian", "--transform", files["folding"], "--fixed", files["fixed_oblique"], "--out", logged, "--log"])
    assert code == 0
    log_det = read(logged)[0]
    assert np.count_nonzero(np.isnan(log_det)) == folds
    positive = det > 0
    np.testing.assert_allclose(log_det[positive], np.log(det[positive]), rtol=1e-5, atol=1e-6)


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["text_transform", "missing_moving", "missing_transform_jacobian", "text_transform_jacobian"])
def test_bad_input_exits_2_with_one_line(files, capsys, case):
    """Bad input: exit code 2 and one ``monai-gradicon: error: ...`` line naming the problem."""
    out = os.path.join(files["root"], "bad.nii.gz")
    args, words = {
        "text_transform": (["warp", "--moving", files["moving"], "--fixed", files["fixed_oblique"], "--transform", files["text"], "--out", out],
                           "not an ITK transform file"),
        "missing_moving": (["warp", "--moving", os.path.join(files["root"], "nope.nii.gz"), "--fixed", files["fixed_oblique"], "--out", out],
                           "moving image /does not exist"),
        "missing_transform_jacobian": (["jacobian", "--transform", os.path.join(files["root"], "nope.h5"), "--fixed", files["fixed_oblique"],
                                        "--out", out], "does not exist"),
        "text_transform_jacobian": (["jacobian", "--transform", files["text"], "--fixed", files["fixed_oblique"], "--out", out],
                                    "not an ITK transform file"),
    }[case]
    code, _, err = cli(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("monai-gradicon: error: "), err
    assert all(word in lines[0] for word in words.split(" /")), (words, err)
    assert not os.path.exists(out)
