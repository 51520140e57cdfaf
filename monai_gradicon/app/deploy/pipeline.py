"""The registration step of the MONAI Deploy application, without the Deploy SDK (testable anywhere).

Input folder layout, one of:

* a NIfTI pair: ``moving.nii.gz`` and ``fixed.nii.gz`` (``.nii`` also accepted), optionally
  ``moving_labels.nii.gz``, ``moving_mask.nii.gz``, ``fixed_mask.nii.gz``;
* a DICOM study: the files of two image series (any names, any sub-folders, one file per slice). Without
  selection rules the two series are ordered by SeriesNumber: the lower number is the moving image, the
  higher the fixed one. The environment variable ``MONAI_GRADICON_DICOM_RULES`` (JSON text, or the path
  of a JSON file) gives Deploy SDK series-selection rules instead, with one selection named ``moving`` and
  one named ``fixed``, each of which must match exactly one series (see :func:`dicom_selection_rules`).

The model path (``-m`` /
``HOLOSCAN_MODEL_PATH``) is a bundle directory, or a weights file (or a folder holding one) for the bundle
named by the environment variable ``MONAI_GRADICON_BUNDLE`` (a short name such as ``knee`` or
``unigradicon``, or a bundle directory; ``knee`` by default); ``MONAI_GRADICON_IO_STEPS`` sets
instance-optimisation steps (default 0). Registration is :func:`monai_gradicon.app.register`, driven by the
bundle like every other path.
"""

from __future__ import annotations

import json
import os

from ..errors import InputError

__all__ = ["DICOM_RULES_VARIABLE", "dicom_selection_rules", "find_pair", "input_kind", "resolve_model", "run_registration"]

DICOM_RULES_VARIABLE = "MONAI_GRADICON_DICOM_RULES"

_ROLES = ("moving", "fixed", "moving_labels", "moving_mask", "fixed_mask")


def find_pair(input_dir: str) -> dict[str, str]:
    """The role -> file mapping of an input folder (``moving`` and ``fixed`` required).

    Args:
        input_dir: folder holding ``moving.nii[.gz]``, ``fixed.nii[.gz]`` and optional masks/labels.

    Returns:
        ``{role: path}`` for every role file found.

    Raises:
        FileNotFoundError: the folder or a required image is missing.
    """
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"input folder not found: {input_dir!r}.")
    found = {}
    for role in _ROLES:
        for extension in (".nii.gz", ".nii"):
            path = os.path.join(input_dir, role + extension)
            if os.path.isfile(path):
                found[role] = path
                break
    missing = [r for r in ("moving", "fixed") if r not in found]
    if missing:
        raise FileNotFoundError(
            f"input folder {input_dir!r} must contain moving.nii.gz and fixed.nii.gz; missing {missing} "
            f"(found {sorted(os.listdir(input_dir))})."
        )
    return found


def _is_dicom_file(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def input_kind(input_dir: str) -> str:
    """Whether the app's input folder holds a NIfTI pair or DICOM files.

    Args:
        input_dir: the app's input folder.

    Returns:
        ``"nifti"`` where it holds ``moving.nii[.gz]`` or ``fixed.nii[.gz]`` (then :func:`find_pair` reads
        it), ``"dicom"`` where a file in it or below is a DICOM file (Part 10: ``DICM`` after the preamble).

    Raises:
        FileNotFoundError: the folder does not exist.
        InputError: the folder holds neither.
    """
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"input folder not found: {input_dir!r}.")
    names = os.listdir(input_dir)
    if any(n in names for r in ("moving", "fixed") for n in (r + ".nii.gz", r + ".nii")):
        return "nifti"
    for root, _, files in os.walk(input_dir):
        if any(_is_dicom_file(os.path.join(root, f)) for f in files):
            return "dicom"
    raise InputError(
        f"input folder {input_dir!r} holds neither a NIfTI pair (moving.nii.gz and fixed.nii.gz) nor DICOM files "
        f"(found {sorted(names)[:10]})."
    )


