"""Landmark target registration error (TRE) in millimetres, DirLab style (paper Sec. 5.2, Tab. 5).

Landmark files list one point per line as **1-based voxel indices** (``x y z``, whitespace or comma
separated), as the DirLab COPDGene ``*_300_iBH_xyz_r1.txt`` files do. They become points in mm either
through the image affine (``p = affine · (index − 1)``, the default) or, as the reference's
evaluation does, with a per-case voxel size and the origin at 0 (``p = (index − 1) · spacing`` in ITK's
LPS frame). Points are mapped through a displacement-field transform in physical space; the error of
a landmark pair is ``‖p_moving − T(p_fixed)‖`` where ``T`` maps fixed points to moving points.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..io import apply_affine, ras_to_lps_matrix, read_displacement_nifti

__all__ = [
    "read_landmarks",
    "landmarks_to_physical",
    "PhysicalDisplacementField",
    "target_registration_error",
    "tre_summary",
]


def read_landmarks(path: str | os.PathLike) -> np.ndarray:
    """Read a landmark file: ``(P, D)`` float64 array of 1-based voxel indices.

    Raises:
        FileNotFoundError: no such file.
        ValueError: empty file, rows of different lengths, non-numeric entries.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"landmark file not found: {path!r}.")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            text = line.replace(",", " ").split()
            if not text:
                continue
            try:
                rows.append([float(v) for v in text])
            except ValueError:
                raise ValueError(f"{path!r} line {number}: expected numbers (1-based voxel indices), got {line.strip()!r}.") from None
    if not rows:
        raise ValueError(f"landmark file {path!r} holds no points.")
    lengths = {len(r) for r in rows}
    if len(lengths) != 1 or lengths.pop() not in (2, 3):
        raise ValueError(f"landmark file {path!r} must have 2 or 3 numbers on every line, got lines of lengths {sorted({len(r) for r in rows})}.")
    return np.asarray(rows, dtype=np.float64)


def landmarks_to_physical(
    indices_one_based: np.ndarray, affine: np.ndarray | None = None, spacing: Sequence[float] | None = None
) -> np.ndarray:
    """1-based voxel indices ``(P, D)`` -> RAS millimetres ``(P, D)``.

    Args:
        indices_one_based: landmark indices as read by :func:`read_landmarks`.
        affine: the image's RAS voxel-to-mm matrix (preferred: uses origin and direction).
        spacing: DirLab convention instead: voxel size per axis with origin 0 and identity direction in
            ITK's LPS frame (what the reference's evaluation assumes).
    """
    if (affine is None) == (spacing is None):
        raise ValueError("give exactly one of affine= or spacing= to place landmarks in space.")
    index = np.asarray(indices_one_based, dtype=np.float64) - 1.0
    dims = index.shape[1]
    if affine is not None:
        if np.asarray(affine).shape != (dims + 1, dims + 1):
            raise ValueError(f"landmarks are {dims}D but the affine is {np.asarray(affine).shape}.")
        return apply_affine(affine, index)
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (dims,) or np.any(spacing <= 0):
        raise ValueError(f"spacing must hold {dims} positive voxel sizes, got {spacing.tolist()}.")
    return (index * spacing) @ ras_to_lps_matrix(dims).T


class PhysicalDisplacementField:
    """``T(p) = p + u(p)`` for a displacement ``u`` in RAS mm sampled on a grid, evaluated like ITK.

    Inside the grid (up to half a voxel beyond the outer voxel centres) ``u`` is interpolated
    linearly; outside it is 0, as ``itk.DisplacementFieldTransform`` does.

    Args:
        displacement: ``(D, *spatial)`` in RAS mm.
        affine: the grid's RAS voxel-to-mm matrix.
    """

    def __init__(self, displacement: np.ndarray, affine: np.ndarray) -> None:
        displacement = np.asarray(displacement, dtype=np.float64)
        dims = displacement.shape[0]
        if dims not in (2, 3) or displacement.ndim != dims + 1 or np.asarray(affine).shape != (dims + 1, dims + 1):
            raise ValueError(f"expected a (D, *spatial) displacement and a (D+1, D+1) affine, got {displacement.shape} and {np.asarray(affine).shape}.")
        self.displacement = displacement
        self.affine = np.asarray(affine, dtype=np.float64)

    @classmethod
    def from_nifti(cls, path: str | os.PathLike) -> "PhysicalDisplacementField":
        """Read a displacement written by :func:`monai_gradicon.io.write_displacement_nifti`."""
        return cls(*read_displacement_nifti(path))

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """Map RAS points ``(P, D)`` to ``T(points)``."""
        points = np.asarray(points, dtype=np.float64)
        dims = self.displacement.shape[0]
        if points.ndim != 2 or points.shape[1] != dims:
            raise ValueError(f"points must be (P, {dims}), got {points.shape}.")
        index = apply_affine(np.linalg.inv(self.affine), points)
        shape = np.array(self.displacement.shape[1:], dtype=np.float64)
        inside = np.all((index >= -0.5) & (index <= shape - 0.5), axis=1)
        grid = torch.from_numpy(2.0 * index / np.maximum(shape - 1, 1) - 1.0).flip(-1)
        grid = grid.reshape(1, -1, *([1] * (dims - 1)), dims)
        field = torch.from_numpy(self.displacement)[None]
        u = F.grid_sample(field, grid, mode="bilinear", padding_mode="border", align_corners=True)
        u = u.reshape(dims, -1).T.numpy() * inside[:, None]
        return points + u


def target_registration_error(fixed_points: np.ndarray, moving_points: np.ndarray, transform) -> np.ndarray:
    """Per-landmark error ``‖p_moving − T(p_fixed)‖`` in mm.

    Args:
        fixed_points: ``(P, D)`` landmarks of the fixed image in mm.
        moving_points: ``(P, D)`` corresponding landmarks of the moving image in mm.
        transform: callable mapping fixed points ``(P, D)`` to moving points (e.g. :class:`PhysicalDisplacementField`).

    Raises:
        ValueError: the two landmark sets differ in count or dimension.
    """
    fixed_points = np.asarray(fixed_points, dtype=np.float64)
    moving_points = np.asarray(moving_points, dtype=np.float64)
    if fixed_points.shape != moving_points.shape:
        raise ValueError(
            f"fixed and moving landmarks must correspond one to one, got {fixed_points.shape[0]} fixed and "
            f"{moving_points.shape[0]} moving points (shapes {fixed_points.shape} and {moving_points.shape})."
        )
    return np.linalg.norm(moving_points - transform(fixed_points), axis=1)


def tre_summary(errors: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation and 25/50/75th percentiles of landmark errors (mm)."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.size == 0:
        raise ValueError("no landmark errors to summarise.")
    p25, p50, p75 = np.percentile(errors, [25, 50, 75])
    return {"mean": float(errors.mean()), "std": float(errors.std()), "p25": float(p25), "p50": float(p50), "p75": float(p75), "count": int(errors.size)}
