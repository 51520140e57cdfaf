"""Instance optimisation: fine-tune the network on the one pair being registered (paper Sec. 5.3, "IO").

Adam on **all** network weights, minimising the full GradICON objective of that pair
(``L_sim(A ∘ Φ_AB, B) + L_sim(B ∘ Φ_BA, A) + λ L_reg``, Sec. 5.1) for a fixed number of steps, with
BatchNorm in eval mode (running statistics, as the released models are used). The maps of the last
weights are returned and the original weights are restored, so the network can register the next
pair unchanged (as ``icon_registration`` 1.1.9 does; its master branch forgets to restore).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..losses import GradICONObjective
from ..maps import Deformation

__all__ = ["InstanceOptimizationResult", "instance_optimize", "DEFAULT_IO_LEARNING_RATE", "DEFAULT_IO_STEPS"]

DEFAULT_IO_LEARNING_RATE = 2e-5
DEFAULT_IO_STEPS = 50


@dataclass
class InstanceOptimizationResult:
    """Maps after instance optimisation and the objective along the way (paper Sec. 5.3).

    Args:
        phi_AB: ``Φ_AB`` (moving = A, fixed = B) of the optimised weights, detached.
        phi_BA: ``Φ_BA`` of the optimised weights, detached.
        losses: total objective before each Adam step (``losses[0]``: the untouched network).
        final_loss: total objective of the optimised weights.
    """

    phi_AB: Deformation
    phi_BA: Deformation
    losses: list[float]
    final_loss: float


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

    Returns:
        the maps of the optimised network and the loss history.
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"instance optimisation needs a positive integer number of steps, got {steps!r}.")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}.")
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
            terms = objective(moving, fixed, deformation(moving, fixed), deformation(fixed, moving))
            terms.total.backward()
            losses.append(float(terms.total.detach()))
            optimizer.step()
        with torch.no_grad():
            phi_AB = _detached(deformation(moving, fixed))
            phi_BA = _detached(deformation(fixed, moving))
            final = float(objective(moving, fixed, phi_AB, phi_BA).total)
    finally:
        network.load_state_dict(saved_state)
        for name, module in network.named_modules():
            module.training = saved_modes[name]
        for name, p in network.named_parameters():
            p.requires_grad_(saved_requires_grad[name])
    return InstanceOptimizationResult(phi_AB=phi_AB, phi_BA=phi_BA, losses=losses, final_loss=final)
