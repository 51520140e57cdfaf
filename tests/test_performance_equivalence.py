"""Every speed/memory lever keeps the float32 eager result: values and gradients, 2D and 3D.

Levers: BatchNorm folded into the transposed convolutions in eval mode, the channels-last memory
format, activation checkpointing per sub-network (BatchNorm running statistics updated once), mixed
precision inside the sub-networks only, the DDF route of the GradICON loss without a [0, 1] copy, the
full-size resample through the dense network-grid map, interpolation split across CPU threads, and the
Gaussian blur of LNCC as banded matrix products. The native kernels have their own files,
``tests/test_native_trilinear.py`` and ``tests/test_native_upsample.py``.
"""

from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from monai_gradicon.io.image import PhysicalImage
from monai_gradicon.losses import GradICONLoss
from monai_gradicon.maps import Deformation
from monai_gradicon.networks import GradICONUNet, multistep_network
from monai_gradicon.networks.steps import DisplacementStep
from monai_gradicon.networks.unet import _BatchNormFunction
from monai_gradicon.transforms.network_grid import PairGeometry

register_module = importlib.import_module("monai_gradicon.app.register")

SHAPES = {2: (37, 42), 3: (34, 33, 36)}
SMALL = {"down_channels": (4, 8, 8), "up_channels": (4, 8, 8)}


def _unet(spatial_dims: int, channels_last: bool, seed: int = 0) -> GradICONUNet:
    """A small U-Net with non-trivial weights and running statistics (the released nets are not identity)."""
    torch.manual_seed(seed)
    net = GradICONUNet(spatial_dims, channels_last=channels_last, **SMALL)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
        for bn in net.batch_norms:
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.3, 3.0)
    return net


