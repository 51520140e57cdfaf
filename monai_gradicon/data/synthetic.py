"""Synthetic registration pairs generated on the fly: nothing to download, fully seeded.

* :func:`triangles_and_circles` — the 2D toy images of the ICON/GradICON papers (Sec. 6.1): a
  triangle or a circle with a soft edge, optionally only its outline ("hollow").
* :func:`phantom` — a 3D (or 2D) anatomy-like phantom of nested ellipsoids with labels.
* :func:`random_smooth_ddf` — a smooth random displacement field (voxel units) with a bounded
  magnitude, used to make pairs with a known ground-truth deformation.
* :class:`SyntheticPairDataset` — a map-style dataset of ``{"moving", "fixed", ...}`` dicts
  (MONAI channel-first convention) built from the above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..maps import warp
from ..validation import check_spatial_dims

__all__ = ["triangles_and_circles", "phantom", "random_smooth_ddf", "SyntheticPairDataset"]


def _uniform(generator: torch.Generator, low: float, high: float, n: int = 1) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def triangles_and_circles(
    batch: int, size: int, hollow: bool = False, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(batch, 1, size, size)`` of one triangle or circle each, and their filled masks.

    Centre ``~U(0.4, 0.7)²``, radius ``~U(0.2, 0.4)``, rotation ``~U(0, 2π)`` in [0, 1] coordinates;
    intensity ``tanh(−40·signed_distance)`` in (−1, 1), or ``1 − that²`` (an outline in [0, 1]) when
    ``hollow``. The mask is ``signed_distance < 0`` (the filled shape), for Dice.

    Args:
        batch: number of images.
        size: side length in pixels (the images are square).
        hollow: draw only the outline of each shape.
        generator: source of the random shapes; ``None`` uses torch's default generator.

    Returns:
        ``(images, masks)``, both float32 ``(batch, 1, size, size)``; masks are 0/1.
    """
    g = generator if generator is not None else torch.default_generator
    lin = torch.linspace(0, 1, size, dtype=torch.float64)
    x, y = torch.meshgrid(lin, lin, indexing="ij")
    images, masks = [], []
    for _ in range(batch):
        cx, cy = _uniform(g, 0.4, 0.7, 2)
        r, theta = _uniform(g, 0.2, 0.4), _uniform(g, 0, 2 * math.pi)
        is_triangle = bool(torch.rand(1, generator=g) > 0.5)
        dist = torch.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        if is_triangle:
            angle = torch.remainder(torch.atan2(x - cx, y - cy) + theta, 2 * math.pi / 3) - math.pi / 3
            signed = dist - r * math.cos(math.pi / 3) / torch.cos(angle)
        else:
            signed = dist - r
        image = torch.tanh(-40 * signed)
        images.append(1 - image**2 if hollow else image)
        masks.append(signed < 0)
    return torch.stack(images)[:, None].float(), torch.stack(masks)[:, None].float()


