"""The native decoder join (``maps/upsample.cpp``) against PyTorch's ``interpolate``, ``+`` and ``cat``.

``upsample_add_concat(base, coarse, skip)`` must equal ``cat([crop(base + F.interpolate(coarse,
scale_factor=2, mode="trilinear", align_corners=False)), skip], 1)``: float64 and float32, sizes where the
crop removes voxels and where it does not, single channels and a batch, one and two threads; and it refuses
what it cannot do (gradients, other layouts, a skip grid larger than the upsampled one).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from monai_gradicon.maps import native

CL = torch.channels_last_3d


@pytest.fixture(autouse=True)
def _native_kernels():
    if not native.native_available():
        pytest.skip(f"the native kernels could not be built here: {native._failure}")


def _oracle(base, coarse, skip):
    up = base + F.interpolate(coarse, scale_factor=2, mode="trilinear", align_corners=False)
    return torch.cat([up[(slice(None), slice(None)) + tuple(slice(0, n) for n in skip.shape[2:])], skip], 1)


def _tensors(batch, channels, skip_channels, coarse_shape, skip_shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, channels, *(2 * n for n in coarse_shape), generator=g, dtype=dtype)
    coarse = torch.randn(batch, channels, *coarse_shape, generator=g, dtype=dtype)
    skip = torch.randn(batch, skip_channels, *skip_shape, generator=g, dtype=dtype)
    return [t.contiguous(memory_format=CL) for t in (base, coarse, skip)]


CASES = {
    # name: (batch, channels, skip channels, coarse shape, skip shape)
    "decoder_level": (1, 16, 2, (5, 12, 12), (10, 24, 24)),
    "cropped_odd": (1, 5, 3, (3, 4, 5), (5, 8, 9)),
    "single_channels": (1, 1, 1, (1, 2, 3), (2, 4, 6)),
    "batch": (2, 4, 4, (3, 3, 4), (6, 5, 8)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
@pytest.mark.parametrize("threads", [1, 2])
def test_upsample_add_concat_equals_interpolate_add_cat(case, dtype, tol, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        base, coarse, skip = _tensors(*CASES[case], dtype)
        out = native.upsample_add_concat(base, coarse, skip)
    finally:
        torch.set_num_threads(before)
    expected = _oracle(base, coarse, skip)
    assert out.shape == expected.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, expected, rtol=0, atol=tol * expected.abs().max().item())
    # the skip channels are copies, bit for bit
    assert torch.equal(out[:, base.shape[1] :], skip)


def test_upsample_add_concat_refuses_what_it_cannot_do():
    base, coarse, skip = _tensors(1, 4, 2, (3, 4, 5), (6, 8, 10), torch.float32)
    with pytest.raises(RuntimeError, match="no backward"):
        native.upsample_add_concat(base.requires_grad_(True), coarse, skip)
    base = base.detach()
    with pytest.raises(RuntimeError, match="channels-last 3D tensors expected"):
        native.upsample_add_concat(base.contiguous(), coarse, skip)
    big_skip = torch.zeros(1, 2, 7, 8, 10).contiguous(memory_format=CL)
    with pytest.raises(RuntimeError, match="skip larger than base"):
        native.upsample_add_concat(base, coarse, big_skip)
    with pytest.raises(RuntimeError, match="one dtype expected"):
        native.upsample_add_concat(base, coarse.double(), skip)
