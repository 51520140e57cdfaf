"""Read an image file with its position in space, and write NIfTI files with a given header.

Reading goes through MONAI's ``LoadImage`` (NIfTI through nibabel, and every other format MONAI
reads: ``.mha``/``.nrrd`` through ITK when installed, PNG, DICOM series...). The voxel array keeps
the order it has in the file (no reorientation); the affine maps voxel indices to RAS millimetres.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch

__all__ = ["PhysicalImage", "ImageReadError", "load_image", "save_nifti", "output_affine"]


class ImageReadError(ValueError):
    """An input file is missing, unreadable, of the wrong dimensionality, or holds non-finite values."""


@dataclass
class PhysicalImage:
    """A single-channel image and where it lies in space.

    Args:
        array: ``(1, *spatial)`` float32 tensor, axes in file (voxel index) order.
        affine: ``(D+1, D+1)`` float64 voxel-index-to-RAS-millimetre matrix.
        path: the file it was read from (for messages).
    """

    array: torch.Tensor
    affine: np.ndarray
    path: str = ""

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.array.shape[1:])

    @property
    def spatial_dims(self) -> int:
        return self.array.ndim - 1

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each index axis."""
        dims = self.spatial_dims
        return np.linalg.norm(self.affine[:dims, :dims], axis=0)


def load_image(path: str | os.PathLike, name: str = "image", spatial_dims: int | None = None) -> PhysicalImage:
    """Read ``path`` as a single-channel image with its RAS affine.

    Args:
        path: any file (or DICOM folder) MONAI's ``LoadImage`` reads.
        name: what the file is (``"moving image"``...), used in error messages.
        spatial_dims: if given, the number of spatial axes the image must have.

    Returns:
        the :class:`PhysicalImage` (``(1, *spatial)`` float32 array in file index order, RAS affine, path).

    Raises:
        ImageReadError: missing or unreadable file, more than one channel, wrong number of spatial
            axes, NaN/inf voxels.
    """
    from monai.transforms import LoadImage

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageReadError(f"{name} file not found: {path!r}.")
    try:
        image = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)(path)
    except Exception as error:  # every reader raises its own type; report them all the same way
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ImageReadError(f"could not read {name} {path!r} as an image ({first_line[:200]}).") from None
    array = torch.as_tensor(np.asarray(image), dtype=torch.float32)
    if array.shape[0] != 1:
        raise ImageReadError(f"{name} {path!r} must have one channel, got {array.shape[0]} channels (shape {tuple(array.shape)}).")
    dims = array.ndim - 1
    if spatial_dims is not None and dims != spatial_dims:
        raise ImageReadError(
            f"{name} {path!r} is a {dims}D image of shape {tuple(array.shape[1:])}, but a {spatial_dims}D image is expected."
        )
    if not torch.isfinite(array).all():
        bad = int((~torch.isfinite(array)).sum())
        raise ImageReadError(f"{name} {path!r} holds {bad} NaN/inf voxel(s); only finite values can be registered.")
    affine = np.asarray(image.affine, dtype=np.float64)
    if affine.shape != (dims + 1, dims + 1):  # MONAI keeps a 4x4 affine for 2D NIfTI files
        affine = _reduce_affine(affine, dims)
    return PhysicalImage(array=array, affine=affine, path=path)


def _reduce_affine(affine: np.ndarray, dims: int) -> np.ndarray:
    out = np.eye(dims + 1)
    out[:dims, :dims] = affine[:dims, :dims]
    out[:dims, dims] = affine[:dims, -1]
    return out


def output_affine(affine: np.ndarray) -> np.ndarray:
    """A 4x4 NIfTI affine for a 2D or 3D ``(D+1, D+1)`` affine (2D images get a unit third axis).

    Args:
        affine: ``(3, 3)`` or ``(4, 4)`` voxel index -> RAS mm matrix.

    Returns:
        ``(4, 4)`` float64 matrix (the input itself when already 4x4).
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape == (4, 4):
        return affine
    dims = affine.shape[0] - 1
    out = np.eye(4)
    out[:dims, :dims] = affine[:dims, :dims]
    out[:dims, 3] = affine[:dims, dims]
    return out


def save_nifti(
    array: np.ndarray | torch.Tensor,
    affine: np.ndarray,
    path: str | os.PathLike,
    dtype: type | np.dtype = np.float32,
    intent: int | str | None = None,
) -> str:
    """Write ``array`` (spatial axes first, optional trailing vector axes) as NIfTI with ``affine``.

    Args:
        array: ``(*spatial)`` scalar image or ``(*spatial, 1, D)`` vector image (NIfTI's 5D layout).
        affine: the RAS voxel-to-world matrix of the grid (2D or 3D).
        path: ``.nii`` or ``.nii.gz``.
        dtype: stored data type.
        intent: NIfTI intent code or name, e.g. ``1006`` (``NIFTI_INTENT_DISPVECT``).

    Returns:
        the path written.
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), output_affine(affine))
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_qform(output_affine(affine), code=1)
    image.header.set_sform(output_affine(affine), code=1)
    if intent is not None:
        image.header.set_intent(intent)
    nib.save(image, os.fspath(path))
    return os.fspath(path)
