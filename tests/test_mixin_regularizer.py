"""GradICON / ICON on MONAI DDFs from any network: values, exact inverses, errors, gradients, torch.compile.

The DDF-level regulariser *is* the core ``GradICONLoss`` / ``ICONLoss`` (one implementation); these tests
pin that a DDF, its :class:`Deformation` wrapper and its [0, 1] field give the same value, and that the
value equals an independent recomputation written directly in voxel units (the MONAI convention).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monai_gradicon.data import random_smooth_ddf
from monai_gradicon.losses import GradICONLoss, ICONLoss
from monai_gradicon.maps import Deformation, ddf_to_map, identity_grid

SHAPES = {2: (13, 17), 3: (9, 11, 12)}  # anisotropic on purpose: catches a wrong per-axis scale


def _smooth_ddfs(spatial_shape, batch, max_displacement, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([random_smooth_ddf(spatial_shape, max_displacement, 3, g) for _ in range(batch)]).to(dtype)


def _sample_voxels(ddf: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """ddf (B, D, *S) in voxels, interpolated at voxel-coordinate points (B, D, *S'), border padding."""
    sizes = torch.tensor(ddf.shape[2:], dtype=ddf.dtype).reshape(1, -1, *([1] * (ddf.ndim - 2)))
    grid = (points * 2 / (sizes - 1) - 1).flip(1).movedim(1, -1)
    return F.grid_sample(ddf, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _voxel_space_gradicon(ddf_AB, ddf_BA, noise, delta):
    """Independent GradICON in voxel units: E_c(x) = x_c − Φ_AB(Φ_BA(x))_c, rescaled to [0, 1] units per axis."""
    shape = ddf_AB.shape[2:]
    dims = len(shape)
    scale = torch.tensor([n - 1 for n in shape], dtype=ddf_AB.dtype).reshape(1, -1, *([1] * dims))
    index = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=ddf_AB.dtype) for n in shape], indexing="ij"))[None]
    x = index + noise.to(ddf_AB.dtype) / shape[-1] * scale  # id + ξ/W in [0, 1] units, expressed in voxels

    def error(points):
        points = points.expand(ddf_AB.shape[0], *points.shape[1:])
        inner = points + _sample_voxels(ddf_BA, points)
        outer = inner + _sample_voxels(ddf_AB, inner)
        return (points - outer) / scale  # back to [0, 1] units per channel

    e0 = error(x)
    total = 0
    for k in range(dims):
        shift = torch.zeros(1, dims, *([1] * dims), dtype=ddf_AB.dtype)
        shift[0, k] = delta * (shape[k] - 1)
        total = total + (((e0 - error(x + shift)) / delta) ** 2).flatten(1).mean(1)
    return total


def _affine_pair(spatial_shape, batch, seed, dtype=torch.float64):
    """DDFs (voxel units) of random mild affine maps Φ_BA and their exact inverses Φ_AB = Φ_BA⁻¹."""
    dims = len(spatial_shape)
    g = torch.Generator().manual_seed(seed)
    index = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=dtype) for n in spatial_shape], indexing="ij"))
    points = index.reshape(dims, -1)
    center = torch.tensor([(n - 1) / 2 for n in spatial_shape], dtype=dtype)[:, None]
    ddf_BA, ddf_AB = [], []
    for _ in range(batch):
        matrix = torch.eye(dims, dtype=dtype) + 0.04 * torch.randn(dims, dims, generator=g, dtype=dtype)
        shift = 0.3 * torch.randn(dims, 1, generator=g, dtype=dtype)
        forward = matrix @ (points - center) + center + shift
        backward = torch.linalg.solve(matrix, points - center - shift) + center
        ddf_BA.append((forward - points).reshape(dims, *spatial_shape))
        ddf_AB.append((backward - points).reshape(dims, *spatial_shape))
    return torch.stack(ddf_AB), torch.stack(ddf_BA)


def _interior_noise(spatial_shape, dtype=torch.float64, shrink=0.7):
    """ξ that places the evaluation points x = id + ξ/W on a grid shrunk towards the centre (all interior)."""
    grid = identity_grid(spatial_shape, dtype)
    return (0.5 + shrink * (grid - 0.5) - grid) * spatial_shape[-1]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("sparse", [False, True])
