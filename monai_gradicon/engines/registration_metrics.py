"""Evaluation metrics of a predicted DDF as MONAI ``CumulativeIterationMetric`` s (use with ``IgniteMetricHandler``).

* :class:`FoldPercentageMetric` — ``%|J| < 0``, the percentage of voxels with a negative Jacobian
  determinant (paper Sec. 7, 8).
* :class:`LandmarkTREMetric` — mean target registration error of landmarks in mm (DirLab, Sec. 8).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

from ..maps import fold_percentage, sample
from ..metrics.landmarks import landmark_distances

__all__ = ["FoldPercentageMetric", "LandmarkTREMetric", "landmark_tre"]


class _PerCaseMetric(CumulativeIterationMetric):
    """A metric that collects one value per case as ``(cases, 1)`` and reduces them with a MONAI ``MetricReduction``."""

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN) -> None:
        super().__init__()
        self.reduction = reduction

    def aggregate(self, reduction: MetricReduction | str | None = None) -> torch.Tensor:
        """Reduce the per-case values collected so far.

        Args:
            reduction: overrides the constructor's ``reduction`` when given.

        Returns:
            the reduced metric; the values are kept as ``(cases, 1)``, so ``"mean"`` gives shape ``(1,)``.
        """
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{type(self).__name__} has no data to aggregate.")
        f, _ = do_metric_reduction(data, reduction or self.reduction)
        return f


class FoldPercentageMetric(_PerCaseMetric):
    """Percentage of voxels of a DDF ``(B, D, *spatial)`` whose Jacobian determinant is negative.

    The ``%|J|`` of paper Sec. 8, per case, by :func:`~monai_gradicon.maps.fold_percentage`. ``y`` is
    ignored (``IgniteMetricHandler`` always passes one).

    Args:
        reduction: how :meth:`aggregate` reduces the per-case values (a MONAI ``MetricReduction``,
            default mean).
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if not isinstance(y_pred, torch.Tensor) or y_pred.ndim not in (4, 5) or y_pred.shape[1] != y_pred.ndim - 2:
            shape = tuple(y_pred.shape) if isinstance(y_pred, torch.Tensor) else type(y_pred).__name__
            raise ValueError(f"FoldPercentageMetric needs a DDF (B, D, *spatial) with D spatial axes, got {shape}.")
        return fold_percentage(y_pred.float()).reshape(-1, 1)


def landmark_tre(
    ddf: torch.Tensor, fixed_points: torch.Tensor, moving_points: torch.Tensor, spacing: Sequence[float]
) -> torch.Tensor:
    """Mean distance in mm between ``fixed_points + ddf(fixed_points)`` and ``moving_points``.

    The distances come from :func:`monai_gradicon.metrics.landmark_distances`, the TRE arithmetic the
    CLI evaluation uses too (paper Sec. 8).

    Args:
        ddf: ``(D, *spatial)`` DDF in voxels (MONAI convention: fixed coordinates → moving coordinates).
        fixed_points: ``(N, D)`` 0-based voxel coordinates in the fixed image (network grid).
        moving_points: ``(N, D)`` corresponding 0-based voxel coordinates in the moving image.
        spacing: voxel size in mm per axis of the network grid.

    Returns:
        scalar tensor, mTRE in mm.
    """
    dims = ddf.shape[0]
    if ddf.ndim != dims + 1 or fixed_points.shape != moving_points.shape or fixed_points.shape[-1] != dims:
        raise ValueError(
            f"landmark_tre needs ddf (D, *spatial) and two (N, D) point sets, got {tuple(ddf.shape)}, "
            f"{tuple(fixed_points.shape)}, {tuple(moving_points.shape)}."
        )
    shape = torch.tensor(ddf.shape[1:], dtype=torch.float64, device=ddf.device)
    coords = (fixed_points.double() / (shape - 1)).T.reshape(1, dims, -1, *([1] * (dims - 1)))
    disp = sample(ddf[None].double(), coords).reshape(dims, -1).T
    mapped = fixed_points.double() + disp
    return landmark_distances(mapped, moving_points, spacing).mean()


class LandmarkTREMetric(_PerCaseMetric):
    """mTRE (mm) per case; ``y_pred`` = DDF batch ``(B, D, *S)``, ``y`` = ``(B, 2, N, D)`` stacked ``[fixed, moving]`` points.

    Args:
        spacing: voxel size in mm of the network grid (lung bundle: 2 mm isotropic).
        reduction: how :meth:`aggregate` reduces the per-case values (a MONAI ``MetricReduction``,
            default mean).
    """

    def __init__(self, spacing: Sequence[float], reduction: MetricReduction | str = MetricReduction.MEAN) -> None:
        super().__init__(reduction)
        self.spacing = [float(s) for s in spacing]

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if y is None or y.ndim != 4 or y.shape[1] != 2:
            raise ValueError(f"LandmarkTREMetric needs y of shape (B, 2, N, D) = [fixed, moving] points, got {None if y is None else tuple(y.shape)}.")
        values = [landmark_tre(y_pred[b], y[b, 0], y[b, 1], self.spacing) for b in range(y_pred.shape[0])]
        return torch.stack(values).reshape(-1, 1).float()
