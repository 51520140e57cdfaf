"""Intensity normalisations of the authors' released models that MONAI has no transform for.

* :class:`UnitWindowd` — clamp to a window and map it to [0, 1], the bounds fixed (CT in HU) or order
  statistics of the image (uniGradICON's MRI window: the image minimum to its 99th percentile, the
  percentile as the ``k``-th smallest value with ``k = int(0.99·n)``, not an interpolated quantile);
* :class:`ScaleByMaximumd` — multiply by ``value / max`` (the HCP brain model: ``0.9 / max``);
* :class:`ApplyMaskd` — multiply by a binary mask (``mask > 0``), required or optional (the lung model:
  image × lung mask; uniGradICON: optional masks), or not at all for a scan flagged for loss masking;
* :class:`ByModalityd` — the intensity transforms of the scan's own modality (``d["modality"]``, else the
  bundle's default): uniGradICON/multiGradICON window CT and MR scans differently, per scan.

Both work on images of any size (``torch.quantile`` refuses more than 2^24 elements; ``kthvalue`` does
not), so full-resolution scans (384×384×160 knees, 512×512×600 CT) pass.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.transforms import Compose, MapTransform, Transform

__all__ = ["order_statistic", "UnitWindowd", "ScaleByMaximumd", "ApplyMaskd", "ByModalityd"]


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

    A scan with ``d[skip_key]`` true (loss masking: the mask enters the similarity of instance
    optimisation instead) keeps its images as they are; the mask stays in ``d[mask_key]``.

    Args:
        keys: images to mask.
        mask_key: where the mask is (same grid as the images).
        required: a missing mask is an error (``True``) or leaves the images as they are (``False``).
        allow_missing_keys: skip absent image keys.
        skip_key: the scan's flag that leaves the images unmasked.

    Raises:
        ValueError: a required mask is missing, the mask is on another grid, or it is empty.
    """

    def __init__(
        self, keys: Sequence[str] | str, mask_key: str = "mask", required: bool = True, allow_missing_keys: bool = False,
        skip_key: str = "loss_masking",
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.required = bool(required)
        self.skip_key = skip_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if d.get(self.skip_key) and d.get(self.mask_key) is not None:
            return d
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


class ByModalityd(Transform):
    """Run the intensity transforms of one scan's modality: ``d[modality_key]`` if the scan says, else ``default``.

    uniGradICON and multiGradICON normalise a CT scan with a fixed HU window and an MR scan with its own
    order statistics (uniGradICON 1.0.6 ``preprocess(image, modality)``); with this transform each scan of
    a pair gets its own (multiGradICON MR–CT pairs), the bundle's ``modality`` setting being the default.

    Args:
        transforms: modality name -> the transforms for it (a sequence, run as a ``Compose``, or one callable).
        default: the modality of a scan that does not name one (a key of ``transforms``).
        modality_key: where a scan names its modality.

    Raises:
        ValueError: ``default`` is not offered (``__init__``), or a scan names a modality that is not.
    """

    def __init__(self, transforms: Mapping[str, Sequence[Callable] | Callable], default: str, modality_key: str = "modality") -> None:
        if not transforms:
            raise ValueError("ByModalityd needs at least one modality.")
        self.transforms = {
            str(name): Compose(list(t)) if isinstance(t, Sequence) else t for name, t in transforms.items()
        }
        if default not in self.transforms:
            raise ValueError(f"the default modality must be one of {self.modalities}, got {default!r}.")
        self.default = default
        self.modality_key = modality_key

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modality names offered, in the order given."""
        return tuple(self.transforms)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        name = d.get(self.modality_key) or self.default
        if name not in self.transforms:
            raise ValueError(f"modality must be one of {self.modalities}, got {name!r}.")
        d[self.modality_key] = name
        return dict(self.transforms[name](d))
