"""Write and read displacement fields in millimetres: NIfTI vector images and ITK transform files.

A displacement field ``u`` sampled on the voxels ``x`` of a grid (the fixed image's) says where each
voxel's point goes: ``T(x) = x + u(x)``, both in mm. ``T`` maps fixed-image points to moving-image
points, which is what a resampler needs (``warped(x) = moving(T(x))``) and what ITK calls the
transform of a registration.

* NIfTI (``write_displacement_nifti``): 5D ``(X, Y, Z, 1, 3)`` float32, intent ``NIFTI_INTENT_DISPVECT``
  (1006), vectors in **RAS** mm as the NIfTI standard defines them; nibabel reads them as stored, and
  ITK/SimpleITK (>= 5.3) flip them to LPS on reading, so every tool gets its own convention.
* ITK (``write_itk_displacement_transform``): an HDF5 transform file holding one
  ``DisplacementFieldTransform_double_D_D`` with the field in **LPS** mm on the grid's ITK geometry;
  ``itk.transformread``, ``SimpleITK.ReadTransform`` and 3D Slicer read it. It is written with ``h5py``
  in ITK's own layout (``/TransformGroup/0/{TransformType, TransformFixedParameters, TransformParameters}``).
"""

from __future__ import annotations

import os

import numpy as np

from .geometry import itk_geometry, ras_to_lps_matrix
from .image import save_nifti

__all__ = [
    "write_displacement_nifti",
    "read_displacement_nifti",
    "write_itk_displacement_transform",
    "read_itk_displacement_transform",
]


def _check_field(displacement_ras: np.ndarray) -> int:
    dims = displacement_ras.shape[0]
    if dims not in (2, 3) or displacement_ras.ndim != dims + 1:
        raise ValueError(f"displacement must be (D, *spatial) with D in (2, 3) spatial axes, got {displacement_ras.shape}.")
    return dims


def write_displacement_nifti(displacement_ras: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> str:
    """Write a displacement ``(D, *spatial)`` in RAS mm, sampled on the grid of ``affine``, as a NIfTI vector image.

    Args:
        displacement_ras: ``(D, *spatial)`` displacement ``u(x) = T(x) − x`` in RAS mm.
        affine: ``(D+1, D+1)`` voxel index -> RAS mm matrix of the grid it is sampled on.
        path: output ``.nii``/``.nii.gz`` file (intent ``DISPVECT``, vectors in dimension 5).

    Returns:
        the path written.
    """
    dims = _check_field(displacement_ras)
    vectors = np.moveaxis(np.asarray(displacement_ras, dtype=np.float32), 0, -1)  # (*spatial, D)
    if dims == 2:
        # NIfTI vectors live in dimension 5 and are 3-component for a DISPVECT; a 2D field gets z = 0.
        vectors = np.concatenate([vectors, np.zeros_like(vectors[..., :1])], axis=-1)[:, :, None]
    return save_nifti(vectors[..., None, :], affine, path, intent=1006)


def read_displacement_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a file written by :func:`write_displacement_nifti`.

    Args:
        path: the NIfTI displacement file.

    Returns:
        ``(displacement (D, *spatial) in RAS mm, (D+1, D+1) RAS affine)``.

    Raises:
        ValueError: the file is not a ``(X, Y, Z, 1, D)`` vector image.
    """
    import nibabel as nib

    image = nib.load(os.fspath(path))
    data = np.asarray(image.dataobj, dtype=np.float64)
    if data.ndim != 5 or data.shape[3] != 1:
        raise ValueError(f"{os.fspath(path)!r} is not a NIfTI displacement field (X, Y, Z, 1, D); got shape {data.shape}.")
    vectors = data[:, :, :, 0, :]
    affine = np.asarray(image.affine, dtype=np.float64)
    if vectors.shape[2] == 1 and np.allclose(vectors[..., 2], 0):  # a 2D field
        out = np.eye(3)
        out[:2, :2], out[:2, 2] = affine[:2, :2], affine[:2, 3]
        return np.moveaxis(vectors[:, :, 0, :2], -1, 0), out
    return np.moveaxis(vectors, -1, 0), affine


def write_itk_displacement_transform(displacement_ras: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> str:
    """Write an ITK HDF5 transform file (``.h5``/``.hdf5``) with one displacement-field transform.

    Args:
        displacement_ras: ``(D, *spatial)`` displacement in RAS mm on the voxels of the grid of ``affine``.
        affine: RAS voxel-to-world matrix of that grid (the fixed image's for the forward transform).
        path: output file.

    Returns:
        the path written.
    """
    import h5py

    dims = _check_field(displacement_ras)
    spatial_shape = displacement_ras.shape[1:]
    geometry = itk_geometry(affine, spatial_shape)
    lps = np.tensordot(ras_to_lps_matrix(dims), np.asarray(displacement_ras, np.float64), axes=(1, 0))
    # ITK buffers are x-fastest with interleaved vector components: (n_k, n_j, n_i, D) in C order.
    parameters = np.moveaxis(lps, 0, -1).transpose(*reversed(range(dims)), dims).reshape(-1)
    fixed = np.concatenate(
        [np.asarray(geometry.size, np.float64), geometry.origin, geometry.spacing, geometry.direction.reshape(-1)]
    )
    strings = h5py.string_dtype(encoding="ascii")
    with h5py.File(os.fspath(path), "w") as f:
        f.create_dataset("HDFVersion", data=np.array([f"HDF5 library version: {h5py.version.hdf5_version}"], dtype=strings))
        f.create_dataset("ITKVersion", data=np.array(["5.4.0"], dtype=strings))
        f.create_dataset("OSName", data=np.array(["Linux"], dtype=strings))
        f.create_dataset("OSVersion", data=np.array(["monai-gradicon"], dtype=strings))
        group = f.create_group("TransformGroup/0")
        group.create_dataset("TransformType", data=np.array([f"DisplacementFieldTransform_double_{dims}_{dims}"], dtype=strings))
        group.create_dataset("TransformFixedParameters", data=fixed)
        group.create_dataset("TransformParameters", data=parameters)
    return os.fspath(path)


def read_itk_displacement_transform(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a file written by :func:`write_itk_displacement_transform`.

    Args:
        path: the ITK ``.h5`` transform file.

    Returns:
        ``(displacement (D, *spatial) in RAS mm, (D+1, D+1) RAS affine)``.

    Raises:
        ValueError: the file holds another kind of transform.
    """
    import h5py

    with h5py.File(os.fspath(path), "r") as f:
        kind = f["TransformGroup/0/TransformType"][0]
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        if not kind.startswith("DisplacementFieldTransform"):
            raise ValueError(f"{os.fspath(path)!r} holds a {kind}, not a displacement field transform.")
        fixed = np.asarray(f["TransformGroup/0/TransformFixedParameters"], np.float64)
        parameters = np.asarray(f["TransformGroup/0/TransformParameters"], np.float64)
    dims = int(kind.rsplit("_", 1)[-1])
    size = tuple(int(n) for n in fixed[:dims])
    origin, spacing = fixed[dims : 2 * dims], fixed[2 * dims : 3 * dims]
    direction = fixed[3 * dims :].reshape(dims, dims)
    flip = ras_to_lps_matrix(dims)
    lps = parameters.reshape(*reversed(size), dims).transpose(*reversed(range(dims)), dims)
    displacement = np.tensordot(flip, np.moveaxis(lps, -1, 0), axes=(1, 0))
    affine = np.eye(dims + 1)
    affine[:dims, :dims] = flip @ direction @ np.diag(spacing)
    affine[:dims, dims] = flip @ origin
    return displacement, affine
