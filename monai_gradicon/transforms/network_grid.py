"""Placing a scan on a registration network's grid: the resampling convention a bundle's weights were trained with.

A network sees an image as an array on its own grid of shape ``N``. How a file's voxel array ``S``
gets there is part of what the weights learnt, so a bundle declares it (``configs/inference.json``) and
every path (``monai-gradicon register``, ``evaluate``, the Deploy app, ``monai.bundle run``) applies
it through :class:`ToNetworkGridd`:

1. **axis codes**: the image is brought to ``axcodes`` (e.g. ``"RAS"``, or the fixed image's codes for
   the moving image of a pair) by a permutation and flips of its index axes, no interpolation
   (what ``Orientationd`` does); ``None`` keeps the stored order;
2. **axis order**: ``"itk"`` reverses the index axes (the ``(k, j, i)`` array order of ITK, what the
   authors' ``itk_wrapper.register_pair`` feeds their released weights), ``"file"`` keeps them;
3. **resize** to ``N`` by linear interpolation (``F.interpolate``) with ``align_corners`` (``False``: the
   authors' wrapper; ``True``: MONAI ``Resized(align_corners=True)``, the convention of models trained
   from scratch by the demo configs).

:class:`PairGeometry` records steps 1–3 for one image, so that network coordinates can be carried
back to the file's voxel indices (and through its affine to millimetres) exactly.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = ["AXIS_ORDERS", "PairGeometry", "axis_codes", "ToNetworkGridd"]

AXIS_ORDERS = ("itk", "file")


def axis_codes(affine: np.ndarray) -> str:
    """The axis codes (``"RAS"``, ``"LPS"``, ``"PIR"``...) of a RAS voxel-to-mm ``affine``, as nibabel names them.

    Args:
        affine: ``(D+1, D+1)`` voxel-to-RAS-mm matrix.

    Returns:
        one letter per voxel axis: the world direction that axis points to.
    """
    import nibabel as nib

    return "".join(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def _reorientation(affine: np.ndarray, axcodes: str) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """File axis shown along each axis of ``axcodes``, and per file axis whether it is read backwards."""
    import nibabel as nib

    dims = affine.shape[0] - 1
    if len(axcodes) != dims:
        raise ValueError(f"axis codes {axcodes!r} must name {dims} axes for a {dims}D image.")
    labels = (("L", "R"), ("P", "A"), ("I", "S"))[:dims]
    try:
        target = nib.orientations.axcodes2ornt(tuple(axcodes.upper()), labels=labels)
    except ValueError as error:
        raise ValueError(f"invalid axis codes {axcodes!r} ({error}).") from None
    source = nib.orientations.io_orientation(affine)  # per file axis: (world axis, +1 | -1)
    order = [0] * dims
    flips = [False] * dims
    for t, (world_t, sign_t) in enumerate(target):
        f = int(np.flatnonzero(source[:, 0] == world_t)[0])
        order[t] = f
        flips[f] = bool(source[f, 1] != sign_t)
    return tuple(order), tuple(flips)


@dataclass
class PairGeometry:
    """How one image grid sits on the network grid (axis permutation/flips, then a linear resize).

    Network axis ``a`` shows file axis ``f = axis_order[a]``, read backwards when ``flips[f]``
    (``c' = S−1−c``). File voxel index ``c'`` and network coordinate ``x ∈ [0, 1]`` relate by
    ``n = (c' + 0.5)·N/S − 0.5``, ``x = n/(N − 1)`` with ``align_corners=False`` (the authors' ITK
    wrapper), or ``x = c'/(S − 1)`` with ``align_corners=True`` (MONAI ``Resized(align_corners=True)``).

    Args:
        image_shape: spatial shape of the file's voxel array.
        network_shape: spatial shape of the network grid (network axis order).
        align_corners: the resize convention (see above).
        axis_order: file axis shown along each network axis (a permutation); ``None``: identity.
        flips: per file axis, whether it is read backwards; empty: no flips.
    """

    image_shape: tuple[int, ...]
    network_shape: tuple[int, ...]
    align_corners: bool = False
    axis_order: tuple[int, ...] | None = None
    flips: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        dims = len(self.image_shape)
        if len(self.network_shape) != dims:
            raise ValueError(f"image shape {self.image_shape} and network shape {self.network_shape} differ in dimension.")
        if self.axis_order is not None and sorted(self.axis_order) != list(range(dims)):
            raise ValueError(f"axis_order must be a permutation of {list(range(dims))}, got {self.axis_order}.")
        if self.flips and len(self.flips) != dims:
            raise ValueError(f"flips must give one flag per file axis ({dims}), got {self.flips}.")

    @classmethod
    def from_affine(
        cls,
        image_shape: Sequence[int],
        affine: np.ndarray,
        network_shape: Sequence[int],
        order: str = "itk",
        align_corners: bool = False,
        axcodes: str | None = None,
    ) -> "PairGeometry":
        """The geometry of an image with RAS ``affine`` under a bundle's convention (module docstring, steps 1–3).

        Args:
            image_shape: spatial shape of the file's voxel array.
            affine: ``(D+1, D+1)`` voxel-to-RAS-mm matrix of the file.
            network_shape: the network grid.
            order: ``"itk"`` (index axes reversed) or ``"file"``.
            align_corners: the resize convention.
            axcodes: axis codes to bring the image to first, or ``None``.

        Returns:
            the geometry.
        """
        if order not in AXIS_ORDERS:
            raise ValueError(f"axis order must be one of {AXIS_ORDERS}, got {order!r}.")
        dims = len(image_shape)
        if axcodes is None:
            base, flips = tuple(range(dims)), ()
        else:
            base, flips = _reorientation(np.asarray(affine, dtype=np.float64), axcodes)
        axis_order = tuple(reversed(base)) if order == "itk" else base
        return cls(tuple(int(n) for n in image_shape), tuple(int(n) for n in network_shape), bool(align_corners), axis_order, flips)

    def _axes(self) -> list[int]:
        return list(self.axis_order) if self.axis_order is not None else list(range(len(self.image_shape)))

    def _flipped(self, f: int) -> bool:
        return bool(self.flips[f]) if self.flips else False

    def to_network_layout(self, array: torch.Tensor) -> torch.Tensor:
        """``(B, C, *file axes)`` -> ``(B, C, *network axes)`` (no resampling)."""
        flipped = [2 + f for f in range(len(self.image_shape)) if self._flipped(f)]
        if flipped:
            array = array.flip(flipped)
        axes = self._axes()
        return array if axes == sorted(axes) else array.permute(0, 1, *[2 + f for f in axes])

    def to_network(self, array: torch.Tensor, mode: str = "linear") -> torch.Tensor:
        """``(B, C, *file axes)`` -> ``(B, C, *network_shape)``: layout, then the resize (``"linear"`` or ``"nearest"``)."""
        x = self.to_network_layout(array)
        if mode == "nearest":
            return F.interpolate(x, size=tuple(self.network_shape), mode="nearest-exact")
        linear = {3: "linear", 4: "bilinear", 5: "trilinear"}[x.ndim]
        return F.interpolate(x, size=tuple(self.network_shape), mode=linear, align_corners=self.align_corners)

    def _to_grid(self, c: torch.Tensor, n_net: int, n_img: int) -> torch.Tensor:
        if self.align_corners:
            return c / max(n_img - 1, 1)
        return ((c + 0.5) * n_net / n_img - 0.5) / (n_net - 1)

    def index_to_unit(self, index: torch.Tensor) -> torch.Tensor:
        """File voxel indices ``(P, D)`` -> network coordinates ``(1, D, P, 1[, 1])`` in [0, 1]."""
        dims = len(self.image_shape)
        columns = []
        for a, f in enumerate(self._axes()):
            n_net, n_img = self.network_shape[a], self.image_shape[f]
            c = (n_img - 1) - index[:, f] if self._flipped(f) else index[:, f]
            columns.append(self._to_grid(c, n_net, n_img))
        return torch.stack(columns, 0).reshape(1, dims, -1, *([1] * (dims - 1)))

    def unit_to_index(self, unit: torch.Tensor) -> torch.Tensor:
        """Network coordinates ``(1, D, P, ...)`` -> file voxel indices ``(P, D)``."""
        dims = len(self.image_shape)
        flat = unit.reshape(dims, -1)
        index = torch.empty(flat.shape[1], dims, dtype=flat.dtype, device=flat.device)
        for a, f in enumerate(self._axes()):
            n_net, n_img = self.network_shape[a], self.image_shape[f]
            if self.align_corners:
                c = flat[a] * max(n_img - 1, 1)
            else:
                c = (flat[a] * (n_net - 1) + 0.5) * n_img / n_net - 0.5
            index[:, f] = (n_img - 1) - c if self._flipped(f) else c
        return index

    def network_affine(self, affine: np.ndarray) -> np.ndarray:
        """Network-voxel-index-to-mm matrix, given the file's voxel-to-mm ``affine`` (the resize is affine per axis)."""
        dims = len(self.image_shape)
        to_file = np.eye(dims + 1)
        to_file[:dims, :dims] = 0.0
        for a, f in enumerate(self._axes()):
            n_net, n_img = self.network_shape[a], self.image_shape[f]
            if self.align_corners:
                scale, offset = (n_img - 1) / max(n_net - 1, 1), 0.0
            else:
                scale, offset = n_img / n_net, 0.5 * n_img / n_net - 0.5
            if self._flipped(f):
                scale, offset = -scale, (n_img - 1) - offset
            to_file[f, a], to_file[f, dims] = scale, offset
        return np.asarray(affine, dtype=np.float64) @ to_file

    def describe(self) -> dict:
        """JSON-ready summary for reports."""
        return {
            "network_axis_to_file_axis": self._axes(),
            "flipped_file_axes": [f for f in range(len(self.image_shape)) if self._flipped(f)],
            "align_corners": self.align_corners,
        }


class ToNetworkGridd(MapTransform):
    """Resample images (and masks) of one scan onto the network grid under a bundle's convention.

    Reads each key's array ``(C, *spatial)`` and its RAS affine (a ``MetaTensor``'s ``affine``, or
    ``d[affine_key]``), replaces it by the ``(C, *network_shape)`` float32 tensor on the network grid (a
    ``MetaTensor`` whose ``affine`` maps network voxels to mm, its other metadata kept, when the input was
    one) and stores the :class:`PairGeometry` under ``geometry_key`` (the same for every key: they share a
    grid; ``None``: not stored, e.g. in training pipelines whose batches are collated).

    Args:
        keys: the image (linear) and masks (``mask_keys``, nearest neighbour) of one scan.
        network_shape: the network's input grid.
        order: ``"itk"`` (index axes reversed, the authors' released weights) or ``"file"``.
        align_corners: the resize convention.
        axcodes: axis codes the weights were trained on (the scan is reoriented to them first), or
            ``None``: take ``d[axcodes_key]`` if present (``register`` puts the fixed image's codes
            there for both scans of a pair), else keep the stored order.
        mask_keys: which of ``keys`` are masks/label maps (nearest-neighbour resize).
        affine_key: where the affine is when the arrays are plain tensors.
        axcodes_key: see ``axcodes``.
        geometry_key: where the geometry is stored, or ``None``.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: Sequence[str] | str,
        network_shape: Sequence[int],
        order: str = "itk",
        align_corners: bool = False,
        axcodes: str | None = None,
        mask_keys: Sequence[str] | str = (),
        affine_key: str = "affine",
        axcodes_key: str = "axcodes",
        geometry_key: str | None = "geometry",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if order not in AXIS_ORDERS:
            raise ValueError(f"order must be one of {AXIS_ORDERS}, got {order!r}.")
        self.network_shape = tuple(int(n) for n in network_shape)
        self.order = order
        self.align_corners = bool(align_corners)
        self.axcodes = axcodes
        self.mask_keys = {mask_keys} if isinstance(mask_keys, str) else set(mask_keys)
        self.affine_key, self.axcodes_key, self.geometry_key = affine_key, axcodes_key, geometry_key

    @property
    def convention(self) -> dict:
        """``{"order", "align_corners", "axcodes"}``: the resampling convention this transform applies."""
        return {"order": self.order, "align_corners": self.align_corners, "axcodes": self.axcodes}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        geometry = None
        for key in self.key_iterator(d):
            image = d[key]
            affine = getattr(image, "affine", None) if self.affine_key not in d else d[self.affine_key]
            if affine is None:
                raise ValueError(f"ToNetworkGridd: '{key}' has no affine (expected a MetaTensor or d['{self.affine_key}']).")
            affine = np.asarray(torch.as_tensor(affine).cpu(), dtype=np.float64)
            array = torch.as_tensor(image).as_subclass(torch.Tensor).to(torch.float32)
            if array.ndim != len(self.network_shape) + 1:
                raise ValueError(
                    f"ToNetworkGridd: '{key}' must be (C, *spatial) with {len(self.network_shape)} spatial axes, "
                    f"got shape {tuple(array.shape)}."
                )
            current = PairGeometry.from_affine(
                array.shape[1:], affine, self.network_shape, self.order, self.align_corners,
                self.axcodes or d.get(self.axcodes_key),
            )
            if geometry is not None and current != geometry:
                raise ValueError(f"ToNetworkGridd: '{key}' is not on the grid of the other keys ({current.image_shape} vs {geometry.image_shape}).")
            geometry = current
            mode = "nearest" if key in self.mask_keys else "linear"
            resampled = geometry.to_network(array[None], mode)[0]
            if isinstance(image, MetaTensor):
                meta = {k: v for k, v in image.meta.items() if k != "affine"}
                meta["spatial_shape"] = np.asarray(self.network_shape)
                resampled = MetaTensor(resampled, affine=torch.as_tensor(geometry.network_affine(affine)), meta=meta)
            d[key] = resampled
        if geometry is not None and self.geometry_key is not None:
            d[self.geometry_key] = geometry
        return d
