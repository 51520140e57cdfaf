"""Dice overlap of a warped label map with the fixed label map (paper Sec. 5.2, Tab. 1, OAI cartilage).

Computed by MONAI's :func:`monai.metrics.compute_dice` (what ``MeanDice`` of the bundles' evaluation uses)
on one-hot maps of the scored labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice

__all__ = ["label_dice", "mean_label_dice"]


def label_dice(prediction: np.ndarray, reference: np.ndarray, labels: Sequence[int] | None = None) -> dict[int, float]:
    """``2|P∩R| / (|P| + |R|)`` for each label.

    Args:
        prediction: warped moving label map (integers).
        reference: fixed label map, same shape.
        labels: the labels to score; default every nonzero label of ``reference`` (OAI: 1 femoral, 2 tibial cartilage).

    Returns:
        label -> Dice in [0, 1]; a label absent from both maps is left out.

    Raises:
        ValueError: the maps differ in shape.
    """
    prediction = np.rint(np.asarray(prediction)).astype(np.int64)
    reference = np.rint(np.asarray(reference)).astype(np.int64)
    if prediction.shape != reference.shape:
        raise ValueError(f"label maps must have the same shape, got {prediction.shape} and {reference.shape}.")
    if labels is None:
        labels = [int(v) for v in np.unique(reference) if v != 0]
    labels = [int(v) for v in labels]
    if not labels:
        return {}
    one_hot = [
        torch.from_numpy(np.stack([m == label for label in labels])[None]).to(torch.float64) for m in (prediction, reference)
    ]
    values = compute_dice(one_hot[0], one_hot[1], include_background=True, ignore_empty=False)[0]
    present = [bool((prediction == label).any() or (reference == label).any()) for label in labels]
    return {label: float(v) for label, v, here in zip(labels, values, present) if here}


def mean_label_dice(prediction: np.ndarray, reference: np.ndarray, labels: Sequence[int] | None = None) -> float:
    """Mean of :func:`label_dice` over the labels (the Dice of paper Tab. 1/2).

    Args:
        prediction: warped moving label map (integers).
        reference: fixed label map, same shape.
        labels: the labels to score; default every nonzero label of ``reference``.

    Returns:
        the mean Dice in [0, 1], NaN when no label is present.
    """
    scores = label_dice(prediction, reference, labels)
    return float(np.mean(list(scores.values()))) if scores else float("nan")
