"""Reading images with their affine and writing displacement fields / ITK transforms (RAS <-> LPS)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dependencies import require_simpleitk
from registration_helpers import oblique_affine, save


def test_load_image_keeps_array_order_and_affine(tmp_path):
    from monai_gradicon.io import load_image

    affine = oblique_affine()
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    image = load_image(save(str(tmp_path / "a.nii.gz"), data, affine), spatial_dims=3)
    assert image.spatial_shape == (4, 5, 6)
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(image.array[0].numpy(), data)
    np.testing.assert_allclose(image.spacing, [1.2, 0.9, 2.5], atol=1e-5)


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", "file not found"),
        ("text", "could not read"),
        ("nan", "NaN/inf"),
        ("2d", "is a 2D image"),
    ],
)
def test_load_image_rejects_bad_files_with_clear_messages(tmp_path, setup, message):
    from monai_gradicon.io import ImageReadError, load_image

    path = str(tmp_path / "x.nii.gz")
    if setup == "text":
        (tmp_path / "x.nii.gz").write_text("not an image")
    elif setup == "nan":
        data = np.ones((5, 5, 5), np.float32)
        data[2, 2, 2] = np.nan
        save(path, data, np.eye(4))
    elif setup == "2d":
        save(path, np.ones((8, 9), np.float32), np.eye(4))
    with pytest.raises(ImageReadError, match=message):
        load_image(path, "moving image", spatial_dims=3)


def test_itk_geometry_converts_ras_to_lps():
    from monai_gradicon.io import itk_geometry

    affine = oblique_affine()
    geometry = itk_geometry(affine, (4, 5, 6))
    np.testing.assert_allclose(geometry.spacing, [1.2, 0.9, 2.5])
    np.testing.assert_allclose(geometry.origin, [20.0, -14.0, 7.5])  # x and y change sign
    np.testing.assert_allclose(geometry.direction @ geometry.direction.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(geometry.direction[2], (affine[:3, :3] / [1.2, 0.9, 2.5])[2])


@pytest.mark.parametrize("dims", [2, 3])
def test_displacement_files_round_trip(tmp_path, dims):
    from monai_gradicon.io import (
        read_displacement_nifti,
        read_itk_displacement_transform,
        write_displacement_nifti,
        write_itk_displacement_transform,
    )

    rng = np.random.default_rng(dims)
    shape = (5, 6, 7)[:dims]
    field = rng.normal(size=(dims, *shape))
    affine = np.eye(dims + 1)
    affine[:dims, :dims] = np.diag(rng.uniform(0.5, 2.0, dims))
    affine[:dims, dims] = rng.normal(size=dims)
    write_displacement_nifti(field, affine, tmp_path / "u.nii.gz")
    back, back_affine = read_displacement_nifti(tmp_path / "u.nii.gz")
    np.testing.assert_allclose(back, field, atol=1e-6)
    np.testing.assert_allclose(back_affine, affine, atol=1e-6)
    write_itk_displacement_transform(field, affine, tmp_path / "t.h5")
    back, back_affine = read_itk_displacement_transform(tmp_path / "t.h5")
    np.testing.assert_allclose(back, field, atol=1e-12)
    np.testing.assert_allclose(back_affine, affine, atol=1e-12)


def test_itk_reads_our_2d_transform(tmp_path):
    sitk = require_simpleitk()
    from monai_gradicon.io import write_itk_displacement_transform

    field = np.zeros((2, 4, 5))
    field[0] += 1.5  # +1.5 mm along RAS x = -1.5 mm along LPS x
    field[1] -= 0.5
    write_itk_displacement_transform(field, np.diag([2.0, 3.0, 1.0]), tmp_path / "t2.h5")
    transform = sitk.ReadTransform(str(tmp_path / "t2.h5"))
    point = np.array([-2.0, -3.0])  # RAS (2, 3) -> LPS (-2, -3), voxel (1, 1)
    np.testing.assert_allclose(transform.TransformPoint(point.tolist()), point + [-1.5, 0.5], atol=1e-9)


# file shape, network shape: some axes up-sampled, one down-sampled, all sizes distinct (a swapped axis fails)
RESIZES = {2: ((10, 7), (8, 30)), 3: ((10, 12, 7), (20, 8, 30))}


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("dims", [2, 3])
def test_pair_geometry_is_where_f_interpolate_samples(dims, align_corners):
    """``index_to_unit``/``unit_to_index`` agree with the resize ``F.interpolate`` really does.

    Each channel of the file image is a ramp holding its voxel's index along one file axis, so the linear
    resize gives, at every network voxel, the file index it sampled (exact: linear interpolation of a linear
    function; at the borders of an ``align_corners=False`` up-sampling F.interpolate clamps to the first/last
    voxel). ``order="itk"``: network axis ``a`` shows file axis ``D-1-a`` (ITK array order).
    """
    from monai_gradicon.transforms.network_grid import PairGeometry

    file_shape, network_shape = RESIZES[dims]
    geometry = PairGeometry.from_affine(file_shape, np.eye(dims + 1), network_shape, order="itk", align_corners=align_corners)
    assert geometry.axis_order == tuple(reversed(range(dims)))
    ramps = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in file_shape], indexing="ij"))
    reversed_layout = ramps[None].permute(0, 1, *range(dims + 1, 1, -1))  # network axis a = file axis D-1-a
    mode = "bilinear" if dims == 2 else "trilinear"
    sampled = F.interpolate(reversed_layout, size=network_shape, mode=mode, align_corners=align_corners)[0]
    # the register pipeline's resize is this one (the same axes, the same convention)
    torch.testing.assert_close(geometry.to_network(ramps[None, :1], "linear")[0, 0], sampled[0], rtol=0, atol=1e-12)

    # network voxel centres n/(N-1) -> file indices: what F.interpolate sampled there
    centres = torch.stack(torch.meshgrid(
        *[torch.arange(n, dtype=torch.float64) / (n - 1) for n in network_shape], indexing="ij"))
    index = geometry.unit_to_index(centres[None])  # (P, D), file axis order
    sampled_index = sampled.reshape(dims, -1).T
    upper = torch.tensor(file_shape, dtype=torch.float64) - 1
    torch.testing.assert_close(index.clamp(torch.zeros(dims, dtype=torch.float64), upper), sampled_index, rtol=0, atol=1e-12)
    inside = ((index >= 0) & (index <= upper)).all(1)
    if align_corners:
        assert bool(inside.all())
    else:  # up-sampled axes: the outermost network voxels sample outside [0, S-1], where F.interpolate clamps
        assert 0 < int(inside.sum()) < len(index)

    # and back: the file index F.interpolate sampled at a network voxel maps to that voxel's centre
    unit = geometry.index_to_unit(sampled_index[inside])
    assert unit.shape == (1, dims, int(inside.sum())) + (1,) * (dims - 1)
    torch.testing.assert_close(unit.reshape(dims, -1).T, centres.reshape(dims, -1).T[inside], rtol=0, atol=1e-12)
    torch.testing.assert_close(geometry.unit_to_index(unit), sampled_index[inside], rtol=0, atol=1e-12)


# axes permuted and flipped (stored codes "PSL"): RAS x = file axis 2 (read backwards), y = file axis 0 (backwards), z = 1
PERMUTED_AFFINE = np.array([[0.0, 0.0, -2.0, 10.0], [-1.5, 0.0, 0.0, 4.0], [0.0, 1.0, 0.0, -3.0], [0, 0, 0, 1.0]])


def test_pair_geometry_ras_convention_matches_the_bundle_transforms(tmp_path):
    """The RAS convention (``order="file"``, ``axcodes="RAS"``, ``align_corners=True``) is what Orientation + Resize do."""
    from monai.transforms import LoadImage, Orientation, Resize

    from monai_gradicon.io import load_image
    from monai_gradicon.transforms.network_grid import PairGeometry

    shape, network_shape = (6, 9, 7), (11, 8, 13)
    volume = np.random.default_rng(0).random(shape).astype(np.float32)
    path = save(tmp_path / "oblique.nii.gz", volume, PERMUTED_AFFINE)
    image = load_image(path)
    geometry = PairGeometry.from_affine(image.spatial_shape, image.affine, network_shape, order="file", align_corners=True, axcodes="RAS")
    ours = geometry.to_network(image.array[None], "linear")[0]
    monai_image = LoadImage(image_only=True, ensure_channel_first=True)(path)
    expected = Resize(network_shape, mode="trilinear", align_corners=True)(Orientation("RAS")(monai_image))
    torch.testing.assert_close(ours, torch.as_tensor(expected).as_subclass(torch.Tensor).float(), atol=1e-5, rtol=1e-5)
    # index_to_unit puts each corner voxel of the file where the resized network image shows it
    index = torch.tensor([[0.0, 0.0, 0.0], [5.0, 8.0, 6.0], [5.0, 0.0, 6.0]], dtype=torch.float64)
    unit = geometry.index_to_unit(index)
    np.testing.assert_allclose(geometry.unit_to_index(unit).numpy(), index.numpy(), atol=1e-12)
    scale = torch.tensor([n - 1 for n in network_shape], dtype=torch.float64)
    network_index = unit.reshape(3, -1).T * scale
    assert torch.allclose(network_index, network_index.round(), atol=1e-9)  # corners land on corners
    network_index = network_index.round().long()
    ras_layout = geometry.to_network_layout(image.array[None])[0, 0]  # reoriented, not resized
    for p in range(3):
        assert float(ours[0][tuple(network_index[p])]) == pytest.approx(float(image.array[0][tuple(index[p].long())]), abs=1e-5)
    assert ras_layout.shape == (7, 6, 9)  # RAS x = file axis 2, y = file axis 0, z = file axis 1
    oriented = torch.as_tensor(Orientation("RAS")(monai_image)).as_subclass(torch.Tensor).float()[0]
    torch.testing.assert_close(ras_layout, oriented, rtol=0, atol=0)  # the same voxels, reoriented as MONAI does
    assert not torch.equal(ras_layout, image.array[0].permute(2, 0, 1))  # the flips are applied, not just the permutation


@pytest.mark.parametrize("affine_kind", ["permuted", "oblique", "oblique_ras"])
def test_to_network_gridd_ras_equals_monai_orientation_and_resize(tmp_path, affine_kind):
    """``ToNetworkGridd`` in the RAS convention = MONAI ``Orientation("RAS")`` + ``Resize(align_corners=True)``.

    Values (1e-5) and the output ``MetaTensor``'s affine (1e-6 mm) equal MONAI's; ``network_affine`` (the
    affine ToNetworkGridd writes) carries network voxel ``n`` to where ``unit_to_index(n / (N − 1))`` lands
    in the file, mapped through the file's affine (1e-9 mm), and masks are resized by nearest neighbour.
    """
    from monai.data import MetaTensor
    from monai.transforms import LoadImage, Orientation, Resize

    from monai_gradicon.io import apply_affine
    from monai_gradicon.transforms import ToNetworkGridd

    shape, network_shape = (6, 9, 7), (11, 8, 13)
    affine = {
        "permuted": PERMUTED_AFFINE,
        "oblique": oblique_affine(spacing=(1.3, 0.8, 2.1), angles=(0.3, -0.2, 2.0)),  # codes "ALS": reoriented
        "oblique_ras": oblique_affine(spacing=(1.3, 0.8, 2.1), angles=(0.3, -0.2, 0.25)),  # RAS: resized only
    }[affine_kind]
    volume = np.random.default_rng(1).random(shape).astype(np.float32)
    path = save(tmp_path / "image.nii.gz", volume, affine)
    monai_image = LoadImage(image_only=True, ensure_channel_first=True)(path)
    mask = MetaTensor((torch.as_tensor(volume) > 0.5)[None].float(), affine=monai_image.affine.clone())
    grid = ToNetworkGridd(["image", "mask"], network_shape, order="file", align_corners=True, axcodes="RAS", mask_keys="mask")
    out = grid({"image": monai_image, "mask": mask})
    expected = Resize(network_shape, mode="trilinear", align_corners=True)(Orientation("RAS")(monai_image))

    assert isinstance(out["image"], MetaTensor) and tuple(out["image"].shape) == (1, *network_shape)
    torch.testing.assert_close(
        out["image"].as_tensor().float(), expected.as_tensor().float(), atol=1e-5, rtol=1e-5
    )
    np.testing.assert_allclose(out["image"].affine.numpy(), expected.affine.numpy(), atol=1e-6)
    np.testing.assert_allclose(out["mask"].affine.numpy(), expected.affine.numpy(), atol=1e-6)
    assert set(torch.unique(out["mask"]).tolist()) <= {0.0, 1.0}  # nearest neighbour, not a blend
    nearest = Resize(network_shape, mode="nearest-exact")(Orientation("RAS")(mask))
    torch.testing.assert_close(out["mask"].as_tensor().float(), nearest.as_tensor().float(), rtol=0, atol=0)
    assert nib.aff2axcodes(out["image"].affine.numpy()) == ("R", "A", "S")
    assert (nib.aff2axcodes(affine) == ("R", "A", "S")) == (affine_kind == "oblique_ras")

    geometry = out["geometry"]
    assert geometry.axis_order is not None and geometry.align_corners
    network_index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in network_shape], indexing="ij"), -1).reshape(-1, 3)
    unit = torch.from_numpy(network_index / (np.array(network_shape, np.float64) - 1)).T.reshape(1, 3, -1, 1, 1)
    file_index = geometry.unit_to_index(unit).numpy()
    np.testing.assert_allclose(
        apply_affine(geometry.network_affine(affine), network_index), apply_affine(affine, file_index), atol=1e-9
    )
    np.testing.assert_allclose(geometry.network_affine(affine), out["image"].affine.numpy(), atol=1e-6)


def test_bundle_directory_defaults_to_its_configs_convention(tmp_path):
    from registration_helpers import AUTHORS_CONVENTION, RAS_CONVENTION, write_tiny_bundle

    from monai_gradicon.app import load_registration_model

    model = load_registration_model(write_tiny_bundle(str(tmp_path / "b")), device="cpu", allow_untrained=True)
    assert model.convention == RAS_CONVENTION == {"order": "file", "align_corners": True, "axcodes": "RAS"}
    knee = load_registration_model("knee", device="cpu", allow_untrained=True)
    assert knee.convention == AUTHORS_CONVENTION == {"order": "itk", "align_corners": False, "axcodes": None}
    assert knee.network_shape == (80, 192, 192)
