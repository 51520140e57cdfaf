"""Build the reference implementation (icon_registration 1.1.9) twins of our networks, for parity tests."""

from __future__ import annotations

import icon_registration as icon
import icon_registration.losses as icon_losses
import icon_registration.network_wrappers as icon_wrappers
import icon_registration.networks as icon_networks
import numpy as np
import torch


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


def perturb_reference_weights(regis_net, generator: torch.Generator, std: float = 0.02, last_std: float = 0.005, batch_norm: bool = False):
    """Give every layer of a reference network random weights (its zero-initialised last conv included).

    Args:
        regis_net: the reference module tree (changed in place and returned).
        generator: the one generator all draws come from, in parameter (then buffer) order (the caller may go on using it).
        std: normal std of the parameters.
        last_std: normal std of the ``lastConv`` parameters.
        batch_norm: also draw BatchNorm running statistics (variance U(0.5, 1.5), mean N(0, 0.1)).
    """
    g = generator
    for name, p in regis_net.named_parameters():
        p.data.normal_(0, std if "lastConv" not in name else last_std, generator=g)
    if batch_norm:
        for name, b in regis_net.named_buffers():
            if name.endswith("running_var"):
                b.data.uniform_(0.5, 1.5, generator=g)
            elif name.endswith("running_mean"):
                b.data.normal_(0, 0.1, generator=g)
    return regis_net


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


def transform_points(transform, points) -> np.ndarray:
    """``transform.TransformPoint`` of each row of ``points`` (ITK, LPS mm)."""
    return np.array([np.array(transform.TransformPoint(p.tolist())) for p in points])


def authors_exact_map(composite, closure, points, network_shape) -> tuple[np.ndarray, np.ndarray]:
    """The authors' ``register_pair`` composite with its sampled field replaced by their exact map ``closure``.

    Their composite ``[to_net(A), displacement field, inverse(to_net(B))]`` samples the composed multi-step
    map only at network nodes and ITK interpolates in between; the exact oracle keeps their two affine
    parts and evaluates their ``phi_AB``/``phi_BA`` closure at the points themselves.

    Returns ``(mapped points, points mapped with zero network displacement)``, LPS mm.
    """
    to_target, field, from_source = (composite.GetNthTransform(i) for i in range(3))
    assert "DisplacementField" in field.GetNameOfClass()
    network_points = transform_points(from_source, points)  # ITK (x, y, z) = network index (i, j, k)
    scale = np.array(network_shape, np.float64) - 1.0  # identity-map axis order (k, j, i)
    unit = torch.from_numpy(network_points[:, ::-1] / scale).to(torch.float32).T.reshape(1, 3, -1, 1, 1)
    with torch.no_grad():
        mapped = closure(unit).reshape(3, -1).T.to(torch.float64).numpy()
    return transform_points(to_target, (mapped * scale)[:, ::-1]), transform_points(to_target, network_points)
