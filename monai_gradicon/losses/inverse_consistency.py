"""Inverse consistency regularisers: GradICON (paper Eq. 2) and plain ICON.

Both take the two directions of a registration, ``Φ_AB`` and ``Φ_BA``, as MONAI DDFs
``(B, D, *spatial)`` in voxel units (from any network) or as :class:`~monai_gradicon.maps.Deformation`
objects (the exact composed maps of a multistep network). They are evaluated, as in the reference
implementation, at randomly perturbed identity points ``x = id + s·ξ`` with ``ξ ~ N(0, 1)`` of shape
``(1, D, *spatial)`` (one draw shared by the whole batch) and ``s = 1/W`` (``2/W`` for the sparse
variant), ``W`` being the size of the last spatial axis, in [0, 1] coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from ..maps import Deformation, shared_identity_grid
from ..validation import check_ddf, check_spatial_dims

__all__ = ["GradICONLoss", "ICONLoss", "as_deformation", "perturbed_identity"]


def as_deformation(phi: torch.Tensor | Deformation, spatial_dims: int, name: str) -> Deformation:
    """A DDF tensor (voxel units) or a :class:`Deformation` -> :class:`Deformation`.

    Lets the regularisers of Eq. 2 (and ICON, Sec. 3) take either form of ``Φ``; a DDF is checked and
    wrapped with :meth:`Deformation.from_ddf`, a :class:`Deformation` is returned as it is.

    Args:
        phi: a MONAI DDF ``(B, D, *spatial)`` in voxel units, or a :class:`Deformation`.
        spatial_dims: the expected ``D`` (2 or 3).
        name: what to call ``phi`` in error messages (e.g. ``"phi_AB"``).

    Returns:
        the deformation.

    Raises:
        ValueError: ``phi`` has the wrong number of spatial axes, or is not a valid DDF (shape, finite values).
    """
    if isinstance(phi, Deformation):
        if phi.spatial_dims != spatial_dims:
            raise ValueError(f"{name} must be a {spatial_dims}D deformation, got a {phi.spatial_dims}D one.")
        return phi
    check_ddf(phi, spatial_dims, name)
    return Deformation.from_ddf(phi)


def perturbed_identity(
    spatial_shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    std_factor: float = 1.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``id + std_factor · ξ / W`` with ``ξ ~ N(0, 1)``, ``(1, D, *spatial_shape)``.

    ``noise`` injects ``ξ`` (shape ``(1, D, *spatial_shape)``); otherwise it is drawn in float32 on
    the CPU from ``generator`` (the global RNG when ``None``), as the reference draws it. These are
    the points at which the inverse consistency of Eq. 2 (GradICON) and Sec. 3 (ICON) is evaluated.

    Args:
        spatial_shape: ``(N_0, ..., N_{D-1})``; ``W = N_{D-1}`` (the last axis) sets the noise scale.
        dtype: dtype of the returned points.
        device: device of the returned points.
        std_factor: noise standard deviation in units of ``1/W`` (1 for the dense, 2 for the sparse
            GradICON variant).
        noise: optional ``ξ`` to use instead of a random draw.
        generator: source of ``ξ`` when ``noise`` is ``None``.

    Returns:
        the perturbed points ``(1, D, *spatial_shape)`` in [0, 1] coordinates.
    """
    shape = (1, len(spatial_shape), *spatial_shape)
    if noise is None:
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}.")
    noise = noise.to(device)
    # (ξ · factor) / W in ξ's dtype, then added to the grid: the reference's exact order of rounding.
    return shared_identity_grid(spatial_shape, dtype, device) + noise * std_factor / spatial_shape[-1]


