"""Two-direction GradICON training inside ``monai.engines.SupervisedTrainer`` (paper Sec. 5.1).

GradICON needs ``Φ_AB`` and ``Φ_BA`` from the same network in every step. The stock MONAI trainer
calls ``loss_function(network(image), label)`` once, so the two directions live in a thin training
module, and the objective in a loss adapter:

* :class:`PairToDDF` — the *deployable* network: one 2-channel tensor ``[moving, fixed]`` in, the MONAI
  DDF out (the ``image`` → ``pred`` contract of bundle metadata, ``verify_net_in_out``, ``ckpt_export``).
  Its state dict *is* the wrapped registration network's, so checkpoints hold the registration network
  itself and load into it directly.
* :class:`BidirectionalRegistration` — the training module: ``forward(image)`` runs ``A → B`` and
  ``B → A`` and returns both deformations. DDP wraps it; AMP, gradient accumulation and every
  MONAI handler keep working because the trainer's own iteration is untouched.
* :class:`GradICONTrainingLoss` — ``forward(pred, label)`` evaluates
  ``L_sim(I^A ∘ Φ_AB, I^B) + L_sim(I^B ∘ Φ_BA, I^A) + λ L_reg(Φ_AB, Φ_BA)`` with
  :class:`~monai_gradicon.losses.GradICONObjective` and keeps every component for logging.

For multistep networks the deformations are exact compositions (:class:`~monai_gradicon.maps.Deformation`),
which is what the reference evaluates; build the trainer with ``decollate=False`` because the
prediction is a dict of deformations, not a batch of images.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.utils import LossReduction
from torch import nn
from torch.nn.modules.loss import _Loss

from ..losses import GradICONLoss, GradICONObjective, ICONLoss, ObjectiveTerms
from ..maps import Deformation

__all__ = ["PairToDDF", "BidirectionalRegistration", "GradICONTrainingLoss", "split_pair"]


def split_pair(image: torch.Tensor, spatial_dims: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``[moving, fixed]`` stacked on the channel axis ``(B, 2C, *spatial)`` into two ``(B, C, *spatial)``.

    Args:
        image: ``(B, 2C, *spatial)``, the first ``C`` channels the moving image, the last ``C`` the fixed one.
        spatial_dims: expected number of spatial axes; ``None`` accepts any tensor of rank >= 4.

    Returns:
        ``(moving, fixed)``, views of ``image``, each ``(B, C, *spatial)``.

    Raises:
        ValueError: wrong rank or an odd channel count (the message gives the shape received).
    """
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image must be a torch.Tensor [moving, fixed] of shape (B, 2C, *spatial), got {type(image).__name__}.")
    if spatial_dims is not None and image.ndim != spatial_dims + 2:
        raise ValueError(
            f"image must be (B, 2C, *spatial) with {spatial_dims} spatial axes ([moving, fixed] on the channel axis), "
            f"got shape {tuple(image.shape)}."
        )
    if image.ndim < 4 or image.shape[1] % 2 != 0:
        raise ValueError(
            "image must hold [moving, fixed] on the channel axis: (B, 2C, *spatial) with an even channel count, "
            f"got shape {tuple(image.shape)}."
        )
    half = image.shape[1] // 2
    return image[:, :half], image[:, half:]


class PairToDDF(nn.Module):
    """The deployable form of a registration network: ``forward(image) -> ddf``.

    Args:
        network: a registration network ``forward(moving, fixed) -> ddf`` (e.g.
            :func:`~monai_gradicon.networks.four_step_network`).
        spatial_dims: 2 or 3, checked against the input.

    ``forward(image)``: ``image`` is ``(B, 2C, *spatial)`` = ``[moving, fixed]``; returns the MONAI DDF
    ``(B, D, *spatial)`` in voxels with ``Warp()(moving, ddf) ≈ fixed``.

    :meth:`state_dict` / :meth:`load_state_dict` are those of ``network`` (no ``network.`` prefix), so a
    checkpoint of this module is a checkpoint of the registration network.
    """

    def __init__(self, network: nn.Module, spatial_dims: int = 3) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise ValueError(f"network must be a torch.nn.Module, got {type(network).__name__}.")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
        self.network = network
        self.spatial_dims = spatial_dims
        # keys are those of `network` (relative to wherever this module sits), in and out
        self._register_state_dict_hook(self._drop_network_prefix)
        self._register_load_state_dict_pre_hook(self._add_network_prefix)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """
        Args:
            image: ``(B, 2C, *spatial)`` = ``[moving, fixed]`` on the channel axis.

        Returns:
            whatever ``network(moving, fixed)`` returns: for a registration network, the MONAI DDF
            ``(B, D, *spatial)`` in voxels with ``Warp()(moving, ddf) ≈ fixed``.
        """
        moving, fixed = split_pair(image, self.spatial_dims)
        return self.network(moving, fixed)

    @staticmethod
    def _drop_network_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        inner = prefix + "network."
        for key in [k for k in state_dict if k.startswith(inner)]:
            state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)

    @staticmethod
    def _add_network_prefix(state_dict: dict, prefix: str, *args: Any) -> None:
        inner = prefix + "network."
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
            state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)


