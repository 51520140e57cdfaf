"""Masked means for similarity losses: the average of a local measure over the voxels inside a mask.

With loss masking (uniGradICON's ``--loss_function_masking``) a local similarity such as the LNCC
(:class:`~monai_gradicon.losses.LNCCLoss`) or the MIND-SSC distance
(:class:`~monai_gradicon.losses.MINDSSCLoss`) is averaged only over the voxels where the mask of the
*target* image (the fixed image of ``L_sim(I^A ∘ Φ_AB, I^B)``, paper Sec. 5.1) is nonzero, instead of
over the whole grid.
"""

from __future__ import annotations

import torch

__all__ = ["masked_mean"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values`` over channels and the voxels where ``mask != 0``, for each sample.

    The average of a local similarity of ``L_sim`` (paper Sec. 5.1) restricted to the target's mask.

    Args:
        values: ``(B, C, *spatial)``.
        mask: ``None`` (every voxel), or ``(B, 1, *spatial)`` / ``(B, C, *spatial)`` (a batch of 1 is
            broadcast); nonzero voxels are inside.

    Returns:
        ``(B,)`` per-sample means, in the dtype of ``values``.

    Raises:
        ValueError: the mask does not broadcast to ``values`` or is empty for a sample.
    """
    if mask is None:
        return values.flatten(1).mean(1)
    if mask.ndim != values.ndim or mask.shape[2:] != values.shape[2:] or mask.shape[1] not in (1, values.shape[1]) \
            or mask.shape[0] not in (1, values.shape[0]):
        raise ValueError(
            f"mask must be (B, 1 or C, *spatial) for values of shape {tuple(values.shape)}, got {tuple(mask.shape)}."
        )
    inside = (mask != 0).expand_as(values)
    counts = inside.flatten(1).sum(1)
    if bool((counts == 0).any()):
        raise ValueError(f"the mask is empty (no voxel != 0) for sample(s) {torch.nonzero(counts == 0).flatten().tolist()}.")
    totals = torch.where(inside, values, torch.zeros((), dtype=values.dtype, device=values.device)).flatten(1).sum(1)
    return totals / counts.to(values.dtype)
