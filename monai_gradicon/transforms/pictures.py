"""Post-processing transform writing a PNG overview of each registered pair."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

from monai.transforms import MapTransform

from ..visualize import save_overview_png

__all__ = ["SaveOverviewPNGd"]


class SaveOverviewPNGd(MapTransform):
    """Write ``<output_dir>/<prefix><n>.png``: fixed | moving | warped | checkerboard | deformed grid.

    ``n`` counts the items this transform has seen (per process). The item is returned unchanged, and
    the written path is stored under ``"overview_png"``.

    Args:
        output_dir: folder of the PNG files (created).
        moving_key: key of the moving image ``(C, *spatial)`` in the decollated item.
        fixed_key: key of the fixed image.
        warped_key: key of the warped moving image (e.g. from :class:`~monai_gradicon.transforms.WarpWithDDFd`).
        ddf_key: key of the DDF ``(D, *spatial)`` (the network's ``pred``).
        prefix: file name prefix.
    """

    def __init__(
        self, output_dir: str, moving_key: str = "moving", fixed_key: str = "fixed", warped_key: str = "warped",
        ddf_key: str = "pred", prefix: str = "registration_",
    ) -> None:
        super().__init__([moving_key, fixed_key, warped_key, ddf_key])
        self.output_dir = str(output_dir)
        self.moving_key, self.fixed_key, self.warped_key, self.ddf_key = moving_key, fixed_key, warped_key, ddf_key
        self.prefix = prefix
        self._count = 0

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        missing = [k for k in self.keys if k not in d]
        if missing:
            raise ValueError(f"SaveOverviewPNGd: key(s) {missing} missing; keys present: {sorted(map(str, d))}.")
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, f"{self.prefix}{self._count}.png")
        self._count += 1
        d["overview_png"] = save_overview_png(
            path, d[self.moving_key], d[self.fixed_key], d[self.warped_key], d[self.ddf_key]
        )
        return d
