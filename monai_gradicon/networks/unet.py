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

from ..validation import check_spatial_dims

__all__ = ["GradICONUNet"]


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

    In 3D every spatial axis must be >= 17 (the fifth pooling needs at least 2 voxels, as in the
    reference); :attr:`min_size` tells the limit.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        down_channels: Sequence[int] = (16, 32, 64, 256, 512),
        up_channels: Sequence[int] = (16, 32, 64, 128, 256),
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
        x = torch.cat([moving, fixed], dim=1)
        skips = []
        for conv in self.down_convs:
            skips.append(x)
            y = conv(F.leaky_relu(x))
            x = y + _match_channels(self._pool(x, 2, ceil_mode=True), y.shape[1])
        for depth in reversed(range(self.num_layers)):
            y = self.up_convs[depth](F.leaky_relu(x))
            x = y + F.interpolate(
                _match_channels(x, y.shape[1]), scale_factor=2, mode=self._upsample_mode, align_corners=False
            )
            x = self.batch_norms[depth](x)
            skip = skips[depth]
            x = x[(slice(None), slice(None)) + tuple(slice(0, n) for n in skip.shape[2:])]
            x = torch.cat([x, skip], dim=1)
        return self.last_conv(x) / 10
