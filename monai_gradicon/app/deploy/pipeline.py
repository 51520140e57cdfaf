"""The registration step of the MONAI Deploy application, without the Deploy SDK (testable anywhere).

Input folder layout: ``moving.nii.gz`` and ``fixed.nii.gz`` (``.nii`` also accepted), optionally
``moving_labels.nii.gz``, ``moving_mask.nii.gz``, ``fixed_mask.nii.gz``. The model path (``-m`` /
``HOLOSCAN_MODEL_PATH``) is a bundle directory, or a weights file (or a folder holding one) for the bundle
named by the environment variable ``MONAI_GRADICON_BUNDLE`` (a short name such as ``knee`` or
``unigradicon``, or a bundle directory; ``knee`` by default); ``MONAI_GRADICON_IO_STEPS`` sets
instance-optimisation steps (default 0). Registration is :func:`monai_gradicon.app.register`, driven by the
bundle like every other path.
"""

from __future__ import annotations

import os

__all__ = ["find_pair", "resolve_model", "run_registration"]

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