def dicom_selection_rules() -> str:
    """The Deploy SDK series-selection rules of ``MONAI_GRADICON_DICOM_RULES`` (JSON text or a JSON file), or ``""``.

    The rules are the SDK's ``DICOMSeriesSelectorOperator`` format, e.g.
    ``{"selections": [{"name": "moving", "conditions": {"SeriesDescription": "(?i)baseline"}},
    {"name": "fixed", "conditions": {"SeriesDescription": "(?i)follow.?up"}}]}``; exactly the two
    selections ``moving`` and ``fixed`` are expected.

    Returns:
        the rules as JSON text, ``""`` where the variable is unset or empty (then SeriesNumber orders the pair).

    Raises:
        InputError: unreadable JSON, or selections other than one ``moving`` and one ``fixed``.
    """
    value = os.environ.get(DICOM_RULES_VARIABLE, "").strip()
    if not value:
        return ""
    text = value
    if not value.startswith("{"):
        if not os.path.isfile(value):
            raise InputError(f"{DICOM_RULES_VARIABLE} must be JSON selection rules or a JSON file; {value!r} is neither.")
        with open(value) as f:
            text = f.read()
    try:
        rules = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{DICOM_RULES_VARIABLE}: the selection rules are not valid JSON ({error}).") from None
    selections = rules.get("selections") if isinstance(rules, dict) else None
    names = sorted(str(s.get("name", "")) for s in selections or [] if isinstance(s, dict))
    if names != ["fixed", "moving"] or not all(isinstance(s, dict) and s.get("conditions") for s in selections):
        raise InputError(
            f"{DICOM_RULES_VARIABLE}: expected {{\"selections\": [...]}} with one selection named 'moving' and one "
            f"named 'fixed', each with conditions; got selections named {names}."
        )
    return text


def resolve_model(model_path: str | None) -> tuple[str, str | None]:
    """``(bundle, weights)`` for :func:`monai_gradicon.app.register` from the app's model path.

    Args:
        model_path: a bundle directory, a folder holding one weights file (``.pt``/``.pth``/``.trch``),
            a weights file, or ``None``; without a bundle directory the bundle named by the
            ``MONAI_GRADICON_BUNDLE`` environment variable (default ``"knee"``) is used.

    Returns:
        ``(bundle, weights)``: bundle name or directory, and the weights file or ``None``.
    """
    builtin = os.environ.get("MONAI_GRADICON_BUNDLE", "knee")
    if model_path and os.path.isdir(model_path):
        if os.path.isfile(os.path.join(model_path, "configs", "inference.json")):
            return model_path, None
        candidates = [os.path.join(model_path, n) for n in sorted(os.listdir(model_path)) if n.endswith((".pt", ".pth", ".trch"))]
        return builtin, candidates[0] if candidates else None
    if model_path and os.path.isfile(model_path):
        return builtin, model_path
    return builtin, None


def run_registration(pair: dict[str, str], output_dir: str, model_path: str | None, device: str | None = None) -> dict:
    """Register ``pair`` (role -> file, as :func:`find_pair` gives) and write the outputs of ``register`` to ``output_dir``.

    Args:
        pair: the files handed to the operator (``moving``, ``fixed``, optional labels and masks).
        output_dir: where the outputs of :func:`monai_gradicon.app.register` go.
        model_path: the app's model path (see :func:`resolve_model`).
        device: ``"cpu"``/``"cuda"``; default: CUDA when available.

    Returns:
        the registration report (dict).
    """
    from ..register import register

    bundle, weights = resolve_model(model_path)
    outputs = register(
        pair["moving"], pair["fixed"], bundle, output_dir, moving_labels=pair.get("moving_labels"),
        moving_mask=pair.get("moving_mask"), fixed_mask=pair.get("fixed_mask"), weights=weights,
        io_steps=int(os.environ.get("MONAI_GRADICON_IO_STEPS", "0")), device=device, progress=False,
    )
    return outputs.report
