"""Instance optimisation: fine-tune the network on the one pair being registered (paper Sec. 5.3, "IO").

Adam on **all** network weights, minimising the full GradICON objective of that pair
(``L_sim(A ∘ Φ_AB, B) + L_sim(B ∘ Φ_BA, A) + λ L_reg``, Sec. 5.1) for a fixed number of steps, with
BatchNorm in eval mode (running statistics, as the released models are used). The maps of the last
weights are returned and the original weights are restored, so the network can register the next
pair unchanged (as ``icon_registration`` 1.1.9 does; its master branch forgets to restore).

Two optional additions, as uniGradICON's ``unigradicon-register`` offers them:

* **loss masking**: the similarity of each direction is averaged inside the mask of its *target*
  image only — ``L_sim(A ∘ Φ_AB, B; mask_B) + L_sim(B ∘ Φ_BA, A; mask_A)`` — the masks given on the
  network grid (uniGradICON's ``GradientICONSparse`` with ``loss_function_masking``: the same mask per
  direction);
* **a Dice term**: ``w · (Dice(S_A ∘ Φ_AB, S_B) + Dice(S_B ∘ Φ_BA, S_A))`` with ``S`` the one-hot
  segmentations (background left out) on the network grid, warped linearly, and MONAI's soft
  ``DiceLoss`` (``1 − (2|P∩T| + ε) / (|P| + |T| + ε)``, ``ε = 10⁻⁶``, mean over labels) — uniGradICON's
  ``--dice_loss_weight``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..losses import GradICONObjective
from ..maps import Deformation, sample, shared_identity_grid

__all__ = [
    "InstanceOptimizationResult",
    "instance_optimize",
    "DiceTerm",
    "TargetMaskedSimilarity",
    "DEFAULT_IO_LEARNING_RATE",
    "DEFAULT_IO_STEPS",
]

DEFAULT_IO_LEARNING_RATE = 2e-5
DEFAULT_IO_STEPS = 50


@dataclass
class InstanceOptimizationResult:
    """Maps after instance optimisation and the objective along the way (paper Sec. 5.3).

    Args:
        phi_AB: ``Φ_AB`` (moving = A, fixed = B) of the optimised weights, detached.
        phi_BA: ``Φ_BA`` of the optimised weights, detached.
        losses: total objective before each Adam step (``losses[0]``: the untouched network), the
            Dice term included when there is one.
        final_loss: total objective of the optimised weights.
        dice_losses: the Dice loss (before its weight) before each step, then of the optimised weights;
            empty without a Dice term.
    """

    phi_AB: Deformation
    phi_BA: Deformation
    losses: list[float]
    final_loss: float
    dice_losses: list[float] = field(default_factory=list)


class TargetMaskedSimilarity(nn.Module):
    """A similarity ``(pred, target, mask)`` called as ``(pred, target)``, with the mask of whichever image is the target.

    :class:`~monai_gradicon.losses.GradICONObjective` calls ``L_sim(A ∘ Φ_AB, B)`` and ``L_sim(B ∘ Φ_BA, A)``;
    wrapped, these become ``L_sim(A ∘ Φ_AB, B, mask_B)`` and ``L_sim(B ∘ Φ_BA, A, mask_A)`` (loss masking).

    Args:
        similarity: a loss taking ``(pred, target, mask)`` (:class:`~monai_gradicon.losses.LNCCLoss`,
            :class:`~monai_gradicon.losses.MINDSSCLoss`).
        images: the pair's images ``(A, B)`` exactly as they are passed to the objective.
        masks: their masks ``(mask_A, mask_B)`` on the same grid.
    """

    def __init__(self, similarity: nn.Module, images: tuple[torch.Tensor, torch.Tensor], masks: tuple[torch.Tensor, torch.Tensor]) -> None:
        super().__init__()
        self.similarity = similarity
        self._pairs = list(zip(images, masks))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pred: the warped image.
            target: one of the two images given at construction (the same tensor object).

        Returns:
            ``similarity(pred, target, mask of target)``.
        """
        for image, mask in self._pairs:
            if target is image:
                return self.similarity(pred, target, mask)
        raise RuntimeError("TargetMaskedSimilarity was called with a target that is neither image of its pair.")