def test_ddf_regularizer_is_the_core_loss(dims, sparse):
    shape = SHAPES[dims]
    ddf_AB, ddf_BA = _smooth_ddfs(shape, 3, 2.0, 1), _smooth_ddfs(shape, 3, 2.0, 2)
    noise = torch.randn(1, dims, *shape, generator=torch.Generator().manual_seed(3))
    loss = GradICONLoss(dims, sparse=sparse, reduction="none")
    from_ddf = loss(ddf_AB, ddf_BA, noise)
    from_deformation = loss(Deformation.from_ddf(ddf_AB), Deformation.from_ddf(ddf_BA), noise)
    unit_fields = [Deformation([ddf_to_map(d) - identity_grid(shape, d.dtype)]) for d in (ddf_AB, ddf_BA)]
    from_unit_fields = loss(*unit_fields, noise)
    assert from_ddf.shape == (3,)
    assert from_ddf.min() > 1e-4  # a real, non-trivial value
    torch.testing.assert_close(from_deformation, from_ddf, rtol=1e-12, atol=0)
    torch.testing.assert_close(from_unit_fields, from_ddf, rtol=1e-10, atol=0)
    if not sparse:  # independent voxel-space recomputation of Eq. 2's finite-difference estimate; rtol 1e-6
        # because the core, like the reference, rounds the identity grid and the step δ to float32
        independent = _voxel_space_gradicon(ddf_AB, ddf_BA, noise, loss.delta)
        torch.testing.assert_close(independent, from_ddf, rtol=1e-6, atol=0)
    # reductions agree with the per-sample values
    torch.testing.assert_close(GradICONLoss(dims, sparse=sparse)(ddf_AB, ddf_BA, noise), from_ddf.mean())
    torch.testing.assert_close(GradICONLoss(dims, sparse=sparse, reduction="sum")(ddf_AB, ddf_BA, noise), from_ddf.sum())


@pytest.mark.parametrize("dims", [2, 3])
def test_ddf_icon_is_the_core_loss(dims):
    shape = SHAPES[dims]
    ddf_AB, ddf_BA = _smooth_ddfs(shape, 2, 2.0, 4), _smooth_ddfs(shape, 2, 2.0, 5)
    noise = torch.randn(1, dims, *shape, generator=torch.Generator().manual_seed(6))
    value = ICONLoss(dims, reduction="none")(ddf_AB, ddf_BA, noise)
    wrapped = ICONLoss(dims, reduction="none")(Deformation.from_ddf(ddf_AB), Deformation.from_ddf(ddf_BA), noise)
    torch.testing.assert_close(wrapped, value, rtol=1e-12, atol=0)
    # independent: both round trips, squared error in [0, 1] units, mean over channels and points
    scale = torch.tensor([n - 1 for n in shape], dtype=torch.float64).reshape(1, -1, *([1] * dims))
    index = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))[None]
    x = (index + noise.double() / shape[-1] * scale).expand(2, dims, *shape)
    expected = 0
    for first, second in ((ddf_BA, ddf_AB), (ddf_AB, ddf_BA)):
        inner = x + _sample_voxels(first, x)
        expected = expected + (((x - inner - _sample_voxels(second, inner)) / scale) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(value, expected, rtol=1e-7, atol=0)  # float32-rounded grid, as the reference


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-20), (torch.float32, 1e-8)])
def test_translation_and_its_negative_are_exact_inverses(dims, dtype, tol):
    shape = SHAPES[dims]
    shifts = torch.tensor([[1.5, -0.75, 2.25][:dims], [-3.0, 0.5, 1.0][:dims]], dtype=dtype)
    ddf_BA = shifts.reshape(2, dims, *([1] * dims)).expand(2, dims, *shape).contiguous()
    ddf_AB = -ddf_BA
    gradicon = GradICONLoss(dims, reduction="none", generator=torch.Generator().manual_seed(0))
    icon = ICONLoss(dims, reduction="none", generator=torch.Generator().manual_seed(0))
    assert gradicon(ddf_AB, ddf_BA).max() < tol
    assert icon(ddf_AB, ddf_BA).max() < tol
    # a translation composed with itself is not an inverse: ICON sees it, GradICON (a gradient) does not
    assert icon(ddf_BA, ddf_BA).min() > 1e-3
    assert gradicon(ddf_BA, ddf_BA).max() < tol