def _pair(spatial_dims: int, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    shape = SHAPES[spatial_dims]
    return torch.rand((batch, 1, *shape), generator=g), torch.rand((batch, 1, *shape), generator=g)


def _grads(module):
    return {k: p.grad.clone() for k, p in module.named_parameters()}


def _assert_grads_close(expected: dict, actual: dict, rtol: float) -> None:
    """Each gradient within ``rtol`` of its layer's gradient scale (a bias before a BatchNorm has a true
    gradient of 0, so its rounding is measured against its layer's weight gradient)."""
    assert expected.keys() == actual.keys()
    for name, g in expected.items():
        scale = max(float(g.abs().max()), float(expected.get(name.replace(".bias", ".weight"), g).abs().max()))
        assert scale > 0, name
        error = float((actual[name] - g).abs().max())
        assert error <= rtol * scale, f"{name}: max error {error:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_folding_equals_eager_eval(spatial_dims, channels_last, monkeypatch):
    """Inference (folded BatchNorm; in 3D channels-last on CPU each decoder join one native pass) equals
    the U-Net written out in PyTorch operations; without the native kernels too."""
    from monai_gradicon.maps import native

    joins = []
    kernel = native.upsample_add_concat
    monkeypatch.setattr(native, "upsample_add_concat", lambda *t: joins.append(1) or kernel(*t))
    net = _unet(spatial_dims, channels_last=channels_last).eval()
    a, b = _pair(spatial_dims)
    with torch.no_grad():
        folded = net(a, b)  # eval mode, no gradients: the folded path
        expected = _eager_eval(net, torch.cat([a, b], 1))
        assert len(joins) == (net.num_layers if spatial_dims == 3 and channels_last else 0)
        monkeypatch.setenv("MONAI_GRADICON_NATIVE", "0")
        without_native = net(a, b)
    assert folded.abs().max() > 1e-3  # a real displacement, not the zero identity
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(without_native, expected, rtol=1e-5, atol=1e-6)
    assert len(joins) == (net.num_layers if spatial_dims == 3 and channels_last else 0)


def _eager_eval(net: GradICONUNet, x: torch.Tensor) -> torch.Tensor:
    """The U-Net written out with every BatchNorm as ``F.batch_norm`` on running statistics (eval)."""
    import torch.nn.functional as F

    from monai_gradicon.networks.unet import _match_channels

    skips = []
    for conv in net.down_convs:
        skips.append(x)
        y = conv(F.leaky_relu(x))
        x = y + _match_channels(net._pool(x, 2, ceil_mode=True), y.shape[1])
    for depth in reversed(range(net.num_layers)):
        y = net.up_convs[depth](F.leaky_relu(x))
        x = y + F.interpolate(_match_channels(x, y.shape[1]), scale_factor=2, mode=net._upsample_mode, align_corners=False)
        bn = net.batch_norms[depth]
        x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        skip = skips[depth]
        x = x[(slice(None), slice(None)) + tuple(slice(0, n) for n in skip.shape[2:])]
        x = torch.cat([x, skip], dim=1)
    return net.last_conv(x) / 10


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("mode", ["inference", "instance_optimization", "training"])
def test_channels_last_equals_default_layout(spatial_dims, mode):
    """Channels-last (the default) against the reference's layout: values, every parameter gradient and the
    running statistics, in inference (no gradients), eval mode with gradients (instance optimisation) and training."""
    default, fast = _unet(spatial_dims, False), _unet(spatial_dims, True)
    for net in (default, fast):
        net.train(mode == "training")
    a, b = _pair(spatial_dims)
    with torch.set_grad_enabled(mode != "inference"):
        out_default, out_fast = default(a, b), fast(a, b)
    assert out_fast.is_contiguous()
    torch.testing.assert_close(out_fast, out_default, rtol=1e-5, atol=1e-6)
    if mode != "inference":
        (out_default**2).sum().backward()
        (out_fast**2).sum().backward()
        _assert_grads_close(_grads(default), _grads(fast), 1e-5)
    for b1, b2 in zip(default.buffers(), fast.buffers()):
        torch.testing.assert_close(b2, b1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_channels_last_by_default_with_and_without_gradients(spatial_dims):
    memory_format = (torch.channels_last, torch.channels_last_3d)[spatial_dims - 2]
    a, b = _pair(spatial_dims)
    for channels_last in (True, False):
        net = _unet(spatial_dims, channels_last)
        conv_inputs = []
        net.down_convs[1].register_forward_hook(lambda m, inputs, out: conv_inputs.append(inputs[0].is_contiguous(memory_format=memory_format)))
        with torch.no_grad():
            net(a, b)
        net(a, b).square().sum().backward()
        assert conv_inputs == [channels_last] * 2


def _norm(spatial_dims: int, channels: int, momentum, dtype=torch.float64):
    norm = (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)[spatial_dims - 2](channels, momentum=momentum).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    return norm


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("momentum", [0.1, None, 0.0])
@pytest.mark.parametrize("training", [True, False])
def test_channels_last_batch_norm_is_batch_norm(spatial_dims, momentum, training):
    """The U-Net's channels-last BatchNorm against ``nn.BatchNorm`` in float64: output, gradients of input,
    weight and bias, running statistics and batch counter, train (batch statistics; momentum, cumulative
    average, frozen as in a checkpoint's recomputation) and eval (running statistics) mode, two calls."""
    memory_format = (torch.channels_last, torch.channels_last_3d)[spatial_dims - 2]
    reference, ours = _norm(spatial_dims, 3, momentum), _norm(spatial_dims, 3, momentum)
    ours.load_state_dict(reference.state_dict())
    reference.train(training)
    ours.train(training)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        x = (torch.randn((2, 3, *SHAPES[spatial_dims]), generator=g, dtype=torch.float64) * 2 + 1).contiguous(memory_format=memory_format)
        upstream = torch.randn(x.shape, generator=g, dtype=torch.float64)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = reference(x1), _BatchNormFunction.apply(x2, ours.weight, ours.bias, ours)
        torch.testing.assert_close(y2, y1, rtol=1e-12, atol=1e-12)
        (y1 * upstream).sum().backward()
        (y2 * upstream).sum().backward()
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-10, atol=1e-12)
    for p1, p2 in zip(reference.parameters(), ours.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-10, atol=1e-12)
    for name, b1 in reference.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[name], b1, rtol=1e-12, atol=1e-12)


