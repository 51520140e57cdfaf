"""Local normalised cross-correlation with a Gaussian window, as the GradICON reference defines it.

Different from MONAI's ``LocalNormalizedCrossCorrelationLoss`` (which squares the correlation, uses
a box/triangular window normalised by its volume, and returns ``-LNCC``): here the window is a
separable Gaussian of ``4σ + 1`` taps with zero "same" padding, the correlation is not squared, and the
loss is ``1 − mean(cc)``. The released lung and uniGradICON weights were trained with this measure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from ..validation import check_spatial_dims
from .masking import masked_mean
from .ncc import check_similarity_inputs, reduce_batch

__all__ = ["LNCCLoss", "gaussian_kernel1d", "gaussian_blur"]


def gaussian_kernel1d(kernel_size: int, sigma: float) -> torch.Tensor:
    """Normalised 1D Gaussian, taps at ``-(k-1)/2 .. (k-1)/2``, built in float32.

    The window of :class:`LNCCLoss` and of the pyramid of the self-adaptive NCC (paper Eq. 7/8).

    Args:
        kernel_size: number of taps ``k`` (odd in every use here: ``4σ + 1`` or ``2σ + 1``).
        sigma: standard deviation in taps (voxels).

    Returns:
        ``(kernel_size,)`` float32 weights summing to 1.
    """
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return pdf / pdf.sum()


def gaussian_blur(image: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable depthwise Gaussian blur of ``(B, C, *spatial)`` with zero "same" padding (no border renormalisation).

    Used for the local means of :class:`LNCCLoss` and the smoothed scales of the self-adaptive NCC
    pyramid (paper Eq. 7/8). Near the border the zero padding pulls values towards 0.

    Args:
        image: ``(B, C, *spatial)`` with 1, 2 or 3 spatial axes; each channel is blurred separately.
        kernel_size: number of taps per axis (odd, so that "same" padding is symmetric).
        sigma: standard deviation in voxels.

    Returns:
        the blurred image, same shape and dtype as ``image``.
    """
    spatial_dims = image.ndim - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial_dims - 1]
    kernel = gaussian_kernel1d(kernel_size, sigma).to(image.device, image.dtype)
    channels = image.shape[1]
    out = image
    for axis in range(spatial_dims):
        shape = [1] * spatial_dims
        shape[axis] = kernel_size
        weight = kernel.reshape(1, 1, *shape).expand(channels, 1, *shape)
        out = conv(out, weight, padding="same", groups=channels)
    return out


class LNCCLoss(_Loss):
    """``1 − mean(cc)`` with the Gaussian-window local correlation

    ``cc = (b(IJ) − b(I)b(J)) / sqrt((relu(b(I²) − b(I)²) + ε)(relu(b(J²) − b(J)²) + ε))``,
    ``b`` a Gaussian blur of ``4σ + 1`` taps, ``ε = 1e-5`` (reference ``icon_registration.LNCC``).

    A local variant of the NCC similarity ``L_sim`` of the paper's objective (Sec. 5.1); the paper's
    lung experiment uses the self-adaptive NCC instead (Sec. 5.2, A.3), while the released lung and
    uniGradICON weights were trained with this measure.

    Args:
        spatial_dims: 2 or 3.
        sigma: Gaussian standard deviation in voxels (reference lung model: 5).
        squared: use ``cc²`` (the reference's ``SquaredLNCC``, for multi-modal pairs).
        reduction: ``"mean"`` | ``"sum"`` over the batch, or ``"none"`` for ``(B,)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        sigma: int = 5,
        squared: bool = False,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if int(sigma) != sigma or sigma < 1:
            raise ValueError(f"sigma must be a positive integer (the window has 4*sigma+1 taps), got {sigma}.")
        self.sigma = int(sigma)
        self.squared = bool(squared)

    def _blur(self, image: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(image, 4 * self.sigma + 1, self.sigma)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            pred: warped moving image ``(B, C, *spatial)``.
            target: fixed image, same shape.
            mask: optional mask of ``target`` ``(B, 1, *spatial)``: the mean is taken over its nonzero
                voxels only (:func:`~monai_gradicon.losses.masking.masked_mean`; the reference's ``mask_B``).

        Returns:
            ``1 − mean(cc)`` per sample (mean over channels and voxels, or the voxels inside ``mask``;
            ``1 − mean(cc²)`` when ``squared``), reduced over the batch as ``reduction`` says.
        """
        check_similarity_inputs(pred, target, self.spatial_dims)
        b = self._blur
        mean_i, mean_j = b(pred), b(target)
        cross = b(pred * target) - mean_i * mean_j
        var_i = torch.relu(b(pred * pred) - mean_i**2) + 1e-5
        var_j = torch.relu(b(target * target) - mean_j**2) + 1e-5
        cc = cross / torch.sqrt(var_i * var_j)
        if self.squared:
            cc = cc**2
        return reduce_batch(1 - masked_mean(cc, mask), self.reduction)