@pytest.mark.parametrize("dims", [2, 3])
def test_affine_and_its_inverse(dims):
    shape = SHAPES[dims]
    ddf_AB, ddf_BA = _affine_pair(shape, 2, seed=7)
    wrong_AB, _ = _affine_pair(shape, 2, seed=8)  # inverse of a different affine
    loss = GradICONLoss(dims, reduction="none")
    # exact on points inside the image (linear fields are interpolated exactly there)
    inside = _interior_noise(shape)
    assert loss(ddf_AB, ddf_BA, inside).max() < 1e-18
    assert ICONLoss(dims, reduction="none")(ddf_AB, ddf_BA, inside).max() < 1e-24
    assert loss(wrong_AB, ddf_BA, inside).min() > 1e-4
    # with the random perturbation (std one voxel) some points leave the image, where border padding
    # freezes the linear field: the value is then not 0 but still well below a non-inverse pair's
    # (measured here: 1e-4..6e-4 against 7e-3..1e-2)
    noise = torch.randn(1, dims, *shape, generator=torch.Generator().manual_seed(9))
    inverse_pair, other_pair = loss(ddf_AB, ddf_BA, noise), loss(wrong_AB, ddf_BA, noise)
    assert (inverse_pair < other_pair / 10).all(), (inverse_pair, other_pair)


@pytest.mark.parametrize("loss_class", [GradICONLoss, ICONLoss])
def test_clear_errors_on_bad_ddfs(loss_class):
    loss = loss_class(3)
    good = torch.zeros(2, 3, 8, 8, 8)
    with pytest.raises(ValueError, match=r"phi_AB must have shape \(B, 3, H, W, D\).*got \(2, 2, 8, 8, 8\)"):
        loss(torch.zeros(2, 2, 8, 8, 8), good)  # wrong channel count
    with pytest.raises(ValueError, match=r"phi_BA must have shape \(B, 3, H, W, D\).*got \(2, 3, 8, 8\)"):
        loss(good, torch.zeros(2, 3, 8, 8))  # wrong rank
    with pytest.raises(ValueError, match=r"share the spatial shape.*\(8, 8, 8\) and \(8, 8, 9\)"):
        loss(good, torch.zeros(2, 3, 8, 8, 9))
    with pytest.raises(ValueError, match=r"share the batch size, got 2 and 3"):
        loss(good, torch.zeros(3, 3, 8, 8, 8))
    with pytest.raises(ValueError, match=r"finite"):
        loss(good, torch.full((2, 3, 8, 8, 8), float("nan")))
    with pytest.raises(ValueError, match=r"phi_AB must have shape \(B, 2, H, W\)"):
        loss_class(2)(good, good)  # a 3D field given to a 2D loss


