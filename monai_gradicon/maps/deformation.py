"""A deformation as a composition of displacement fields, evaluable at any point.

The multistep network of the paper (Eq. 6) outputs ``Φ = Φ^{A_P B_P} ∘ ... ∘ Φ^{A_0 B_0}``, each
``Φ^{A_i B_i} = Id + u_i`` with ``u_i`` a displacement field at its own resolution. GradICON (Eq. 2)
needs ``Φ_AB ∘ Φ_BA`` at randomly perturbed points, so a deformation has to be evaluated off the grid
*as the composition*, not by interpolating one resampled field. :class:`Deformation` keeps the fields
and evaluates them one after another, exactly as the reference implementation does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .grid import _voxel_scale, shared_identity_grid, sample

__all__ = ["Deformation"]


class Deformation:
    """``Φ(x) = Φ_n(... Φ_2(Φ_1(x)))`` with ``Φ_k(x) = x + interpolate(u_k, x)`` in [0, 1] coordinates.

    Args:
        fields: displacement fields ``u_k`` of shape ``(B, D, *S_k)`` in [0, 1] units, in the order
            they are applied (``fields[0]`` acts first on the input points). Each may have its own
            resolution; batch sizes must agree or be 1.
        spatial_shape: the grid of the images this deformation registers (where :meth:`map` and
            :meth:`ddf` sample it by default); defaults to the shape of ``fields[0]``.
    """

    def __init__(self, fields: Sequence[torch.Tensor], spatial_shape: Sequence[int] | None = None):
        if len(fields) == 0:
            raise ValueError("a Deformation needs at least one displacement field, got none.")
        dims = {int(f.shape[1]) for f in fields} | {f.ndim - 2 for f in fields}  # int(): traced shapes are tensors
        if len(dims) != 1:
            raise ValueError(f"all fields must be (B, D, *spatial) with D spatial axes, got {[tuple(f.shape) for f in fields]}.")
        # (field, divisor): u_k = field / divisor, divisor None for a field given in [0, 1] units
        self._terms: list[tuple[torch.Tensor, torch.Tensor | None]] = [(f, None) for f in fields]
        self.spatial_shape = tuple(int(n) for n in (spatial_shape or fields[0].shape[2:]))
        if len(self.spatial_shape) != fields[0].shape[1]:
            raise ValueError(f"spatial_shape must have {fields[0].shape[1]} entries, got {self.spatial_shape}.")

    @classmethod
    def from_ddf(cls, ddf: torch.Tensor) -> "Deformation":
        """Wrap a MONAI DDF (voxel units) as a one-field deformation.

        The field is kept in voxel units and each interpolated value is divided by ``N_k - 1`` (per
        axis) as it is used, so no [0, 1]-unit copy of the DDF is stored (nor kept for backward).

        Args:
            ddf: MONAI DDF ``(B, D, *spatial)`` in voxel units.

        Returns:
            a :class:`Deformation` with the single field ``ddf / (N_k - 1)`` (per axis, [0, 1] units)
            on the grid of ``ddf``.
        """
        return cls._of_terms([(ddf, _voxel_scale(ddf.shape[2:], ddf))])

    @classmethod
    def _of_terms(
        cls, terms: Sequence[tuple[torch.Tensor, torch.Tensor | None]], spatial_shape: Sequence[int] | None = None
    ) -> "Deformation":
        """A deformation of ``(field, divisor)`` terms (``u_k = field / divisor``), checked as :meth:`__init__` checks fields."""
        phi = cls([f for f, _ in terms], spatial_shape)
        phi._terms = list(terms)
        return phi

    @property
    def fields(self) -> list[torch.Tensor]:
        """The displacement fields ``u_k`` in [0, 1] units, in the order they are applied.

        Returns:
            one ``(B, D, *S_k)`` tensor per field (a DDF given to :meth:`from_ddf` is divided on access).
        """
        return [f if d is None else f / d for f, d in self._terms]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first field (and of the points :meth:`map` samples)."""
        return self._terms[0][0].dtype

    @property
    def device(self) -> torch.device:
        """The device of the first field."""
        return self._terms[0][0].device

    @property
    def spatial_dims(self) -> int:
        """Number of spatial axes ``D``."""
        return self._terms[0][0].shape[1]

    @property
    def batch_size(self) -> int:
        """Largest batch size among the fields (the others are 1 and broadcast)."""
        return max(f.shape[0] for f, _ in self._terms)

    def __call__(self, coords: torch.Tensor, is_identity: bool = False) -> torch.Tensor:
        """Map points ``coords`` ``(B', D, *S')`` in [0, 1] coordinates to ``Φ(coords)``.

        ``is_identity=True`` says that ``coords`` is the identity grid of the first field's
        resolution: if the shapes (batch included) agree, the first field is then added without
        interpolation. This mirrors the reference's shortcut; both paths agree to float rounding.

        Args:
            coords: points ``(B', D, *S')`` in [0, 1] coordinates.
            is_identity: ``coords`` is the identity grid of ``fields[0]``'s resolution.

        Returns:
            ``Φ(coords)`` ``(max(B', batch), D, *S')`` in [0, 1] coordinates, always a new tensor.
        """
        out = coords
        for k, (field, divisor) in enumerate(self._terms):
            if k == 0 and is_identity and coords.shape == field.shape:
                out = out + (field if divisor is None else field / divisor)
            else:
                # the interpolated values are a fresh tensor that autograd does not keep: scale and add into
                # it (x + u == u + x exactly, so this is the reference's sum, with one buffer fewer)
                values = sample(field, out)
                if divisor is not None:
                    values = values.div_(divisor)
                out = values.add_(out)
        return out

    def compose(self, inner: "Deformation") -> "Deformation":
        """``self ∘ inner``: ``inner`` acts first; the result keeps ``inner``'s grid (paper Eq. 6).

        Args:
            inner: the deformation applied first.

        Returns:
            a new :class:`Deformation` with ``inner.fields + self.fields``.
        """
        return Deformation._of_terms(inner._terms + self._terms, inner.spatial_shape)

    def map(self, spatial_shape: Sequence[int] | None = None) -> torch.Tensor:
        """``Φ(id)`` on the identity grid of ``spatial_shape`` (default: :attr:`spatial_shape`).

        Args:
            spatial_shape: grid to sample on; ``None`` uses :attr:`spatial_shape`.

        Returns:
            ``(B', D, *shape)`` in [0, 1] coordinates, ``B'`` the fields' batch size (1 if every field
            has batch 1).
        """
        grid = shared_identity_grid(spatial_shape or self.spatial_shape, self.dtype, self.device)
        return self(grid, is_identity=True)

    def ddf(self, spatial_shape: Sequence[int] | None = None) -> torch.Tensor:
        """MONAI DDF (voxel units) of ``Φ`` on the grid of ``spatial_shape`` (default: :attr:`spatial_shape`).

        Args:
            spatial_shape: grid to sample on; ``None`` uses :attr:`spatial_shape`.

        Returns:
            ``(batch_size, D, *shape)`` in voxel units of that grid, ``Warp()(moving, ddf) ≈ fixed``.
        """
        spatial_shape = tuple(spatial_shape or self.spatial_shape)
        grid = shared_identity_grid(spatial_shape, self.dtype, self.device)
        phi = self(grid, is_identity=True)  # a fresh tensor
        if phi.shape[0] != self.batch_size:
            phi = phi.expand(self.batch_size, *phi.shape[1:])
        scale = _voxel_scale(spatial_shape, phi)
        if not torch.is_grad_enabled() and phi.shape[0] == self._terms[0][0].shape[0] == self.batch_size:
            return phi.sub_(grid).mul_(scale)  # not expanded, no graph: reuse its buffer
        return (phi - grid) * scale
