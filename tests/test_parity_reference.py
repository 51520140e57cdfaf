"""Parity with the authors' implementation, icon_registration 1.1.9 (the oracle).

Same weights, same inputs, same injected perturbation: our maps, loss components, similarity values,
fold counts and parameter gradients must equal the reference's. A wrong sign, step size, axis order,
noise scale, composition order or resolution makes these fail.
"""

from __future__ import annotations

import icon_registration as icon
import icon_registration.losses as icon_losses
import icon_registration.networks as icon_networks
import pytest
import torch
from reference_oracle import perturb_reference_weights, reference_loss, reference_network

from monai_gradicon.losses import GradICONLoss, GradICONObjective, ICONLoss, LNCCLoss, NCCLoss
from monai_gradicon.maps import ddf_to_map, fold_count, fold_percentage, map_to_ddf
from monai_gradicon.networks import (
    GradICONUNet,
    convert_reference_state_dict,
    load_reference_weights,
    multistep_network,
)

SHAPES = {2: (37, 42), 3: (17, 18, 19)}
LEVELS = {2: [(0,), (1, 0), (2, 1, 0, 0)], 3: [(0,)]}
CASES = [(d, lv, b, dt) for d in (2, 3) for lv in LEVELS[d] for b in (1, 3) for dt in (torch.float32, torch.float64)]
# GradICON on every case; the sparse GradICON and plain ICON regularisers on the batch-3 cases
OBJECTIVE_CASES = [("gradicon", *c) for c in CASES] + [(k, *c) for k in ("sparse", "icon") for c in CASES if c[2] == 3]


def _tolerances(dtype):
    # float32: rtol 1e-5 on maps and similarity, 1e-4 on the finite-difference (gradient) term
    return (1e-5, 1e-4, 1e-6) if dtype == torch.float32 else (1e-10, 1e-10, 1e-12)


def _twins(spatial_dims, levels, dtype, seed=0, channels=None):
    """The reference network and ours with the same (perturbed) weights.

    ``channels=(down, up)`` builds every step from a narrow ``UNet2(len(down), ...)`` of the reference and
    its twin ``GradICONUNet(spatial_dims, 1, down, up)`` instead of the 17.7M-parameter ``tallUNet2``.
    """
    torch.manual_seed(seed)  # the default initialisation (overwritten below, but keeps the build reproducible)
    unet = subnetwork = None
    last_std = 0.005
    if channels is not None:
        down, up = channels
        unet = lambda: icon_networks.UNet2(len(down), [[2, *down], list(up)], spatial_dims)  # noqa: E731
        subnetwork = lambda: GradICONUNet(spatial_dims, 1, down, up)  # noqa: E731
        last_std = 0.03  # fewer input channels to the last conv: a larger std for a comparable displacement
    ref = perturb_reference_weights(reference_network(spatial_dims, levels, unet), torch.Generator().manual_seed(seed), std=0.02, last_std=last_std)
    ours = multistep_network(spatial_dims, levels, subnetwork=subnetwork)
    load_reference_weights(ours, ref.state_dict())
    return ref.to(dtype), ours.to(dtype)


