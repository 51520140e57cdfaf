"""Finding the checkpoint to resume a killed training from."""

from __future__ import annotations

import glob
import os
import re

__all__ = ["latest_checkpoint"]

_EPOCH = re.compile(r"(?:epoch|iteration)=(\d+)\.pt$")


def latest_checkpoint(ckpt_dir: str, pattern: str = "training_*.pt") -> str:
    """Path of the most advanced periodic training checkpoint in ``ckpt_dir``.

    MONAI's ``CheckpointSaver(save_interval=..., file_prefix="training")`` writes
    ``training_checkpoint_epoch=<N>.pt`` (model, optimizer and trainer state); the file with the
    largest ``N`` is returned.

    Args:
        ckpt_dir: the bundle's checkpoint folder.
        pattern: glob of the periodic checkpoints inside ``ckpt_dir``.

    Returns:
        the path of the matching file whose name ends in ``epoch=<N>.pt`` or ``iteration=<N>.pt``
        with the largest ``N``.

    Raises:
        FileNotFoundError: no such checkpoint (the message names the folder and pattern).
    """
    found = []
    for path in glob.glob(os.path.join(str(ckpt_dir), pattern)):
        match = _EPOCH.search(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    if not found:
        raise FileNotFoundError(
            f"nothing to resume: no training checkpoint matching '{pattern}' (…epoch=<N>.pt) in {os.path.abspath(str(ckpt_dir))}."
        )
    return max(found)[1]