class BidirectionalRegistration(nn.Module):
    """Training module returning both directions of a registration network (paper Sec. 5.1).

    Args:
        network: a registration network ``(moving, fixed) -> ddf`` or a :class:`PairToDDF` around one.
            If it has a ``deformation(moving, fixed)`` method (the multistep networks), the exact
            composed :class:`~monai_gradicon.maps.Deformation` is returned instead of the dense DDF.

    ``forward(image)`` with ``image = [A, B]`` ``(B, 2C, *spatial)`` (or ``forward(A, B)``) returns
    ``{"moving": A, "fixed": B, "phi_AB": Φ_AB, "phi_BA": Φ_BA}``. The two directions are two separate
    calls, so batch-norm statistics see one direction at a time, as in the reference.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network.network if isinstance(network, PairToDDF) else network
        self.spatial_dims = getattr(network, "spatial_dims", None)

    def _one_direction(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor | Deformation:
        if hasattr(self.network, "deformation"):
            return self.network.deformation(moving, fixed)
        return self.network(moving, fixed)

    def forward(self, image: torch.Tensor, fixed: torch.Tensor | None = None) -> dict[str, Any]:
        """
        Args:
            image: ``[A, B]`` stacked on the channel axis ``(B, 2C, *spatial)``; or, when ``fixed`` is
                given, the moving image ``A`` ``(B, C, *spatial)``.
            fixed: the fixed image ``B``; ``None`` splits ``image`` instead.

        Returns:
            ``{"moving": A, "fixed": B, "phi_AB": Φ_AB, "phi_BA": Φ_BA}``; each ``Φ`` is a
            :class:`~monai_gradicon.maps.Deformation` when the network has ``deformation()``, else the
            network's DDF ``(B, D, *spatial)`` in voxels (the two inputs of Sec. 5.1's objective).
        """
        moving, fixed = split_pair(image, self.spatial_dims) if fixed is None else (image, fixed)
        return {
            "moving": moving,
            "fixed": fixed,
            "phi_AB": self._one_direction(moving, fixed),
            "phi_BA": self._one_direction(fixed, moving),
        }


class GradICONTrainingLoss(_Loss):
    """The symmetric GradICON objective as a ``SupervisedTrainer`` loss: ``forward(pred, label) -> total``.

    Args:
        similarity: ``(warped, target) -> scalar`` (``torch.nn.MSELoss()``, MONAI or package NCC/LNCC,
            :class:`~monai_gradicon.losses.SelfAdaptiveNCCLoss`).
        lmbda: ``λ`` of Sec. 5.1 (knee 0.2, lung 0.1 in the paper's tables).
        spatial_dims: 2 or 3 (builds ``GradICONLoss(spatial_dims, delta)`` unless ``regularizer`` is given).
        regularizer: an explicit :class:`~monai_gradicon.losses.GradICONLoss` / ``ICONLoss``.
        delta: finite-difference step of the GradICON term (Eq. 2), [0, 1] units.
        both_compositions: add ``L_reg(Φ_BA, Φ_AB)``, the paper's symmetric form.

    Attributes:
        last_terms: :class:`~monai_gradicon.losses.ObjectiveTerms` of the last call.
    """

    def __init__(
        self,
        similarity: nn.Module,
        lmbda: float,
        spatial_dims: int = 3,
        regularizer: GradICONLoss | ICONLoss | None = None,
        delta: float = 1e-3,
        both_compositions: bool = False,
    ) -> None:
        super().__init__(reduction=LossReduction.MEAN.value)
        regularizer = regularizer if regularizer is not None else GradICONLoss(spatial_dims, delta=delta)
        self.objective = GradICONObjective(similarity, regularizer, lmbda, both_compositions)
        self.last_terms: ObjectiveTerms | None = None

    @property
    def similarity(self) -> nn.Module:
        """The similarity measure ``L_sim`` of the wrapped :class:`~monai_gradicon.losses.GradICONObjective`."""
        return self.objective.similarity

    def forward(self, pred: dict[str, Any], target: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            pred: the dict of :class:`BidirectionalRegistration` (``moving``, ``fixed``, ``phi_AB``, ``phi_BA``).
            target: unused (``SupervisedTrainer`` passes its ``label``; the targets are the images themselves).

        Returns:
            the scalar ``similarity + λ · regularizer``.
        """
        needed = {"moving", "fixed", "phi_AB", "phi_BA"}
        if not isinstance(pred, dict) or not needed <= set(pred):
            got = sorted(pred) if isinstance(pred, dict) else type(pred).__name__
            raise ValueError(
                "GradICONTrainingLoss needs the output of BidirectionalRegistration (keys moving, fixed, phi_AB, "
                f"phi_BA); got {got}. Set the trainer's network to BidirectionalRegistration(network)."
            )
        self.last_terms = self.objective(pred["moving"], pred["fixed"], pred["phi_AB"], pred["phi_BA"])
        return self.last_terms.total

    def log_values(self) -> dict[str, float]:
        """Scalars of the last call: ``similarity``, ``regularizer``, ``transform_magnitude``, ``folds`` and,
        for :class:`~monai_gradicon.losses.SelfAdaptiveNCCLoss`, ``gamma_1..gamma_Q`` (batch means).

        Returns:
            name -> float; empty before the first call.
        """
        if self.last_terms is None:
            return {}
        values = {k: v for k, v in self.last_terms.scalars().items() if k != "total"}
        gammas = getattr(self.similarity, "gammas", None)
        if isinstance(gammas, torch.Tensor):
            for q, g in enumerate(gammas.float().mean(0).tolist(), start=1):
                values[f"gamma_{q}"] = float(g)
        return values
