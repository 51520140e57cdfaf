"""The physical geometry of a DICOM image series: slice order and the NIfTI (RAS) affine, without the Deploy SDK.

DICOM gives, per slice, ``ImagePositionPatient`` (IPP, the centre of the first transmitted pixel, mm),
``ImageOrientationPatient`` (IOP: the direction cosines of a row, then of a column) and ``PixelSpacing``
(``[spacing between rows, spacing between columns]``: the *second* value is the step along a row), all in
the patient's LPS frame. For the voxel index ``(i, j, k)`` = (column, row, slice), with slices ordered by
their position along the normal ``n = row cosine x column cosine``::

    p_LPS(i, j, k) = IPP_0 + i * PixelSpacing[1] * row_cosine + j * PixelSpacing[0] * column_cosine
                     + k * (IPP_{N-1} - IPP_0) / (N - 1)

and the NIfTI affine is ``diag(-1, -1, 1, 1)`` times that map (LPS -> RAS). The array of such a volume in
NIfTI index order is the ``(slice, row, column)`` stack transposed to ``(column, row, slice)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import InputError

__all__ = ["LPS_TO_RAS", "series_geometry"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_COSINE_TOLERANCE = 1e-4
_SPACING_TOLERANCE_MM = 1e-4
_SLICE_STEP_TOLERANCE = 0.01  # fraction of the slice step that positions may deviate from a regular grid


def _vector(dataset: Any, keyword: str, size: int, what: str) -> np.ndarray:
    value = getattr(dataset, keyword, None)
    if value is None or len(value) != size:
        raise InputError(f"{what}: every slice needs {keyword} ({size} numbers); a slice has {value!r}.")
    return np.asarray([float(v) for v in value], dtype=np.float64)


def series_geometry(datasets: Sequence[Any], what: str = "DICOM series") -> tuple[np.ndarray, np.ndarray]:
    """Slice order and RAS affine of a series of single-frame DICOM slices, checked to form one regular volume.

    Args:
        datasets: the slices (pydicom datasets, or any objects with the attributes ``ImagePositionPatient``,
            ``ImageOrientationPatient``, ``PixelSpacing``, ``Rows``, ``Columns``), in any order.
        what: how error messages name the series (e.g. its role and SeriesInstanceUID).

    Returns:
        ``(order, affine)``: ``order[k]`` is the index in ``datasets`` of slice ``k`` (ascending along the
        slice normal, the order the Deploy SDK and ITK stack them), and the 4x4 affine from the NIfTI voxel
        index (column, row, slice) to RAS mm.

    Raises:
        InputError: fewer than two slices (a 2D image is not a volume), a multi-frame object, slices that
            differ in orientation, pixel spacing or size, two slices at one position, or slice positions off
            a regular grid (a missing slice, varying spacing) by more than 1% of the slice step.
    """
    if len(datasets) < 2:
        raise InputError(f"{what} is not a volume: it has {len(datasets)} slice(s); registration needs at least 2.")
    frames = [int(getattr(d, "NumberOfFrames", 1) or 1) for d in datasets]
    if max(frames) > 1:
        raise InputError(f"{what}: multi-frame DICOM objects ({max(frames)} frames) are not supported; "
                         "expected one file per slice.")
    orientation = np.stack([_vector(d, "ImageOrientationPatient", 6, what) for d in datasets])
    spacing = np.stack([_vector(d, "PixelSpacing", 2, what) for d in datasets])
    position = np.stack([_vector(d, "ImagePositionPatient", 3, what) for d in datasets])
    if np.abs(orientation - orientation[0]).max() > _COSINE_TOLERANCE:
        raise InputError(f"{what} is not a volume: its slices have different ImageOrientationPatient.")
    if np.abs(spacing - spacing[0]).max() > _SPACING_TOLERANCE_MM:
        raise InputError(f"{what} is not a volume: its slices have different PixelSpacing "
                         f"({sorted({tuple(s) for s in spacing.tolist()})}).")
    sizes = {(int(d.Rows), int(d.Columns)) for d in datasets}
    if len(sizes) > 1:
        raise InputError(f"{what} is not a volume: its slices have different sizes (Rows, Columns) {sorted(sizes)}.")
    row_cosine, column_cosine = orientation[0, :3], orientation[0, 3:]
    normal = np.cross(row_cosine, column_cosine)
    order = np.argsort(position @ normal, kind="stable")
    position = position[order]
    distance = position @ normal
    steps = np.diff(distance)
    if steps.min() <= _SPACING_TOLERANCE_MM:
        raise InputError(f"{what} is not a volume: two slices lie at the same position "
                         f"(along the normal at {distance[np.argmin(steps)]:.4f} mm).")
    step = (position[-1] - position[0]) / (len(position) - 1)
    regular = position[0] + np.arange(len(position))[:, None] * step
    deviation = np.linalg.norm(position - regular, axis=1).max()
    if deviation > _SLICE_STEP_TOLERANCE * np.linalg.norm(step):
        raise InputError(f"{what} is not a volume: its slice positions are not evenly spaced (slice gaps from "
                         f"{steps.min():.4f} to {steps.max():.4f} mm; a missing slice or a mixed series?).")
    lps = np.eye(4)
    lps[:3, 0] = row_cosine * spacing[0, 1]
    lps[:3, 1] = column_cosine * spacing[0, 0]
    lps[:3, 2] = step
    lps[:3, 3] = position[0]
    return order, LPS_TO_RAS @ lps
