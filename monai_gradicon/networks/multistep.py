"""The P-step multiscale GradICON network of paper Eq. 6, and its reference layouts."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..maps import Deformation
from ..validation import check_image_pair, check_spatial_dims
from .steps import CompositionStep, DisplacementStep, DownsampleStep, step_min_size
from .unet import GradICONUNet

__all__ = ["MultiStepRegistrationNet", "multistep_network", "four_step_network"]


class MultiStepRegistrationNet(nn.Module):
    """A registration network ``forward(moving, fixed) -> ddf`` made of GradICON steps (paper Eq. 6, Fig. 1).

    The returned DDF is in MONAI's convention (voxel units, channel ``i`` along spatial axis ``i``,
    ``align_corners=True``): ``monai.networks.blocks.Warp(padding_mode="border")(moving, ddf) ≈ fixed``.
    :meth:`deformation` returns the exact composed map instead, which the GradICON loss evaluates
    off the grid.

    Args:
        step: the root step (see :mod:`monai_gradicon.networks.steps`).
        spatial_dims: 2 or 3.
        in_channels: channels of each input image.
    """

    def __init__(self, step: nn.Module, spatial_dims: int, in_channels: int = 1) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.in_channels = in_channels
        self.step = step
        self.min_size = step_min_size(step)

    def deformation(self, moving: torch.Tensor, fixed: torch.Tensor) -> Deformation:
        """``Φ_AB`` for ``A = moving``, ``B = fixed`` as a :class:`~monai_gradicon.maps.Deformation`.

        The exact composition of Eq. 6 (one field per sub-network, each at its own resolution), which
        the GradICON loss (Eq. 2) evaluates off the grid.

        Args:
            moving: image ``A`` ``(B, in_channels, *spatial)``, every axis at least :attr:`min_size`.
            fixed: image ``B``, same shape.

        Returns:
            the deformation, on the grid of ``moving``.

        Raises:
            ValueError: the pair has the wrong rank, channel count or shape, is too small, or holds NaN/inf.
        """
        check_image_pair(moving, fixed, self.spatial_dims, self.in_channels, self.min_size)
        phi = self.step(moving, fixed)
        return Deformation(phi.fields, moving.shape[2:])

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """DDF ``(B, D, *spatial)`` in voxel units such that ``moving ∘ (id + ddf) ≈ fixed``.

        Args:
            moving: image ``A`` ``(B, in_channels, *spatial)``, every axis at least :attr:`min_size`.
            fixed: image ``B``, same shape.

        Returns:
            MONAI DDF ``(B, D, *spatial)`` in voxel units: :meth:`deformation` sampled on the grid of
            ``moving`` (``Warp()(moving, ddf) ≈ fixed``).
        """
        return self.deformation(moving, fixed).ddf()


def multistep_network(
    spatial_dims: int,
    levels: Sequence[int] = (2, 1, 0, 0),
    in_channels: int = 1,
    subnetwork: Callable[[], nn.Module] | None = None,
    checkpoint_activations: bool = False,
    autocast_dtype: str | None = None,
    channels_last: bool = True,
) -> MultiStepRegistrationNet:
    """Build the P-step network of Eq. 6: ``P = len(levels)`` sub-networks, coarse to fine.

    ``levels[s]`` is how many times the images are halved for sub-network ``s``; it must not
    increase. ``(0,)`` is a single U-Net; ``(1, 0)`` two steps at half and full resolution;
    ``(3, 2, 1, 0)`` the doubling chain of the paper's toy experiments (Sec. A.1.1); ``(2, 1, 0, 0)``
    the knee/lung layout (quarter, half, full, full; Sec. A.2, A.3), whose weights load from the
    reference with :func:`~monai_gradicon.networks.load_reference_weights`.

    Args:
        spatial_dims: 2 or 3.
        levels: halvings per step, coarse to fine.
        in_channels: channels of each input image.
        subnetwork: factory for each step's network ``(moving, fixed) -> displacement in [0, 1] units``;
            default :class:`GradICONUNet` (the reference ``tallUNet2``).
        checkpoint_activations: recompute each sub-network's activations in the backward pass instead
            of keeping them (activation checkpointing per U-Net; see :class:`DisplacementStep`): training
            memory of about one sub-network instead of ``P``, for one more forward of each.
        autocast_dtype: ``None``, ``"float16"`` or ``"bfloat16"``: mixed precision inside each
            sub-network only (:class:`DisplacementStep`); meant for CUDA.
        channels_last: the memory format of the default :class:`GradICONUNet` steps (ignored with
            ``subnetwork``): ``True`` the fast channels-last layout, ``False`` the reference's layout and
            rounding.

    Returns:
        the :class:`MultiStepRegistrationNet`; its :attr:`~MultiStepRegistrationNet.min_size` is the
        smallest input size per axis.

    Raises:
        ValueError: ``spatial_dims`` is not 2 or 3, or ``levels`` is empty, negative or increasing.
    """
    check_spatial_dims(spatial_dims)
    levels = [int(v) for v in levels]
    if not levels or min(levels) < 0 or any(b > a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"levels must be a non-empty, non-increasing sequence of integers >= 0, got {levels}.")
    make = subnetwork or (lambda: GradICONUNet(spatial_dims, in_channels, channels_last=channels_last))

    def downsampled(step: nn.Module, times: int) -> nn.Module:
        for _ in range(times):
            step = DownsampleStep(step, spatial_dims)
        return step

    def estimate() -> DisplacementStep:
        return DisplacementStep(make(), checkpoint_activations, autocast_dtype)

    root: nn.Module = estimate()
    for previous, level in zip(levels, levels[1:]):
        root = CompositionStep(downsampled(root, previous - level), estimate())
    return MultiStepRegistrationNet(downsampled(root, levels[-1]), spatial_dims, in_channels)


def four_step_network(
    spatial_dims: int = 3,
    include_last_step: bool = True,
    checkpoint_activations: bool = False,
    channels_last: bool = True,
) -> MultiStepRegistrationNet:
    """The layout of the released knee (Sec. A.2), lung (Sec. A.3), brain and uniGradICON models.

    Quarter-, half- and full-resolution U-Nets, plus a second full-resolution U-Net when
    ``include_last_step`` (the 3-step net is the first training stage of the reference recipe). Same as
    ``multistep_network(spatial_dims, (2, 1, 0, 0))`` (Eq. 6 with default :class:`GradICONUNet` steps).
    In 3D the input needs at least 65 voxels per axis.

    Args:
        spatial_dims: 2 or 3 (the released models are 3D).
        include_last_step: add the second full-resolution U-Net (levels ``(2, 1, 0, 0)``; else ``(2, 1, 0)``).
        checkpoint_activations: activation checkpointing per U-Net (see :func:`multistep_network`).
        channels_last: the U-Nets' memory format (see :class:`GradICONUNet`).

    Returns:
        the :class:`MultiStepRegistrationNet`, with the state-dict layout of the released weights
        (when ``include_last_step`` and ``spatial_dims=3``).
    """
    levels = (2, 1, 0, 0) if include_last_step else (2, 1, 0)
    return multistep_network(spatial_dims, levels, checkpoint_activations=checkpoint_activations, channels_last=channels_last)
