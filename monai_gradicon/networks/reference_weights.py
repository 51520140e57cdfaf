"""Load weights saved by the reference implementation (``icon_registration`` 1.1.9) into our networks.

The reference nests ``TwoStepRegistration(netPhi, netPsi)``, ``DownsampleRegistration(net)`` and
``FunctionFromVectorField(net)`` around ``UNet2`` modules; its released knee/lung/brain GradICON and
uniGradICON checkpoints are ``state_dict``s of that tree (optionally prefixed ``regis_net.``). Each key
is translated by walking *our* module tree, so a key that has no counterpart, or a parameter of ours
that no key fills, is an error — nothing is dropped silently (the reference itself loads with
``strict=False``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from .multistep import MultiStepRegistrationNet
from .steps import CompositionStep, DisplacementStep, DownsampleStep
from .unet import GradICONUNet

__all__ = ["load_reference_weights", "convert_reference_state_dict"]

_UNET_NAMES = {"downConvs": "down_convs", "upConvs": "up_convs", "batchNorms": "batch_norms", "lastConv": "last_conv"}


def _translate(key: str, root: nn.Module) -> str:
    module: nn.Module = root
    out: list[str] = []
    tokens = key.split(".")
    for i, token in enumerate(tokens):
        if isinstance(module, CompositionStep) and token in ("netPhi", "netPsi"):
            name = "first" if token == "netPhi" else "second"
        elif isinstance(module, DownsampleStep) and token == "net":
            name = "step"
        elif isinstance(module, DisplacementStep) and token == "net":
            name = "net"
        elif isinstance(module, GradICONUNet):
            if token not in _UNET_NAMES:
                raise KeyError(key)
            return ".".join(out + [_UNET_NAMES[token]] + tokens[i + 1 :])
        else:
            raise KeyError(key)
        out.append(name)
        module = getattr(module, name)
    raise KeyError(key)


def convert_reference_state_dict(
    state_dict: Mapping[str, torch.Tensor], network: MultiStepRegistrationNet
) -> dict[str, torch.Tensor]:
    """Translate a reference ``regis_net`` state dict into ``network``'s keys.

    The reference's ``TwoStepRegistration``/``DownsampleRegistration``/``FunctionFromVectorField`` tree
    is the same Eq. 6 composition as our :class:`CompositionStep`/:class:`DownsampleStep`/
    :class:`DisplacementStep` tree (paper Sec. 5.1; released models: Sec. A.2, A.3), so every key has
    one counterpart. A ``regis_net.`` prefix is stripped and persisted ``identity_map`` buffers are skipped.

    Args:
        state_dict: the reference checkpoint (``name -> tensor``), with or without the ``regis_net.`` prefix.
        network: the network to load into; its layout must match (e.g. ``four_step_network(3)`` for the
            released knee/lung/uniGradICON weights).

    Returns:
        a state dict with ``network``'s keys and the reference's tensors (not copied), ready for
        ``network.load_state_dict(..., strict=True)``.

    Raises:
        ValueError: naming every reference key that has no place in ``network`` and every parameter
            of ``network`` that the state dict does not fill.
    """
    converted, unknown = {}, []
    for key, value in state_dict.items():
        bare = key[len("regis_net.") :] if key.startswith("regis_net.") else key
        if bare == "identity_map" or bare.endswith(".identity_map"):
            continue  # a grid buffer the reference may have persisted; ours is rebuilt on the fly
        try:
            converted["step." + _translate(bare, network.step)] = value
        except (KeyError, AttributeError):
            unknown.append(key)
    missing = sorted(set(network.state_dict()) - set(converted))
    if unknown or missing:
        raise ValueError(
            "the reference state dict does not match this network's layout: "
            f"{len(unknown)} key(s) without a counterpart {unknown[:5]}{'...' if len(unknown) > 5 else ''}, "
            f"{len(missing)} parameter(s) not filled {missing[:5]}{'...' if len(missing) > 5 else ''}. "
            "The released knee/lung/uniGradICON weights need four_step_network(3)."
        )
    return converted


def load_reference_weights(
    network: MultiStepRegistrationNet, source: str | os.PathLike | Mapping[str, torch.Tensor]
) -> MultiStepRegistrationNet:
    """Load a reference checkpoint (path or state dict) into ``network`` strictly; returns ``network``.

    For the released GradICON models of the paper (knee, Sec. A.2; lung, Sec. A.3) and uniGradICON.
    A file is read with ``torch.load(..., map_location="cpu", weights_only=True)``; the keys are
    translated by :func:`convert_reference_state_dict`.

    Args:
        network: the network to fill (in place), e.g. ``four_step_network(3)``.
        source: path of a reference ``.trch``/``.pt`` state-dict file, or the state dict itself.

    Returns:
        ``network``, with the reference weights loaded.

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        ValueError: ``source`` is not a state dict, or it does not match ``network``'s layout.

    Example::

        net = four_step_network(3)
        load_reference_weights(net, "lung_model_weights_step_2.trch")
    """
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"reference weights file not found: {os.fspath(source)!r}.")
        source = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(source, Mapping):
        raise ValueError(f"expected a state dict (mapping of names to tensors), got {type(source).__name__}.")
    network.load_state_dict(convert_reference_state_dict(source, network), strict=True)
    return network
