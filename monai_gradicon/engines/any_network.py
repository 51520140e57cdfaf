"""Any registration network, MONAI's own included, in the symmetric GradICON training (paper Sec. 5.1).

A network is anything that turns a moving/fixed pair into a MONAI DDF ``(B, D, *spatial)`` in voxel
units, whatever its own calling convention:

* ``net(moving, fixed) -> ddf`` (this package's networks, most research code): ``input_mode="pair"``;
* ``net(torch.cat([moving, fixed], 1)) -> ddf`` (MONAI's ``LocalNet``, ``GlobalNet``, ``RegUNet``):
  ``input_mode="concat"``;
* ``net(moving, fixed) -> (warped, ddf)`` (MONAI's ``VoxelMorph``): ``input_mode="pair", output_index=1``.

:class:`PairNetwork` gives every such network the one signature ``forward(moving, fixed) -> ddf``
that the two-direction training pieces of :mod:`monai_gradicon.engines.two_direction` expect:
``BidirectionalRegistration(PairNetwork(net, ...))`` runs it as ``Φ_AB`` and ``Φ_BA``, and
``GradICONTrainingLoss`` turns both into the paper's objective
``L_sim(I^A ∘ Φ_AB, I^B) + L_sim(I^B ∘ Φ_BA, I^A) + λ · L_reg(Φ_AB, Φ_BA)`` through
:class:`~monai_gradicon.losses.GradICONObjective` (the one implementation of the loss), in a plain
PyTorch loop or as ``network`` / ``loss_function`` of ``monai.engines.SupervisedTrainer``.
:func:`inverse_consistency_error` measures ``‖Φ_AB ∘ Φ_BA − Id‖`` in voxels for evaluation.

Example (MONAI ``LocalNet``, plain loop)::

    model = BidirectionalRegistration(PairNetwork(LocalNet(3, 2, 4, (0, 1, 2, 3), out_channels=3), "concat"))
    loss = GradICONTrainingLoss(LocalNormalizedCrossCorrelationLoss(spatial_dims=3), lmbda=1.0, spatial_dims=3)
    loss(model(moving, fixed)).backward()
"""

from __future__ import annotations

import torch
from torch import nn

from ..maps import Deformation
from ..validation import check_ddf, check_image_pair

__all__ = ["PairNetwork", "inverse_consistency_error"]

_INPUT_MODES = ("pair", "concat")


class PairNetwork(nn.Module):
    """Adapter giving any registration network the signature ``forward(moving, fixed) -> ddf``.

    This is the one-direction network ``Φ_AB = net(A, B)`` that the symmetric objective of paper
    Sec. 5.1 evaluates twice (``Φ_AB`` and ``Φ_BA``) for the GradICON regulariser (Eq. 2).

    The returned DDF follows MONAI's convention (``Warp()(moving, ddf) ≈ fixed``) and is checked:
    ``(B, D, *spatial)`` with the batch and spatial shape of the inputs, finite values.

    Args:
        net: the registration network (any ``torch.nn.Module``).
        input_mode: ``"pair"`` calls ``net(moving, fixed)``; ``"concat"`` calls
            ``net(torch.cat([moving, fixed], dim=1))`` (MONAI ``LocalNet``/``GlobalNet``/``RegUNet``,
            built with ``in_channels = 2 × image channels``).
        output_index: when ``net`` returns a tuple or list, the position of the DDF in it (MONAI
            ``VoxelMorph`` returns ``(warped, ddf)``: use 1). ``None`` expects a tensor.
    """

    def __init__(self, net: nn.Module, input_mode: str = "pair", output_index: int | None = None) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise ValueError(f"net must be a torch.nn.Module, got {type(net).__name__}.")
        if input_mode not in _INPUT_MODES:
            raise ValueError(f"input_mode must be one of {_INPUT_MODES}, got {input_mode!r}.")
        if output_index is not None and not isinstance(output_index, int):
            raise ValueError(f"output_index must be an int or None, got {output_index!r}.")
        self.net = net
        self.input_mode = input_mode
        self.output_index = output_index

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """
        Args:
            moving: image ``A`` ``(B, C, *spatial)``.
            fixed: image ``B``, same shape.

        Returns:
            ``ddf_AB`` ``(B, D, *spatial)`` in voxel units: maps fixed-image coordinates to
            moving-image coordinates (``Warp()(moving, ddf_AB) ≈ fixed``).
        """
        if not isinstance(moving, torch.Tensor) or moving.ndim not in (4, 5):
            shape = tuple(moving.shape) if isinstance(moving, torch.Tensor) else type(moving).__name__
            raise ValueError(f"moving must be a (B, C, H, W) or (B, C, H, W, D) tensor, got {shape}.")
        spatial_dims = moving.ndim - 2
        check_image_pair(moving, fixed, spatial_dims)
        out = self.net(torch.cat([moving, fixed], dim=1)) if self.input_mode == "concat" else self.net(moving, fixed)
        if isinstance(out, (tuple, list)):
            if self.output_index is None:
                raise ValueError(
                    f"net returned a {type(out).__name__} of {len(out)} items; pass output_index to say which is "
                    "the DDF (MONAI VoxelMorph returns (warped, ddf): output_index=1)."
                )
            if not -len(out) <= self.output_index < len(out):
                raise ValueError(f"output_index {self.output_index} is out of range for {len(out)} outputs.")
            out = out[self.output_index]
        elif self.output_index is not None:
            raise ValueError(f"output_index={self.output_index} given but net returned a single {type(out).__name__}.")
        expected = (moving.shape[0], spatial_dims, *moving.shape[2:])
        check_ddf(out, spatial_dims, "the network's DDF", shape=expected)
        return out


def inverse_consistency_error(ddf_AB: torch.Tensor, ddf_BA: torch.Tensor) -> torch.Tensor:
    """Mean ``‖Φ_AB(Φ_BA(x)) − x‖`` over the voxels ``x`` of the grid, in voxels (paper Sec. 3, ICON's error).

    The composition is evaluated exactly (``Φ_AB`` interpolated at ``Φ_BA(x)``, border padding), and the
    Euclidean norm is taken in voxel units per axis. Zero for an exactly inverse pair.

    Args:
        ddf_AB: MONAI DDF ``(B, D, *spatial)``, voxel units, ``D`` in {2, 3}.
        ddf_BA: the opposite direction, same shape.

    Returns:
        ``(B,)`` mean inverse consistency error in voxels (detached).
    """
    if not isinstance(ddf_AB, torch.Tensor) or ddf_AB.ndim not in (4, 5):
        shape = tuple(ddf_AB.shape) if isinstance(ddf_AB, torch.Tensor) else type(ddf_AB).__name__
        raise ValueError(f"ddf_AB must be a (B, 2, H, W) or (B, 3, H, W, D) DDF, got {shape}.")
    spatial_dims = ddf_AB.ndim - 2
    check_ddf(ddf_AB, spatial_dims, "ddf_AB")
    check_ddf(ddf_BA, spatial_dims, "ddf_BA", shape=tuple(ddf_AB.shape))
    with torch.no_grad():
        roundtrip = Deformation.from_ddf(ddf_AB).compose(Deformation.from_ddf(ddf_BA)).ddf()
        return roundtrip.norm(dim=1).flatten(1).mean(1)
