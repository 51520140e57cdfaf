"""Build the reference implementation (icon_registration 1.1.9) twins of our networks, for parity tests."""

from __future__ import annotations

import icon_registration as icon
import icon_registration.losses as icon_losses
import icon_registration.network_wrappers as icon_wrappers
import icon_registration.networks as icon_networks


def reference_network(spatial_dims: int, levels, unet=None):
    """The reference module tree equal to ``multistep_network(spatial_dims, levels)``.

    ``unet`` builds each step's network (default: the reference ``tallUNet2``; e.g. a narrow
    ``UNet2`` twin of ``GradICONUNet(spatial_dims, 1, down_channels, up_channels)``).
    """
    make = unet or (lambda: icon_networks.tallUNet2(dimension=spatial_dims))
    net = icon_wrappers.FunctionFromVectorField(make())
    for previous, level in zip(levels, levels[1:]):
        for _ in range(previous - level):
            net = icon_wrappers.DownsampleRegistration(net, dimension=spatial_dims)
        net = icon_wrappers.TwoStepRegistration(
            net, icon_wrappers.FunctionFromVectorField(make())
        )
    for _ in range(levels[-1]):
        net = icon_wrappers.DownsampleRegistration(net, dimension=spatial_dims)
    return net


def reference_loss(kind: str, regis_net, similarity, lmbda, input_shape):
    """``GradientICON`` / ``GradientICONSparse`` / ``InverseConsistentNet`` around ``regis_net``."""
    cls = {
        "gradicon": icon.GradientICON,
        "sparse": icon_losses.GradientICONSparse,
        "icon": icon.InverseConsistentNet,
    }[kind]
    model = cls(regis_net, similarity, lmbda)
    model.assign_identity_map(list(input_shape))
    return model
