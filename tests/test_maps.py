"""Identity grid, DDF <-> map conversion, warping, composition, Jacobian determinant and folds."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks import Warp

from monai_gradicon.maps import (
    Deformation,
    ddf_to_map,
    fold_count,
    fold_percentage,
    identity_grid,
    jacobian_determinant,
    map_to_ddf,
    warp,
)

SHAPES = {2: (9, 11), 3: (7, 8, 9)}


def test_identity_grid_puts_first_and_last_voxel_at_zero_and_one():
    grid = identity_grid((4, 5))
    assert grid.shape == (1, 2, 4, 5)
    torch.testing.assert_close(grid[0, 0, :, 0], torch.tensor([0, 1 / 3, 2 / 3, 1]))
    torch.testing.assert_close(grid[0, 1, 0, :], torch.tensor([0, 0.25, 0.5, 0.75, 1]))
    with pytest.raises(ValueError, match=r"every spatial size >= 2, got \(1, 5\)"):
        identity_grid((1, 5))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_ddf_and_map_convert_with_n_minus_one(spatial_dims):
    shape = SHAPES[spatial_dims]
    ddf = torch.randn((3, spatial_dims, *shape), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    phi = ddf_to_map(ddf)
    # one voxel of displacement along axis k is 1/(N_k - 1) in map units
    unit = torch.zeros_like(ddf)
    unit[:, -1] = 1.0
    torch.testing.assert_close((ddf_to_map(unit) - identity_grid(shape, torch.float64))[:, -1],
                               torch.full_like(unit[:, -1], 1 / (shape[-1] - 1)))
    torch.testing.assert_close(map_to_ddf(phi), ddf)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_warp_equals_monai_warp_and_moves_content_the_contract_way(spatial_dims):
    shape = SHAPES[spatial_dims]
    g = torch.Generator().manual_seed(1)
    image = torch.rand((2, 3, *shape), dtype=torch.float64, generator=g)
    ddf = torch.randn((2, spatial_dims, *shape), dtype=torch.float64, generator=g)
    # our grid holds float32-rounded coordinates (mirroring the reference), MONAI's exact float64 ones:
    # a sampling-position difference of ~1e-8 voxel
    torch.testing.assert_close(warp(image, ddf), Warp(mode="bilinear", padding_mode="border")(image, ddf),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(warp(image.float(), ddf.float()),
                               Warp(mode="bilinear", padding_mode="border")(image.float(), ddf.float()))
    # ddf = +1 voxel along the last axis: out(x) = image(x + 1)
    shift = torch.zeros_like(ddf)
    shift[:, -1] = 1.0
    torch.testing.assert_close(warp(image, shift)[..., :-1], image[..., 1:], rtol=1e-6, atol=1e-6)


def test_label_warping_is_nearest_and_keeps_the_label_set():
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 4, (1, 1, 12, 13), generator=g).float()
    ddf = torch.randn((1, 2, 12, 13), generator=g) * 0.8
    out = warp(labels, ddf, mode="nearest")
    assert set(out.unique().tolist()) <= set(labels.unique().tolist())
    # each pixel takes the label of the pixel nearest to x + ddf(x) (clamped to the image)
    rows, cols = torch.meshgrid(torch.arange(12.0), torch.arange(13.0), indexing="ij")
    r = (rows + ddf[0, 0]).round().clamp(0, 11).long()
    c = (cols + ddf[0, 1]).round().clamp(0, 12).long()
    nearest = labels[0, 0][r, c]
    assert float((out[0, 0] == nearest).float().mean()) > 0.97  # ties at exactly .5 may round either way
    assert not torch.equal(out, labels)
    torch.testing.assert_close(out, Warp(mode="nearest", padding_mode="border")(labels, ddf))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_composition_of_translations_adds_them(spatial_dims):
    shape = SHAPES[spatial_dims]
    t1, t2 = torch.zeros((1, spatial_dims, *shape)), torch.zeros((1, spatial_dims, *shape))
    t1[:, 0], t2[:, -1] = 1.0, -2.0
    composed = Deformation.from_ddf(t1).compose(Deformation.from_ddf(t2))
    ddf = composed.ddf()
    inner = tuple(slice(2, -2) for _ in shape)  # away from the border clamp
    torch.testing.assert_close(ddf[(0, 0) + inner], torch.ones_like(ddf[(0, 0) + inner]))
    torch.testing.assert_close(ddf[(0, -1) + inner], torch.full_like(ddf[(0, -1) + inner], -2.0))
    # order matters for non-commuting maps: self ∘ inner applies inner first
    identity = identity_grid(shape)
    squash = Deformation([0.5 * identity - identity])  # x -> x / 2 in [0, 1] coordinates
    t1_unit = torch.zeros((1, spatial_dims) + (1,) * spatial_dims)
    t1_unit[:, 0] = 1.0 / (shape[0] - 1)  # t1 in [0, 1] units
    scale = torch.tensor([n - 1 for n in shape], dtype=torch.float32).reshape(1, -1, *([1] * spatial_dims))
    squash_after = squash.compose(Deformation.from_ddf(t1)).ddf()  # x -> (x + t1) / 2
    squash_first = Deformation.from_ddf(t1).compose(squash).ddf()  # x -> x / 2 + t1
    inner = (slice(None), slice(None)) + tuple(slice(0, -2) for _ in shape)  # x + t1 stays inside the image
    torch.testing.assert_close(squash_after[inner], (((identity + t1_unit) / 2 - identity) * scale)[inner], rtol=0, atol=1e-5)
    torch.testing.assert_close(squash_first, ((identity / 2 + t1_unit - identity) * scale), rtol=0, atol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_jacobian_of_identity_and_of_a_scaling(spatial_dims):
    shape = SHAPES[spatial_dims]
    zero = torch.zeros((2, spatial_dims, *shape))
    torch.testing.assert_close(jacobian_determinant(zero), torch.ones((2, *[n - 1 for n in shape])))
    assert fold_count(zero).tolist() == [0.0, 0.0]
    # ddf = 0.5·x along every axis -> det = 1.5^D everywhere
    grid = map_to_ddf(identity_grid(shape)) * 0 + torch.stack(
        torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))[None]
    torch.testing.assert_close(jacobian_determinant(0.5 * grid), torch.full((1, *[n - 1 for n in shape]), 1.5**spatial_dims))


def test_known_fold_count():
    """A 2D map that mirrors the last axis on a band of 3 columns folds exactly there."""
    h, w = 6, 10
    cols = torch.arange(w, dtype=torch.float32)
    folded = cols.clone()
    folded[4:7] = torch.tensor([6.0, 5.0, 4.0])  # reversed order: negative ∂x/∂col across the band
    phi = torch.stack(torch.meshgrid(torch.arange(h, dtype=torch.float32), folded, indexing="ij"))[None]
    ddf = phi - torch.stack(torch.meshgrid(torch.arange(h, dtype=torch.float32), cols, indexing="ij"))[None]
    det = jacobian_determinant(ddf)
    # forward differences along columns: 3→6 (+), 6→5 (−), 5→4 (−), 4→7 (+): two negative columns × (h−1) rows
    assert fold_count(ddf).tolist() == [2.0 * (h - 1)]
    torch.testing.assert_close(fold_percentage(ddf), torch.tensor([100.0 * 2 / (w - 1)]))
    assert (det[:, :, 4:6] < 0).all() and (det[:, :, :4] > 0).all()


def test_bad_ddf_is_rejected():
    with pytest.raises(ValueError, match=r"ddf must have shape \(B, 2, H, W\).*got \(1, 3, 5, 5\)"):
        jacobian_determinant(torch.zeros((1, 3, 5, 5)))
    nan = torch.zeros((1, 2, 5, 5))
    nan[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="finite values, got 1 NaN"):
        fold_count(nan)
    with pytest.raises(ValueError, match="share the spatial shape"):
        warp(torch.zeros((1, 1, 5, 5)), torch.zeros((1, 2, 5, 6)))
