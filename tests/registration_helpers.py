"""Shared fixtures for the registration tests: a tiny test-only bundle and synthetic NIfTI volumes."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np

TINY_SHAPE = (20, 24, 28)


def write_tiny_bundle(root: str, shape=TINY_SHAPE, channels=(8, 8, 8), preprocessing: str = "none") -> str:
    """A bundle directory whose network is one small GradICON U-Net (fast on CPU); no weights."""
    os.makedirs(os.path.join(root, "configs"), exist_ok=True)
    os.makedirs(os.path.join(root, "models"), exist_ok=True)
    config = {
        "network_def": {
            "_target_": "monai_gradicon.networks.multistep_network",
            "spatial_dims": 3,
            "levels": [0],
            "subnetwork": {
                "_target_": "monai_gradicon.networks.GradICONUNet",
                "_mode_": "callable",
                "spatial_dims": 3,
                "down_channels": list(channels),
                "up_channels": list(channels),
            },
        },
        "network_shape": list(shape),
        "registration": {"preprocessing": preprocessing, "lncc_sigma": 1, "lmbda": 1.5, "sparse": False},
    }
    with open(os.path.join(root, "configs", "inference.json"), "w") as f:
        json.dump(config, f, indent=1)
    return root


def write_random_weights(bundle: str, seed: int = 0, std: float = 0.01) -> str:
    """Give the tiny bundle a ``models/model.pt`` whose last layer is random, so it predicts a real deformation."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle, "configs", "inference.json"))
    network = parser.get_parsed_content("network_def")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if "last_conv" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    path = os.path.join(bundle, "models", "model.pt")
    torch.save(network.state_dict(), path)
    return path


def oblique_affine(spacing=(1.2, 0.9, 2.5), angles=(0.3, -0.2, 0.25), origin=(-20.0, 14.0, 7.5)) -> np.ndarray:
    """RAS affine with a non-identity direction (rotation about three axes) and anisotropic voxels."""
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def world_points(affine: np.ndarray, shape) -> np.ndarray:
    """RAS mm of every voxel centre, ``(*shape, 3)``."""
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    return index @ affine[:3, :3].T + affine[:3, 3]


def blob_intensity(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """A smooth intensity pattern of world points (so linear interpolation is accurate)."""
    r = points - centre
    return (
        np.exp(-np.sum((r / np.array([9.0, 11.0, 13.0])) ** 2, axis=-1))
        + 0.5 * np.sin(r[..., 0] / 7.0) * np.cos(r[..., 1] / 9.0)
        + 0.02 * r[..., 2]
    )


def save(path: str, array: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(np.asarray(array, np.float32), affine), path)
    return path


# --- an analytic deformation with a closed-form inverse, for exact physical-space checks -------------

ROTATION_ANGLE = 0.05  # radians about the z axis
TRANSLATION = np.array([1.5, -1.0, 0.8])  # mm


def _rotation() -> np.ndarray:
    c, s = np.cos(ROTATION_ANGLE), np.sin(ROTATION_ANGLE)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def analytic_transform(points: np.ndarray) -> np.ndarray:
    """``T(p) = R·S(p) + t`` (fixed -> moving points, RAS mm), ``S`` a smooth triangular warp (≤ 3 mm)."""
    p = np.asarray(points, dtype=np.float64)
    s = p.copy()
    s[..., 1] = p[..., 1] + 2.0 * np.sin(p[..., 2] / 15.0)
    s[..., 0] = p[..., 0] + 3.0 * np.sin(s[..., 1] / 18.0) * np.cos(p[..., 2] / 20.0)
    return s @ _rotation().T + TRANSLATION


def analytic_inverse(points: np.ndarray) -> np.ndarray:
    """``T⁻¹`` in closed form."""
    s = (np.asarray(points, dtype=np.float64) - TRANSLATION) @ _rotation()
    p = s.copy()
    p[..., 0] = s[..., 0] - 3.0 * np.sin(s[..., 1] / 18.0) * np.cos(s[..., 2] / 20.0)
    p[..., 1] = s[..., 1] - 2.0 * np.sin(s[..., 2] / 15.0)
    return p


class AnalyticNetwork:
    """Builds a network that returns the network-grid DDF of :func:`analytic_transform` (or its inverse).

    The direction is told apart by intensity: the moving test image is brighter than the fixed one,
    so ``forward(moving, fixed)`` with the brighter image as ``moving`` returns ``Φ_AB``.
    """

    @staticmethod
    def build(moving_affine, moving_shape, fixed_affine, fixed_shape, network_shape):
        import torch
        from torch import nn

        from monai_gradicon.register import PairGeometry

        geo_a = PairGeometry(tuple(moving_shape), tuple(network_shape), True)
        geo_b = PairGeometry(tuple(fixed_shape), tuple(network_shape), True)
        net_index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in network_shape], indexing="ij"), 0)
        unit = net_index / (np.array(network_shape, dtype=np.float64) - 1).reshape(-1, 1, 1, 1)
        unit_t = torch.from_numpy(unit)[None]

        def field(source_geo, source_affine, target_geo, target_affine, mapping):
            index = source_geo.unit_to_index(unit_t)  # (P, 3) source file indices
            mm = index.numpy() @ source_affine[:3, :3].T + source_affine[:3, 3]
            target_mm = mapping(mm)
            target_index = (target_mm - target_affine[:3, 3]) @ np.linalg.inv(target_affine[:3, :3]).T
            target_unit = target_geo.index_to_unit(torch.from_numpy(target_index)).reshape(unit_t.shape)
            scale = torch.tensor([n - 1 for n in network_shape], dtype=torch.float64).reshape(1, 3, 1, 1, 1)
            return ((target_unit - unit_t) * scale).to(torch.float32)

        ddf_ab = field(geo_b, fixed_affine, geo_a, moving_affine, analytic_transform)
        ddf_ba = field(geo_a, moving_affine, geo_b, fixed_affine, analytic_inverse)

        class _Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("ddf_ab", ddf_ab)
                self.register_buffer("ddf_ba", ddf_ba)

            def forward(self, moving, fixed):
                return self.ddf_ab if moving.mean() > fixed.mean() else self.ddf_ba

        return _Net()