def test_channels_last_batch_norm_sums_accurately():
    """float32 on a channels-last 1×4×64³ tensor: gradients and running statistics within 1e-5 (relative) of
    float64 (measured ≤ 2e-6, as the default layout's kernels). PyTorch's own channels-last CPU kernels
    accumulate these sums in one float32 running sum (weight gradient 9e-5, input gradient 5e-5 here)."""
    reference = _norm(3, 4, 1.0)
    ours = _norm(3, 4, 1.0, torch.float32)
    ours.load_state_dict(reference.state_dict())
    g = torch.Generator().manual_seed(4)
    x = torch.randn((1, 4, 64, 64, 64), generator=g, dtype=torch.float64) + 3
    upstream = x + torch.randn(x.shape, generator=g, dtype=torch.float64)  # Σ g·x̂ of the size of its terms
    reference(x.requires_grad_()).mul(upstream).sum().backward()
    x32 = x.detach().float().contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    _BatchNormFunction.apply(x32, ours.weight, ours.bias, ours).mul(upstream.float()).sum().backward()
    for expected, actual in [(reference.weight.grad, ours.weight.grad), (reference.bias.grad, ours.bias.grad), (x.grad, x32.grad),
                             (reference.running_mean, ours.running_mean), (reference.running_var, ours.running_var)]:
        error = float((actual.double() - expected).abs().max() / expected.abs().max())
        assert error < 1e-5, error


