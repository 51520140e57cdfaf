"""The symmetric GradICON training objective, paper Sec. 5.1.

``L = L_sim(I^A ∘ Φ_AB, I^B) + L_sim(I^B ∘ Φ_BA, I^A) + λ · L_reg``, with ``L_reg`` the inverse
consistency regulariser on ``Φ_AB ∘ Φ_BA`` (what the reference computes and every released model was
trained with) or, with ``both_compositions=True``, ``L_reg(Φ_AB, Φ_BA) + L_reg(Φ_BA, Φ_AB)`` as
written in the paper. Every component is returned so that a trainer can log it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..maps import Deformation, map_jacobian_determinant, sample, shared_identity_grid
from .inverse_consistency import GradICONLoss, ICONLoss, as_deformation

__all__ = ["GradICONObjective", "ObjectiveTerms"]


@dataclass
class ObjectiveTerms:
    """Components of one evaluation of :class:`GradICONObjective` (all tensors), the terms of the
    objective of paper Sec. 5.1.

    Built by :meth:`GradICONObjective.forward`; each argument is also an attribute of the same name.

    Args:
        total: ``similarity + λ · regularizer``, the scalar to back-propagate.
        similarity: sum of both directions' similarity losses.
        regularizer: the inverse consistency term (before ``λ``).
        transform_magnitude: ``mean((Φ_AB(id) − id)²)`` in [0, 1] units.
        folds: negative-Jacobian voxels of ``Φ_BA`` per batch element, batch mean (as the reference logs it).
        warped_moving: ``I^A ∘ Φ_AB`` (to compare with the fixed image), detached.
        warped_fixed: ``I^B ∘ Φ_BA``, detached.
    """

    total: torch.Tensor
    similarity: torch.Tensor
    regularizer: torch.Tensor
    transform_magnitude: torch.Tensor
    folds: torch.Tensor
    warped_moving: torch.Tensor
    warped_fixed: torch.Tensor

    def scalars(self) -> dict[str, float]:
        """The scalar components as Python floats, for logging.

        Returns:
            ``{"total", "similarity", "regularizer", "transform_magnitude", "folds"}`` -> float (the mean
            when a component is not a scalar).
        """
        names = ("total", "similarity", "regularizer", "transform_magnitude", "folds")
        return {n: float(getattr(self, n).detach().mean()) for n in names}


class GradICONObjective(nn.Module):
    """Similarity in both directions plus ``λ`` times an inverse consistency regulariser (Sec. 5.1).

    Args:
        similarity: any MONAI-style loss ``(pred, target) -> scalar``, e.g. ``torch.nn.MSELoss()``,
            :class:`~monai_gradicon.losses.LNCCLoss` or :class:`~monai_gradicon.losses.SelfAdaptiveNCCLoss`.
        regularizer: :class:`GradICONLoss` (default role) or :class:`ICONLoss`, with ``reduction="mean"``.
        lmbda: ``λ > 0`` (paper: 0.2 knee, 0.1/1.5 lung).
        both_compositions: add ``reg(Φ_BA, Φ_AB)`` to ``reg(Φ_AB, Φ_BA)`` as the paper writes it.
    """

    def __init__(
        self,
        similarity: nn.Module,
        regularizer: GradICONLoss | ICONLoss,
        lmbda: float,
        both_compositions: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(regularizer, (GradICONLoss, ICONLoss)):
            raise ValueError(f"regularizer must be a GradICONLoss or ICONLoss, got {type(regularizer).__name__}.")
        if regularizer.reduction != "mean":
            raise ValueError(f"regularizer must use reduction='mean', got {regularizer.reduction!r}.")
        if not lmbda > 0:
            raise ValueError(f"lmbda must be > 0, got {lmbda}.")
        self.similarity = similarity
        self.regularizer = regularizer
        self.lmbda = float(lmbda)
        self.both_compositions = bool(both_compositions)

    def forward(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        phi_AB: torch.Tensor | Deformation,
        phi_BA: torch.Tensor | Deformation,
        noise: torch.Tensor | None = None,
    ) -> ObjectiveTerms:
        """
        Args:
            moving: image A ``(B, C, *spatial)``.
            fixed: image B, same shape.
            phi_AB: network output for (moving=A, fixed=B): DDF or :class:`Deformation`; ``A ∘ Φ_AB ≈ B``.
            phi_BA: network output for (moving=B, fixed=A).
            noise: optional injected perturbation for the regulariser (see :class:`GradICONLoss`).

        Returns:
            the :class:`ObjectiveTerms`; ``total = similarity + λ · regularizer`` keeps the autograd graph.
        """
        dims = self.regularizer.spatial_dims
        ab = as_deformation(phi_AB, dims, "phi_AB")
        ba = as_deformation(phi_BA, dims, "phi_BA")
        if tuple(moving.shape[2:]) != ab.spatial_shape or moving.shape != fixed.shape:
            raise ValueError(
                f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must have the same shape, on the "
                f"deformation grid {ab.spatial_shape}."
            )
        grid = shared_identity_grid(ab.spatial_shape, moving.dtype, moving.device)
        map_AB = ab(grid, is_identity=True)
        map_BA = ba(grid, is_identity=True)
        warped_moving = sample(moving, map_AB)
        warped_fixed = sample(fixed, map_BA)
        similarity = self.similarity(warped_moving, fixed) + self.similarity(warped_fixed, moving)
        regularizer = self.regularizer(ab, ba, noise)
        if self.both_compositions:
            regularizer = regularizer + self.regularizer(ba, ab)
        with torch.no_grad():
            magnitude = torch.mean((grid - map_AB) ** 2)
            negative = map_jacobian_determinant(map_BA.expand(moving.shape[0], *map_BA.shape[1:])) < 0
            folds = negative.flatten(1).sum(1).to(moving.dtype).mean()
        return ObjectiveTerms(
            total=self.lmbda * regularizer + similarity,
            similarity=similarity,
            regularizer=regularizer,
            transform_magnitude=magnitude,
            folds=folds,
            warped_moving=warped_moving.detach(),
            warped_fixed=warped_fixed.detach(),
        )
