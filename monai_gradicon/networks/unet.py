"""The U-Net used by every GradICON sub-network (architecture of the reference ``tallUNet2``).

Encoder: ``x ← Conv(k3, s2)(leaky_relu(x)) + avg_pool(x)`` (residual, channels zero-padded at the
front or cropped). Decoder: ``x ← ConvT(k4, s2)(leaky_relu(x)) + upsample(x)``, BatchNorm, crop to
the skip, concatenate. The last convolution is zero-initialised and its output divided by 10, so
an untrained network predicts the identity map. Default channels give 17,670,229 parameters in 3D and
4,756,902 in 2D, the same state-dict shapes as the reference, so its weights load (see
:func:`~monai_gradicon.networks.load_reference_weights`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..maps import native
from ..validation import check_spatial_dims

__all__ = ["GradICONUNet"]


def _channels_last_format(spatial_dims: int) -> torch.memory_format:
    """The channels-last memory format of a ``spatial_dims``-D image batch (``channels_last_3d`` in 3D)."""
    return (torch.channels_last, torch.channels_last_3d)[spatial_dims - 2]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A channels-last ``(N, C, *S)`` tensor as the ``(N·ΠS, C)`` matrix it is in memory (a view)."""
    return x.movedim(1, -1).reshape(-1, x.shape[1])


class _BatchNormFunction(torch.autograd.Function):
    """``norm(x)`` (an affine ``nn.BatchNorm``) for a channels-last CPU tensor: ``x̂·γ + β``, ``x̂ = (x − μ)·σ⁻¹``.

    PyTorch's CPU BatchNorm kernels accumulate the per-channel sums of a channels-last tensor in one
    float32 running sum (forward statistics and the backward's ``Σ g`` and ``Σ g·x̂``: 9e-5 relative
    error on the weight gradient of a 64³ tensor against 2e-6 in the default layout, 1e-3 on a BatchNorm
    weight gradient of a 40×96×96 U-Net), and take a slow elementwise path when the gradient is strided
    (it is: the channel slices of a concatenation's gradient). Here ``Σ x`` and ``Σ g`` are pairwise
    ``torch.sum`` reductions, and ``Σ (x − μ)²`` and ``Σ g·x̂`` the diagonals of ``(C, C)`` matrix
    products of ``(voxels, C)`` matrices (blocked float32 sums).
    The module's semantics are kept: batch statistics in training (their dependence on ``x`` in the
    gradient) or running ones, running averages by momentum or cumulative, ``num_batches_tracked``.
    ``x̂`` is kept for backward instead of ``x`` (same memory).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, norm):
        shape, n = (1, -1) + (1,) * (x.ndim - 2), x.numel() // x.shape[1]
        ctx.batch_stats = norm.training or norm.running_mean is None
        if ctx.batch_stats:
            mean = x.sum((0, *range(2, x.ndim))) / n
            normalized = x - mean.reshape(shape)
            var = (_rows(normalized).t() @ _rows(normalized)).diagonal() / n
            if norm.training and norm.track_running_stats:
                norm.num_batches_tracked.add_(1)
                momentum = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
                norm.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
                norm.running_var.mul_(1 - momentum).add_(var * (n / max(n - 1, 1)), alpha=momentum)
            invstd = torch.rsqrt(var + norm.eps)
            normalized.mul_(invstd.reshape(shape))
        else:
            invstd = torch.rsqrt(norm.running_var + norm.eps)
            normalized = torch.addcmul((-norm.running_mean * invstd).reshape(shape), x, invstd.reshape(shape))
        ctx.save_for_backward(normalized, weight, invstd)
        return torch.addcmul(bias.reshape(shape), normalized, weight.reshape(shape))

    @staticmethod
    def backward(ctx, grad):
        normalized, weight, invstd = ctx.saved_tensors
        shape = (1, -1) + (1,) * (normalized.ndim - 2)
        grad = grad.contiguous(memory_format=_channels_last_format(normalized.ndim - 2))
        sum_g = grad.sum((0, *range(2, grad.ndim)))
        sum_g_xhat = (_rows(grad).t() @ _rows(normalized)).diagonal()
        scale = invstd * weight
        if not ctx.batch_stats:
            grad_x = grad * scale.reshape(shape)
        else:  # scale·(g − Σg/n − x̂·Σg·x̂/n)
            n = normalized.numel() // normalized.shape[1]
            grad_x = torch.addcmul((-scale * sum_g / n).reshape(shape), grad, scale.reshape(shape))
            grad_x.addcmul_(normalized, (scale * sum_g_xhat / n).reshape(shape), value=-1)
        return grad_x, sum_g_xhat, sum_g, None


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Keep the first ``channels`` channels of ``x``, zero-padding missing ones at the front."""
    x = x[:, :channels]
    missing = channels - x.shape[1]
    if missing > 0:
        x = F.pad(x, (0, 0) * (x.ndim - 2) + (missing, 0))
    return x


