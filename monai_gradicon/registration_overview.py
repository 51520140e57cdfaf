"""A PNG overview of one registration: fixed, warped moving, checkerboard, deformed grid.

Three rows show the middle slice across each index axis of the fixed image. The deformed grid is
drawn as contour lines of the moving-image coordinates ``T(x)`` (in mm) over the fixed slice: with no
deformation they are straight, evenly spaced lines.
"""

from __future__ import annotations

import os

import numpy as np

from .io import PhysicalImage, apply_affine

__all__ = ["save_overview", "checkerboard"]


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """Alternate square tiles of two same-shape 2D arrays."""
    if a.shape != b.shape:
        raise ValueError(f"checkerboard needs two arrays of the same shape, got {a.shape} and {b.shape}.")
    rows = (np.arange(a.shape[0]) * tiles // max(1, a.shape[0]))[:, None]
    cols = (np.arange(a.shape[1]) * tiles // max(1, a.shape[1]))[None, :]
    return np.where((rows + cols) % 2 == 0, a, b)


def _normalise(x: np.ndarray) -> np.ndarray:
    low, high = np.percentile(x, [1, 99]) if x.size else (0.0, 1.0)
    return np.clip((x - low) / (high - low if high > low else 1.0), 0, 1)


def save_overview(fixed: PhysicalImage, direction, path: str | os.PathLike, grid_lines: int = 12) -> str:
    """Write the overview of a forward registration (``direction``: displacement and warped image on the fixed grid).

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
        f, w = _normalise(take(fixed_array)), _normalise(take(direction.warped))
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
        for k in range(dims):
            values = mm[..., k]
            if np.ptp(values) > 0:
                ax.contour(values.T, levels=np.linspace(values.min(), values.max(), grid_lines), colors="r", linewidths=0.5)
        ax.set_title("deformed grid (moving mm)")
        for a in axes[row]:
            a.set_axis_off()
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=80)
    plt.close(fig)
    return os.fspath(path)
