"""Loss behaviour: the self-adaptive NCC of Eq. 7/8, GradICON/ICON properties, reductions, argument errors."""

from __future__ import annotations

import icon_registration.losses as icon_losses
import pytest
import torch

from monai_gradicon.losses import GradICONLoss, GradICONObjective, ICONLoss, LNCCLoss, NCCLoss, SelfAdaptiveNCCLoss


def _blobs(shape, shift=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((2, 1, *[max(2, n // 8) for n in shape]), generator=g)
    x = torch.nn.functional.interpolate(x, size=shape, mode="bilinear" if len(shape) == 2 else "trilinear")
    return torch.roll(x, shifts=shift, dims=-1)


# ---- self-adaptive multi-scale NCC (Eq. 7, 8)

@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("alpha", [None, 0.1])
def test_adaptive_ncc_is_zero_for_equal_images(spatial_dims, alpha):
    a = _blobs((32,) * spatial_dims)
    loss = SelfAdaptiveNCCLoss(spatial_dims, num_scales=3, alpha=alpha, beta=1.3)
    assert abs(float(loss(a, a.clone()))) < 1e-5
    assert loss.gammas.shape == (2, 3) and loss.scale_weights.shape == (2, 4)
    torch.testing.assert_close(loss.scale_weights.sum(1), torch.ones(2))


def test_adaptive_ncc_matches_the_reference_with_shifted_threshold():
    a, b = _blobs((32, 32, 32), seed=1), _blobs((32, 32, 32), shift=3, seed=1)
    ref = icon_losses.AdaptiveNCC(level=4, threshold=0.1, gamma=1.5)(a, b)
    ours = SelfAdaptiveNCCLoss(3, num_scales=4, alpha=0.1 / 1.5, beta=1.5)(a, b)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    assert float(ours) != pytest.approx(float(SelfAdaptiveNCCLoss(3, 4, alpha=0.1, beta=1.5)(a, b)), rel=1e-6)


def test_greedy_thresholds_follow_eq8():
    loss = SelfAdaptiveNCCLoss(2, num_scales=4, alpha=0.1, beta=1.3)
    assert loss.thresholds() == pytest.approx([0.1 / 1.3**3, 0.1 / 1.3**2, 0.1 / 1.3, 0.1])
    assert SelfAdaptiveNCCLoss(2, num_scales=4).thresholds() == [1.0] * 4


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_coarse_misalignment_puts_the_weight_on_the_coarsest_scale(spatial_dims):
    a = _blobs((32,) * spatial_dims, seed=3)
    far = _blobs((32,) * spatial_dims, shift=12, seed=3)
    near = a + 0.02 * torch.randn(a.shape, generator=torch.Generator().manual_seed(13))
    loss = SelfAdaptiveNCCLoss(spatial_dims, num_scales=3, alpha=0.1, beta=1.3)
    loss(a, far)
    weights_far = loss.scale_weights.mean(0)
    assert int(weights_far.argmax()) == 3 and weights_far[3] > 0.9  # greedy: coarse NCC above its threshold → γ_Q = 1
    loss(a, near)
    weights_near = loss.scale_weights.mean(0)
    assert weights_near[3] < weights_far[3] and weights_near[:3].sum() > 0.5  # aligned: focus moves to finer scales


def test_adaptive_weights_are_not_backpropagated():
    a = _blobs((32, 32), seed=4)
    b = _blobs((32, 32), shift=5, seed=4).requires_grad_(True)
    loss = SelfAdaptiveNCCLoss(2, num_scales=2)
    value = loss(a, b)
    value.backward()
    assert loss.gammas.requires_grad is False and float(b.grad.abs().max()) > 0
    # gradient equals that of the blend with the γ held constant
    g1 = b.grad.clone()
    b.grad = None
    sims = [NCCLoss(2, reduction="none")(x, y) for x, y in zip(loss.pyramid(a), loss.pyramid(b))]
    w = loss.scale_weights
    (sum(w[:, i] * sims[i] for i in range(3)).mean()).backward()
    torch.testing.assert_close(b.grad, g1, rtol=1e-4, atol=1e-7)


# ---- GradICON / ICON properties

@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("loss_cls", [GradICONLoss, ICONLoss])
def test_identity_pair_has_zero_regulariser(spatial_dims, loss_cls):
    shape = (2, spatial_dims) + (12,) * spatial_dims
    ddf = torch.zeros(shape)
    loss = loss_cls(spatial_dims, generator=torch.Generator().manual_seed(0))
    assert float(loss(ddf, ddf)) < 1e-9
    # and it is not zero for everything: a smooth non-inverse pair costs something
    bumpy = torch.randn((2, spatial_dims) + (3,) * spatial_dims, generator=torch.Generator().manual_seed(1))
    bumpy = torch.nn.functional.interpolate(bumpy, size=shape[2:], mode="bilinear" if spatial_dims == 2 else "trilinear")
    assert float(loss(bumpy, bumpy)) > 1e-4


def test_gradicon_ignores_a_consistent_translation_that_icon_penalises():
    """GradICON penalises the Jacobian of Φ_AB∘Φ_BA − Id, so a constant offset costs nothing (Sec. 4)."""
    shape = (40, 40)
    t = torch.zeros((1, 2, *shape))
    t[:, 1] = 0.5  # Φ_AB∘Φ_BA = shift by 1 voxel: not inverse consistent, but its Jacobian is I
    noise = torch.randn((1, 2, *shape), generator=torch.Generator().manual_seed(0)) * 0.01
    grad_icon = GradICONLoss(2)(t, t, noise=noise)
    icon = ICONLoss(2)(t, t, noise=noise)
    assert float(icon) > 1e-4
    assert float(grad_icon) < 1e-3 * float(icon) / (1 / 39) ** 2


@pytest.mark.parametrize("reduction,shape", [("none", (3,)), ("sum", ()), ("mean", ())])
def test_reductions(reduction, shape):
    g = torch.Generator().manual_seed(0)
    ddf = torch.randn((3, 2, 10, 10), generator=g) * 0.3
    noise = torch.randn((1, 2, 10, 10), generator=g)
    value = GradICONLoss(2, reduction=reduction)(ddf, ddf.flip(0), noise=noise)
    assert value.shape == shape
    # "none": sample i's value is the loss of pair i alone (the same noise for every sample)
    per = torch.stack([GradICONLoss(2)(ddf[i : i + 1], ddf.flip(0)[i : i + 1], noise=noise) for i in range(3)])
    assert float(per.min()) > 0 and len({round(float(v), 6) for v in per}) == 3  # three different values
    expected = {"none": per, "sum": per.sum(), "mean": per.mean()}[reduction]
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=0)


def test_generator_makes_the_perturbation_reproducible():
    ddf = torch.randn((1, 3, 17, 17, 17), generator=torch.Generator().manual_seed(0)) * 0.5
    first = GradICONLoss(3, generator=torch.Generator().manual_seed(1))(ddf, -ddf)
    second = GradICONLoss(3, generator=torch.Generator().manual_seed(1))(ddf, -ddf)
    third = GradICONLoss(3, generator=torch.Generator().manual_seed(2))(ddf, -ddf)
    assert float(first) == float(second) != float(third)
    # the generator's draw is the perturbation: injecting the same ξ gives the same value
    xi = torch.randn((1, 3, 17, 17, 17), generator=torch.Generator().manual_seed(1))
    assert float(GradICONLoss(3)(ddf, -ddf, noise=xi)) == float(first)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: GradICONLoss(4), "spatial_dims must be 2 or 3, got 4"),
        (lambda: GradICONLoss(2, delta=0), "delta must be > 0, got 0"),
        (lambda: LNCCLoss(2, sigma=0.5), "sigma must be a positive integer"),
        (lambda: SelfAdaptiveNCCLoss(2, num_scales=0), "num_scales must be an integer >= 1, got 0"),
        (lambda: SelfAdaptiveNCCLoss(2, alpha=0.1, beta=0.9), "beta must be > 1, got 0.9"),
        (lambda: GradICONObjective(torch.nn.MSELoss(), GradICONLoss(2), 0), "lmbda must be > 0, got 0"),
        (lambda: GradICONObjective(torch.nn.MSELoss(), torch.nn.MSELoss(), 1), "must be a GradICONLoss or ICONLoss, got MSELoss"),
        (lambda: GradICONLoss(2, reduction="median"), "median"),
    ],
)
def test_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_tensors():
    loss = GradICONLoss(2)
    with pytest.raises(ValueError, match=r"phi_AB must have shape \(B, 2, H, W\) for spatial_dims=2, got \(1, 3, 8, 8\)"):
        loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"share the spatial shape, got \(8, 8\) and \(8, 9\)"):
        loss(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 9))
    with pytest.raises(ValueError, match=r"noise must have shape \(1, 2, 8, 8\), got \(1, 2, 8\)"):
        loss(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8), noise=torch.zeros(1, 2, 8))
    with pytest.raises(ValueError, match="phi_BA must hold only finite values"):
        loss(torch.zeros(1, 2, 8, 8), torch.full((1, 2, 8, 8), float("nan")))
    with pytest.raises(ValueError, match=r"pred and target must have the same shape"):
        NCCLoss(2)(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match=r"too small for num_scales=4"):
        small = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
        SelfAdaptiveNCCLoss(2, num_scales=4)(small[:1], small[1:])