class _PairConvNet(nn.Module):
    """A tiny network with the pair signature net(moving, fixed) -> ddf (stands for 'any network')."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.body = nn.Sequential(conv(2, 6, 3, padding=1), nn.Tanh(), conv(6, dims, 3, padding=1))

    def forward(self, moving, fixed):
        return 2.0 * self.body(torch.cat([moving, fixed], 1))


def _check_gradient_against_finite_differences(named_tensors, value_of, seed, eps=1e-6):
    """Every tensor gets a nonzero gradient, and ``grad · v`` equals the central difference of the loss
    along a random direction ``v`` of all the tensors together (float64)."""
    names, params = zip(*named_tensors)
    grads = torch.autograd.grad(value_of(), params)
    for name, g in zip(names, grads):
        assert float(g.abs().max()) > 0, name
    gen = torch.Generator().manual_seed(seed)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    predicted = sum(float((g * v).sum()) for g, v in zip(grads, direction))
    with torch.no_grad():
        for p, v in zip(params, direction):
            p.add_(eps * v)
        plus = float(value_of())
        for p, v in zip(params, direction):
            p.sub_(2 * eps * v)
        minus = float(value_of())
        for p, v in zip(params, direction):
            p.add_(eps * v)
    assert abs(predicted) > 1e-6
    assert (plus - minus) / (2 * eps) == pytest.approx(predicted, rel=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_gradients_reach_every_parameter_of_any_network(dims):
    torch.manual_seed(0)  # the network's default initialisation
    net = _PairConvNet(dims).double()
    shape = (2, 1, *SHAPES[dims])
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(shape, generator=g, dtype=torch.float64), torch.rand(shape, generator=g, dtype=torch.float64)
    noise = torch.randn(1, dims, *SHAPES[dims], generator=g)
    loss = GradICONLoss(dims)
    _check_gradient_against_finite_differences(net.named_parameters(), lambda: loss(net(a, b), net(b, a), noise), seed=3)


def test_gradients_reach_every_monai_localnet_parameter():
    from monai.networks.nets import LocalNet

    torch.manual_seed(0)  # the network's default initialisation
    net = LocalNet(spatial_dims=3, in_channels=2, out_channels=3, num_channel_initial=2, extract_levels=(0, 1, 2)).double()
    g = torch.Generator().manual_seed(1)
    a, b = (torch.rand(2, 1, 12, 12, 12, generator=g, dtype=torch.float64) for _ in range(2))
    noise = torch.randn(1, 3, 12, 12, 12, generator=g)
    loss = GradICONLoss(3)
    ddf_AB, ddf_BA = net(torch.cat([a, b], 1)), net(torch.cat([b, a], 1))
    reg = loss(ddf_AB, ddf_BA, noise)
    reg.backward()
    missing = [n for n, p in net.named_parameters() if not float(p.grad.abs().max()) > 0]
    assert not missing, missing
    assert len(list(net.parameters())) > 10
    # what flows into LocalNet is the regulariser's true derivative with respect to its two DDFs. (Checked at
    # the DDFs: freshly initialised LocalNet sits on ReLU kinks, so even its own autograd gradient differs
    # from central differences of LocalNet alone by ~5%, whatever the step.)
    leaves = [("ddf_AB", ddf_AB.detach().requires_grad_()), ("ddf_BA", ddf_BA.detach().requires_grad_())]
    _check_gradient_against_finite_differences(leaves, lambda: loss(leaves[0][1], leaves[1][1], noise), seed=4)


# torch.compile is the route that applies (TorchScript does not: torch.jit.script rejects the Python
# Deformation objects, torch.jit.trace freezes the shape checks). The default backend here is
# "aot_eager" (Dynamo graph capture + AOTAutograd, seconds); set MONAI_GRADICON_COMPILE_BACKEND=inductor
# for the full C++ code generation (about two minutes of compilation on a shared 2-core CPU).
COMPILE_BACKEND = os.environ.get("MONAI_GRADICON_COMPILE_BACKEND", "aot_eager")


def test_torch_compile_keeps_values_and_gradients():
    torch._dynamo.reset()
    torch.manual_seed(0)  # the network's default initialisation
    net = _PairConvNet(2)
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 1, 12, 12, generator=g), torch.rand(2, 1, 12, 12, generator=g)
    noise = torch.randn(1, 2, 12, 12, generator=torch.Generator().manual_seed(2))
    loss = GradICONLoss(2)

    def step(moving, fixed, xi):
        return loss(net(moving, fixed), net(fixed, moving), xi)

    eager = step(a, b, noise)
    eager_grads = torch.autograd.grad(eager, list(net.parameters()))
    compiled = torch.compile(step, backend=COMPILE_BACKEND)(a, b, noise)
    compiled_grads = torch.autograd.grad(compiled, list(net.parameters()))
    # Eq. 2's finite differences divide float32 rounding by δ = 1e-3, and inductor reorders/fuses the
    # arithmetic: compare against the gradient's scale (measured with inductor: max difference 3.5e-6)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-7)
    for g_compiled, g_eager in zip(compiled_grads, eager_grads):
        scale = float(g_eager.abs().max())
        assert scale > 0
        torch.testing.assert_close(g_compiled, g_eager, rtol=1e-3, atol=1e-3 * scale)