def _multistep(spatial_dims: int, checkpoint: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    levels = (1, 0)
    net = multistep_network(
        spatial_dims, levels, subnetwork=lambda: GradICONUNet(spatial_dims, **SMALL), checkpoint_activations=checkpoint
    )
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    return net


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_activation_checkpointing_equals_plain_training_step(spatial_dims):
    plain, checkpointed = _multistep(spatial_dims, False), _multistep(spatial_dims, True)
    assert all(s.checkpoint_activations for s in checkpointed.modules() if isinstance(s, DisplacementStep))
    a, b = _pair(spatial_dims)
    losses = []
    for net in (plain, checkpointed):
        net.train()
        phi_ab, phi_ba = net.deformation(a, b), net.deformation(b, a)
        loss = (phi_ab.ddf() ** 2).mean() + GradICONLoss(spatial_dims, generator=torch.Generator().manual_seed(2))(
            phi_ab, phi_ba
        )
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    _assert_grads_close(_grads(plain), _grads(checkpointed), 1e-6)
    # running statistics moved once per forward (two directions -> two updates), not again in the recomputation
    for (name, r1), r2 in zip(plain.named_buffers(), checkpointed.buffers()):
        torch.testing.assert_close(r2, r1, rtol=1e-6, atol=1e-7, msg=name)
    counts = [int(m.num_batches_tracked) for m in checkpointed.modules() if isinstance(m, torch.nn.BatchNorm3d | torch.nn.BatchNorm2d)]
    assert counts and set(counts) == {2}
    with torch.no_grad():  # the option changes nothing in inference
        torch.testing.assert_close(checkpointed.eval()(a, b), plain.eval()(a, b), rtol=1e-5, atol=1e-7)


def test_checkpointing_saves_memory_of_activations():
    """Fewer bytes kept for backward (counted through saved-tensor hooks, no timing)."""

    def saved_bytes(checkpoint: bool) -> int:
        net = _multistep(3, checkpoint).train()
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        a, b = _pair(3, batch=1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(a, b).sum()
        return total

    assert saved_bytes(True) < 0.5 * saved_bytes(False)


def test_autocast_option_runs_the_subnetwork_in_reduced_precision_only():
    net = _multistep(3, False)
    fast = copy.deepcopy(net)
    for step in fast.modules():
        if isinstance(step, DisplacementStep):
            step.autocast_dtype = "bfloat16"
    seen = []
    for unet in fast.modules():
        if isinstance(unet, GradICONUNet):
            unet.down_convs[1].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    a, b = _pair(3)
    with torch.no_grad():
        ddf, ddf_fast = net.eval()(a, b), fast.eval()(a, b)
    assert seen and set(seen) == {torch.bfloat16}  # the convolutions ran in bf16 (CPU autocast)
    assert ddf_fast.dtype == torch.float32  # maps and composition in float32
    assert (ddf_fast - ddf).abs().max() < 0.05 * float(ddf.abs().max()) + 1e-3  # close, not equal
    with pytest.raises(ValueError, match="autocast_dtype must be None or one of"):
        DisplacementStep(GradICONUNet(3), autocast_dtype="float8")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gradicon_loss_on_ddfs_equals_the_unit_route(spatial_dims):
    shape = SHAPES[spatial_dims]
    g = torch.Generator().manual_seed(4)
    small = (1, spatial_dims) + (5,) * spatial_dims
    mode = ("bilinear", "trilinear")[spatial_dims - 2]
    u_ab = torch.nn.functional.interpolate(torch.randn(small, generator=g) * 0.03, size=shape, mode=mode)
    u_ba = -0.8 * u_ab
    scale = torch.tensor([n - 1 for n in shape], dtype=torch.float32).reshape(1, -1, *([1] * spatial_dims))
    noise = torch.randn((1, spatial_dims, *shape), generator=g)
    units = [u.clone().requires_grad_(True) for u in (u_ab, u_ba)]
    ddfs = [(u * scale).requires_grad_(True) for u in (u_ab, u_ba)]
    loss = GradICONLoss(spatial_dims)
    value_units = loss(Deformation([units[0]]), Deformation([units[1]]), noise=noise)
    value_ddf = loss(ddfs[0], ddfs[1], noise=noise)
    torch.testing.assert_close(value_ddf, value_units, rtol=1e-5, atol=0)
    value_units.backward()
    value_ddf.backward()
    # chain rule of ddf = u * scale; finite differences with δ = 1e-3 amplify float32 rounding by 1/δ
    _assert_grads_close({"ab": units[0].grad, "ba": units[1].grad}, {"ab": ddfs[0].grad * scale, "ba": ddfs[1].grad * scale}, 1e-3)
    # the DDF is not copied into [0, 1] units: nothing field-sized beyond the reference's is kept
    assert Deformation.from_ddf(ddfs[0])._terms[0][0] is ddfs[0]


def _smooth_deformation(shape, seed: int, amplitude: float) -> Deformation:
    """Four smooth fields at quarter/half/full/full resolution, as a trained 4-step network gives."""
    g = torch.Generator().manual_seed(seed)
    fields = []
    for factor in (1, 1, 2, 4):
        size = tuple(-(-n // factor) for n in shape)
        coarse = torch.randn((1, 3, 4, 4, 4), generator=g) * amplitude
        fields.append(torch.nn.functional.interpolate(coarse, size=size, mode="trilinear", align_corners=True))
    return Deformation(fields, shape)


@pytest.mark.parametrize("align_corners", [False, True])
def test_resample_writes_the_exact_composition_channel_first(align_corners):
    network_shape = (20, 24, 28)
    image_shape = (50, 44, 41)  # file axes (i, j, k), finer than the network grid, ITK order
    phi = _smooth_deformation(network_shape, 0, 0.02)
    affine = np.array([[0.0, 0.0, 0.8, -5.0], [0.0, -0.6, 0.0, 7.0], [0.55, 0.0, 0.0, 2.0], [0, 0, 0, 1]])
    geometry = PairGeometry.from_affine(image_shape, affine, network_shape, "itk", align_corners)
    g = torch.Generator().manual_seed(5)
    source = PhysicalImage(torch.rand((1, *image_shape), generator=g), affine)
    target = PhysicalImage(torch.rand((1, *image_shape), generator=g), affine)
    labels = PhysicalImage(torch.randint(0, 4, (1, *image_shape), generator=g).float(), affine)

    out = register_module._resample_direction(phi, source, target, geometry, geometry, labels)
    index = register_module._voxel_indices(image_shape, 0, image_shape[0], torch.device("cpu"))
    exact_index, exact_mm = register_module.physical_transform(phi, geometry, geometry, affine, affine, index)
    assert out.displacement.shape == (3, *image_shape) and out.displacement.flags["C_CONTIGUOUS"]
    assert np.abs(exact_mm.numpy()).max() > 1.0  # a deformation of several voxels
    # voxel (i, j, k), component c: the row of that voxel in C order
    np.testing.assert_array_equal(out.displacement, exact_mm.T.reshape(3, *image_shape).numpy().astype(np.float32))
    i, j, k = 7, 30, 11
    np.testing.assert_array_equal(out.displacement[:, i, j, k], exact_mm[(i * 44 + j) * 41 + k].numpy().astype(np.float32))
    exact_warped = register_module.sample_at_voxel_indices(target.array[None], exact_index, "bilinear")[0]
    np.testing.assert_array_equal(out.warped, exact_warped.reshape(image_shape).numpy())
    assert set(np.unique(out.warped_labels)) <= {0.0, 1.0, 2.0, 3.0}


_FIGURE = r"^[a-z0-9_]+: ours=[0-9.]+ reference=[0-9.]+ ratio=[0-9.]+$"


@pytest.fixture
def threads():
    """Set the torch thread count for a test and restore it afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("mode,padding_mode", [("bilinear", "border"), ("bilinear", "zeros"), ("nearest", "border")])
@pytest.mark.parametrize("chunks", [2, 3])
def test_threaded_grid_sample_equals_one_call(spatial_dims, mode, padding_mode, chunks, threads, monkeypatch):
    """Points split across threads: values and point gradients bit for bit, field gradients to float rounding.

    ``chunks`` threads with a small per-thread minimum so that the split happens on test sizes; the point
    count is not a multiple of 3, so the padded last chunk is exercised too.
    """
    from monai_gradicon.maps import grid as grid_module

    threads(chunks)
    monkeypatch.setattr(grid_module, "MIN_POINTS_PER_THREAD", 64)
    g = torch.Generator().manual_seed(spatial_dims)
    field = torch.randn(1, 3, *SHAPES[spatial_dims], generator=g).requires_grad_(True)
    points = (23, 19, 7)[:spatial_dims]
    assert np.prod(points) % 3 != 0
    grid = (torch.rand(1, *points, spatial_dims, generator=g) * 2.4 - 1.2).requires_grad_(True)
    weights = torch.randn(1, 3, *points, generator=g)
    ours = grid_module.grid_sample(field, grid, mode=mode, padding_mode=padding_mode)
    plain = F.grid_sample(field, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    assert torch.equal(ours, plain)
    inputs = [field, grid] if mode == "bilinear" else [field]
    ours_grads = torch.autograd.grad((ours * weights).sum(), inputs)
    plain_grads = torch.autograd.grad((plain * weights).sum(), inputs)
    torch.testing.assert_close(ours_grads[0], plain_grads[0], rtol=1e-5, atol=1e-5)
    assert ours_grads[0].abs().max() > 0.1
    if mode == "bilinear":
        assert torch.equal(ours_grads[1], plain_grads[1])


def test_threaded_grid_sample_splits_only_single_images_on_cpu(threads, monkeypatch):
    """A batch of 2 goes to one ``F.grid_sample`` call unchanged (the kernel already divides by batch)."""
    from monai_gradicon.maps import grid as grid_module

    threads(2)
    monkeypatch.setattr(grid_module, "MIN_POINTS_PER_THREAD", 16)
    calls = []
    original = F.grid_sample

    def spy(field, grid, **kwargs):
        calls.append(tuple(grid.shape))
        return original(field, grid, **kwargs)

    monkeypatch.setattr(grid_module.F, "grid_sample", spy)
    field = torch.randn(2, 1, 9, 10)
    grid = torch.rand(2, 9, 10, 2) * 2 - 1
    grid_module.grid_sample(field, grid)
    grid_module.grid_sample(field[:1], grid[:1])
    assert calls == [(2, 9, 10, 2), (2, 45, 1, 2)]


def _depthwise_blur(image: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """The oracle: the same separable blur as depthwise convolutions with zero "same" padding."""
    from monai_gradicon.losses.lncc import gaussian_kernel1d

    dims = image.ndim - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    kernel = gaussian_kernel1d(kernel_size, sigma).to(image.dtype)
    out = image
    for axis in range(dims):
        shape = [1] * dims
        shape[axis] = kernel_size
        out = conv(out, kernel.reshape(1, 1, *shape).expand(image.shape[1], 1, *shape), padding="same", groups=image.shape[1])
    return out


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("kernel_size,sigma", [(21, 5), (7, 3), (45, 11)])
def test_banded_gaussian_blur_equals_depthwise_convolution(spatial_dims, kernel_size, sigma):
    """LNCC's blur as matrix products = depthwise convolutions: float32 values and gradients to rounding, float64 to 1e-12.

    ``(45, 11)`` is wider than the smallest axis (the band is cut by the zero padding on both sides).
    """
    from monai_gradicon.losses.lncc import gaussian_blur

    shape = (2, 2, *(24, 31, 19)[:spatial_dims])
    g = torch.Generator().manual_seed(kernel_size)
    image = torch.rand(shape, generator=g, dtype=torch.float64).requires_grad_(True)
    weights = torch.randn(shape, generator=g, dtype=torch.float64)
    ours64, oracle64 = gaussian_blur(image, kernel_size, sigma), _depthwise_blur(image, kernel_size, sigma)
    torch.testing.assert_close(ours64, oracle64, rtol=0, atol=1e-12)
    grad_ours, grad_oracle = (torch.autograd.grad((b * weights).sum(), image)[0] for b in (ours64, oracle64))
    torch.testing.assert_close(grad_ours, grad_oracle, rtol=0, atol=1e-12)
    image32 = image.detach().float().requires_grad_(True)
    ours32, oracle32 = gaussian_blur(image32, kernel_size, sigma), _depthwise_blur(image32, kernel_size, sigma)
    torch.testing.assert_close(ours32, oracle32, rtol=0, atol=2e-6)
    grads = [torch.autograd.grad((b * weights.float()).sum(), image32)[0] for b in (ours32, oracle32)]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=2e-5)
    assert (ours64 - image).abs().max() > 0.05  # the blur does something


def test_gaussian_blur_refuses_an_even_kernel():
    from monai_gradicon.losses.lncc import gaussian_blur

    with pytest.raises(ValueError, match="kernel_size must be odd"):
        gaussian_blur(torch.zeros(1, 1, 8, 8), 4, 1.0)


@pytest.mark.parametrize(
    "script,options,figures",
    [
        ("benchmark_reference.py", ["--quick", "--repeats", "1"], ["gradicon_loss_ddf_input_fwd_bwd_24_peak_mib", "knee_4step_forward_flop_floor_ratio"]),
        ("benchmark_training.py", ["--quick", "--no-peak"], ["knee_4step_train_iteration_17x17x17", "knee_4step_train_iteration_17x17x17_reference_layout"]),
    ],
)
def test_benchmark_scripts_quick_variant_prints_one_line_per_figure(script, options, figures):
    """Smoke test of the benchmark scripts (not timed): ``<figure>: ours=<v> reference=<v> ratio=<ours/reference>``."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, str(root / "scripts" / script), *options], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = {line.split(":")[0]: line for line in done.stdout.splitlines() if re.match(_FIGURE, line)}
    for figure in figures:
        assert figure in lines, done.stdout
        values = dict(part.split("=") for part in lines[figure].split(": ")[1].split())
        assert float(values["ratio"]) == pytest.approx(float(values["ours"]) / float(values["reference"]), rel=0.1, abs=0.01)  # printed values are rounded
