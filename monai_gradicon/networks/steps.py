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

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..maps import Deformation, sample, shared_identity_grid

__all__ = ["DisplacementStep", "DownsampleStep", "CompositionStep", "step_min_size"]

AUTOCAST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@contextlib.contextmanager
def _batch_norm_stats_frozen(module: nn.Module):
    """BatchNorm as in the forward pass, running statistics left as they are (for a checkpoint's recomputation).

    A running-average factor of 0 keeps each statistic (``(1 − 0)·r + 0·b == r`` exactly) while the
    layer still records the same tensors for backward; the batch counter is put back afterwards.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


class DisplacementStep(nn.Module):
    """``Φ = Id + net(moving, fixed)``; ``net`` returns a ``(B, D, *spatial)`` displacement in [0, 1] units.

    The *estimating* operation of a sub-network (paper Sec. 5.1, Eq. 6): ``Φ^{A_i B_i} = u^{A_i B_i} + Id``.

    Args:
        net: the sub-network ``(moving, fixed) -> u`` (e.g. :class:`~monai_gradicon.networks.GradICONUNet`);
            ``u`` must have the batch and spatial shape of ``moving``.
        checkpoint_activations: when gradients are recorded, keep only the inputs of ``net`` and
            recompute its activations in the backward pass (``torch.utils.checkpoint``, non-reentrant):
            less memory for one more forward. The recomputation leaves BatchNorm running statistics
            alone, so they are updated once per step as without checkpointing.
        autocast_dtype: ``None`` (float32), or ``"float16"``/``"bfloat16"`` to run ``net`` under
            ``torch.autocast`` on the input's device (mixed precision, meant for CUDA); ``u`` is cast back
            to the input dtype, so maps, composition and losses stay in full precision.
    """

    def __init__(self, net: nn.Module, checkpoint_activations: bool = False, autocast_dtype: str | None = None) -> None:
        super().__init__()
        if autocast_dtype is not None and autocast_dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast_dtype must be None or one of {sorted(AUTOCAST_DTYPES)}, got {autocast_dtype!r}.")
        self.net = net
        self.checkpoint_activations = bool(checkpoint_activations)
        self.autocast_dtype = autocast_dtype

    def _run(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        if self.autocast_dtype is None:
            return self.net(moving, fixed)
        with torch.autocast(moving.device.type, dtype=AUTOCAST_DTYPES[self.autocast_dtype]):
            return self.net(moving, fixed).to(moving.dtype)

    def _recompute_contexts(self):
        return contextlib.nullcontext(), _batch_norm_stats_frozen(self.net)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Deformation:
        """
        Args:
            moving: image ``(B, C, *spatial)`` at this step's resolution.
            fixed: image, same shape.

        Returns:
            the one-field :class:`~monai_gradicon.maps.Deformation` ``Id + u`` on the grid of ``moving``.

        Raises:
            ValueError: ``net`` returned a displacement of the wrong batch or spatial shape.
        """
        if self.checkpoint_activations and torch.is_grad_enabled():
            displacement = checkpoint(self._run, moving, fixed, use_reentrant=False, context_fn=self._recompute_contexts)
        else:
            displacement = self._run(moving, fixed)
        if displacement.shape[0] != moving.shape[0] or displacement.shape[2:] != moving.shape[2:]:
            raise ValueError(
                f"the sub-network must return a displacement of shape (B, D, *spatial) = "
                f"({moving.shape[0]}, {moving.ndim - 2}, {', '.join(map(str, moving.shape[2:]))}), "
                f"got {tuple(displacement.shape)}."
            )
        return Deformation([displacement])


class DownsampleStep(nn.Module):
    """Run ``step`` on both images average-pooled by 2 (``ceil_mode=True``).

    The *downsampling* operation of a sub-network (paper Sec. 5.1, Eq. 6: ``I^{A_i}``, ``I^{B_i}``). The
    inner step's deformation is in [0, 1] coordinates, so it applies unchanged at full resolution.

    Args:
        step: the step to run at half resolution (any step of this module).
        spatial_dims: 2 or 3 (selects ``avg_pool2d`` or ``avg_pool3d``).
    """

    def __init__(self, step: nn.Module, spatial_dims: int) -> None:
        super().__init__()
        self.step = step
        self.spatial_dims = spatial_dims

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Deformation:
        """
        Args:
            moving: image ``(B, C, *spatial)``.
            fixed: image, same shape.

        Returns:
            the :class:`~monai_gradicon.maps.Deformation` of ``step`` on the pooled pair (its fields
            live on the pooled grid, ``ceil(N/2)`` per axis).
        """
        pool = (F.avg_pool2d, F.avg_pool3d)[self.spatial_dims - 2]
        return self.step(pool(moving, 2, ceil_mode=True), pool(fixed, 2, ceil_mode=True))


class CompositionStep(nn.Module):
    """``Φ = Φ_first ∘ Φ_second`` with ``Φ_second = second(moving ∘ Φ_first, fixed)`` (paper Eq. 6).

    The *warping* and *composing* operations of Sec. 5.1; in :func:`~monai_gradicon.networks.multistep_network`
    ``first`` is the coarser part of the chain and ``second`` refines the remaining misalignment.

    Args:
        first: step run on the original pair.
        second: step run on ``(moving warped by Φ_first, fixed)``.
    """

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Deformation:
        """
        Args:
            moving: image ``(B, C, *spatial)``.
            fixed: image, same shape.

        Returns:
            the :class:`~monai_gradicon.maps.Deformation` ``Φ_first ∘ Φ_second`` (``Φ_second`` acts
            first on a point), on the grid of ``moving``.
        """
        phi = self.first(moving, fixed)
        grid = shared_identity_grid(moving.shape[2:], moving.dtype, moving.device)
        warped = sample(moving, phi(grid, is_identity=True))
        psi = self.second(warped, fixed)
        return phi.compose(psi)


def step_min_size(step: nn.Module) -> int:
    """Smallest spatial size every axis of the input may have for ``step`` to run.

    Follows the steps of Eq. 6: a :class:`DownsampleStep` around an inner step needing ``m`` voxels needs
    ``2m - 1`` (pooling uses ``ceil_mode``); a :class:`CompositionStep` needs the larger of its two; a
    :class:`DisplacementStep` needs its network's ``min_size`` attribute (default 2), at least 2.

    Args:
        step: a :class:`DisplacementStep`, :class:`DownsampleStep` or :class:`CompositionStep` tree.

    Returns:
        the minimum size per spatial axis.

    Raises:
        ValueError: ``step`` (or a step inside it) is none of these three classes.
    """
    if isinstance(step, DisplacementStep):
        return max(2, int(getattr(step.net, "min_size", 2)))
    if isinstance(step, DownsampleStep):
        return 2 * step_min_size(step.step) - 1
    if isinstance(step, CompositionStep):
        return max(step_min_size(step.first), step_min_size(step.second))
    raise ValueError(f"unknown registration step {type(step).__name__}.")
