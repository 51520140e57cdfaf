"""Voxel <-> physical coordinates, and the RAS (NIfTI, nibabel, MONAI) <-> LPS (ITK) conversion.

MONAI's ``LoadImage`` and nibabel describe an image by a ``(D+1, D+1)`` affine that maps a voxel index
``(i, j, k)`` to a point in **RAS** millimetres (x to the right, y anterior, z superior). ITK, SimpleITK
and 3D Slicer's transform files use **LPS** (x to the left, y posterior): the first two coordinates
change sign. Everything in this package computes in RAS and converts only at the ITK boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from ..maps import grid_sample

__all__ = ["ras_to_lps_matrix", "apply_affine", "ItkGeometry", "itk_geometry"]


def ras_to_lps_matrix(spatial_dims: int) -> np.ndarray:
    """``diag(-1, -1, 1...)`` of size ``spatial_dims``; it is its own inverse (LPS <-> RAS).

    Args:
        spatial_dims: 2 or 3.

    Returns:
        ``(spatial_dims, spatial_dims)`` float64 matrix that flips the first two axes.
    """
    flip = np.ones(spatial_dims)
    flip[: min(2, spatial_dims)] = -1.0
    return np.diag(flip)


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map ``points`` ``(..., D)`` through the homogeneous ``(D+1, D+1)`` ``affine``.

    Args:
        affine: ``(D+1, D+1)`` matrix (e.g. voxel index -> RAS mm).
        points: ``(..., D)`` coordinates.

    Returns:
        ``(..., D)`` float64 mapped coordinates ``A·p + t``.
    """
    affine = np.asarray(affine, dtype=np.float64)
    dims = affine.shape[0] - 1
    return points @ affine[:dims, :dims].T + affine[:dims, dims]


@dataclass(frozen=True)
class ItkGeometry:
    """An image grid as ITK describes it: ``p_LPS = origin + direction · diag(spacing) · index``.

    Args:
        size: voxels per index axis ``(n_i, n_j, n_k)`` (ITK order, fastest axis first).
        origin: LPS position of voxel ``(0, 0, 0)`` in mm.
        spacing: voxel size per index axis in mm (positive).
        direction: ``(D, D)`` orthonormal direction cosines (columns = index axes) in LPS.
    """

    size: tuple[int, ...]
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray


def itk_geometry(affine_ras: np.ndarray, spatial_shape: tuple[int, ...]) -> ItkGeometry:
    """The ITK description of a grid given by its RAS voxel-to-world affine (as MONAI/nibabel give it).

    Args:
        affine_ras: ``(D+1, D+1)`` voxel index -> RAS mm matrix.
        spatial_shape: voxels per index axis.

    Returns:
        the :class:`ItkGeometry` (LPS origin, spacing, direction cosines) of that grid.

    Raises:
        ValueError: if the affine is singular (a zero voxel size).
    """
    affine_ras = np.asarray(affine_ras, dtype=np.float64)
    dims = affine_ras.shape[0] - 1
    if len(spatial_shape) != dims:
        raise ValueError(f"affine is for {dims}D images but the grid has shape {tuple(spatial_shape)}.")
    flip = ras_to_lps_matrix(dims)
    linear = flip @ affine_ras[:dims, :dims]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"the image affine is singular (voxel sizes {spacing.tolist()}); cannot place it in space.")
    return ItkGeometry(
        size=tuple(int(n) for n in spatial_shape),
        origin=flip @ affine_ras[:dims, dims],
        spacing=spacing,
        direction=linear / spacing,
    )


def sample_at_voxel_indices(image: torch.Tensor, index: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sample ``image`` at continuous voxel indices as ITK's resampler does (used to warp files in physical space).

    Inside ``[-0.5, S - 0.5]`` along every axis: linear (border-clamped) or nearest interpolation;
    elsewhere 0 (ITK's default pixel value outside the image).

    Args:
        image: ``(1, C, *S)`` with ``D = len(S)`` spatial axes.
        index: ``(P, D)`` continuous 0-based voxel indices into ``image``.
        mode: ``"bilinear"`` or ``"nearest"``.

    Returns:
        ``(C, P)`` sampled values, in ``image``'s dtype.
    """
    dims = index.shape[1]
    size = torch.tensor(image.shape[2:], dtype=index.dtype, device=index.device)
    inside = ((index >= -0.5) & (index <= size - 0.5)).all(dim=1)
    grid = (2.0 * index / (size - 1).clamp(min=1) - 1.0).flip(-1)  # grid_sample wants the last axis first
    grid = grid.to(image.dtype).reshape(1, -1, *([1] * (dims - 1)), dims)
    values = grid_sample(image, grid, mode=mode, padding_mode="border")
    return values.reshape(image.shape[1], -1) * inside.to(values.dtype)
