"""The native CPU trilinear kernel (``maps/trilinear.cpp``) against ``torch.nn.functional.grid_sample``.

The oracle is PyTorch's own ``grid_sample`` (align_corners=True, border padding) called on the grid a
[0, 1] point maps to (``2c - 1``, last axis first), and finite differences (``gradcheck``): values,
gradients with respect to the field and to the points, in float64 and float32, batches broadcast either
way, channels-last and strided fields, points outside the image, on voxel faces and at the last voxel,
and thread counts that split the points into several slabs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from monai_gradicon.maps import Deformation, identity_grid, sample
from monai_gradicon.maps import native


@pytest.fixture(autouse=True)
def _native_kernel():
    if not native.native_available():
        pytest.skip(f"the native trilinear kernel could not be built here: {native._failure}")


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _oracle(field: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    batch = max(field.shape[0], coords.shape[0])
    grid = (coords.movedim(1, -1).flip(-1) * 2 - 1).expand(batch, *coords.shape[2:], 3)
    return F.grid_sample(field.expand(batch, *field.shape[1:]), grid, padding_mode="border", align_corners=True)


def _points(shape, batch, dtype, generator, spread=1.3):
    """Points in and around [0, 1]: random ones, some exactly on voxel faces, at 0, at 1 and outside."""
    coords = torch.rand(batch, 3, *shape, generator=generator, dtype=dtype) * spread - (spread - 1) / 2
    flat = coords.view(batch, 3, -1)
    flat[:, :, :5] = torch.tensor([0.0, 1.0, -0.25, 1.5, 0.5], dtype=dtype)  # border, outside, mid-voxel
    return coords


def _grads(fn, field, coords, weights):
    field = field.detach().requires_grad_(True)
    coords = coords.detach().requires_grad_(True)
    out = fn(field, coords)
    return (out, *torch.autograd.grad((out * weights).sum(), [field, coords]))


CASES = {
    # name: (field batch, field shape, points batch, points shape)
    "same_grid": (1, (9, 11, 13), 1, (9, 11, 13)),
    "other_grid": (1, (9, 11, 13), 1, (6, 14, 5)),
    "field_broadcast": (1, (8, 7, 9), 2, (5, 6, 7)),
    "points_broadcast": (2, (8, 7, 9), 1, (5, 6, 7)),
    "batch": (2, (8, 7, 9), 2, (5, 6, 7)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_native_equals_grid_sample(case, dtype, tol, layout):
    """Values to the same rounding as grid_sample's (equal weights and sums), both gradients to float rounding."""
    field_batch, field_shape, points_batch, points_shape = CASES[case]
    g = torch.Generator().manual_seed(3)
    channels = 3
    field = torch.randn(field_batch, channels, *field_shape, generator=g, dtype=dtype)
    if layout == "channels_last":
        field = field.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "strided":  # every other voxel of a larger field along the last axis
        wide = torch.randn(field_batch, channels, *field_shape[:2], 2 * field_shape[2], generator=g, dtype=dtype)
        field = wide[..., ::2]
    coords = _points(points_shape, points_batch, dtype, g)
    weights = torch.randn(max(field_batch, points_batch), channels, *points_shape, generator=g, dtype=dtype)
    ours = _grads(native.trilinear, field, coords, weights)
    expected = _grads(_oracle, field, coords, weights)
    for name, a, b in zip(("values", "field gradient", "point gradient"), ours, expected):
        assert a.shape == b.shape, name
        scale = b.abs().max()
        assert scale > 0.1, name
        assert (a - b).abs().max() <= tol * scale, f"{name}: {(a - b).abs().max() / scale:.3g} relative"
    assert torch.count_nonzero(expected[2]) < expected[2].numel()  # clamped points have no point gradient


