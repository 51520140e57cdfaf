"""Global normalised cross-correlation, the ``NCC`` of the paper (Sec. 5.1) and of its reference code."""

from __future__ import annotations

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from ..validation import check_spatial_dims

__all__ = ["NCCLoss", "standardize", "check_similarity_inputs", "reduce_batch"]


def check_similarity_inputs(pred: torch.Tensor, target: torch.Tensor, spatial_dims: int) -> None:
    """Check the inputs of a similarity measure ``L_sim(pred, target)`` (paper Sec. 5.1, 5.2).

    Args:
        pred: warped moving image, must be ``(B, C, *spatial)`` with ``spatial_dims`` spatial axes.
        target: fixed image, must have the same shape as ``pred``.
        spatial_dims: 2 or 3.

    Raises:
        ValueError: wrong rank, or the shapes differ (the message gives both shapes).
    """
    if pred.ndim != spatial_dims + 2:
        raise ValueError(
            f"pred must be (B, C, {', '.join('HWD'[:spatial_dims])}) for spatial_dims={spatial_dims}, "
            f"got shape {tuple(pred.shape)}."
        )
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}.")


def reduce_batch(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply a MONAI ``LossReduction`` value to per-sample similarity losses (the ``L_sim`` of paper Sec. 5.1).

    Args:
        per_sample: ``(B,)`` loss of each pair.
        reduction: ``"mean"``, ``"sum"``, or anything else (``"none"``) to keep ``per_sample``.

    Returns:
        a scalar for ``"mean"``/``"sum"``, else ``per_sample`` itself.
    """
    if reduction == LossReduction.MEAN.value:
        return per_sample.mean()
    if reduction == LossReduction.SUM.value:
        return per_sample.sum()
    return per_sample


def standardize(image: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit (population) standard deviation per sample and channel over the spatial axes.

    The normalisation inside the NCC of paper Sec. 5.1 and the ``Ñ CC`` of Eq. 7: the NCC of two images
    is the mean of the product of their standardised versions. No epsilon is added, so a constant
    image gives NaN.

    Args:
        image: ``(B, C, *spatial)``.

    Returns:
        ``(B, C, *spatial)`` standardised image.
    """
    axes = tuple(range(2, image.ndim))
    centered = image - image.mean(axes, keepdim=True)
    return centered / torch.sqrt((centered**2).mean(axes, keepdim=True))


class NCCLoss(_Loss):
    """``1 − NCC(pred, target)`` with NCC the global normalised cross-correlation, range [0, 2].

    The NCC of each sample is the mean over channels and voxels of the product of the standardised
    images, as in the reference ``icon_registration.NCC`` (which is the batch mean of this). This is the
    ``Ñ CC = 1 − NCC`` of paper Eq. 7.

    Args:
        spatial_dims: 2 or 3.
        reduction: ``"mean"`` | ``"sum"`` over the batch, or ``"none"`` for ``(B,)``.
    """

    def __init__(self, spatial_dims: int, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.spatial_dims = check_spatial_dims(spatial_dims)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pred: warped moving image ``(B, C, *spatial)``.
            target: fixed image, same shape.

        Returns:
            ``1 − NCC`` per sample (in [0, 2]), reduced over the batch as ``reduction`` says.
        """
        check_similarity_inputs(pred, target, self.spatial_dims)
        per_sample = 1 - (standardize(pred) * standardize(target)).flatten(1).mean(1)
        return reduce_batch(per_sample, self.reduction)
