"""Registration metrics: landmark TRE in mm, Dice of warped labels (MONAI ``compute_dice``).

Folds (negative Jacobian determinants) come from :func:`monai_gradicon.maps.fold_count`.
"""

from .dice import label_dice, mean_label_dice
from .landmarks import (
    PhysicalDisplacementField,
    landmark_distances,
    landmarks_to_physical,
    read_landmarks,
    target_registration_error,
    tre_summary,
)

__all__ = [
    "read_landmarks",
    "landmarks_to_physical",
    "PhysicalDisplacementField",
    "landmark_distances",
    "target_registration_error",
    "tre_summary",
    "label_dice",
    "mean_label_dice",
]
