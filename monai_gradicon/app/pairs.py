"""Register every pair of a datalist with one model: what a bundle's ``configs/inference.json`` runs.

The datalist is the one pair-list schema of the package (:func:`monai_gradicon.transforms.load_pair_datalist`):
``{"testing": [{"moving": ..., "fixed": ..., "moving_mask": ..., "fixed_mask": ..., "moving_label": ...,
"id": ...}, ...]}``. Each pair is registered by :func:`monai_gradicon.app.register` into
``<out>/<id>`` (default id: the entry's index), so ``python -m monai.bundle run --config_file
configs/inference.json`` writes exactly what ``monai-gradicon register`` writes for the same pair.
"""

from __future__ import annotations

import json
import os

from tqdm.auto import tqdm

from ..transforms.datalist import load_pair_datalist
from .model import RegistrationModel
from .register import register

__all__ = ["register_pairs", "pair_name"]


def pair_name(entry: dict, index: int) -> str:
    """The output folder name of a datalist entry: its ``id``, else its index.

    Args:
        entry: the datalist entry.
        index: its position in the section.

    Returns:
        the folder name.
    """
    return str(entry.get("id", index))


def register_pairs(
    model: RegistrationModel,
    datalist_file: str,
    out: str,
    section: str = "testing",
    io_steps: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Register the pairs of one datalist section; write ``<out>/<id>/`` per pair and ``<out>/registrations.json``.

    Args:
        model: the bundle's ``registration_model``.
        datalist_file: the pair datalist (JSON).
        out: output folder.
        section: which section of the datalist.
        io_steps: instance-optimisation steps per pair (0: none).
        progress: progress bar over the pairs.

    Returns:
        the reports of the pairs, in datalist order.
    """
    entries = load_pair_datalist(datalist_file, section)
    reports = []
    for index, entry in enumerate(tqdm(entries, desc="pairs", disable=not progress)):
        outputs = register(
            entry["moving"], entry["fixed"], model, os.path.join(out, pair_name(entry, index)),
            moving_labels=entry.get("moving_label"), moving_mask=entry.get("moving_mask"), fixed_mask=entry.get("fixed_mask"),
            io_steps=io_steps, progress=False,
        )
        reports.append(outputs.report)
    with open(os.path.join(out, "registrations.json"), "w", encoding="utf-8") as f:
        json.dump([{"id": pair_name(e, i), "report": r["files"]["report"]} for i, (e, r) in enumerate(zip(entries, reports))], f, indent=2)
    return reports