class _InverseConsistencyBase(_Loss):
    def __init__(
        self,
        spatial_dims: int,
        reduction: LossReduction | str = LossReduction.MEAN,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.generator = generator

    def _reduce(self, per_sample: torch.Tensor) -> torch.Tensor:
        if self.reduction == LossReduction.MEAN.value:
            return per_sample.mean()
        if self.reduction == LossReduction.SUM.value:
            return per_sample.sum()
        return per_sample

    def _pair(self, phi_AB, phi_BA) -> tuple[Deformation, Deformation]:
        ab = as_deformation(phi_AB, self.spatial_dims, "phi_AB")
        ba = as_deformation(phi_BA, self.spatial_dims, "phi_BA")
        if ab.spatial_shape != ba.spatial_shape:
            raise ValueError(
                f"phi_AB and phi_BA must share the spatial shape, got {ab.spatial_shape} and {ba.spatial_shape}."
            )
        if ab.batch_size != ba.batch_size:
            raise ValueError(f"phi_AB and phi_BA must share the batch size, got {ab.batch_size} and {ba.batch_size}.")
        return ab, ba


def _per_sample_mean(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).mean(1)


class GradICONLoss(_InverseConsistencyBase):
    """Gradient inverse consistency, paper Eq. 2: ``‖∇(Φ_AB ∘ Φ_BA) − I‖_F²``.

    As in the reference implementation, the Jacobian is taken by forward differences of the inverse
    consistency error ``E(x) = x − Φ_AB(Φ_BA(x))`` with step ``δ`` (in [0, 1] units) at perturbed
    identity points ``x``; each direction contributes the mean over channels and points of
    ``((E(x) − E(x + δ e_k)) / δ)²`` and the directions are summed. This is ``(1/D)·mean‖J − I‖_F²``.

    Args:
        spatial_dims: 2 or 3.
        delta: finite-difference step ``δ`` in [0, 1] units (reference: 1e-3).
        sparse: evaluate on every second point of a grid perturbed with std ``2/W`` (the
            ``GradientICONSparse`` variant that trained every released reference model) instead of
            every point with std ``1/W``.
        reduction: ``"mean"`` | ``"sum"`` over the batch, or ``"none"`` for a ``(B,)`` tensor.
        generator: source of the perturbation ``ξ``; ``None`` uses torch's global RNG.

    Example::

        loss = GradICONLoss(spatial_dims=3)
        reg = loss(ddf_AB, ddf_BA)        # MONAI DDFs from any network, voxel units
    """

    def __init__(
        self,
        spatial_dims: int,
        delta: float = 1e-3,
        sparse: bool = False,
        reduction: LossReduction | str = LossReduction.MEAN,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(spatial_dims, reduction, generator)
        if not delta > 0:
            raise ValueError(f"delta must be > 0, got {delta}.")
        self.delta = float(delta)
        self.sparse = bool(sparse)

    def forward(
        self,
        phi_AB: torch.Tensor | Deformation,
        phi_BA: torch.Tensor | Deformation,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            phi_AB: fixed(B)->moving(A) deformation: a DDF ``(B, D, *spatial)`` or a :class:`Deformation`.
            phi_BA: the opposite direction, same form.
            noise: optional ``ξ`` of shape ``(1, D, *spatial)`` to inject instead of drawing it.

        Returns:
            the regulariser, reduced over the batch as ``reduction`` says.
        """
        ab, ba = self._pair(phi_AB, phi_BA)
        shape = ab.spatial_shape
        x = perturbed_identity(shape, ab.dtype, ab.device, 2.0 if self.sparse else 1.0, noise, self.generator)
        if self.sparse:
            x = x[(slice(None), slice(None)) + (slice(None, None, 2),) * self.spatial_dims]
        # E(x) = x − Φ_AB(Φ_BA(x)) at x and at x + δ e_k, one direction at a time so that only one set of
        # temporaries is alive; each result is written into its fresh composed tensor (−c + p == p − c exactly)
        step = torch.tensor(self.delta, dtype=torch.float32, device=x.device)
        error = ab(ba(x)).neg_().add_(x)
        per_sample = 0
        for k in range(self.spatial_dims):
            shifted = x.clone()
            shifted[:, k] += step  # x + δ e_k, rounded as the reference rounds it
            difference = ab(ba(shifted)).neg_().add_(shifted).neg_().add_(error)  # E(x) − E(x + δ e_k)
            per_sample = per_sample + _per_sample_mean(difference.div_(self.delta).square())
        return self._reduce(per_sample)


class ICONLoss(_InverseConsistencyBase):
    """Plain inverse consistency (ICON): ``‖Φ_AB∘Φ_BA − Id‖² + ‖Φ_BA∘Φ_AB − Id‖²`` (paper Sec. 3).

    Evaluated as the reference does: at perturbed identity points (std ``1/W``), mean over channels
    and points for each composition, the two compositions summed.

    Args:
        spatial_dims: 2 or 3.
        reduction: ``"mean"`` | ``"sum"`` over the batch, or ``"none"`` for a ``(B,)`` tensor.
        generator: source of the perturbation; ``None`` uses torch's global RNG.
    """

    def forward(
        self,
        phi_AB: torch.Tensor | Deformation,
        phi_BA: torch.Tensor | Deformation,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            phi_AB: fixed(B)->moving(A) deformation: a DDF ``(B, D, *spatial)`` or a :class:`Deformation`.
            phi_BA: the opposite direction, same form.
            noise: optional ``ξ`` of shape ``(1, D, *spatial)`` to inject instead of drawing it.

        Returns:
            ``mean((x − Φ_AB(Φ_BA(x)))²) + mean((x − Φ_BA(Φ_AB(x)))²)`` per sample (means over channels
            and points, [0, 1] units), reduced over the batch as ``reduction`` says.
        """
        ab, ba = self._pair(phi_AB, phi_BA)
        x = perturbed_identity(ab.spatial_shape, ab.dtype, ab.device, 1.0, noise, self.generator)
        per_sample = _per_sample_mean((x - ab(ba(x))) ** 2) + _per_sample_mean((x - ba(ab(x))) ** 2)
        return self._reduce(per_sample)