def test_native_gradients_by_finite_differences():
    """float64 gradcheck of both inputs at points off the voxel faces (where the gradient jumps)."""
    g = torch.Generator().manual_seed(4)
    field = torch.randn(1, 2, 5, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    coords = (torch.rand(2, 3, 3, 2, 2, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_(True)
    assert torch.autograd.gradcheck(native.trilinear, (field, coords), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_slabs_do_not_change_the_result(dtype, threads):
    """1, 2 and 3 threads (1, 2 and 3 slabs of points): the same values and point gradients, bit for bit;
    field gradients to float rounding (a voxel reached from two slabs is summed per slab first)."""
    g = torch.Generator().manual_seed(5)
    shape = (30, 30, 30)  # 27,000 points: 3 slabs of 9,000 (each at least the kernel's 8,192)
    field = torch.randn(1, 3, 24, 26, 28, generator=g, dtype=dtype)
    coords = (identity_grid(shape, dtype) + 0.05 * torch.randn(1, 3, *shape, generator=g, dtype=dtype)).contiguous()
    weights = torch.randn(1, 3, *shape, generator=g, dtype=dtype)
    results = []
    for count in (1, 2, 3):
        threads(count)
        results.append(_grads(native.trilinear, field, coords, weights))
    for other in results[1:]:
        assert torch.equal(other[0], results[0][0])
        assert torch.equal(other[2], results[0][2])
        torch.testing.assert_close(other[1], results[0][1], rtol=0, atol=1e-5 * results[0][1].abs().max().item())
    expected = _grads(_oracle, field, coords, weights)
    assert (results[2][1] - expected[1]).abs().max() <= 2e-5 * expected[1].abs().max()


def test_sample_runs_the_native_kernel_only_in_its_case(monkeypatch):
    """``sample``: 3D linear border interpolation on CPU goes native; nearest, zeros, 2D, a trace,
    ``torch.compile`` and ``MONAI_GRADICON_NATIVE=0`` go to grid_sample, with the same values."""
    calls = []
    kernel = native.trilinear
    monkeypatch.setattr("monai_gradicon.maps.grid.trilinear", lambda f, c: calls.append(1) or kernel(f, c))
    g = torch.Generator().manual_seed(6)
    field = torch.randn(1, 3, 7, 8, 9, generator=g)
    coords = torch.rand(1, 3, 5, 6, 4, generator=g)
    native_values = sample(field, coords)
    assert len(calls) == 1
    sample(field, coords, mode="nearest")
    sample(field, coords, padding_mode="zeros")
    sample(field[..., 0], coords[:, :2, ..., 0])
    traced = torch.jit.trace(lambda f, c: sample(f, c), (field, coords), check_trace=False)
    torch._dynamo.reset()
    compiled = torch.compile(lambda f, c: sample(f, c), backend="aot_eager", fullgraph=True)  # no graph break
    compiled_values = compiled(field, coords)
    assert len(calls) == 1
    torch.testing.assert_close(traced(field, coords), native_values, rtol=0, atol=1e-6)
    torch.testing.assert_close(compiled_values, native_values, rtol=0, atol=1e-6)
    monkeypatch.setenv("MONAI_GRADICON_NATIVE", "0")
    torch.testing.assert_close(sample(field, coords), native_values, rtol=0, atol=1e-6)
    assert len(calls) == 1


def test_composition_through_native_kernel_equals_grid_sample_route(monkeypatch):
    """A 3-field Deformation (the multistep composition, Eq. 6) and its gradients, native vs grid_sample."""
    g = torch.Generator().manual_seed(7)
    fields = [0.05 * torch.randn(1, 3, *s, generator=g) for s in ((6, 7, 8), (12, 14, 16), (12, 14, 16))]
    points = identity_grid((12, 14, 16)) + 0.02 * torch.randn(1, 3, 12, 14, 16, generator=g)

    def run():
        leaves = [f.clone().requires_grad_(True) for f in fields]
        out = Deformation(leaves)(points)
        return (out, *torch.autograd.grad(out.square().sum(), leaves))

    ours = run()
    monkeypatch.setenv("MONAI_GRADICON_NATIVE", "0")
    expected = run()
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())
