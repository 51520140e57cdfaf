"""Evaluation metrics of a predicted DDF as MONAI ``CumulativeIterationMetric`` s (use with ``IgniteMetricHandler``).

* :class:`FoldPercentageMetric` — ``%|J| < 0``, the percentage of voxels with a negative Jacobian
  determinant (paper Sec. 7, 8).

Landmark mTRE is measured in physical space by :func:`monai_gradicon.app.evaluate_pairs` (the bundles'
``evaluate.json`` runs it), the one TRE implementation of the package.
"""

from __future__ import annotations

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

from ..maps import fold_percentage

__all__ = ["FoldPercentageMetric"]


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
