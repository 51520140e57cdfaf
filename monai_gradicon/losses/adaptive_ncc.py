"""Self-adaptive multi-scale NCC, paper Sec. 5.2, Eq. 7 (parameter-free) and Eq. 8 (greedy)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from ..validation import check_spatial_dims
from .lncc import gaussian_blur
from .ncc import check_similarity_inputs, reduce_batch, standardize

__all__ = ["SelfAdaptiveNCCLoss"]


class SelfAdaptiveNCCLoss(_Loss):
    """Self-adaptive multi-scale ``Ñ CC = 1 − NCC`` (paper Eq. 7/8), 2D and 3D.

    The pyramid has ``Q + 1`` scales: scale 0 is the image itself, scale 1 the image blurred with a
    Gaussian of ``σ`` (``2σ + 1`` taps), and scale ``i >= 2`` the blurred ``2^(i-1)``-average-pooled
    image (as in the reference ``AdaptiveNCC``; Fig. 2's coarsest term is "smooth 1/8" for Q = 4).
    With ``s_i = Ñ CC`` at scale ``i`` (per sample),

    ``g_0 = s_0``,  ``g_i = γ_i s_i + (1 − γ_i) g_{i−1}``,  loss ``= g_Q``,

    where the weights are not back-propagated through and are

    * Eq. 7 (``alpha=None``, parameter-free): ``γ_i = clamp(s_i, 0, 1)`` (the clamp only matters for
      anti-correlated images, ``s_i > 1``, and keeps the blend convex);
    * Eq. 8 (greedy): ``γ_i = clamp(s_i / h(i), 0, 1)``, ``h(i) = α / β^(Q − i)``.

    After each call :attr:`gammas` holds the detached ``γ_1..γ_Q`` and :attr:`scale_weights` the
    effective weight of each ``s_0..s_Q`` in the loss (they sum to 1), both ``(B, ·)``, for logging.

    Note: the reference ``AdaptiveNCC(level, threshold, gamma)`` uses ``h(i) = threshold / gamma^(Q+1−i)``,
    one power of ``gamma`` beyond Eq. 8; it equals this loss with ``alpha = threshold / gamma``,
    ``beta = gamma``.

    Args:
        spatial_dims: 2 or 3.
        num_scales: ``Q`` (paper lung setting: 4).
        alpha: base threshold of Eq. 8 (paper lung setting: 0.1); ``None`` for Eq. 7.
        beta: threshold ratio ``β > 1`` of Eq. 8 (paper lung setting: 1.3).
        sigma: Gaussian standard deviation in voxels.
        reduction: ``"mean"`` | ``"sum"`` over the batch, or ``"none"`` for ``(B,)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        num_scales: int = 4,
        alpha: float | None = None,
        beta: float = 1.5,
        sigma: int = 2,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if int(num_scales) != num_scales or num_scales < 1:
            raise ValueError(f"num_scales must be an integer >= 1, got {num_scales}.")
        if alpha is not None and not alpha > 0:
            raise ValueError(f"alpha must be > 0 (or None for the parameter-free Eq. 7), got {alpha}.")
        if alpha is not None and not beta > 1:
            raise ValueError(f"beta must be > 1, got {beta}.")
        if int(sigma) != sigma or sigma < 1:
            raise ValueError(f"sigma must be a positive integer, got {sigma}.")
        self.num_scales = int(num_scales)
        self.alpha = alpha
        self.beta = float(beta)
        self.sigma = int(sigma)
        self.gammas: torch.Tensor | None = None
        self.scale_weights: torch.Tensor | None = None

    def thresholds(self) -> list[float]:
        """``h(i) = α / β^(Q − i)`` for ``i = 1..Q`` (Eq. 8); all 1 for the parameter-free Eq. 7.

        Returns:
            ``Q`` thresholds, scale 1 first.
        """
        q = self.num_scales
        if self.alpha is None:
            return [1.0] * q
        return [self.alpha / self.beta ** (q - i) for i in range(1, q + 1)]

    def pyramid(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The ``Q + 1`` scales of ``image`` described above (``I^(0) .. I^(Q)`` of Eq. 7).

        Args:
            image: ``(B, C, *spatial)``; every spatial axis must be at least ``2^(Q-1)``.

        Returns:
            ``Q + 1`` tensors, finest first; scale ``i >= 2`` has spatial size ``floor(N / 2^(i-1))``.
        """
        pool = (F.avg_pool2d, F.avg_pool3d)[self.spatial_dims - 2]
        blur = lambda t: gaussian_blur(t, 2 * self.sigma + 1, self.sigma)  # noqa: E731
        scales = [image, blur(image)]
        for i in range(1, self.num_scales):
            factor = 2**i
            if min(image.shape[2:]) < factor:
                raise ValueError(
                    f"images of spatial size {tuple(image.shape[2:])} are too small for num_scales={self.num_scales}: "
                    f"scale {i + 1} pools by {factor}."
                )
            scales.append(blur(pool(image, factor)))
        return scales

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pred: warped moving image ``(B, C, *spatial)``.
            target: fixed image, same shape.

        Returns:
            ``g_Q`` per sample (Eq. 7), reduced over the batch as ``reduction`` says; :attr:`gammas` and
            :attr:`scale_weights` are updated.
        """
        check_similarity_inputs(pred, target, self.spatial_dims)

        def ncc_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return 1 - (standardize(a) * standardize(b)).flatten(1).mean(1)

        sims = [ncc_loss(a, b) for a, b in zip(self.pyramid(pred), self.pyramid(target))]
        loss = sims[0]
        gammas = []
        for i, h in enumerate(self.thresholds(), start=1):
            gamma = torch.clamp(sims[i].detach() / h, 0, 1)
            loss = gamma * sims[i] + (1 - gamma) * loss
            gammas.append(gamma)
        self.gammas = torch.stack(gammas, dim=1)
        # effective weight of s_i: γ_i · Π_{j>i} (1 − γ_j), with γ_0 := 1
        weights, remaining = [], torch.ones_like(loss.detach())
        for gamma in reversed([torch.ones_like(gammas[0])] + gammas):
            weights.append(gamma * remaining)
            remaining = remaining * (1 - gamma)
        self.scale_weights = torch.stack(weights[::-1], dim=1)
        return reduce_batch(loss, self.reduction)
