"""Input checks shared by every public entry point.

Each check raises ``ValueError`` with a message that names what was expected and what was given,
so that bad input fails early instead of producing a silently wrong registration.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["check_spatial_dims", "check_image", "check_image_pair", "check_ddf", "check_finite"]


def check_spatial_dims(spatial_dims: int) -> int:
    """Return ``spatial_dims`` if it is 2 or 3, else raise ``ValueError``.

    Args:
        spatial_dims: number of spatial axes to check.

    Returns:
        ``spatial_dims`` unchanged.

    Raises:
        ValueError: ``spatial_dims`` is not 2 or 3.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    return spatial_dims


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``tensor`` holds NaN or infinite values.

    Args:
        tensor: the values to check.
        name: what to call ``tensor`` in the message.

    Raises:
        ValueError: naming ``name`` and the number of NaN/inf values.
    """
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} must hold only finite values, got {bad} NaN/inf value(s).")


def check_image(image: torch.Tensor, spatial_dims: int, name: str = "image", min_size: int = 2) -> None:
    """Check that ``image`` is a finite ``(B, C, *spatial)`` tensor with ``spatial_dims`` axes of size >= ``min_size``.

    Args:
        image: the tensor to check.
        spatial_dims: expected number of spatial axes.
        name: what to call ``image`` in messages.
        min_size: smallest allowed size of every spatial axis.

    Raises:
        ValueError: not a tensor, wrong rank, a spatial axis too small, or NaN/inf values.
    """
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(image).__name__}.")
    if image.ndim != spatial_dims + 2:
        raise ValueError(
            f"{name} must have shape (B, C, {', '.join('HWD'[:spatial_dims])}) for spatial_dims={spatial_dims}, "
            f"got a {image.ndim}-D tensor of shape {tuple(image.shape)}."
        )
    small = [s for s in image.shape[2:] if s < min_size]
    if small:
        raise ValueError(
            f"{name} spatial size {tuple(image.shape[2:])} is too small: every spatial axis must be >= {min_size}."
        )
    check_finite(image, name)


def check_image_pair(
    moving: torch.Tensor, fixed: torch.Tensor, spatial_dims: int, channels: int | None = None, min_size: int = 2
) -> None:
    """Check a moving/fixed pair: same shape, expected rank and channel count, finite, large enough.

    Args:
        moving: moving image ``(B, C, *spatial)``.
        fixed: fixed image, must have the same shape.
        spatial_dims: expected number of spatial axes.
        channels: required channel count ``C``; ``None`` does not check it.
        min_size: smallest allowed size of every spatial axis.

    Raises:
        ValueError: either image fails :func:`check_image`, the shapes differ, or the channel count is wrong.
    """
    check_image(moving, spatial_dims, "moving", min_size)
    check_image(fixed, spatial_dims, "fixed", min_size)
    if moving.shape != fixed.shape:
        raise ValueError(
            f"moving and fixed must have the same shape, got moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)}."
        )
    if channels is not None and moving.shape[1] != channels:
        raise ValueError(f"moving and fixed must have {channels} channel(s), got {moving.shape[1]}.")


def check_ddf(ddf: torch.Tensor, spatial_dims: int, name: str = "ddf", shape: Sequence[int] | None = None) -> None:
    """Check a dense displacement field ``(B, spatial_dims, *spatial)``; optionally its exact shape.

    Args:
        ddf: the tensor to check (MONAI DDF, voxel units; the units are not checked).
        spatial_dims: expected number of spatial axes (and of channels).
        name: what to call ``ddf`` in messages.
        shape: the exact full shape required, e.g. ``(B, D, *spatial)``; ``None`` does not check it.

    Raises:
        ValueError: not a tensor, wrong rank or channel count, a spatial axis below 2, a different
            ``shape``, or NaN/inf values.
    """
    if not isinstance(ddf, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(ddf).__name__}.")
    if ddf.ndim != spatial_dims + 2 or ddf.shape[1] != spatial_dims:
        raise ValueError(
            f"{name} must have shape (B, {spatial_dims}, {', '.join('HWD'[:spatial_dims])}) for "
            f"spatial_dims={spatial_dims}, got {tuple(ddf.shape)}."
        )
    if min(ddf.shape[2:]) < 2:
        raise ValueError(f"{name} spatial size {tuple(ddf.shape[2:])} is too small: every axis must be >= 2.")
    if shape is not None and tuple(ddf.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(ddf.shape)}.")
    check_finite(ddf, name)
