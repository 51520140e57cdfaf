"""Synthetic 2D vessel trees, a stand-in for the DRIVE retina segmentations of paper Sec. 6.2.

DRIVE cannot be downloaded here, so :func:`vessel_tree` draws a random branching tree (a few trunks
leaving an "optic disc", each bending randomly and splitting into two thinner, shorter children a
few times) and :func:`vessel_pairs` turns trees into registration pairs by warping each with a smooth
random displacement field, so the true deformation is known.
"""

from __future__ import annotations

import math

import torch

from ..maps import warp
from .synthetic import random_smooth_ddf

__all__ = ["vessel_tree", "vessel_pairs"]


def _segments(
    generator: torch.Generator, trunks: int, depth: int, length: float, width: float
) -> list[tuple[float, float, float, float, float]]:
    """Line segments ``(x0, y0, x1, y1, half_width)`` in [0, 1] coordinates of one random tree."""

    def rand(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand(1, generator=generator, dtype=torch.float64))

    segments: list[tuple[float, float, float, float, float]] = []
    root = (rand(0.35, 0.65), rand(0.35, 0.65))
    first = rand(0, 2 * math.pi)
    stack = [(root, first + 2 * math.pi * k / trunks + rand(-0.3, 0.3), length, width, depth) for k in range(trunks)]
    pieces = 4  # a branch is drawn as 4 segments with a random bend between them
    while stack:
        (x, y), angle, branch_length, branch_width, level = stack.pop()
        for _ in range(pieces):
            angle += rand(-0.35, 0.35)
            nx = x + branch_length / pieces * math.cos(angle)
            ny = y + branch_length / pieces * math.sin(angle)
            segments.append((x, y, nx, ny, branch_width))
            x, y = nx, ny
        if level > 1 and 0.0 <= x <= 1.0 and 0.0 <= y <= 1.0:
            for sign in (-1.0, 1.0):
                stack.append(((x, y), angle + sign * rand(0.35, 0.8), branch_length * rand(0.6, 0.8), branch_width * 0.72, level - 1))
    return segments


def vessel_tree(
    size: int,
    generator: torch.Generator | None = None,
    trunks: int = 3,
    depth: int = 4,
    length: float = 0.3,
    width: float | None = None,
) -> torch.Tensor:
    """One random vessel-tree image ``(1, size, size)`` in [0, 1] (1 inside vessels, soft edges).

    Args:
        size: image side in pixels.
        generator: random source (the tree is a deterministic function of its state).
        trunks: number of main vessels leaving the root.
        depth: branch generations (each branch splits in two until ``depth`` is used up).
        length: length of a trunk in [0, 1] units; children are 60–80 % of their parent.
        width: half-width of a trunk in [0, 1] units (default ``1.6`` pixels); children are 72 %.

    Returns:
        The image; vessels are at least about one pixel wide so they survive the sampling grid.
    """
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}.")
    if trunks < 1 or depth < 1:
        raise ValueError(f"trunks and depth must be >= 1, got trunks={trunks}, depth={depth}.")
    g = generator if generator is not None else torch.default_generator
    half_width = width if width is not None else 1.6 / (size - 1)
    segs = torch.tensor(_segments(g, trunks, depth, length, half_width), dtype=torch.float64)
    lin = torch.linspace(0, 1, size, dtype=torch.float64)
    px, py = torch.meshgrid(lin, lin, indexing="ij")
    points = torch.stack([px.flatten(), py.flatten()], 1)  # (N, 2)
    start, end, radius = segs[:, 0:2], segs[:, 2:4], segs[:, 4].clamp_min(0.6 / (size - 1))
    direction = end - start
    t = ((points[:, None] - start[None]) * direction[None]).sum(-1) / (direction * direction).sum(-1).clamp_min(1e-12)
    closest = start[None] + t.clamp(0, 1)[..., None] * direction[None]
    distance = (points[:, None] - closest).norm(dim=-1)  # (N, segments)
    pixel = 1.0 / (size - 1)
    intensity = torch.sigmoid((radius[None] - distance) / (0.35 * pixel)).amax(1)
    return intensity.reshape(1, size, size).float()


def vessel_pairs(
    count: int, size: int, max_displacement: float, seed: int = 0, control_points: int = 4
) -> dict[str, torch.Tensor]:
    """``count`` registration pairs of vessel trees with known ground-truth deformations.

    The fixed image is the moving tree warped by a smooth random field ``u`` (at most
    ``max_displacement`` pixels per component): ``fixed = warp(moving, u)``, so ``u`` is the true
    MONAI DDF of the pair (fixed coordinates → moving coordinates), the field a registration
    network ``net(moving, fixed)`` should predict.

    Args:
        count: number of pairs.
        size: image side in pixels.
        max_displacement: largest displacement component in pixels (keep it below the control-point
            spacing, ``size / (control_points − 1)``, for a fold-free truth).
        seed: seed of the whole set.
        control_points: control lattice of :func:`~monai_gradicon.data.random_smooth_ddf`.

    Returns:
        ``{"moving": (count, 1, S, S), "fixed": (count, 1, S, S), "ddf": (count, 2, S, S)}``.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}.")
    g = torch.Generator().manual_seed(seed)
    moving = torch.stack([vessel_tree(size, g) for _ in range(count)])
    ddf = torch.cat([random_smooth_ddf((size, size), max_displacement, control_points, g) for _ in range(count)])
    fixed = warp(moving, ddf)
    return {"moving": moving, "fixed": fixed, "ddf": ddf}
