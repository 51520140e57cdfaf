"""Evaluate registrations of a list of pairs: landmark mTRE (both directions) and label Dice plus folds.

The pairs come from a pair datalist, the one schema of the bundles' datalists
(:func:`monai_gradicon.transforms.load_pair_datalist`; section ``testing`` by default), entries with

* ``moving``, ``fixed``: image files (``moving`` is image A, registered onto ``fixed``);
* optional ``id`` (default: index), ``registration`` (an existing ``register`` output folder; when
  absent the pair is registered now into ``<out>/<id>``), ``moving_mask``/``fixed_mask``;
* optional ``moving_landmarks``, ``fixed_landmarks`` (1-based voxel index files) and
  ``landmark_spacing`` (DirLab convention, see :func:`landmarks_to_physical`; default: the image affines);
* optional ``moving_label``, ``fixed_label`` (label maps on each image's grid).

Relative paths are resolved against the datalist's folder. Per pair: mTRE of ``Φ_AB`` (fixed
landmarks mapped to the moving image) and of ``Φ_BA`` (the other way), the error before registration,
mean Dice of the warped moving labels, and the folds of both maps. Over pairs: mean and 25/50/75th
percentiles of the per-pair mTRE (the layout of paper Tab. 5), and the mean Dice and folds (Tab. 1).
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..io import load_image
from ..metrics import (
    PhysicalDisplacementField,
    label_dice,
    landmark_distances,
    landmarks_to_physical,
    read_landmarks,
    target_registration_error,
    tre_summary,
)
from ..transforms.datalist import load_pair_datalist
from .errors import InputError
from .model import RegistrationModel
from .pairs import pair_name
from .register import register

__all__ = ["evaluate_pairs", "evaluate_registration"]


def evaluate_registration(pair: dict, registration_dir: str) -> dict:
    """Metrics of one pair from a ``register`` output folder: mTRE both ways, Dice, folds (paper Tab. 1, 5).

    Args:
        pair: one entry of the pairs file with paths already resolved (see the module docstring).
        registration_dir: the ``register`` output folder of that pair (``report.json``, displacements,
            warped labels).

    Returns:
        a dict: ``registration``, ``folds_forward[_percent]``, ``folds_inverse[_percent]``, and when the
        pair has landmarks ``tre_before``/``tre_forward``/``tre_inverse`` (:func:`tre_summary` dicts), and when
        it has labels ``dice`` (label -> Dice) and ``dice_mean``.

    Raises:
        ValueError: only one landmark file given, or landmark counts that differ.
    """
    with open(os.path.join(registration_dir, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    fixed_affine = np.asarray(report["fixed_affine_ras"])
    moving_affine = np.asarray(report["moving_affine_ras"])
    result: dict = {
        "registration": registration_dir,
        "folds_forward": report["forward"]["folds"],
        "folds_forward_percent": report["forward"]["folds_percent"],
        "folds_inverse": report["inverse"]["folds"],
        "folds_inverse_percent": report["inverse"]["folds_percent"],
    }
    if pair.get("moving_landmarks") or pair.get("fixed_landmarks"):
        if not (pair.get("moving_landmarks") and pair.get("fixed_landmarks")):
            raise InputError(f"pair {pair.get('id')!r}: give both moving_landmarks and fixed_landmarks, or neither.")
        spacing = pair.get("landmark_spacing")
        moving_index = read_landmarks(pair["moving_landmarks"])
        fixed_index = read_landmarks(pair["fixed_landmarks"])
        if moving_index.shape != fixed_index.shape:
            raise InputError(
                f"pair {pair.get('id')!r}: {moving_index.shape[0]} moving landmarks but {fixed_index.shape[0]} fixed "
                "landmarks; they must correspond one to one."
            )
        place = (lambda idx, aff: landmarks_to_physical(idx, spacing=spacing)) if spacing else (
            lambda idx, aff: landmarks_to_physical(idx, affine=aff)
        )
        moving_mm, fixed_mm = place(moving_index, moving_affine), place(fixed_index, fixed_affine)
        forward = PhysicalDisplacementField.from_nifti(os.path.join(registration_dir, "displacement_mm.nii.gz"))
        inverse = PhysicalDisplacementField.from_nifti(os.path.join(registration_dir, "inverse_displacement_mm.nii.gz"))
        result["tre_before"] = tre_summary(landmark_distances(fixed_mm, moving_mm))
        result["tre_forward"] = tre_summary(target_registration_error(fixed_mm, moving_mm, forward))
        result["tre_inverse"] = tre_summary(target_registration_error(moving_mm, fixed_mm, inverse))
    if pair.get("fixed_label"):
        warped_path = os.path.join(registration_dir, "warped_moving_labels.nii.gz")
        if not os.path.isfile(warped_path):
            raise InputError(f"pair {pair.get('id')!r}: fixed_label given but {warped_path!r} is missing (register with moving_label).")
        fixed_labels = load_image(pair["fixed_label"], "fixed label map").array[0].numpy()
        warped = load_image(warped_path, "warped label map").array[0].numpy()
        scores = label_dice(warped, fixed_labels)
        result["dice"] = {str(k): v for k, v in scores.items()}
        result["dice_mean"] = float(np.mean(list(scores.values()))) if scores else float("nan")
    return result


def _over_pairs(values: list[float]) -> dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    p25, p50, p75 = np.percentile(values, [25, 50, 75])
    return {"mean": float(values.mean()), "p25": float(p25), "p50": float(p50), "p75": float(p75), "pairs": int(values.size)}


def evaluate_pairs(
    datalist_file: str,
    out: str,
    bundle: str | RegistrationModel | None = None,
    weights: str | None = None,
    io_steps: int = 0,
    device: str | None = None,
    progress: bool = True,
    section: str = "testing",
) -> dict:
    """Register (when needed) and evaluate every pair of a datalist section; write ``<out>/evaluation.json``.

    Args:
        datalist_file: pair datalist (see the module docstring).
        out: output folder (``evaluation.json`` and registrations made now, one sub-folder per pair).
        bundle: a short name, a bundle directory or a :class:`RegistrationModel`, for pairs without a
            ``registration`` folder (loaded once for all pairs).
        weights: weights file overriding the bundle's.
        io_steps: instance-optimisation steps (paper Sec. 5.3) for registrations made now.
        device: ``"cpu"``/``"cuda"``; default: CUDA when available.
        progress: show progress bars.
        section: the datalist section.

    Returns:
        ``{"pairs": [per-pair metrics], "summary": {...}}``.
    """
    from .model import load_registration_model

    pairs = load_pair_datalist(datalist_file, section, required_keys=())
    os.makedirs(out, exist_ok=True)
    model = None
    results = []
    for number, pair in enumerate(pairs):
        pair.setdefault("id", pair_name(pair, number))
        registration_dir = pair.get("registration")
        if not registration_dir:
            missing = [key for key in ("moving", "fixed") if not pair.get(key)]
            if missing:
                raise InputError(f"pair {pair['id']!r} has no {missing} image(s) and no 'registration' folder.")
            if bundle is None:
                raise InputError(f"pair {pair['id']!r} has no 'registration' folder; give a bundle to register it.")
            if model is None:
                if isinstance(bundle, RegistrationModel) and weights:
                    raise InputError("weights apply when the model is loaded from a bundle; this RegistrationModel is already built.")
                model = bundle if isinstance(bundle, RegistrationModel) else load_registration_model(bundle, weights, device)
            registration_dir = os.path.join(out, str(pair["id"]))
            register(
                pair["moving"], pair["fixed"], model, registration_dir, moving_labels=pair.get("moving_label"),
                moving_mask=pair.get("moving_mask"), fixed_mask=pair.get("fixed_mask"), io_steps=io_steps, progress=progress,
            )
        metrics = evaluate_registration(pair, registration_dir)
        metrics["id"] = pair["id"]
        results.append(metrics)
    summary: dict = {}
    for key in ("tre_before", "tre_forward", "tre_inverse"):
        values = [r[key]["mean"] for r in results if key in r]
        if values:
            summary[f"m{key}"] = _over_pairs(values)
    dice = [r["dice_mean"] for r in results if "dice_mean" in r]
    if dice:
        summary["dice_mean"] = _over_pairs(dice)
    for key in ("folds_forward", "folds_forward_percent", "folds_inverse", "folds_inverse_percent"):
        summary[key] = float(np.mean([r[key] for r in results]))
    evaluation = {"pairs": results, "summary": summary}
    with open(os.path.join(out, "evaluation.json"), "w", encoding="utf-8") as f:
        json.dump(evaluation, f, indent=2)
    return evaluation
