"""Intensity normalisations of the authors' released models that MONAI has no transform for.

* :class:`UnitWindowd` — clamp to a window and map it to [0, 1], the bounds fixed (CT in HU) or order
  statistics of the image (uniGradICON's MRI window: the image minimum to its 99th percentile, the
  percentile as the ``k``-th smallest value with ``k = int(0.99·n)``, not an interpolated quantile);
* :class:`ScaleByMaximumd` — multiply by ``value / max`` (the HCP brain model: ``0.9 / max``);
* :class:`ApplyMaskd` — multiply by a binary mask (``mask > 0``), required or optional (the lung model:
  image × lung mask; uniGradICON: optional masks).

Both work on images of any size (``torch.quantile`` refuses more than 2^24 elements; ``kthvalue`` does
not), so full-resolution scans (384×384×160 knees, 512×512×600 CT) pass.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.transforms import MapTransform

__all__ = ["order_statistic", "UnitWindowd", "ScaleByMaximumd", "ApplyMaskd"]


def order_statistic(values: torch.Tensor, fraction: float) -> float:
    """The ``k``-th smallest of ``values`` with ``k = clamp(int(fraction·n), 1, n)`` (uniGradICON's quantile).

    Args:
        values: any tensor (flattened).
        fraction: in [0, 1].

    Returns:
        the value, as a Python float.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"quantile fraction must be in [0, 1], got {fraction}.")
    flat = values.reshape(-1)
    n = flat.numel()
    return float(torch.kthvalue(flat, max(1, min(int(fraction * n), n))).values)


class UnitWindowd(MapTransform):
    """Clamp each image to ``[low, high]`` and map it linearly to [0, 1].

    A bound is a number (``low=-1000, high=1000`` HU: uniGradICON's CT window), or, when ``None``, the
    order statistic at ``low_quantile`` / ``high_quantile`` (:func:`order_statistic`); ``low=None`` with
    ``low_quantile=None`` is the image minimum (uniGradICON's MRI window, ``high_quantile=0.99``).

    Args:
        keys: images to normalise.
        low: lower bound, or ``None``.
        high: upper bound, or ``None``.
        low_quantile: fraction for a ``None`` lower bound (``None``: the minimum).
        high_quantile: fraction for a ``None`` upper bound (``None``: the maximum).
        allow_missing_keys: skip absent keys.

    Raises:
        ValueError: the window is empty (``high <= low``), e.g. a constant image.
    """

    def __init__(
        self,
        keys: Sequence[str] | str,
        low: float | None = None,
        high: float | None = None,
        low_quantile: float | None = None,
        high_quantile: float | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.low, self.high = low, high
        self.low_quantile, self.high_quantile = low_quantile, high_quantile

    def window(self, image: torch.Tensor) -> tuple[float, float]:
        """The ``(low, high)`` bounds for ``image``."""
        values = torch.as_tensor(image).as_subclass(torch.Tensor).to(torch.float32)
        low = self.low if self.low is not None else (
            order_statistic(values, self.low_quantile) if self.low_quantile is not None else float(values.min())
        )
        high = self.high if self.high is not None else (
            order_statistic(values, self.high_quantile) if self.high_quantile is not None else float(values.max())
        )
        return float(low), float(high)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            low, high = self.window(d[key])
            if high <= low:
                raise ValueError(
                    f"cannot normalise '{key}': its intensity window [{low}, {high}] is empty (constant image?)."
                )
            d[key] = (torch.as_tensor(d[key]).to(torch.float32).clamp(low, high) - low) / (high - low)
        return d


class ScaleByMaximumd(MapTransform):
    """Multiply each image by ``value / max(image)`` (the HCP brain model's preprocessing, ``value = 0.9``).

    Args:
        keys: images to scale.
        value: what the maximum becomes.
        allow_missing_keys: skip absent keys.

    Raises:
        ValueError: the maximum is not positive.
    """

    def __init__(self, keys: Sequence[str] | str, value: float = 0.9, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.value = float(value)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key]).to(torch.float32)
            peak = float(image.max())
            if peak <= 0:
                raise ValueError(f"cannot scale '{key}' by value/max: its maximum is {peak}, expected > 0.")
            d[key] = image * (self.value / peak)
        return d


class ApplyMaskd(MapTransform):
    """Multiply each image by its binary mask ``d[mask_key] > 0`` (0 outside).

    Args:
        keys: images to mask.
        mask_key: where the mask is (same grid as the images).
        required: a missing mask is an error (``True``) or leaves the images as they are (``False``).
        allow_missing_keys: skip absent image keys.

    Raises:
        ValueError: a required mask is missing, the mask is on another grid, or it is empty.
    """

    def __init__(self, keys: Sequence[str] | str, mask_key: str = "mask", required: bool = True, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.required = bool(required)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if d.get(self.mask_key) is None:
            if self.required:
                raise ValueError(f"a mask ('{self.mask_key}') is required, none was given.")
            return d
        inside = torch.as_tensor(d[self.mask_key]).as_subclass(torch.Tensor) > 0
        if not bool(inside.any()):
            raise ValueError(f"the mask ('{self.mask_key}') is empty (no voxel > 0).")
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key]).to(torch.float32)
            if tuple(inside.shape) != tuple(image.shape):
                raise ValueError(f"the mask ('{self.mask_key}') has shape {tuple(inside.shape)}, the image '{key}' {tuple(image.shape)}.")
            d[key] = image * inside
        return d
