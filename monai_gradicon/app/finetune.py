"""Fine-tuning a bundle's released model on one's own pairs, fed exactly as ``register`` feeds them.

A bundle's ``registration_model`` (its ``configs/inference.json``) says how its weights see a scan: the
``scan_preprocessing`` ending in :class:`~monai_gradicon.transforms.ToNetworkGridd`, the mask policy, the
axis codes both scans of a pair are brought to. :class:`RegistrationPairDataset` turns each training pair
of a datalist into the network input through :func:`~monai_gradicon.app.prepare_pair` itself, so weights
fine-tuned on these items are used by ``monai-gradicon register --bundle <b> --weights <model.pt>`` under
the very convention they were trained with. :func:`starting_network` is the network to fine-tune: the
model's, with its weights file loaded strictly (never an untrained one). The shared recipe
``bundles/common/finetune.json`` wires both into MONAI's ``SupervisedTrainer`` with the objective the
released models were trained with (LNCC σ 5 + λ 1.5 sparse GradICON, paper Sec. 5.1).
"""

from __future__ import annotations

import torch
from torch import nn

from ..transforms.datalist import entry_modalities, load_pair_datalist
from .errors import InputError, MissingWeightsError
from .model import RegistrationModel
from .register import prepare_pair

__all__ = ["RegistrationPairDataset", "starting_network"]


def starting_network(model: RegistrationModel) -> nn.Module:
    """The network of ``model`` to fine-tune, refusing one without loaded weights.

    Args:
        model: a bundle's ``registration_model`` (its weights file was loaded strictly when it was built:
            a file that does not fit has already failed, naming the file; a missing one names where to get it).

    Returns:
        ``model.network`` (``forward(moving, fixed) -> ddf``), whose ``state_dict`` is what ``register --weights`` loads.

    Raises:
        MissingWeightsError: ``model`` has no weights (``allow_untrained``): fine-tuning would start from random weights.
    """
    if not model.weights:
        raise MissingWeightsError(
            f"fine-tuning {model.name!r} starts from its released weights, but none were loaded ({'; '.join(model.notes)}): "
            "put the weights file in place (see the bundle's large_files.yml) or pass --weights_file FILE; "
            "allow_untrained does not apply to fine-tuning."
        )
    return model.network


class RegistrationPairDataset(torch.utils.data.Dataset):
    """The pairs of one datalist section on the network grid, each prepared as :func:`~monai_gradicon.app.register` prepares it.

    Args:
        model: the bundle's ``registration_model``; its mask policy applies (``"required"``: every entry needs
            ``moving_mask`` and ``fixed_mask``; ``"unused"``: none may have them).
        datalist_file: the pair datalist (:func:`~monai_gradicon.transforms.load_pair_datalist`); in a bundle
            with several modalities (uniGradICON: ``ct``, ``mri``) an entry may name ``modality`` (both scans)
            or ``moving_modality``/``fixed_modality``, else the bundle default applies.
        section: the datalist section.

    Each item is ``{"image": (2C, *network_shape) float32 [moving, fixed], "id": str}``.

    Raises:
        InputError: an entry without the masks the model requires, with masks it does not use, or with a
            modality the bundle does not know.
        FileNotFoundError / ValueError: from the datalist (naming file, section, entry and key).
    """

    def __init__(self, model: RegistrationModel, datalist_file: str, section: str = "training") -> None:
        required = ["moving", "fixed"] + (["moving_mask", "fixed_mask"] if model.masks == "required" else [])
        self.model = model
        self.entries = load_pair_datalist(datalist_file, section, required_keys=required)
        self.modalities = []
        for index, entry in enumerate(self.entries):
            where = f"entry {index} of section '{section}' in {datalist_file}"
            if model.masks == "unused" and ("moving_mask" in entry or "fixed_mask" in entry):
                raise InputError(f"{where} gives masks, but the {model.name!r} model does not use masks: remove moving_mask/fixed_mask.")
            modalities = entry_modalities(entry)
            for modality in modalities:
                if modality is not None and modality not in model.modalities:
                    known = f"one of {list(model.modalities)}" if model.modalities else "none (this bundle has one preprocessing)"
                    raise InputError(f"{where} has modality {modality!r}; the {model.name!r} bundle knows {known}.")
            self.modalities.append(modalities)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        moving_modality, fixed_modality = self.modalities[index]
        pair = prepare_pair(
            self.model, entry["moving"], entry["fixed"], moving_mask=entry.get("moving_mask"), fixed_mask=entry.get("fixed_mask"),
            moving_modality=moving_modality, fixed_modality=fixed_modality,
        )
        return {"image": torch.cat([pair.A, pair.B], dim=1)[0], "id": str(entry.get("id", index))}
