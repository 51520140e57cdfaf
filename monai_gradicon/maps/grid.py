"""Identity grids, interpolation at arbitrary points, and the DDF <-> [0, 1] map conversion.

Two ways of writing the same deformation are used in this package:

* a MONAI **DDF** ``(B, D, *spatial)`` in voxel units, channel ``i`` along spatial axis ``i``,
  ``align_corners=True``; ``monai.networks.blocks.Warp()(moving, ddf_AB) ≈ fixed``;
* a **map** ``Φ(x)`` in normalised coordinates where the first and last voxel of every axis sit at
  0 and 1 (the coordinates of the GradICON paper, Sec. 3, and of its reference implementation).

They convert per axis as ``ddf_i = (Φ_i(id) - id_i) * (N_i - 1)``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .native import native_available, trilinear

__all__ = ["identity_grid", "sample", "grid_sample", "ddf_to_map", "map_to_ddf", "warp"]

#: fewest points per thread for which :func:`grid_sample` splits a single-image call across threads
MIN_POINTS_PER_THREAD = 16384


def identity_grid(
    spatial_shape: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Identity map ``id`` of shape ``(1, D, *spatial_shape)`` in [0, 1] coordinates.

    Channel ``k`` holds ``index_k / (N_k - 1)``. The values are rounded to float32 before the cast to
    ``dtype`` (as the reference does), so float64 results mirror the reference bit for bit.

    Args:
        spatial_shape: ``(N_0, ..., N_{D-1})``, every ``N_k >= 2``.
        dtype: dtype of the returned tensor.
        device: device of the returned tensor (``None``: the default device).

    Returns:
        the identity map ``(1, D, *spatial_shape)`` with ``D = len(spatial_shape)``.
    """
    return shared_identity_grid(spatial_shape, dtype, device).clone()