class GradICONUNet(nn.Module):
    """U-Net predicting a displacement field in [0, 1] units from a (moving, fixed) pair.

    The sub-network ``F^i_θ`` of each step of paper Eq. 6 (Sec. 5.1: "estimating ``u`` via a U-Net"),
    the ``tallUNet2`` of the ICON repository that Sec. A.2.1 and A.3.1 adopt.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of each input image (the network sees ``2 * in_channels``).
        down_channels: encoder widths (reference: 16, 32, 64, 256, 512).
        up_channels: decoder widths, same length (reference: 16, 32, 64, 128, 256).
        channels_last: run the convolutions in the channels-last memory format (``channels_last_3d`` in
            3D), which oneDNN convolves about 2x faster on CPU, forward and backward; same values and
            gradients to float rounding. ``True`` (default): always; ``False``: the reference's layout,
            whose convolutions round as the reference's do (for bit-level comparisons: over Adam steps
            rounding noise in near-zero gradients becomes full steps, so instance optimisation ends
            ~2e-3 mm away from the reference's in channels-last).

    In 3D every spatial axis must be >= 17 (the fifth pooling needs at least 2 voxels, as in the
    reference); :attr:`min_size` tells the limit.

    In inference (eval mode, no gradients recorded) each BatchNorm is folded into the transposed convolution before it (and the final
    ``/ 10`` into the last convolution): ``BN(ConvT(a) + up(b)) = ConvT'(a) + up(s·b)`` with
    ``s = γ / sqrt(σ² + ε)``, ``ConvT'`` the convolution with weights scaled by ``s`` and bias
    ``s·(bias − μ) + β``. One full-size pass fewer per decoder level; same values to float rounding. On
    a CPU in 3D the upsampling, addition and concatenation of each level then run as one native pass
    (:func:`~monai_gradicon.maps.native.upsample_add_concat`).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        down_channels: Sequence[int] = (16, 32, 64, 256, 512),
        up_channels: Sequence[int] = (16, 32, 64, 128, 256),
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if len(down_channels) != len(up_channels) or len(down_channels) < 1:
            raise ValueError(
                f"down_channels and up_channels must have the same length >= 1, got {len(down_channels)} and {len(up_channels)}."
            )
        conv = (nn.Conv2d, nn.Conv3d)[spatial_dims - 2]
        conv_t = (nn.ConvTranspose2d, nn.ConvTranspose3d)[spatial_dims - 2]
        norm = (nn.BatchNorm2d, nn.BatchNorm3d)[spatial_dims - 2]
        self.in_channels = in_channels
        self.num_layers = len(down_channels)
        down = [2 * in_channels, *down_channels]
        up_in = [down[i + 1] + (up_channels[i + 1] if i + 1 < self.num_layers else 0) for i in range(self.num_layers)]
        self.down_convs = nn.ModuleList(
            conv(down[i], down[i + 1], kernel_size=3, padding=1, stride=2) for i in range(self.num_layers)
        )
        self.up_convs = nn.ModuleList(
            conv_t(up_in[i], up_channels[i], kernel_size=4, padding=1, stride=2) for i in range(self.num_layers)
        )
        self.batch_norms = nn.ModuleList(norm(c) for c in up_channels)
        self.last_conv = conv(down[0] + up_channels[0], spatial_dims, kernel_size=3, padding=1)
        nn.init.zeros_(self.last_conv.weight)
        nn.init.zeros_(self.last_conv.bias)
        self._pool = (F.avg_pool2d, F.avg_pool3d)[spatial_dims - 2]
        self._upsample_mode = ("bilinear", "trilinear")[spatial_dims - 2]
        self._conv_t = (F.conv_transpose2d, F.conv_transpose3d)[spatial_dims - 2]
        self._conv = (F.conv2d, F.conv3d)[spatial_dims - 2]
        self.channels_last = bool(channels_last)
        # 3D avg_pool rejects a size-1 input: the input to the last pooling must have >= 2 voxels.
        self.min_size = 2 ** (self.num_layers - 1) + 1 if spatial_dims == 3 else 1

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Displacement ``(B, D, *spatial)`` in [0, 1] units for the pair (same shape inputs).

        Args:
            moving: image ``(B, in_channels, *spatial)``.
            fixed: image, same shape.

        Returns:
            the displacement ``u`` ``(B, D, *spatial)`` in [0, 1] units, channel ``k`` along spatial
            axis ``k`` (all zeros before training).
        """
        x = self._layout(torch.cat([moving, fixed], dim=1))
        skips = []
        for conv in self.down_convs:
            skips.append(x)
            y = conv(F.leaky_relu(x))
            pooled = self._pool(x, 2, ceil_mode=True)[:, : y.shape[1]]
            # the residual, channels zero-padded at the front: add into the fresh convolution output
            y[:, y.shape[1] - pooled.shape[1] :] += pooled
            x = y
        fold = not self.training and not torch.is_grad_enabled()  # inference: no weight gradients to keep
        for depth in reversed(range(self.num_layers)):
            x = self._decode(depth, x, skips[depth], fold)
        if fold:
            out = self._conv(x, self.last_conv.weight / 10, self.last_conv.bias / 10, padding=1)
        else:
            out = self.last_conv(x) / 10
        return out.contiguous()

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=_channels_last_format(self.spatial_dims)) if self.channels_last else x

    def _decode(self, depth: int, x: torch.Tensor, skip: torch.Tensor, fold: bool) -> torch.Tensor:
        """Decoder level ``depth``: ``cat([crop(BN(ConvT(leaky_relu(x)) + upsample(x))), skip])``, BN folded when ``fold``.

        Folded on a CPU in 3D channels-last, the upsampling, addition, crop and concatenation are one pass
        of :func:`~monai_gradicon.maps.native.upsample_add_concat` (three full-size passes otherwise).
        """
        conv, norm = self.up_convs[depth], self.batch_norms[depth]
        residual = self._layout(_match_channels(x, conv.out_channels))  # a dense copy upsamples fast
        if not fold or norm.running_mean is None:
            y = conv(F.leaky_relu(x))
            y += F.interpolate(residual, scale_factor=2, mode=self._upsample_mode, align_corners=False)
            if self.channels_last and norm.affine and y.device.type == "cpu" and not torch.jit.is_tracing():
                y = _BatchNormFunction.apply(y, norm.weight, norm.bias, norm)
            else:
                y = norm(y)
            return self._concat(y, skip)
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale
        if norm.bias is not None:
            shift = shift + norm.bias
        bias = shift if conv.bias is None else conv.bias * scale + shift
        per_channel = scale.reshape(1, -1, *([1] * self.spatial_dims))  # ConvT weights are (in, out, *k)
        y = self._conv_t(F.leaky_relu(x), conv.weight * per_channel, bias, stride=2, padding=1)
        coarse = residual * per_channel
        if self._native_join(y):
            return native.upsample_add_concat(self._layout(y), self._layout(coarse), self._layout(skip))
        y += F.interpolate(coarse, scale_factor=2, mode=self._upsample_mode, align_corners=False)
        return self._concat(y, skip)

    def _concat(self, y: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``cat([y cropped to skip's grid, skip])`` in this network's layout (the cropped part would leave it)."""
        y = y[(slice(None), slice(None)) + tuple(slice(0, n) for n in skip.shape[2:])]
        return self._layout(torch.cat([y, skip], dim=1))

    def _native_join(self, y: torch.Tensor) -> bool:
        """Whether the folded decoder join runs natively: 3D, channels-last, float, CPU, and
        :func:`~monai_gradicon.maps.native.native_available` (built, eager)."""
        return (
            self.spatial_dims == 3
            and self.channels_last
            and y.device.type == "cpu"
            and y.dtype in (torch.float32, torch.float64)
            and native.native_available()
        )
