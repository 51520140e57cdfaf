"""Similarities of instance optimisation (``--io-sim``, ``--loss-masking``) against the reference's, value and gradient.

* :class:`MINDSSCLoss` / :func:`mind_ssc` = ``icon_registration.losses.MINDSSC(2, 2)`` (the descriptor
  channel by channel, the loss and its gradient with respect to the warped image), 3D, float32 and
  float64, unmasked and with a mask of the target (the reference's ``mask_B``). The reference builds its
  shift kernels in the default dtype, so its float64 run sets the default dtype to float64.
* :class:`LNCCLoss` with a mask = ``LNCC(5)(A, B, mask_B)`` and ``squared=True`` = ``SquaredLNCC(5)``:
  the mean of ``cc`` is taken only inside the target's mask (``_masked_mean``).

Tolerances: float32 relative 2e-5 on values and on the gradient (relative to its largest entry);
measured ≤ 1.2e-7. float64 1e-9 unmasked (measured 2.7e-16); masked float64 1e-6 because the reference
sums the masked values in float32, in an order that depends on the CPU's kernels (measured ≤ 6.2e-8 on
the value, 1.4e-8 on the gradient).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dependencies import require_reference

icon = require_reference()

from icon_registration import losses as reference  # noqa: E402

from monai_gradicon.losses import LNCCLoss, MINDSSCLoss  # noqa: E402
from monai_gradicon.losses.masking import masked_mean  # noqa: E402
from monai_gradicon.losses.mind import mind_ssc  # noqa: E402

SHAPE = (1, 1, 14, 15, 16)
TOL = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-9, 1e-6)}  # (unmasked, masked) relative


def _smooth(seed: int, dtype: torch.dtype, shape=SHAPE) -> torch.Tensor:
    """A random image smoothed three times by a 3-voxel box (no ties in the MIND minimum)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for _ in range(3):
        x = F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
    return (x * 4.0 + 0.5).to(dtype)


def _with_flat_block(image: torch.Tensor) -> torch.Tensor:
    """``image`` with a nearly flat block (contrast 1e-3): there the MIND variance is ~1e-6 of its mean and its
    lower bound (10⁻³ × the mean) acts."""
    out = image.clone()
    out[..., :5, :, :] = float(image.mean()) + 1e-3 * (image[..., :5, :, :] - float(image.mean()))
    return out


def _reference_call(dtype, fn, *args):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the reference builds its MIND kernels in the default dtype
    try:
        return fn(*args)
    finally:
        torch.set_default_dtype(previous)


def _value_and_grad(loss, a, b, *mask):
    a = a.clone().requires_grad_(True)
    value = loss(a, b, *mask)
    (grad,) = torch.autograd.grad(value, a)
    return value.detach(), grad


def _assert_close(ours, theirs, tol, what):
    (value, grad), (ref_value, ref_grad) = ours, theirs
    assert abs(float(value) - float(ref_value)) <= tol * abs(float(ref_value)), f"{what}: {float(value)} vs {float(ref_value)}"
    scale = float(ref_grad.abs().max())
    assert scale > 0
    error = float((grad - ref_grad).abs().max())
    assert error <= tol * scale, f"{what}: gradient differs by {error / scale:.3g} (relative)"


def _mask(image: torch.Tensor) -> torch.Tensor:
    return (image > image.median()).to(image.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mind_ssc_descriptor_equals_reference(dtype):
    image = _with_flat_block(_smooth(0, dtype))
    theirs = _reference_call(dtype, reference.MINDSSC(2, 2).compute_mindssc, image)
    ours = mind_ssc(image, 2, 2)
    assert ours.shape == (1, 12, *SHAPE[2:]) and ours.dtype == dtype
    torch.testing.assert_close(ours, theirs, rtol=TOL[dtype][0], atol=TOL[dtype][0])
    assert float(ours.std()) > 0.05  # a descriptor that varies, not a constant


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
def test_mind_ssc_loss_value_and_gradient_equal_reference(dtype, masked):
    a, b = _smooth(1, dtype), _with_flat_block(_smooth(2, dtype))
    mask = (_mask(b),) if masked else ()
    theirs = _value_and_grad(lambda x, y, *m: _reference_call(dtype, reference.MINDSSC(2, 2), x, y, *m), a, b, *mask)
    ours = _value_and_grad(MINDSSCLoss(3, radius=2, dilation=2), a, b, *mask)
    _assert_close(ours, theirs, TOL[dtype][int(masked)], f"MIND-SSC {dtype} masked={masked}")
    if masked:  # the mask really restricts the mean
        unmasked = MINDSSCLoss(3)(a, b)
        assert abs(float(unmasked) - float(ours[0])) > 1e-3 * float(unmasked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("squared", [False, True])
def test_masked_lncc_value_and_gradient_equal_reference(dtype, squared):
    a, b = _smooth(3, dtype, (1, 1, 18, 17, 16)), _smooth(4, dtype, (1, 1, 18, 17, 16))
    mask = _mask(b)
    measure = (reference.SquaredLNCC if squared else reference.LNCC)(5)
    theirs = _value_and_grad(measure, a, b, mask)
    ours = _value_and_grad(LNCCLoss(3, sigma=5, squared=squared), a, b, mask)
    _assert_close(ours, theirs, TOL[dtype][1], f"masked LNCC squared={squared} {dtype}")
    everywhere = LNCCLoss(3, sigma=5, squared=squared)(a, b)
    assert abs(float(everywhere) - float(ours[0])) > 1e-3  # the mask changes the value
    # the reference's unmasked value is ours without a mask
    assert abs(float(measure(a, b)) - float(everywhere)) <= TOL[dtype][0] * abs(float(everywhere))


def test_mind_ssc_batch_elements_are_independent():
    """Per-sample variance bounds: a sample's loss does not depend on its batch neighbours."""
    a = torch.cat([_smooth(5, torch.float64), 10.0 * _smooth(6, torch.float64)])
    b = torch.cat([_smooth(7, torch.float64), _smooth(8, torch.float64)])
    per_sample = MINDSSCLoss(3, reduction="none")(a, b)
    alone = torch.stack([MINDSSCLoss(3)(a[i : i + 1], b[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(per_sample, alone, rtol=1e-12, atol=0)


def test_masked_mean_and_mind_refuse_bad_input():
    values = torch.ones(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"empty .* sample\(s\) \[1\]"):
        masked_mean(values, torch.stack([torch.ones(1, 4, 5), torch.zeros(1, 4, 5)]))
    with pytest.raises(ValueError, match=r"mask must be \(B, 1 or C, \*spatial\)"):
        masked_mean(values, torch.ones(2, 1, 4, 6))
    with pytest.raises(ValueError, match="3D images only .* got spatial_dims=2"):
        MINDSSCLoss(2)
    with pytest.raises(ValueError, match="single-channel 3D image"):
        mind_ssc(torch.ones(1, 2, 8, 8, 8))
