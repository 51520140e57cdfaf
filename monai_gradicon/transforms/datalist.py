"""Pair datalists (decathlon-style JSON) with errors that name the file, section and key at fault.

Format::

    {"training":   [{"moving": "img/p01_exp.nii.gz", "fixed": "img/p01_insp.nii.gz",
                     "moving_label": "seg/p01_exp.nii.gz", "fixed_label": "seg/p01_insp.nii.gz"}, ...],
     "validation": [...], "testing": [...]}

Relative paths are joined to ``base_dir`` (default: the datalist's folder). Values that are not file
names (numbers, lists) are kept as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

__all__ = ["load_pair_datalist", "PAIR_KEYS", "entry_modalities"]

#: keys a pair entry may have: images, label maps, masks (for models that use them), landmark files, a
#: free-text id, the scans' modalities (bundles with several: ``modality`` for both, or one per scan), and for
#: evaluation an existing ``register`` output folder and the DirLab landmark spacing.
PAIR_KEYS = (
    "moving", "fixed", "moving_label", "fixed_label", "moving_mask", "fixed_mask", "moving_landmarks", "fixed_landmarks",
    "id", "modality", "moving_modality", "fixed_modality", "registration", "landmark_spacing",
)

#: keys whose string values are text, not file names.
TEXT_KEYS = ("id", "modality", "moving_modality", "fixed_modality")


def entry_modalities(entry: dict) -> tuple[str | None, str | None]:
    """The moving and fixed scans' modalities a pair entry names (``None``: the bundle default).

    Args:
        entry: a datalist entry; ``modality`` applies to both scans, ``moving_modality``/``fixed_modality``
            to one (they must agree with ``modality`` when both are given).

    Returns:
        ``(moving modality, fixed modality)``.

    Raises:
        ValueError: a per-scan modality that contradicts ``modality``.
    """
    both = entry.get("modality")
    chosen = []
    for role in ("moving", "fixed"):
        own = entry.get(f"{role}_modality")
        if own is not None and both is not None and own != both:
            raise ValueError(f"pair entry {entry.get('id', '')!r}: {role}_modality {own!r} contradicts modality {both!r}.")
        chosen.append(own if own is not None else both)
    return chosen[0], chosen[1]


def load_pair_datalist(
    datalist_file: str,
    section: str = "training",
    base_dir: str | None = None,
    required_keys: Sequence[str] = ("moving", "fixed"),
    check_files: bool = True,
    allowed_keys: Sequence[str] | None = PAIR_KEYS,
) -> list[dict]:
    """Read one section of a pair datalist and resolve its paths.

    Args:
        datalist_file: path of the JSON file.
        section: ``"training"``, ``"validation"`` or ``"testing"`` (any top-level key).
        base_dir: folder the relative paths are relative to; default the JSON file's folder.
        required_keys: keys every entry must have.
        check_files: raise if a referenced file does not exist.
        allowed_keys: keys an entry may have (a misspelt key fails instead of being ignored); ``None``: any.

    Returns:
        list of dicts with absolute paths.

    Raises:
        FileNotFoundError / ValueError: naming the datalist file, section, entry index and key.
    """
    path = os.path.abspath(os.path.expanduser(str(datalist_file)))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"datalist file not found: {path} (set --datalist_file to your pair list, or use the synthetic "
            "phantom pairs with --synthetic True)."
        )
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"datalist file {path} is not valid JSON: {e}.") from e
    if not isinstance(content, dict) or section not in content:
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"datalist file {path} has no section '{section}' (found: {keys}).")
    entries = content[section]
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"section '{section}' of datalist file {path} must be a non-empty list of pairs.")
    root = os.path.abspath(base_dir) if base_dir else os.path.dirname(path)
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"entry {i} of section '{section}' in {path} must be an object, got {type(entry).__name__}.")
        missing = [k for k in required_keys if k not in entry]
        if missing:
            raise ValueError(
                f"entry {i} of section '{section}' in {path} lacks key(s) {missing} (has {sorted(entry)})."
            )
        if allowed_keys is not None:
            unknown = sorted(set(entry) - set(allowed_keys))
            if unknown:
                raise ValueError(
                    f"entry {i} of section '{section}' in {path} has unknown key(s) {unknown}; allowed: {list(allowed_keys)}."
                )
        resolved = {}
        for key, value in entry.items():
            if isinstance(value, str) and key not in TEXT_KEYS:
                full = value if os.path.isabs(value) else os.path.join(root, value)
                if check_files and not os.path.exists(full):
                    raise FileNotFoundError(
                        f"entry {i} key '{key}' of section '{section}' in {path}: file not found: {full}."
                    )
                resolved[key] = full
            else:
                resolved[key] = value
        out.append(resolved)
    return out
