"""Apply and inspect ITK transform files: ``warp`` an image with a transform, ``jacobian`` map of a transform.

The files are those ``register`` writes (``transform.h5`` / ``inverse_transform.h5``: one ITK
``DisplacementFieldTransform`` in LPS mm) or any file ``itk.transformread`` reads, including a
composite such as the ``unigradicon-register`` output (``[affine, displacement, affine]``). A transform
maps fixed-grid points to moving-image points (ITK's convention), so ``warped(x) = moving(T(x))``.

* :func:`warp_image` resamples with ``itk.resample_image_filter`` onto the fixed grid, as the authors'
  ``unigradicon-warp`` does (same filters, so equal outputs by construction); label maps warped with
  nearest neighbour keep their pixel type (cast to double and back where ITK's interpolators are not
  wrapped for the type).
* :func:`jacobian_map` samples the transform on the fixed grid with
  ``itk.transform_to_displacement_field_filter`` (as the authors do) and takes ``det(∂T/∂p)`` in
  physical space: ``∂T/∂p = I + (∂u/∂s) Dᵀ`` with ``s`` the mm coordinate along each grid axis (central
  differences inside, one-sided differences on the border voxels) and ``D`` the grid's LPS direction
  matrix. The authors' ``unigradicon-jacobian`` uses ITK's ``DisplacementFieldJacobianDeterminantFilter``,
  which omits ``Dᵀ`` (it differentiates along the grid axes as if they were the LPS axes) and takes half
  the one-sided difference on the border (zero-flux Neumann): it is right only inside a grid whose LPS
  direction is the identity; for a plain RAS NIfTI (direction ``diag(−1, −1, 1)``) it reports
  ``(1−a)²(1+a)`` for a uniform expansion ``(1+a)³``. Inside an identity-direction grid the two agree to
  float32 rounding.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from .errors import InputError

__all__ = ["warp_image", "jacobian_map"]


def _itk():
    import itk

    return itk


def _read_image(path: str, name: str):
    itk = _itk()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{name} image {path!r} does not exist.")
    try:
        return itk.imread(path)
    except Exception as error:  # ITK raises RuntimeError/TypeError for unreadable files
        raise InputError(f"{name} image {path!r} is not readable by ITK: {' '.join(str(error).split())[:200]}") from error


def _read_transform(path: str, dims: int):
    """The first transform of an ITK transform file (a composite stays one transform), checked against ``dims``."""
    itk = _itk()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"transform file {path!r} does not exist.")
    try:
        transforms = itk.transformread(path)
    except Exception as error:
        raise InputError(
            f"{path!r} is not an ITK transform file (expected .h5/.hdf5/.tfm/.txt/.mat as written by "
            f"'monai-gradicon register' or itk.transformwrite)."
        ) from error
    if len(transforms) == 0:
        raise InputError(f"transform file {path!r} holds no transform.")
    transform = transforms[0]
    in_dims, out_dims = int(transform.GetInputSpaceDimension()), int(transform.GetOutputSpaceDimension())
    if in_dims != dims or out_dims != dims:
        raise InputError(
            f"transform {path!r} ({transform.GetNameOfClass()}) is {in_dims}D -> {out_dims}D but the fixed image is {dims}D."
        )
    return transform


def _to_interpolable(image, nearest: bool):
    """``(image, cast_back)``: an image type ITK's interpolators accept (double where needed) and the cast back."""
    itk = _itk()
    dims = image.GetImageDimension()
    interpolator = itk.NearestNeighborInterpolateImageFunction if nearest else itk.LinearInterpolateImageFunction
    if str((type(image), itk.D)) in interpolator.GetTypesAsList():
        return image, lambda x: x
    array = itk.array_view_from_image(image)
    if array.dtype.itemsize == 8 and array.dtype.kind in "iu" and array.size and np.abs(array).max() > 2**53:
        raise InputError("the moving image has 64-bit integer values that a double cannot represent exactly.")
    double = itk.Image[itk.D, dims]
    cast_back = itk.CastImageFilter[double, type(image)].New()
    return itk.CastImageFilter[type(image), double].New()(image), cast_back