def _images(batch, shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand((batch, 1, *shape), generator=g, dtype=torch.float64)
    b = torch.roll(a, shifts=2, dims=-1) * 0.8 + 0.2 * torch.rand((batch, 1, *shape), generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


def _reference_gradients(ref_net, ours):
    """The reference's parameter gradients under our parameter names (translated like a checkpoint)."""
    state = dict(ref_net.state_dict())
    state.update({name: p.grad for name, p in ref_net.named_parameters()})
    return convert_reference_state_dict(state, ours)


def _check_objective_parity(kind, spatial_dims, levels, batch, dtype, shape, channels=None):
    """Train-mode forward of both directions + backward of the whole objective, in both implementations:
    the maps, every loss component, every parameter gradient and every BatchNorm buffer must agree."""
    rtol, rtol_grad, atol = _tolerances(dtype)
    ref_net, ours = _twins(spatial_dims, levels, dtype, channels=channels)
    lmbda = {"gradicon": 0.2, "sparse": 1.5, "icon": 1024.0}[kind]
    model = reference_loss(kind, ref_net, icon.SSD(), lmbda, (batch, 1, *shape)).to(dtype)
    model.train()
    ours.train()
    a, b = _images(batch, shape, dtype)

    torch.manual_seed(123)
    out = model(a, b)
    out.all_loss.backward()

    regularizer = {"gradicon": GradICONLoss(spatial_dims), "sparse": GradICONLoss(spatial_dims, sparse=True),
                   "icon": ICONLoss(spatial_dims)}[kind]
    objective = GradICONObjective(torch.nn.MSELoss(), regularizer, lmbda)
    torch.manual_seed(123)
    noise = torch.randn((1, spatial_dims, *shape))  # the draw the reference made after seeding
    phi_AB = ours.deformation(a, b)
    phi_BA = ours.deformation(b, a)
    terms = objective(a, b, phi_AB, phi_BA, noise=noise)
    terms.total.backward()

    # the perturbed weights really deform (else a wrong composition or resolution would go unseen)
    assert float(map_to_ddf(model.phi_AB_vectorfield.detach()).abs().max()) > 0.1
    torch.testing.assert_close(phi_AB.map(), model.phi_AB_vectorfield.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(phi_BA.map(), model.phi_BA_vectorfield.detach(), rtol=rtol, atol=atol)
    # the DDF contract: ddf = (Φ(id) − id)·(N − 1) per axis
    torch.testing.assert_close(phi_AB.ddf().detach(), map_to_ddf(model.phi_AB_vectorfield.detach()),
                               rtol=rtol, atol=1e-5 if dtype == torch.float32 else 1e-10)
    torch.testing.assert_close(terms.similarity, out.similarity_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(terms.regularizer, out.inverse_consistency_loss, rtol=rtol_grad, atol=atol)
    torch.testing.assert_close(terms.total, out.all_loss, rtol=rtol_grad, atol=atol)
    torch.testing.assert_close(terms.transform_magnitude, out.transform_magnitude, rtol=rtol, atol=atol)
    assert float(terms.regularizer.detach()) > 0
    assert float(terms.folds) == float(out.flips)
    # the same parameter gradients, so training follows the same path
    ref_grads = _reference_gradients(ref_net, ours)
    params = dict(ours.named_parameters())
    assert len(params) == len(list(ref_net.parameters()))
    grad_rtol = 1e-3 if dtype == torch.float32 else 1e-8
    for name, p in params.items():
        assert float(ref_grads[name].abs().max()) > 0, name  # every layer takes part
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=grad_rtol,
                                   atol=1e-5 if dtype == torch.float32 else 1e-12, msg=lambda m: f"{name}: {m}")
    # BatchNorm running statistics evolved identically through the two directional passes
    ref_state = convert_reference_state_dict(ref_net.state_dict(), ours)
    buffers = dict(ours.named_buffers())
    assert buffers and all(int(v) == 2 for k, v in buffers.items() if k.endswith("num_batches_tracked"))
    for name, buf in buffers.items():
        if name.endswith("running_var"):
            assert float((buf - 1).abs().max()) > 1e-4, name  # moved away from its initial value
        torch.testing.assert_close(buf, ref_state[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind,spatial_dims,levels,batch,dtype", OBJECTIVE_CASES)
def test_objective_and_maps_match_reference(kind, spatial_dims, levels, batch, dtype):
    _check_objective_parity(kind, spatial_dims, levels, batch, dtype, SHAPES[spatial_dims])


# 3D multistep layouts at small legal sizes. The 5-level tallUNet2 needs >= 17 voxels per axis at its own
# resolution, so the 2-step net (half, full) needs 33; it runs the real tallUNet2 twins. The 4-step net
# (quarter, half, full, full: the layout of the released knee/lung models) would need 65 voxels per axis
# (20-40 s per case on one thread, a minute in float64); it runs narrow 3-level UNet2 twins instead (>= 5
# voxels per U-Net level, so 17 at full resolution): the same composition, downsampling, warping and
# BatchNorm tree. The full-width 4-step forward is compared in test_reference_weights.
NARROW_UNET = ((3, 4, 6), (2, 3, 4))  # channels zero-padded at the front going down, cropped going up
LAYOUTS_3D = {
    "2-step": dict(levels=(1, 0), shape=(33, 34, 35), channels=None),
    "4-step": dict(levels=(2, 1, 0, 0), shape=(17, 18, 19), channels=NARROW_UNET),
}
CASES_3D = [
    ("gradicon", "2-step", 2, torch.float32),
    ("sparse", "2-step", 1, torch.float32),
    ("gradicon", "4-step", 2, torch.float64),
    ("sparse", "4-step", 2, torch.float64),
    ("gradicon", "4-step", 2, torch.float32),
    ("sparse", "4-step", 2, torch.float32),
]


@pytest.mark.parametrize(
    "kind,layout,batch,dtype", CASES_3D, ids=[f"{k}-{lay}-batch{b}-{str(d)[6:]}" for k, lay, b, d in CASES_3D]
)
def test_3d_multistep_objective_matches_reference(kind, layout, batch, dtype):
    case = LAYOUTS_3D[layout]
    _check_objective_parity(kind, 3, case["levels"], batch, dtype, case["shape"], case["channels"])


def test_generator_draws_the_reference_noise():
    """A seeded generator reproduces the reference's global-RNG draw exactly (CPU, float32)."""
    ref_net, ours = _twins(2, (0,), torch.float32)
    shape = SHAPES[2]
    model = reference_loss("gradicon", ref_net, icon.SSD(), 0.2, (2, 1, *shape)).eval()
    ours.eval()
    a, b = _images(2, shape, torch.float32)
    torch.manual_seed(7)
    out = model(a, b)
    loss = GradICONLoss(2, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        value = loss(ours.deformation(a, b), ours.deformation(b, a))
    torch.testing.assert_close(value, out.inverse_consistency_loss.detach(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ddf_input_equals_one_step_deformation(spatial_dims, dtype):
    """Passing the dense DDF of a 1-step net gives the same regulariser as passing its Deformation."""
    _, ours = _twins(spatial_dims, (0,), dtype)
    ours.eval()
    shape = SHAPES[spatial_dims]
    a, b = _images(3, shape, dtype)
    noise = torch.randn((1, spatial_dims, *shape), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for loss in (GradICONLoss(spatial_dims), ICONLoss(spatial_dims)):
            exact = loss(ours.deformation(a, b), ours.deformation(b, a), noise=noise)
            dense = loss(ours(a, b), ours(b, a), noise=noise)
            # the dense path re-samples the field at the float32-rounded grid points (batch 3): ~1e-8 per
            # value, amplified by the 1/δ² of the finite differences
            torch.testing.assert_close(dense, exact, rtol=1e-4 if dtype == torch.float32 else 1e-5, atol=0)
            assert exact > 0


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_similarities_match_reference(spatial_dims, batch, dtype):
    shape = SHAPES[spatial_dims] if spatial_dims == 2 else (21, 22, 23)
    a, b = _images(batch, shape, dtype, seed=5)
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(NCCLoss(spatial_dims)(a, b), icon.NCC()(a, b), rtol=rtol, atol=0)
    for sigma in (1, 2):
        torch.testing.assert_close(LNCCLoss(spatial_dims, sigma)(a, b), icon.LNCC(sigma)(a, b), rtol=rtol, atol=0)
        torch.testing.assert_close(
            LNCCLoss(spatial_dims, sigma, squared=True)(a, b), icon_losses.SquaredLNCC(sigma)(a, b), rtol=rtol, atol=0
        )
    per_sample = NCCLoss(spatial_dims, reduction="none")(a, b)
    assert per_sample.shape == (batch,)
    torch.testing.assert_close(per_sample.mean(), icon.NCC()(a, b), rtol=rtol, atol=0)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_fold_counts_match_reference(spatial_dims):
    shape = SHAPES[spatial_dims]
    g = torch.Generator().manual_seed(11)
    ddf = torch.randn((3, spatial_dims, *shape), generator=g) * 0.7  # rough enough to fold in places
    phi = ddf_to_map(ddf)
    ours = fold_count(ddf)
    assert ours.sum() > 0
    assert float(ours.mean()) == float(icon_losses.flips(phi))
    torch.testing.assert_close(fold_percentage(ddf).mean(), icon_losses.flips(phi, in_percentage=True), rtol=1e-6, atol=0)
