"""Network architecture, layout builder, downsampling sizes and input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from monai_gradicon.networks import GradICONUNet, four_step_network, multistep_network
from monai_gradicon.networks.steps import CompositionStep, DownsampleStep


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_unet_matches_the_reference_parameter_counts():
    assert _count(GradICONUNet(3)) == 17_670_229
    assert _count(GradICONUNet(2)) == 4_756_902
    assert _count(four_step_network(3)) == 4 * 17_670_229


@pytest.mark.parametrize("spatial_dims,shape", [(2, (13, 22)), (3, (17, 18, 20))])
def test_untrained_network_is_the_identity(spatial_dims, shape):
    net = multistep_network(spatial_dims, (1, 0) if spatial_dims == 2 else (0,)).eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand((2, 1, *shape), generator=g), torch.rand((2, 1, *shape), generator=g)
    with torch.no_grad():
        ddf = net(a, b)
    assert ddf.shape == (2, spatial_dims, *shape)
    assert ddf.abs().max() < 1e-5  # zero-initialised last convolution
    last = [m.last_conv for m in net.modules() if isinstance(m, GradICONUNet)]
    assert last and all(float(c.weight.abs().max()) == 0 and float(c.bias.abs().max()) == 0 for c in last)
    with torch.no_grad():  # and it is that convolution: a nonzero bias b gives the displacement b/10 ([0, 1] units)
        last[-1].bias.fill_(0.01)
        shifted = net(a, b)
    expected = 0.001 * (torch.tensor(shape, dtype=torch.float32) - 1).reshape(1, -1, *([1] * spatial_dims))
    torch.testing.assert_close(shifted, expected.expand_as(shifted), rtol=1e-4, atol=1e-6)


def test_layout_follows_eq6_nesting():
    net = multistep_network(2, (2, 1, 0, 0))
    root = net.step
    assert isinstance(root, CompositionStep) and isinstance(root.first, CompositionStep)
    assert isinstance(root.first.first, DownsampleStep)
    assert isinstance(root.first.first.step.first, DownsampleStep)
    assert net.min_size == 5  # 2D U-Nets need no floor of their own; maps need 2 voxels at the quarter level


def test_downsampling_uses_ceil_sizes():
    seen = []
    net = multistep_network(2, (2, 1, 0))
    for module in net.modules():
        if isinstance(module, GradICONUNet):
            module.register_forward_hook(lambda m, inp, out: seen.append(inp))
    g = torch.Generator().manual_seed(0)
    moving, fixed = torch.rand(1, 1, 37, 42, generator=g), torch.rand(1, 1, 37, 42, generator=g)
    with torch.no_grad():
        net.eval()(moving, fixed)
    assert [tuple(inp[0].shape[2:]) for inp in seen] == [(10, 11), (19, 21), (37, 42)]
    # each U-Net sees the fixed image average-pooled by 2 (ceil mode: a partial window averages what it holds)
    half = F.avg_pool2d(fixed, 2, ceil_mode=True)
    quarter = F.avg_pool2d(half, 2, ceil_mode=True)
    for (_, seen_fixed), expected in zip(seen, (quarter, half, fixed)):
        torch.testing.assert_close(seen_fixed, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(seen[0][0], F.avg_pool2d(F.avg_pool2d(moving, 2, ceil_mode=True), 2, ceil_mode=True))
    assert float(half[0, 0, -1, -1]) == pytest.approx(float(fixed[0, 0, -1, -2:].mean()), rel=1e-6)  # 37 -> 19: last row alone


def test_three_d_size_floor_is_reported_before_running():
    net = four_step_network(3)
    assert net.min_size == 65
    with pytest.raises(ValueError, match=r"moving spatial size \(64, 80, 80\) is too small: every spatial axis must be >= 65"):
        net(torch.zeros(1, 1, 64, 80, 80), torch.zeros(1, 1, 64, 80, 80))
    assert multistep_network(3, (0,)).min_size == 17


@pytest.mark.parametrize(
    "moving,fixed,message",
    [
        (torch.zeros(1, 20, 20), torch.zeros(1, 20, 20), r"moving must have shape \(B, C, H, W\) for spatial_dims=2, got a 3-D"),
        (torch.zeros(1, 1, 20, 20), torch.zeros(1, 1, 20, 21), r"same shape, got moving \(1, 1, 20, 20\) and fixed \(1, 1, 20, 21\)"),
        (torch.zeros(1, 2, 20, 20), torch.zeros(1, 2, 20, 20), r"must have 1 channel\(s\), got 2"),
        (torch.full((1, 1, 20, 20), float("inf")), torch.zeros(1, 1, 20, 20), "moving must hold only finite values, got 400"),
    ],
)
def test_bad_input_is_a_clear_error(moving, fixed, message):
    with pytest.raises(ValueError, match=message):
        multistep_network(2, (0,))(moving, fixed)


def test_bad_layouts_are_rejected():
    with pytest.raises(ValueError, match=r"non-increasing .* got \[0, 1\]"):
        multistep_network(2, (0, 1))
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3, got 4"):
        multistep_network(4, (0,))
    with pytest.raises(ValueError, match="same length"):
        GradICONUNet(2, down_channels=(8, 16), up_channels=(8,))


def test_custom_subnetwork_and_channels():
    net = multistep_network(2, (1, 0), in_channels=2, subnetwork=lambda: GradICONUNet(2, 2, (8, 8, 8), (8, 8, 8)))
    unets = [m for m in net.modules() if isinstance(m, GradICONUNet)]
    assert len(unets) == 2 and all(u.down_convs[0].in_channels == 4 for u in unets)  # [moving, fixed], 2 channels each
    g = torch.Generator().manual_seed(0)
    for p in net.parameters():
        p.data.normal_(0, 0.05, generator=g)
    moving, fixed = torch.rand(1, 2, 16, 16, generator=g), torch.rand(1, 2, 16, 16, generator=g)
    with torch.no_grad():
        ddf = net.eval()(moving, fixed)
        other = moving.clone()
        other[:, 1] = 0  # change only the second channel of the moving image
        changed = net(other, fixed)
    assert ddf.shape == (1, 2, 16, 16)
    assert float(ddf.abs().max()) > 0.01 and float((changed - ddf).abs().max()) > 1e-4  # the 2nd channel is used
