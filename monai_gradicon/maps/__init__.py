"""Deformations: identity grids, DDF <-> map conversion, composition, warping, Jacobians."""

from .deformation import Deformation
from .grid import ddf_to_map, grid_sample, identity_grid, map_to_ddf, sample, shared_identity_grid, warp
from .jacobian import fold_count, fold_percentage, jacobian_determinant, map_jacobian_determinant

__all__ = [
    "Deformation",
    "ddf_to_map",
    "identity_grid",
    "shared_identity_grid",
    "map_to_ddf",
    "sample",
    "grid_sample",
    "warp",
    "fold_count",
    "fold_percentage",
    "jacobian_determinant",
    "map_jacobian_determinant",
]
