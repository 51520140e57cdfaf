"""Synthetic pair data (the embedded default, no downloads)."""

from .synthetic import SyntheticPairDataset, phantom, random_smooth_ddf, triangles_and_circles

__all__ = ["SyntheticPairDataset", "phantom", "random_smooth_ddf", "triangles_and_circles"]