class DiceTerm(nn.Module):
    """Soft Dice of both warped one-hot segmentations against the other image's: ``Dice(S_A ∘ Φ_AB, S_B) + Dice(S_B ∘ Φ_BA, S_A)``.

    Args:
        segmentation_A: one-hot ``(1, K, *spatial)`` of the moving image's labels (background left out).
        segmentation_B: the fixed image's, same labels in the same channels.
    """

    def __init__(self, segmentation_A: torch.Tensor, segmentation_B: torch.Tensor) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        if segmentation_A.shape != segmentation_B.shape:
            raise ValueError(
                f"the one-hot segmentations must have the same shape, got {tuple(segmentation_A.shape)} and "
                f"{tuple(segmentation_B.shape)}."
            )
        self.segmentation_A = segmentation_A
        self.segmentation_B = segmentation_B
        self.dice = DiceLoss(include_background=True, smooth_nr=1e-6, smooth_dr=1e-6)

    def forward(self, phi_AB: Deformation, phi_BA: Deformation) -> torch.Tensor:
        """
        Args:
            phi_AB: ``Φ_AB`` on the segmentations' grid.
            phi_BA: ``Φ_BA``.

        Returns:
            the scalar Dice loss of both directions (each in [0, 1]).
        """
        grid = shared_identity_grid(phi_AB.spatial_shape, self.segmentation_A.dtype, self.segmentation_A.device)
        warped_A = sample(self.segmentation_A, phi_AB(grid, is_identity=True))
        warped_B = sample(self.segmentation_B, phi_BA(grid, is_identity=True))
        return self.dice(warped_A, self.segmentation_B) + self.dice(warped_B, self.segmentation_A)


def _detached(phi: Deformation) -> Deformation:
    return Deformation([f.detach() for f in phi.fields], phi.spatial_shape)


def instance_optimize(
    deformation: Callable[[torch.Tensor, torch.Tensor], Deformation],
    network: nn.Module,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    objective: GradICONObjective,
    steps: int = DEFAULT_IO_STEPS,
    learning_rate: float = DEFAULT_IO_LEARNING_RATE,
    progress: bool = True,
    generator: torch.Generator | None = None,
    masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    dice: DiceTerm | None = None,
    dice_weight: float = 0.0,
) -> InstanceOptimizationResult:
    """Fine-tune ``network`` on one pair, return the resulting maps, restore the weights.

    Args:
        deformation: ``(moving, fixed) -> Deformation`` computed by ``network`` (e.g.
            ``RegistrationModel.deformation``).
        network: the module whose parameters are optimised (and restored afterwards).
        moving: image A ``(1, C, *spatial)`` on the network grid.
        fixed: image B, same shape.
        objective: the full objective (similarity both ways + ``λ`` GradICON).
        steps: number of Adam steps (> 0; the reference's default is 50).
        learning_rate: Adam learning rate (reference: 2e-5).
        progress: show a tqdm progress bar.
        generator: RNG for the GradICON evaluation-point perturbation (reproducible runs).
        masks: ``(mask_A, mask_B)`` on the network grid for loss masking (each direction's similarity
            is averaged inside its target image's mask, :class:`TargetMaskedSimilarity`); ``None``: everywhere.
        dice: the :class:`DiceTerm` of the pair's segmentations, or ``None``.
        dice_weight: its weight ``w >= 0`` in the objective.

    Returns:
        the maps of the optimised network and the loss history.
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"instance optimisation needs a positive integer number of steps, got {steps!r}.")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}.")
    if not dice_weight >= 0:
        raise ValueError(f"dice_weight must be >= 0, got {dice_weight}.")
    if masks is not None:
        similarity = TargetMaskedSimilarity(objective.similarity, (moving, fixed), masks)
        objective = GradICONObjective(similarity, objective.regularizer, objective.lmbda, objective.both_compositions)
    dice_losses: list[float] = []

    def total(phi_AB: Deformation, phi_BA: Deformation) -> torch.Tensor:
        value = objective(moving, fixed, phi_AB, phi_BA).total
        if dice is not None:
            term = dice(phi_AB, phi_BA)
            dice_losses.append(float(term.detach()))
            value = value + dice_weight * term
        return value
    saved_state = copy.deepcopy(network.state_dict())
    saved_modes = {name: m.training for name, m in network.named_modules()}
    saved_requires_grad = {name: p.requires_grad for name, p in network.named_parameters()}
    if generator is not None:
        objective.regularizer.generator = generator
    losses: list[float] = []
    try:
        network.eval()
        for p in network.parameters():
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
        for _ in tqdm(range(int(steps)), desc="instance optimisation", disable=not progress, leave=False):
            optimizer.zero_grad(set_to_none=True)
            loss = total(deformation(moving, fixed), deformation(fixed, moving))
            loss.backward()
            losses.append(float(loss.detach()))
            optimizer.step()
        with torch.no_grad():
            phi_AB = _detached(deformation(moving, fixed))
            phi_BA = _detached(deformation(fixed, moving))
            final = float(total(phi_AB, phi_BA))
    finally:
        network.load_state_dict(saved_state)
        for name, module in network.named_modules():
            module.training = saved_modes[name]
        for name, p in network.named_parameters():
            p.requires_grad_(saved_requires_grad[name])
    return InstanceOptimizationResult(phi_AB=phi_AB, phi_BA=phi_BA, losses=losses, final_loss=final, dice_losses=dice_losses)