def phantom(
    spatial_shape: Sequence[int], generator: torch.Generator | None = None, num_structures: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random phantom ``(1, *spatial_shape)`` in [0, 1] and its label map (0 = background).

    A large ellipsoid "body" (label 1) holds ``num_structures`` smaller randomly placed ellipsoids
    (labels 2..), each with its own intensity, smoothed at the edges. Where structures overlap the
    later one's label wins; structure labels are only set inside the body (outside it stays 0).

    Args:
        spatial_shape: 2 or 3 sizes, e.g. ``(64, 64, 64)``.
        generator: source of the random layout; ``None`` uses torch's default generator.
        num_structures: number of inner ellipsoids (labels ``2 .. num_structures + 1``).

    Returns:
        ``(image, labels)``: float32 ``(1, *spatial_shape)`` in [0, 1] and int64 ``(1, *spatial_shape)``.
    """
    g = generator if generator is not None else torch.default_generator
    dims = len(spatial_shape)
    axes = [torch.linspace(-1, 1, n, dtype=torch.float64) for n in spatial_shape]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    image = torch.zeros(spatial_shape, dtype=torch.float64)
    labels = torch.zeros(spatial_shape, dtype=torch.int64)

    def ellipsoid(center, radii):
        shape = (-1,) + (1,) * dims
        return (((coords - center.reshape(shape)) / radii.reshape(shape)) ** 2).sum(0).sqrt() - 1

    body = ellipsoid(_uniform(g, -0.1, 0.1, dims), _uniform(g, 0.65, 0.85, dims))
    image += 0.3 * torch.sigmoid(-body * 20)
    labels[body < 0] = 1
    for k in range(num_structures):
        level = ellipsoid(_uniform(g, -0.4, 0.4, dims), _uniform(g, 0.12, 0.3, dims))
        image += (0.3 + 0.4 * float(_uniform(g, 0, 1))) * torch.sigmoid(-level * 20) * (1 - 0.3 * k / num_structures)
        labels[(level < 0) & (body < 0)] = k + 2
    return image.clamp(0, 1)[None].float(), labels[None]


def random_smooth_ddf(
    spatial_shape: Sequence[int],
    max_displacement: float,
    control_points: int = 4,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A smooth random DDF ``(1, D, *spatial_shape)`` in voxel units, ``|ddf| <= max_displacement``.

    Standard-normal values on a ``control_points^D`` lattice are upsampled to the image grid (bicubic
    in 2D, trilinear in 3D, ``align_corners=True``) and scaled so the largest absolute component
    equals ``max_displacement``.
    Keep ``max_displacement`` below the control spacing for a fold-free (diffeomorphic) field.

    Args:
        spatial_shape: 2 or 3 sizes of the image grid.
        max_displacement: largest absolute displacement component, in voxels.
        control_points: lattice points per axis of the random coarse field.
        generator: source of the random values; ``None`` uses torch's default generator.

    Returns:
        DDF ``(1, D, *spatial_shape)`` in voxel units (MONAI convention), in torch's default dtype.
    """
    g = generator if generator is not None else torch.default_generator
    dims = len(spatial_shape)
    coarse = torch.randn((1, dims) + (control_points,) * dims, generator=g)
    mode = "bicubic" if dims == 2 else "trilinear"
    ddf = F.interpolate(coarse, size=tuple(spatial_shape), mode=mode, align_corners=True)
    return ddf * (max_displacement / ddf.abs().max().clamp_min(1e-12))


class SyntheticPairDataset(Dataset):
    """Seeded pairs ``{"moving", "fixed", "moving_label", "fixed_label"}``, channel-first, float32.

    ``kind="shapes"`` (2D only): two independent triangles/circles (the paper's toy task; labels are
    the filled masks). ``kind="phantom"``: one phantom deformed by two independent smooth random
    fields of at most ``max_displacement`` voxels (labels warped with nearest neighbour).
    Item ``i`` is the same every time (its generator is seeded with ``seed + i``).

    Args:
        spatial_shape: image size, 2 or 3 entries.
        length: number of pairs.
        kind: ``"shapes"`` or ``"phantom"``.
        hollow: outlines instead of filled shapes (``kind="shapes"``).
        max_displacement: deformation magnitude in voxels (``kind="phantom"``).
        seed: base seed.
    """

    def __init__(
        self,
        spatial_shape: Sequence[int],
        length: int = 64,
        kind: str = "phantom",
        hollow: bool = True,
        max_displacement: float | None = None,
        seed: int = 0,
    ) -> None:
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        check_spatial_dims(len(self.spatial_shape))
        if kind not in ("shapes", "phantom"):
            raise ValueError(f"kind must be 'shapes' or 'phantom', got {kind!r}.")
        if kind == "shapes" and (len(self.spatial_shape) != 2 or self.spatial_shape[0] != self.spatial_shape[1]):
            raise ValueError(f"kind='shapes' makes square 2D images, got spatial_shape={self.spatial_shape}.")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}.")
        self.length = int(length)
        self.kind = kind
        self.hollow = hollow
        self.max_displacement = (
            float(max_displacement) if max_displacement is not None else 0.08 * min(self.spatial_shape)
        )
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length} pairs.")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        if self.kind == "shapes":
            images, masks = triangles_and_circles(2, self.spatial_shape[0], self.hollow, g)
            return {"moving": images[0], "fixed": images[1], "moving_label": masks[0], "fixed_label": masks[1]}
        image, labels = phantom(self.spatial_shape, g)
        out = {}
        for name in ("moving", "fixed"):
            ddf = random_smooth_ddf(self.spatial_shape, self.max_displacement, generator=g)
            out[name] = warp(image[None], ddf)[0]
            out[f"{name}_label"] = warp(labels[None].float(), ddf, mode="nearest")[0]
        return out
