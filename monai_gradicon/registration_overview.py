"""A PNG overview of one registration: fixed, warped moving, checkerboard, deformed grid.

Three rows show the middle slice across each index axis of the fixed image. The deformed grid is
drawn as contour lines of the moving-image coordinates ``T(x)`` (in mm) over the fixed slice: with no
deformation they are straight, evenly spaced lines.
"""

from __future__ import annotations

import os

import numpy as np

from .io import PhysicalImage, apply_affine
from .visualize import checkerboard, draw_deformed_grid, normalize_intensity

__all__ = ["save_overview", "checkerboard"]  # checkerboard: re-exported from monai_gradicon.visualize


def save_overview(fixed: PhysicalImage, direction, path: str | os.PathLike, grid_lines: int = 12) -> str:
    """Write the overview of a forward registration: fixed | warped moving | checkerboard | deformed grid.

    The panels come from :mod:`monai_gradicon.visualize` (:func:`~monai_gradicon.visualize.checkerboard`,
    :func:`~monai_gradicon.visualize.draw_deformed_grid`, intensities by
    :func:`~monai_gradicon.visualize.normalize_intensity` with the 1st/99th percentiles); in 3D one row
    per index axis (its middle slice), in 2D one row.

    Args:
        fixed: the fixed image (grid, affine and intensities).
        direction: the forward outputs on the fixed grid: ``.displacement`` ``(D, *S)`` in RAS mm and
            ``.warped`` ``(*S)`` (the moving image resampled on the fixed grid).
        path: the PNG file to write.
        grid_lines: contour lines per component of the deformed grid.

    Returns:
        the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed_array = fixed.array[0].numpy()
    shape = fixed_array.shape
    dims = len(shape)
    views = range(dims) if dims == 3 else [None]
    fig, axes = plt.subplots(len(views), 4, figsize=(12, 3 * len(views)), squeeze=False)
    for row, axis in enumerate(views):
        take = (lambda a: np.take(a, shape[axis] // 2, axis=axis)) if axis is not None else (lambda a: a)
        f = normalize_intensity(take(fixed_array), percentiles=(1, 99))
        w = normalize_intensity(take(direction.warped), percentiles=(1, 99))
        axes_index = [np.arange(n, dtype=np.float64) for n in shape]
        if axis is not None:
            axes_index[axis] = np.array([shape[axis] // 2], dtype=np.float64)
        index = np.stack(np.meshgrid(*axes_index, indexing="ij"), axis=-1)
        mm = apply_affine(fixed.affine, index) + np.moveaxis(direction.displacement, 0, -1)[
            tuple(slice(shape[axis] // 2, shape[axis] // 2 + 1) if k == axis else slice(None) for k in range(dims))
        ]
        mm = mm.squeeze(axis) if axis is not None else mm
        panels = [(f, "fixed"), (w, "warped moving"), (checkerboard(f, w), "checkerboard")]
        for col, (img, title) in enumerate(panels):
            axes[row, col].imshow(img.T, cmap="gray", origin="lower")
            axes[row, col].set_title(title if axis is None else f"{title} (axis {axis} mid)")
        ax = axes[row, 3]
        ax.imshow(f.T, cmap="gray", origin="lower", alpha=0.5)
        components = [mm[..., k].T for k in range(dims)]
        levels = [np.linspace(c.min(), c.max(), grid_lines) for c in components]
        draw_deformed_grid(ax, components, levels, color="r", linewidth=0.5)
        ax.set_title("deformed grid (moving mm)")
        for a in axes[row]:
            a.set_axis_off()
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=80)
    plt.close(fig)
    return os.fspath(path)