@functools.lru_cache(maxsize=16)
def _build_identity_grid(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    axes = [(torch.arange(n, dtype=torch.float64) * (1.0 / (n - 1))).to(torch.float32) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)
    return grid[None].to(device=device, dtype=dtype)


def shared_identity_grid(
    spatial_shape: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """:func:`identity_grid` from a small cache, for the package's own hot paths (as the reference keeps its
    identity map as a module buffer). The tensor is shared: never modify it in place.

    Args:
        spatial_shape: ``(N_0, ..., N_{D-1})``, every ``N_k >= 2``.
        dtype: dtype of the returned tensor.
        device: device of the returned tensor (``None``: the default device).

    Returns:
        the shared identity map ``(1, D, *spatial_shape)``.
    """
    shape = tuple(int(s) for s in spatial_shape)
    if any(s < 2 for s in shape):
        raise ValueError(f"identity_grid needs every spatial size >= 2, got {shape}.")
    device = torch.device(device) if device is not None else torch.empty(0).device
    if torch.jit.is_tracing():  # a trace must record the grid's construction, not a cached constant
        return _build_identity_grid.__wrapped__(shape, dtype, device)
    return _build_identity_grid(shape, dtype, device)


def sample(
    field: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border"
) -> torch.Tensor:
    """Interpolate ``field`` ``(B, C, *S)`` at the points ``coords`` ``(B', D, *S')`` given in [0, 1] coordinates.

    This evaluates ``field`` off the grid in the coordinates of the paper (Sec. 3), e.g. a displacement
    at ``Φ(x)`` when composing maps. ``align_corners=True``; with the default border padding a point
    outside the image takes the value of the nearest border voxel. A batch of 1 on either side is
    broadcast to the other's batch. Linear interpolation with border padding of a 3D float field on CPU
    runs the native kernel of :mod:`.native` (about 2× faster than ``grid_sample`` with its gradients,
    the same values); every other case, traces and ``torch.compile`` included, goes to :func:`grid_sample`.

    Args:
        field: values to interpolate, ``(B, C, *S)`` with ``D`` spatial axes (an image or a displacement).
        coords: the points, ``(B', D, *S')`` in [0, 1] coordinates, channel ``k`` along spatial axis ``k``
            (0 is the first voxel's centre, 1 the last's).
        mode: ``"bilinear"`` (``"linear"`` and ``"trilinear"`` are accepted as the same thing; linear in
            every axis) or ``"nearest"`` (for label maps).
        padding_mode: value outside the image, passed to ``torch.nn.functional.grid_sample``:
            ``"border"`` (default), ``"zeros"`` or ``"reflection"``.

    Returns:
        ``(max(B, B'), C, *S')``.
    """
    if mode in ("linear", "trilinear"):
        mode = "bilinear"
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}.")
    if _native_case(field, coords, mode, padding_mode):
        return trilinear(field, coords)
    batch = max(field.shape[0], coords.shape[0])
    if field.shape[0] != batch:
        field = field.expand(batch, *field.shape[1:])
    if coords.shape[0] != batch:
        coords = coords.expand(batch, *coords.shape[1:])
    # grid_sample wants (B, *S', D) in [-1, 1] with the last spatial axis first; flip() makes the one copy.
    grid = coords.movedim(1, -1).flip(-1).mul_(2.0).sub_(1.0)
    return grid_sample(field, grid, mode=mode, padding_mode=padding_mode)


def _native_case(field: torch.Tensor, coords: torch.Tensor, mode: str, padding_mode: str) -> bool:
    """Whether ``sample`` runs the native kernel (:mod:`.native`): linear, border, 3D, float, CPU, and
    :func:`~.native.native_available` (built, and neither a trace nor ``torch.compile``: they record
    ``grid_sample``)."""
    return (
        mode == "bilinear"
        and padding_mode == "border"
        and field.ndim == 5
        and coords.ndim >= 3
        and coords.shape[1] == 3
        and field.dtype in (torch.float32, torch.float64)
        and coords.dtype == field.dtype
        and field.device.type == "cpu"
        and coords.device.type == "cpu"
        and (field.shape[0] == coords.shape[0] or 1 in (field.shape[0], coords.shape[0]))
    ) and native_available()


def grid_sample(field: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border") -> torch.Tensor:
    """``torch.nn.functional.grid_sample(..., align_corners=True)`` that uses every CPU thread on a single image.

    PyTorch's CPU kernels (``grid_sampler_3d`` forward and backward, ``grid_sampler_2d`` forward) divide
    the work by batch element only, so one image (the usual case: one pair, both directions in turn)
    runs on one thread. Here the points of a single-image call on CPU are cut into one chunk per thread,
    the chunks become the batch of one ``grid_sample`` call against the same (expanded, not copied)
    field, and the output is put back in order. Every point is interpolated by the same arithmetic as
    in the single call, so values and the gradient with respect to the points are equal bit for bit;
    the gradient with respect to the field sums the chunks' contributions per chunk first, which can
    change the float rounding of a voxel reached from two chunks. Batches of several images, other
    devices, traces and ``torch.compile`` (a recorded graph would fix the thread count) and small calls go
    straight to ``F.grid_sample``.

    Args:
        field: ``(B, C, *S)``.
        grid: ``(B, *S', D)`` in [-1, 1], the last spatial axis first (``grid_sample``'s convention).
        mode: ``"bilinear"`` or ``"nearest"``.
        padding_mode: ``"border"``, ``"zeros"`` or ``"reflection"``.

    Returns:
        ``(B, C, *S')``, as ``F.grid_sample``.
    """
    if torch.jit.is_tracing() or torch.compiler.is_compiling():  # a recorded graph would fix the thread count
        return F.grid_sample(field, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    points = grid[0, ..., 0].numel()
    chunks = min(torch.get_num_threads(), points // MIN_POINTS_PER_THREAD)
    if chunks < 2 or field.device.type != "cpu" or grid.shape[0] != 1 or field.shape[0] != 1:
        return F.grid_sample(field, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    dims = grid.shape[-1]
    per_chunk = -(-points // chunks)
    flat = grid.reshape(points, dims)
    if per_chunk * chunks != points:  # pad with copies of the last point; their values are dropped
        flat = torch.cat([flat, flat[-1:].expand(per_chunk * chunks - points, dims)])
    batched = flat.reshape(chunks, per_chunk, *([1] * (dims - 1)), dims)
    field = field.expand(chunks, *field.shape[1:])
    values = F.grid_sample(field, batched, mode=mode, padding_mode=padding_mode, align_corners=True)
    values = values.reshape(chunks, field.shape[1], per_chunk).transpose(0, 1).reshape(field.shape[1], -1)
    return values[:, :points].reshape(1, field.shape[1], *grid.shape[1:-1])


def _voxel_scale(spatial_shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """``(1, D, 1, ..., 1)`` tensor of ``N_k - 1``."""
    scale = torch.tensor([s - 1 for s in spatial_shape], dtype=like.dtype, device=like.device)
    return scale.reshape(1, -1, *([1] * len(spatial_shape)))


def ddf_to_map(ddf: torch.Tensor) -> torch.Tensor:
    """MONAI DDF (voxel units) -> map ``Φ(id)`` in [0, 1] coordinates (paper Sec. 3), same shape.

    Per axis ``Φ_i(id) = id_i + ddf_i / (N_i - 1)``.

    Args:
        ddf: MONAI DDF ``(B, D, *spatial)`` in voxel units, channel ``i`` along spatial axis ``i``.

    Returns:
        the map ``Φ(id)`` ``(B, D, *spatial)``: the [0, 1] coordinates each grid point is sent to.
    """
    shape = ddf.shape[2:]
    return shared_identity_grid(shape, ddf.dtype, ddf.device) + ddf / _voxel_scale(shape, ddf)


def map_to_ddf(phi: torch.Tensor) -> torch.Tensor:
    """Map ``Φ(id)`` in [0, 1] coordinates (paper Sec. 3) -> MONAI DDF in voxel units, same shape.

    Per axis ``ddf_i = (Φ_i(id) - id_i) * (N_i - 1)``; the inverse of :func:`ddf_to_map`.

    Args:
        phi: the map sampled on the identity grid, ``(B, D, *spatial)`` in [0, 1] coordinates.

    Returns:
        the MONAI DDF ``(B, D, *spatial)`` in voxel units.
    """
    shape = phi.shape[2:]
    return (phi - shared_identity_grid(shape, phi.dtype, phi.device)) * _voxel_scale(shape, phi)


def warp(image: torch.Tensor, ddf: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Pull ``image`` back through ``ddf``: ``out(x) = image(x + ddf(x))`` with border padding.

    Equal to ``monai.networks.blocks.Warp(mode, padding_mode="border")``; use ``mode="nearest"`` for
    label maps (no new label values are created). With ``ddf = ddf_AB`` this is ``I^A ∘ Φ_AB`` of the
    paper (Sec. 3), the warped moving image compared with the fixed one.

    Args:
        image: image ``(B, C, *spatial)`` to resample (the moving image).
        ddf: MONAI DDF ``(B, D, *spatial)`` in voxel units on the same spatial grid (fixed -> moving
            coordinates). A batch of 1 on either side is broadcast to the other's batch.
        mode: ``"bilinear"`` or ``"nearest"``.

    Returns:
        the warped image ``(B, C, *spatial)`` on the grid of ``ddf``.
    """
    if image.shape[2:] != ddf.shape[2:]:
        raise ValueError(
            f"image and ddf must share the spatial shape, got image {tuple(image.shape)} and ddf {tuple(ddf.shape)}."
        )
    return sample(image, ddf_to_map(ddf), mode=mode)
