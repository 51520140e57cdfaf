"""Jacobian determinant of a deformation by forward differences, and fold counting.

A fold is a voxel where ``det ∇Φ < 0`` (the map is locally not invertible, paper Sec. 6). The
differences are taken as the reference does (one-sided, on the ``N-1`` cropped grid), so fold counts
match it exactly; the determinant is in voxel units, so the identity gives 1.
"""

from __future__ import annotations

import torch

from ..validation import check_ddf

__all__ = ["jacobian_determinant", "map_jacobian_determinant", "fold_count", "fold_percentage"]


def map_jacobian_determinant(phi: torch.Tensor) -> torch.Tensor:
    """Forward-difference Jacobian determinant of a coordinate map ``Φ(id)`` ``(B, D, *spatial)``.

    The units are those of ``phi`` (voxels for ``ddf + index grid``; [0, 1] units scale the result
    by the positive ``Π 1/(N_k − 1)``, which leaves its sign, hence the fold count of paper Sec. 6–8,
    unchanged). In 2D the differences are taken at each voxel towards its ``+1`` neighbours; in 3D
    from the ``-1`` neighbours towards each voxel ``(1:, 1:, 1:)``, as the reference does. The input is
    detached (no gradient flows).

    Args:
        phi: the map sampled on a grid, ``(B, 2, H, W)`` or ``(B, 3, H, W, D)``; channel ``k`` is the
            coordinate along spatial axis ``k``.

    Returns:
        ``(B, N_0 - 1, ..., N_{D-1} - 1)`` determinants.
    """
    spatial_dims = phi.ndim - 2
    if spatial_dims not in (2, 3) or phi.shape[1] != spatial_dims:
        raise ValueError(f"expected a map of shape (B, 2, H, W) or (B, 3, H, W, D), got {tuple(phi.shape)}.")
    phi = phi.detach()
    if spatial_dims == 2:
        du = phi[:, :, 1:, :-1] - phi[:, :, :-1, :-1]
        dv = phi[:, :, :-1, 1:] - phi[:, :, :-1, :-1]
        return du[:, 0] * dv[:, 1] - du[:, 1] * dv[:, 0]
    corner = phi[:, :, 1:, 1:, 1:]
    a = corner - phi[:, :, :-1, 1:, 1:]
    b = corner - phi[:, :, 1:, :-1, 1:]
    c = corner - phi[:, :, 1:, 1:, :-1]
    return (torch.cross(a, b, dim=1) * c).sum(dim=1)


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """``det(I + ∇ddf)`` by forward differences, ``(B, N_0 - 1, ..., N_{D-1} - 1)``; 1 for the identity.

    A negative value marks a fold (paper Sec. 6–8). Computed by :func:`map_jacobian_determinant` on
    ``ddf + index grid``, i.e. in voxel units.

    Args:
        ddf: MONAI DDF ``(B, D, *spatial)`` in voxel units, ``D`` in {2, 3}.

    Returns:
        ``(B, N_0 - 1, ..., N_{D-1} - 1)`` determinants in the dtype of ``ddf`` (detached).
    """
    spatial_dims = ddf.ndim - 2
    if spatial_dims not in (2, 3):
        raise ValueError(f"ddf must be (B, 2, H, W) or (B, 3, H, W, D), got {tuple(ddf.shape)}.")
    check_ddf(ddf, spatial_dims)
    grid = torch.stack(
        torch.meshgrid(*[torch.arange(n, dtype=ddf.dtype, device=ddf.device) for n in ddf.shape[2:]], indexing="ij")
    )
    return map_jacobian_determinant(ddf + grid[None])


def fold_count(ddf: torch.Tensor) -> torch.Tensor:
    """Number of voxels with negative Jacobian determinant, per batch element: ``(B,)`` float.

    The "folds" of the knee experiment (paper Sec. 7, Table 1), counted over the
    ``(N_0 - 1) × ... × (N_{D-1} - 1)`` forward-difference grid of :func:`jacobian_determinant`.

    Args:
        ddf: MONAI DDF ``(B, D, *spatial)`` in voxel units, ``D`` in {2, 3}.

    Returns:
        ``(B,)`` fold counts in the dtype of ``ddf``.
    """
    return (jacobian_determinant(ddf) < 0).flatten(1).sum(1).to(ddf.dtype)


def fold_percentage(ddf: torch.Tensor) -> torch.Tensor:
    """Percentage of voxels with negative Jacobian determinant, per batch element: ``(B,)``.

    The ``%|J|`` of the lung experiment (paper Sec. 8) and of Fig. 4d (Sec. 6.2); the denominator is
    the ``(N_0 - 1) × ... × (N_{D-1} - 1)`` forward-difference grid of :func:`jacobian_determinant`.

    Args:
        ddf: MONAI DDF ``(B, D, *spatial)`` in voxel units, ``D`` in {2, 3}.

    Returns:
        ``(B,)`` percentages in [0, 100], in the dtype of ``ddf``.
    """
    return (jacobian_determinant(ddf) < 0).flatten(1).to(ddf.dtype).mean(1) * 100.0
