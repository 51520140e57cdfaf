"""The building blocks of the multistep network of paper Eq. 6 / Fig. 1.

Every step maps an image pair ``(moving, fixed)`` to a :class:`~monai_gradicon.maps.Deformation`
``Φ`` with ``moving ∘ Φ ≈ fixed``, in [0, 1] coordinates (so a step's output does not depend on the
resolution it ran at):

* :class:`DisplacementStep` — *estimating*: ``Φ = Id + u`` with ``u`` predicted by a U-Net;
* :class:`DownsampleStep` — *downsampling*: run a step on both images average-pooled by 2
  (``ceil_mode``, so odd sizes give ``ceil(N/2)``);
* :class:`CompositionStep` — *warping* and *composing*: ``Φ = Φ_first ∘ Φ_second`` where ``second``
  sees the moving image already warped by ``Φ_first``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..maps import Deformation, identity_grid, sample

__all__ = ["DisplacementStep", "DownsampleStep", "CompositionStep", "step_min_size"]


class DisplacementStep(nn.Module):
    """``Φ = Id + net(moving, fixed)``; ``net`` returns a ``(B, D, *spatial)`` displacement in [0, 1] units."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Deformation:
        displacement = self.net(moving, fixed)
        if displacement.shape[0] != moving.shape[0] or displacement.shape[2:] != moving.shape[2:]:
            raise ValueError(
                f"the sub-network must return a displacement of shape (B, D, *spatial) = "
                f"({moving.shape[0]}, {moving.ndim - 2}, {', '.join(map(str, moving.shape[2:]))}), "
                f"got {tuple(displacement.shape)}."
            )
        return Deformation([displacement])


class DownsampleStep(nn.Module):
    """Run ``step`` on both images average-pooled by 2 (``ceil_mode=True``)."""

    def __init__(self, step: nn.Module, spatial_dims: int) -> None:
        super().__init__()
        self.step = step
        self.spatial_dims = spatial_dims

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Deformation:
        pool = (F.avg_pool2d, F.avg_pool3d)[self.spatial_dims - 2]
        return self.step(pool(moving, 2, ceil_mode=True), pool(fixed, 2, ceil_mode=True))


class CompositionStep(nn.Module):
    """``Φ = Φ_first ∘ Φ_second`` with ``Φ_second = second(moving ∘ Φ_first, fixed)`` (paper Eq. 6)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Deformation:
        phi = self.first(moving, fixed)
        grid = identity_grid(moving.shape[2:], moving.dtype, moving.device)
        warped = sample(moving, phi(grid, is_identity=True))
        psi = self.second(warped, fixed)
        return phi.compose(psi)


def step_min_size(step: nn.Module) -> int:
    """Smallest spatial size every axis of the input may have for ``step`` to run."""
    if isinstance(step, DisplacementStep):
        return max(2, int(getattr(step.net, "min_size", 2)))
    if isinstance(step, DownsampleStep):
        return 2 * step_min_size(step.step) - 1
    if isinstance(step, CompositionStep):
        return max(step_min_size(step.first), step_min_size(step.second))
    raise ValueError(f"unknown registration step {type(step).__name__}.")
