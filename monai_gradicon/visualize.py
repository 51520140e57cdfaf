"""Pictures of a registration: checkerboards, deformed grids, and one-file PNG overviews (the one picture module).

Everything here works on 2D slices (``(H, W)`` arrays or tensors); 3D volumes are shown by their
middle slice along the last spatial axis (:func:`middle_slice`). The functions return numpy arrays
in [0, 1] so that they can go to matplotlib, TensorBoard (``add_image``) or a PNG file alike.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "middle_slice",
    "normalize_intensity",
    "checkerboard",
    "grid_image",
    "draw_deformed_grid",
    "overview_image",
    "save_overview_png",
    "save_registration_overview",
]


def _to_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def middle_slice(volume: torch.Tensor | np.ndarray, spatial_dims: int | None = None) -> np.ndarray:
    """A 2D picture of an image or DDF given without batch axis.

    Args:
        volume: ``(C, H, W)``, ``(C, H, W, D)`` or plain ``(H, W)``.
        spatial_dims: 2 or 3; default: ``volume.ndim - 1`` for 3D/4D input, 2 for a plain 2D array.

    Returns:
        ``(C, H, W)`` (the middle slice along the last spatial axis in 3D; for a 3-channel DDF the
        channel of that axis is dropped, keeping the in-plane displacement) or ``(H, W)``.
    """
    array = _to_numpy(volume)
    if array.ndim == 2:
        return array
    dims = spatial_dims if spatial_dims is not None else array.ndim - 1
    if dims not in (2, 3) or array.ndim != dims + 1:
        raise ValueError(f"expected a (C, *spatial) array with 2 or 3 spatial axes, got shape {array.shape}.")
    if dims == 2:
        return array
    sliced = array[..., array.shape[-1] // 2]
    if sliced.shape[0] == 3:  # a DDF: keep the two in-plane components
        sliced = sliced[:2]
    return sliced


def normalize_intensity(image: np.ndarray, percentiles: tuple[float, float] | None = None) -> np.ndarray:
    """Scale ``image`` linearly to [0, 1] (a constant image becomes zeros).

    Args:
        image: array of any shape.
        percentiles: map these two percentiles (e.g. ``(1, 99)``) to 0 and 1 and clip, instead of the
            minimum and maximum (robust to a few very bright voxels).

    Returns:
        array of the same shape in [0, 1] (minimum 0 and maximum 1 without ``percentiles``).
    """
    image = np.asarray(image)
    if image.size == 0:
        return np.zeros_like(image)
    if percentiles is None:
        low, high = float(np.min(image)), float(np.max(image))
    else:
        low, high = (float(v) for v in np.percentile(image, list(percentiles)))
    if high - low < 1e-12:
        return np.zeros_like(image)
    scaled = (image - low) / (high - low)
    return scaled if percentiles is None else np.clip(scaled, 0.0, 1.0)


def checkerboard(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, tiles: int = 8) -> np.ndarray:
    """Interleave two same-shape 2D images in a ``tiles × tiles`` checkerboard.

    Args:
        a: ``(H, W)`` image shown on the "white" tiles.
        b: ``(H, W)`` image shown on the "black" tiles.
        tiles: number of tiles along each axis (>= 1).

    Returns:
        ``(H, W)`` array.
    """
    a, b = _to_numpy(a), _to_numpy(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"checkerboard needs two 2D images of the same shape, got {a.shape} and {b.shape}.")
    if tiles < 1:
        raise ValueError(f"tiles must be >= 1, got {tiles}.")
    rows = (np.arange(a.shape[0]) * tiles // a.shape[0])[:, None]
    cols = (np.arange(a.shape[1]) * tiles // a.shape[1])[None, :]
    return np.where((rows + cols) % 2 == 0, a, b)


def grid_image(ddf: np.ndarray | torch.Tensor, spacing: int = 8, thickness: float = 2.0) -> np.ndarray:
    """Render the deformation of a regular grid by a 2D DDF (MONAI convention, voxel units).

    The picture is the fixed-image grid: pixel ``x`` is dark when the point ``x + ddf(x)`` it is mapped
    to lies on a grid line of the moving image, so the lines show how the moving grid looks after
    warping (``Warp()(grid, ddf)``).

    Args:
        ddf: ``(2, H, W)`` displacement in voxels (channel i along axis i).
        spacing: grid line spacing in pixels.
        thickness: line thickness in pixels (a pixel is on a line when its mapped point is closer
            than ``thickness / 2`` to it).

    Returns:
        ``(H, W)`` array in [0, 1] (1 = background, 0 = line).
    """
    d = _to_numpy(ddf)
    if d.ndim != 3 or d.shape[0] != 2:
        raise ValueError(f"grid_image needs a 2D DDF of shape (2, H, W), got {d.shape}.")
    if spacing < 2 or thickness <= 0:
        raise ValueError(f"spacing must be >= 2 and thickness >= 1, got {spacing} and {thickness}.")
    rows, cols = np.meshgrid(np.arange(d.shape[1]), np.arange(d.shape[2]), indexing="ij")
    pr, pc = rows + d[0], cols + d[1]
    half = spacing / 2.0
    distance_r = np.abs(np.mod(pr + half, spacing) - half)  # distance to the nearest grid line
    distance_c = np.abs(np.mod(pc + half, spacing) - half)
    on_line = (distance_r < thickness / 2.0) | (distance_c < thickness / 2.0)
    return np.where(on_line, 0.0, 1.0).astype(np.float32)


def draw_deformed_grid(axis, coordinates: Sequence[np.ndarray], levels: Sequence[np.ndarray] | np.ndarray, color: str = "k", linewidth: float = 0.8) -> None:
    """Draw a deformed grid on a matplotlib axis as contour lines of mapped coordinates.

    Each ``coordinates[k]`` is a 2D array giving, at every pixel ``x`` of the picture, coordinate ``k``
    of the point ``T(x)`` it maps to (voxels or mm); its level lines are the lines of the target grid
    seen through ``T``. Components that are constant on the slice draw nothing.

    Args:
        axis: a matplotlib ``Axes``.
        coordinates: 2D arrays ``(H, W)``, one per drawn component, shown as ``imshow`` shows them.
        levels: the contour levels, one array for all components or one per component.
        color: line colour.
        linewidth: line width.

    Returns:
        None (draws on ``axis``).
    """
    per_component = isinstance(levels, (list, tuple))
    for k, values in enumerate(coordinates):
        values = np.asarray(values)
        if np.ptp(values) <= 0:
            continue
        axis.contour(values, levels=levels[k] if per_component else levels, colors=color, linewidths=linewidth)


def overview_image(
    moving: np.ndarray | torch.Tensor,
    fixed: np.ndarray | torch.Tensor,
    warped: np.ndarray | torch.Tensor,
    ddf: np.ndarray | torch.Tensor,
    tiles: int = 8,
) -> np.ndarray:
    """One grey picture ``(H, 5W)``: fixed | moving | warped moving | checkerboard(warped, fixed) | grid.

    Args:
        moving: moving image ``(C, *spatial)`` or ``(H, W)`` (3D: middle slice; first channel shown).
        fixed: fixed image, same form.
        warped: warped moving image, same form.
        ddf: ``(D, *spatial)`` DDF of ``warped = Warp()(moving, ddf)``.
        tiles: checkerboard tiles per axis.

    Returns:
        ``(H, 5W)`` array in [0, 1].
    """
    panels = []
    for image in (fixed, moving, warped):
        sliced = middle_slice(image)
        panels.append(normalize_intensity(sliced[0] if sliced.ndim == 3 else sliced))
    panels.append(checkerboard(panels[2], panels[0], tiles))
    flow = middle_slice(ddf)
    panels.append(grid_image(flow, spacing=max(4, min(flow.shape[1:]) // 8)))
    return np.concatenate(panels, axis=1)


def save_overview_png(
    path: str,
    moving: np.ndarray | torch.Tensor,
    fixed: np.ndarray | torch.Tensor,
    warped: np.ndarray | torch.Tensor,
    ddf: np.ndarray | torch.Tensor,
    title: str | None = None,
    tiles: int = 8,
) -> str:
    """Write :func:`overview_image` as a labelled PNG with matplotlib (Agg backend); returns ``path``.

    The fifth panel draws the deformed grid as contour lines of ``x + ddf(x)`` (smoother than the
    raster of :func:`grid_image`).

    Args:
        path: output PNG file (its folder must exist).
        moving: moving image ``(C, *spatial)`` or ``(H, W)`` (3D: middle slice).
        fixed: fixed image, same form.
        warped: warped moving image, same form.
        ddf: ``(D, *spatial)`` DDF of ``warped = Warp()(moving, ddf)``, voxel units.
        title: optional figure title.
        tiles: checkerboard tiles per axis.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picture = overview_image(moving, fixed, warped, ddf, tiles)
    width = picture.shape[1] // 5
    labels: Sequence[str] = ("fixed", "moving", "warped moving", "checkerboard warped/fixed", "deformed grid")
    fig, axes = plt.subplots(1, 5, figsize=(15, 3.4))
    for k, axis in enumerate(axes[:4]):
        axis.imshow(picture[:, k * width : (k + 1) * width], cmap="gray", vmin=0, vmax=1)
    # deformed grid as contour lines of the map x + ddf(x) (smooth at any deformation)
    flow = middle_slice(ddf)
    rows, cols = np.meshgrid(np.arange(flow.shape[1]), np.arange(flow.shape[2]), indexing="ij")
    spacing = max(4, min(flow.shape[1:]) // 8)
    axes[4].imshow(np.ones(flow.shape[1:]), cmap="gray", vmin=0, vmax=1)
    draw_deformed_grid(axes[4], (rows + flow[0], cols + flow[1]), np.arange(0, max(flow.shape[1:]) + spacing, spacing))
    for k, axis in enumerate(axes):
        axis.set_title(labels[k], fontsize=9)
        axis.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    from .io import apply_affine

    return apply_affine(affine, points)


def save_registration_overview(fixed, direction, path: str | os.PathLike, grid_lines: int = 12) -> str:
    """Write the overview of a forward registration: fixed | warped moving | checkerboard | deformed grid.

    Panels from :func:`checkerboard` and :func:`draw_deformed_grid` (the deformed grid: contour lines of
    the moving-image coordinates ``T(x)`` in mm over the fixed slice; straight, evenly spaced lines when
    nothing moves), intensities by :func:`normalize_intensity` with the 1st/99th percentiles; in 3D one
    row per index axis (its middle slice), in 2D one row. What ``register --overview`` writes.

    Args:
        fixed: the fixed image, a :class:`monai_gradicon.io.PhysicalImage` (grid, affine and intensities).
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
        mm = _apply_affine(fixed.affine, index) + np.moveaxis(direction.displacement, 0, -1)[
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
