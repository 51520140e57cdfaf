"""Local normalised cross-correlation with a Gaussian window, as the GradICON reference defines it.

Different from MONAI's ``LocalNormalizedCrossCorrelationLoss`` (which squares the correlation, uses
a box/triangular window normalised by its volume, and returns ``-LNCC``): here the window is a
separable Gaussian of ``4σ + 1`` taps with zero "same" padding, the correlation is not squared, and the
loss is ``1 − mean(cc)``. The released lung and uniGradICON weights were trained with this measure.
"""

from __future__ import annotations

import torch
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


def _band_matrix(size: int, kernel: torch.Tensor) -> torch.Tensor:
    """``(size, size)`` matrix ``T`` with ``T[i, j] = kernel[j - i + half]`` inside the band, 0 outside.

    ``T @ x`` along an axis is the "same" cross-correlation of ``x`` with ``kernel`` under zero padding.
    """
    half = (kernel.numel() - 1) // 2
    index = torch.arange(size, device=kernel.device)
    offset = index[None, :] - index[:, None] + half
    inside = (offset >= 0) & (offset < kernel.numel())
    return torch.where(inside, kernel[offset.clamp(0, kernel.numel() - 1)], kernel.new_zeros(()))


def gaussian_blur(image: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, *spatial)`` with zero "same" padding (no border renormalisation).

    Used for the local means of :class:`LNCCLoss` and the smoothed scales of the self-adaptive NCC
    pyramid (paper Eq. 7/8). Near the border the zero padding pulls values towards 0.

    Each axis is one matrix product with the banded ``(N, N)`` matrix of the 1D kernel: the same sums as
    a depthwise convolution (the terms outside the band are exact zeros), but dense matrix products run
    at the CPU's GEMM rate, where a single-channel ``conv3d`` with a ``(k, 1, 1)`` kernel falls back to
    PyTorch's slow unfolded path (40x slower forward and backward at 80×192×192). The rounding of each
    sum is the GEMM's, within float rounding of the convolution's.

    Args:
        image: ``(B, C, *spatial)`` with 1, 2 or 3 spatial axes; each channel is blurred separately.
        kernel_size: number of taps per axis (odd, so that "same" padding is symmetric).
        sigma: standard deviation in voxels.

    Returns:
        the blurred image, same shape and dtype as ``image``.
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd (symmetric 'same' padding), got {kernel_size}.")
    shape = image.shape
    kernel = gaussian_kernel1d(kernel_size, sigma).to(image.device, image.dtype)
    out = image
    for axis in range(2, image.ndim):
        band = _band_matrix(shape[axis], kernel)
        trailing = shape[axis + 1 :].numel()
        if trailing == 1:  # the last axis: rows times band^T
            out = (out.reshape(-1, shape[axis]) @ band.t()).reshape(shape)
        else:
            out = torch.matmul(band, out.reshape(-1, shape[axis], trailing)).reshape(shape)
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
