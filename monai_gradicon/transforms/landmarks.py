"""Landmarks (e.g. DirLab's 300 per case) carried into the preprocessed network grid, for mTRE (paper Sec. 8)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from ..metrics.landmarks import read_landmarks  # the one reader (re-exported here for the bundle configs)

__all__ = ["read_landmarks", "LandmarksToGridd"]


class LandmarksToGridd(MapTransform):
    """Convert fixed/moving landmark voxel indices of the *original* images to 0-based indices of the preprocessed grid.

    Uses the images' ``meta["original_affine"]`` (file index → world) and their current ``affine``
    (after ``Orientationd`` / ``Spacingd`` / crop-pad: grid index → world), so it must run after all spatial
    transforms. Output under ``output_key``: ``(2, N, 3)`` float32 ``[fixed, moving]`` — the ``y`` of
    :class:`~monai_gradicon.engines.LandmarkTREMetric`.

    Args:
        fixed_key: key of the fixed image (a ``MetaTensor`` from ``LoadImaged``).
        moving_key: key of the moving image, same kind.
        fixed_landmarks_key: key of the fixed landmarks (file or array, voxel indices of the fixed file).
        moving_landmarks_key: key of the moving landmarks, same kind, same count.
        output_key: where to store the result.
        one_based: the landmark indices start at 1 (DirLab).
    """

    def __init__(
        self, fixed_key: str = "fixed", moving_key: str = "moving", fixed_landmarks_key: str = "fixed_landmarks",
        moving_landmarks_key: str = "moving_landmarks", output_key: str = "landmarks", one_based: bool = True,
    ) -> None:
        super().__init__([fixed_landmarks_key, moving_landmarks_key])
        self.pairs = ((fixed_key, fixed_landmarks_key), (moving_key, moving_landmarks_key))
        self.output_key = output_key
        self.one_based = bool(one_based)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        converted = []
        for image_key, points_key in self.pairs:
            if points_key not in d:
                raise ValueError(f"LandmarksToGridd: key '{points_key}' missing (keys: {sorted(map(str, d))}).")
            image = d.get(image_key)
            if not isinstance(image, MetaTensor) or "original_affine" not in image.meta:
                raise ValueError(f"LandmarksToGridd: '{image_key}' must be a MetaTensor loaded by LoadImaged (with original_affine).")
            points = read_landmarks(d[points_key], spatial_dims=3) - (1.0 if self.one_based else 0.0)
            file_to_world = np.asarray(image.meta["original_affine"], dtype=np.float64)
            grid_to_world = np.asarray(image.affine, dtype=np.float64)
            homogeneous = np.concatenate([points, np.ones((points.shape[0], 1))], axis=1)
            grid = (np.linalg.inv(grid_to_world) @ file_to_world @ homogeneous.T).T[:, :3]
            converted.append(grid)
        if converted[0].shape != converted[1].shape:
            raise ValueError(f"fixed and moving landmarks differ in count: {converted[0].shape[0]} vs {converted[1].shape[0]}.")
        d[self.output_key] = torch.as_tensor(np.stack(converted), dtype=torch.float32)
        return d
