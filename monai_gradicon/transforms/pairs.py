"""Dictionary transforms for moving/fixed pairs: shape and channel checks, warping with a predicted DDF."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from ..maps import warp

__all__ = ["CheckPaird", "WarpWithDDFd", "NamePaird"]


def _describe(data: Mapping[Hashable, Any], key: Hashable) -> str:
    value = data[key]
    meta = getattr(value, "meta", None) or data.get(f"{key}_meta_dict") or {}
    name = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    return f"'{key}'" + (f" ({name})" if name else "")


class CheckPaird(MapTransform):
    """Fail early, naming the files, when a moving/fixed pair cannot be registered.

    Checks that every key holds a ``(channels, *spatial)`` array with ``spatial_dims`` spatial axes,
    the expected channel count, finite values, and that all keys share one spatial shape (run it after
    resampling/cropping, so the shapes are those the network sees).

    Args:
        keys: the image (and label) keys of one pair, e.g. ``["moving", "fixed"]``.
        spatial_dims: 2 or 3.
        channels: required channel count of each image (``None``: not checked).
        min_size: smallest allowed spatial size per axis (the network's ``min_size``).
        allow_missing_keys: skip keys absent from the item instead of raising (MONAI ``MapTransform``).
    """

    def __init__(
        self, keys: KeysCollection, spatial_dims: int = 3, channels: int | None = 1, min_size: int = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.min_size = int(min_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        shapes = {}
        for key in self.key_iterator(d):
            value = torch.as_tensor(d[key])
            if value.ndim != self.spatial_dims + 1:
                raise ValueError(
                    f"{_describe(d, key)} must be (channels, *spatial) with {self.spatial_dims} spatial axes, "
                    f"got shape {tuple(value.shape)}."
                )
            if self.channels is not None and value.shape[0] != self.channels:
                raise ValueError(
                    f"{_describe(d, key)} must have {self.channels} channel(s), got {value.shape[0]} "
                    f"(shape {tuple(value.shape)})."
                )
            if min(value.shape[1:]) < self.min_size:
                raise ValueError(
                    f"{_describe(d, key)} spatial shape {tuple(value.shape[1:])} is too small: the network needs "
                    f">= {self.min_size} voxels per axis."
                )
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"{_describe(d, key)} holds NaN or infinite values.")
            shapes[key] = tuple(value.shape[1:])
        if len(set(shapes.values())) > 1:
            listing = ", ".join(f"{_describe(d, k)}: {s}" for k, s in shapes.items())
            raise ValueError(f"the images of a pair must have the same spatial shape after preprocessing, got {listing}.")
        return d


class WarpWithDDFd(MapTransform):
    """Warp images with the DDF stored under ``ddf_key`` (post-processing of a decollated item).

    ``out = Warp(padding_mode="border")(image, ddf)``, i.e. the moving image resampled on the fixed grid.

    Args:
        keys: images ``(C, *spatial)`` to warp (e.g. ``"moving"``, ``"moving_label"``).
        ddf_key: key of the DDF ``(D, *spatial)`` (the network's ``pred``).
        output_keys: where to store each result (same length as ``keys``).
        mode: ``"bilinear"`` or ``"nearest"`` (labels), one or one per key.
        reference_key: image whose affine the results get (they live on the fixed grid); ``None`` keeps
            the source image's affine (``spatial_shape`` in the meta data is still updated).
        allow_missing_keys: skip image keys absent from the item instead of raising (the DDF must be present).

    Results are ``MetaTensor`` s carrying the source image's meta data (file name), so ``SaveImaged``
    can write them.
    """

    def __init__(
        self, keys: KeysCollection, ddf_key: str = "pred", output_keys: Sequence[str] | str | None = None,
        mode: Sequence[str] | str = "bilinear", reference_key: str | None = "fixed", allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ddf_key = ddf_key
        self.reference_key = reference_key
        outs = [output_keys] if isinstance(output_keys, str) else output_keys
        self.output_keys = list(outs) if outs is not None else [f"warped_{k}" for k in self.keys]
        modes = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        if len(self.output_keys) != len(self.keys) or len(modes) != len(self.keys):
            raise ValueError(f"output_keys and mode must match keys {list(self.keys)}, got {self.output_keys} and {modes}.")
        self.modes = modes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.ddf_key not in d:
            raise ValueError(f"WarpWithDDFd: no DDF under key '{self.ddf_key}'; keys present: {sorted(map(str, d))}.")
        ddf = torch.as_tensor(d[self.ddf_key])
        plain_ddf = ddf.as_tensor() if isinstance(ddf, MetaTensor) else ddf
        for key, out_key, mode in zip(self.keys, self.output_keys, self.modes):
            if key not in d:
                if self.allow_missing_keys:
                    continue
                raise ValueError(f"WarpWithDDFd: key '{key}' is missing; keys present: {sorted(map(str, d))}.")
            image = torch.as_tensor(d[key]).to(ddf.device)
            if tuple(image.shape[1:]) != tuple(ddf.shape[1:]):
                raise ValueError(
                    f"'{key}' spatial shape {tuple(image.shape[1:])} differs from the DDF's {tuple(ddf.shape[1:])}."
                )
            source = image.as_tensor() if isinstance(image, MetaTensor) else image
            warped = warp(source[None].float(), plain_ddf[None].float(), mode=mode)[0]
            meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
            reference = d.get(self.reference_key) if self.reference_key else None
            if isinstance(reference, MetaTensor):  # the warped image lives on the fixed grid
                meta["affine"] = reference.affine.clone()
            meta["spatial_shape"] = tuple(warped.shape[1:])
            d[out_key] = MetaTensor(warped, meta=meta)
        return d


class NamePaird(MapTransform):
    """Give in-memory (e.g. synthetic) pair images a file name so ``SaveImaged`` can write their results.

    Each item gets ``filename_or_obj = <prefix><n>_<key>`` in the meta data of every key (``n`` counts the
    items seen by this transform instance); tensors become ``MetaTensor`` s with an identity affine.
    Items that already carry a file name (loaded from disk) are left as they are.

    Args:
        keys: image keys, e.g. ``["moving", "fixed"]``.
        prefix: name prefix.
        allow_missing_keys: skip keys absent from the item instead of raising (MONAI ``MapTransform``).
    """

    def __init__(self, keys: KeysCollection, prefix: str = "pair", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.prefix = prefix
        self._count = 0

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        index = self._count
        self._count += 1
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, MetaTensor) and value.meta.get("filename_or_obj"):
                continue
            tensor = torch.as_tensor(value)
            d[key] = MetaTensor(
                tensor, meta={"filename_or_obj": f"{self.prefix}{index}_{key}", "spatial_shape": tuple(tensor.shape[1:])}
            )
        return d