def warp_image(moving: str, fixed: str, out: str, transform: str | None = None, nearest: bool = False) -> str:
    """Resample ``moving`` onto the fixed grid through a transform file: ``warped(x) = moving(T(x))``.

    Args:
        moving: the moving image (any format ITK reads; label maps keep their pixel type).
        fixed: the fixed image; the output has its grid and header (origin, spacing, direction).
        out: output image path (format from the extension, e.g. ``.nii.gz``).
        transform: an ITK transform file mapping fixed points to moving points (``transform.h5`` of
            ``register``, or any ``itk.transformread`` file, composite included); ``None``: the identity,
            i.e. a plain resample onto the fixed grid.
        nearest: nearest-neighbour interpolation (label maps: no new label values) instead of linear.

    Returns:
        the path written. Points mapped outside the moving image get 0.

    Raises:
        InputError: a missing or unreadable image or transform file, or a transform of another dimension.
    """
    itk = _itk()
    fixed_image = _read_image(fixed, "fixed")
    moving_image = _read_image(moving, "moving")
    dims = fixed_image.GetImageDimension()
    if moving_image.GetImageDimension() != dims:
        raise InputError(f"moving image is {moving_image.GetImageDimension()}D but the fixed image is {dims}D.")
    if moving_image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"moving image {os.fspath(moving)!r} has {moving_image.GetNumberOfComponentsPerPixel()} components per pixel; warp scalar images.")
    phi = itk.IdentityTransform[itk.D, dims].New() if transform is None else _read_transform(transform, dims)
    image, cast_back = _to_interpolable(moving_image, nearest)
    function = itk.NearestNeighborInterpolateImageFunction if nearest else itk.LinearInterpolateImageFunction
    warped = itk.resample_image_filter(
        image, transform=phi, interpolator=function.New(image), use_reference_image=True, reference_image=fixed_image
    )
    warped = cast_back(warped)
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(out))), exist_ok=True)
    itk.imwrite(warped, os.fspath(out))
    return os.fspath(out)


def _axis_derivative(u: np.ndarray, axis: int, spacing: float) -> np.ndarray:
    """Central difference along ``axis`` in mm, one-sided on the border voxels (``np.gradient``)."""
    if u.shape[axis] < 2:
        raise InputError(f"the fixed grid has a single voxel along axis {axis}; a Jacobian needs at least 2.")
    return np.gradient(u, spacing, axis=axis)


def physical_jacobian_determinant(displacement_lps: np.ndarray, spacing: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """``det(I + (∂u/∂s) Dᵀ)`` of a displacement ``(*S, D)`` in LPS mm on a grid indexed ``(i, j, k)``.

    Args:
        displacement_lps: displacement vectors in LPS mm, array axes in grid-index order ``(i, j[, k])``.
        spacing: grid spacing per index axis (mm).
        direction: the grid's LPS direction matrix (columns: index axes).

    Returns:
        the determinant on the grid (float64), ``(*S)``.
    """
    u = np.asarray(displacement_lps, np.float64)
    dims = u.shape[-1]
    gradient = np.stack([_axis_derivative(u, a, float(spacing[a])) for a in range(dims)], axis=-1)  # (*S, comp, axis)
    jacobian = np.eye(dims) + gradient @ np.asarray(direction, np.float64).T
    return np.linalg.det(jacobian)


def jacobian_map(transform: str, fixed: str, out: str, log: bool = False) -> dict:
    """Jacobian determinant map of a transform file on the fixed grid, with its fold count.

    Args:
        transform: an ITK transform file (displacement field, affine or composite), fixed -> moving points.
        fixed: the fixed image whose grid the map is sampled on; the output has its header.
        out: output image (float32, e.g. ``.nii.gz``).
        log: write ``log(det)`` instead; voxels with ``det <= 0`` (folds) are written as NaN and counted
            (a warning says how many).

    Returns:
        ``{"path", "voxels", "folds" (det <= 0), "folds_percent", "min", "max", "mean", "log",
        "nonpositive_log_voxels"}``.

    Raises:
        InputError: a missing or unreadable file, or a transform of another dimension than the fixed image.
    """
    itk = _itk()
    fixed_image = _read_image(fixed, "fixed")
    dims = fixed_image.GetImageDimension()
    phi = _read_transform(transform, dims)
    field = itk.transform_to_displacement_field_filter(phi, reference_image=fixed_image, use_reference_image=True)
    array = itk.array_from_image(field)  # (k, j, i, D) LPS mm
    displacement = np.transpose(array, tuple(reversed(range(dims))) + (dims,))
    spacing = np.asarray(fixed_image.GetSpacing(), np.float64)
    direction = np.asarray(itk.array_from_matrix(fixed_image.GetDirection()), np.float64)
    det = physical_jacobian_determinant(displacement, spacing, direction)
    folds = int(np.count_nonzero(det <= 0))
    nonpositive = folds if log else 0
    values = det
    if log:
        values = np.full(det.shape, np.nan)
        positive = det > 0
        values[positive] = np.log(det[positive])
        if nonpositive:
            warnings.warn(f"log Jacobian: {nonpositive} voxel(s) with det <= 0 (folds) written as NaN.", stacklevel=2)
    image = itk.image_from_array(np.ascontiguousarray(np.transpose(values, tuple(reversed(range(dims)))).astype(np.float32)))
    image.SetOrigin(fixed_image.GetOrigin())
    image.SetSpacing(fixed_image.GetSpacing())
    image.SetDirection(fixed_image.GetDirection())
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(out))), exist_ok=True)
    itk.imwrite(image, os.fspath(out))
    return {
        "path": os.fspath(out),
        "voxels": int(det.size),
        "folds": folds,
        "folds_percent": 100.0 * folds / det.size,
        "min": float(det.min()),
        "max": float(det.max()),
        "mean": float(det.mean()),
        "log": bool(log),
        "nonpositive_log_voxels": nonpositive,
    }
