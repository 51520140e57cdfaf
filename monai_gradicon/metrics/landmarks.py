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

from ..io import apply_affine, ras_to_lps_matrix, read_displacement_nifti, sample_at_voxel_indices

__all__ = [
    "read_landmarks",
    "landmarks_to_physical",
    "PhysicalDisplacementField",
    "landmark_distances",
    "target_registration_error",
    "tre_summary",
]


def read_landmarks(source: str | os.PathLike | np.ndarray | torch.Tensor, spatial_dims: int | None = None) -> np.ndarray:
    """Read landmarks: ``(P, D)`` float64 array, the values as given (DirLab files: 1-based voxel indices).

    The one landmark reader of the package, used by the evaluation (:func:`monai_gradicon.app.evaluate_pairs`,
    which ``monai-gradicon evaluate`` and the bundles' ``evaluate.json`` run; mTRE of paper Sec. 5.2/8).

    Args:
        source: a text file with one point per line (numbers separated by whitespace or commas,
            blank lines skipped, surrounding spaces in the path stripped), or a ``(P, D)`` array/tensor.
        spatial_dims: required number of coordinates per point (2 or 3); ``None``: 2 or 3.

    Returns:
        float64 array ``(P, D)`` with ``P >= 1`` (no index base or unit conversion).

    Raises:
        FileNotFoundError: no such file.
        ValueError: empty file, rows of different lengths, non-numeric entries, wrong column count.
    """
    allowed = (2, 3) if spatial_dims is None else (int(spatial_dims),)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        points = np.asarray(source.detach().cpu() if isinstance(source, torch.Tensor) else source, dtype=np.float64)
        if points.ndim != 2 or points.shape[0] < 1 or points.shape[1] not in allowed:
            raise ValueError(f"landmarks must be a (P, D) table with P >= 1 and D in {allowed}, got shape {points.shape}.")
        return points
    path = os.fspath(source).strip()
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
    lengths = sorted({len(r) for r in rows})
    if len(lengths) != 1 or lengths[0] not in allowed:
        raise ValueError(f"landmark file {path!r} must have {' or '.join(map(str, allowed))} numbers on every line, got lines of lengths {lengths}.")
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

    Returns:
        ``(P, D)`` float64 landmark positions in RAS mm.

    Raises:
        ValueError: both or neither of ``affine``/``spacing``, or either of the wrong size.
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
        index = torch.from_numpy(apply_affine(np.linalg.inv(self.affine), points))
        field = torch.from_numpy(self.displacement)[None]
        return points + sample_at_voxel_indices(field, index, "bilinear").T.numpy()


def landmark_distances(mapped_points, target_points, spacing: Sequence[float] | None = None):
    """Per-landmark distances ``‖(p_target − T(p_fixed)) · spacing‖`` — the TRE arithmetic (paper Sec. 5.2, Tab. 5).

    The one implementation, used by :func:`target_registration_error` (points in mm).

    Args:
        mapped_points: ``(P, D)`` fixed landmarks carried through the transform, ``T(p_fixed)``
            (numpy array or torch tensor).
        target_points: ``(P, D)`` corresponding landmarks of the moving image, same kind and units.
        spacing: voxel size per axis when the points are in voxels (gives mm); ``None``: the points
            are already in mm.

    Returns:
        ``(P,)`` distances, a float64 numpy array or tensor like the inputs.

    Raises:
        ValueError: the two landmark sets differ in count or dimension.
    """
    if tuple(mapped_points.shape) != tuple(target_points.shape) or len(mapped_points.shape) != 2:
        raise ValueError(
            f"fixed and moving landmarks must correspond one to one as (P, D) tables, got {mapped_points.shape[0]} fixed and "
            f"{target_points.shape[0]} moving points (shapes {tuple(mapped_points.shape)} and {tuple(target_points.shape)})."
        )
    if isinstance(mapped_points, torch.Tensor):
        difference = target_points.double() - mapped_points.double()
        if spacing is not None:
            difference = difference * torch.as_tensor(spacing, dtype=torch.float64, device=difference.device)
        return difference.norm(dim=1)
    difference = np.asarray(target_points, dtype=np.float64) - np.asarray(mapped_points, dtype=np.float64)
    if spacing is not None:
        difference = difference * np.asarray(spacing, dtype=np.float64)
    return np.linalg.norm(difference, axis=1)


def target_registration_error(fixed_points: np.ndarray, moving_points: np.ndarray, transform) -> np.ndarray:
    """Per-landmark error ``‖p_moving − T(p_fixed)‖`` in mm (paper Sec. 5.2, Tab. 5), by :func:`landmark_distances`.

    Args:
        fixed_points: ``(P, D)`` landmarks of the fixed image in mm.
        moving_points: ``(P, D)`` corresponding landmarks of the moving image in mm.
        transform: callable mapping fixed points ``(P, D)`` to moving points (e.g. :class:`PhysicalDisplacementField`).

    Returns:
        ``(P,)`` float64 errors in mm.

    Raises:
        ValueError: the two landmark sets differ in count or dimension.
    """
    fixed_points = np.asarray(fixed_points, dtype=np.float64)
    moving_points = np.asarray(moving_points, dtype=np.float64)
    if fixed_points.shape != moving_points.shape:
        landmark_distances(fixed_points, moving_points)  # raises the error naming both shapes
    return landmark_distances(transform(fixed_points), moving_points)


def tre_summary(errors: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation and 25/50/75th percentiles of landmark errors (the layout of paper Tab. 5).

    Args:
        errors: per-landmark errors in mm (e.g. from :func:`target_registration_error`).

    Returns:
        ``{"mean", "std", "p25", "p50", "p75", "count"}``.

    Raises:
        ValueError: no errors.
    """
    errors = np.asarray(errors, dtype=np.float64)
    if errors.size == 0:
        raise ValueError("no landmark errors to summarise.")
    p25, p50, p75 = np.percentile(errors, [25, 50, 75])
    return {"mean": float(errors.mean()), "std": float(errors.std()), "p25": float(p25), "p50": float(p50), "p75": float(p75), "count": int(errors.size)}
