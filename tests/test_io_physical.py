"""Reading images with their affine and writing displacement fields / ITK transforms (RAS <-> LPS)."""

from __future__ import annotations

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
    voxel). ``reverse_axes=True``: network axis ``a`` shows file axis ``D-1-a`` (ITK array order).
    """
    from monai_gradicon.register import PairGeometry, _to_network

    file_shape, network_shape = RESIZES[dims]
    geometry = PairGeometry(file_shape, network_shape, reverse_axes=True, align_corners=align_corners)
    ramps = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in file_shape], indexing="ij"))
    reversed_layout = ramps[None].permute(0, 1, *range(dims + 1, 1, -1))  # network axis a = file axis D-1-a
    mode = "bilinear" if dims == 2 else "trilinear"
    sampled = F.interpolate(reversed_layout, size=network_shape, mode=mode, align_corners=align_corners)[0]
    # the register pipeline's resize is this one (the same axes, the same convention)
    torch.testing.assert_close(_to_network(ramps[:1], geometry, torch.device("cpu"))[0, 0], sampled[0], rtol=0, atol=1e-12)

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


def test_pair_geometry_ras_convention_matches_the_bundle_transforms(tmp_path):
    """A bundle directory's convention (RAS reorientation, align_corners=True) is what Orientationd + Resized do."""
    from monai.transforms import LoadImage, Orientation, Resize

    from monai_gradicon.io import load_image
    from monai_gradicon.register import PairGeometry, _to_network
    from monai_gradicon.registration_model import RegistrationModel

    shape, network_shape = (6, 9, 7), (11, 8, 13)
    affine = np.array([[0.0, 0.0, -2.0, 10.0], [-1.5, 0.0, 0.0, 4.0], [0.0, 1.0, 0.0, -3.0], [0, 0, 0, 1.0]])  # axes permuted and flipped
    volume = np.random.default_rng(0).random(shape).astype(np.float32)
    path = save(tmp_path / "oblique.nii.gz", volume, affine)
    model = RegistrationModel(network=torch.nn.Identity(), spatial_shape=network_shape, orientation="RAS", align_corners=True)
    image = load_image(path)
    geometry = PairGeometry.for_image(image, model)
    ours = _to_network(image.array, geometry, torch.device("cpu"))[0]
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


def test_bundle_directory_defaults_to_its_configs_convention(tmp_path):
    from registration_helpers import write_tiny_bundle

    from monai_gradicon.registration_model import load_registration_model

    model = load_registration_model(write_tiny_bundle(str(tmp_path / "b")), device="cpu")
    assert (model.orientation, model.align_corners) == ("RAS", True)
    knee = load_registration_model("knee", device="cpu")
    assert (knee.orientation, knee.reverse_axes, knee.align_corners) == ("none", True, False)
