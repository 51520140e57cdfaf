"""Files in physical space: images with their affine, displacement fields in mm, ITK transform files."""

from .displacement import (
    read_displacement_nifti,
    read_itk_displacement_transform,
    write_displacement_nifti,
    write_itk_displacement_transform,
)
from .geometry import ItkGeometry, apply_affine, itk_geometry, ras_to_lps_matrix, sample_at_voxel_indices
from .image import ImageReadError, PhysicalImage, load_image, output_affine, save_nifti

__all__ = [
    "PhysicalImage",
    "ImageReadError",
    "load_image",
    "save_nifti",
    "output_affine",
    "write_displacement_nifti",
    "read_displacement_nifti",
    "write_itk_displacement_transform",
    "read_itk_displacement_transform",
    "ItkGeometry",
    "itk_geometry",
    "apply_affine",
    "ras_to_lps_matrix",
    "sample_at_voxel_indices",
]
