"""Shared fixtures for the registration tests: a tiny test-only bundle and synthetic NIfTI volumes."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np

TINY_SHAPE = (20, 24, 28)


RAS_CONVENTION = {"order": "file", "align_corners": True, "axcodes": "RAS"}  # MONAI Orientationd(RAS) + Resized(align_corners=True)
AUTHORS_CONVENTION = {"order": "itk", "align_corners": False, "axcodes": None}  # the authors' itk_wrapper.register_pair


def grid_transform(shape, convention: dict | None = None) -> dict:
    """The ``ToNetworkGridd`` config item of a scan preprocessing (``convention``: RAS by default)."""
    convention = dict(RAS_CONVENTION if convention is None else convention)
    return {
        "_target_": "monai_gradicon.transforms.ToNetworkGridd", "keys": ["image", "mask"], "mask_keys": "mask",
        "allow_missing_keys": True, "network_shape": list(shape), **convention,
    }


def registration_model_item(name: str, masks: str = "unused", lmbda: float = 1.5, lncc_sigma: int = 1, sparse: bool = False) -> dict:
    """The ``registration_model`` config item, as the bundles write it."""
    return {
        "_target_": "monai_gradicon.app.RegistrationModel", "network": "@network_def",
        "scan_preprocessing": {"_target_": "Compose", "transforms": "@scan_preprocessing"},
        "weights": "@weights_file", "masks": masks, "lmbda": lmbda, "lncc_sigma": lncc_sigma, "sparse": sparse,
        "name": name, "bundle_root": "@bundle_root", "allow_untrained": "@allow_untrained",
    }


def write_tiny_bundle(
    root: str, shape=TINY_SHAPE, channels=(8, 8, 8), intensity: list | None = None, convention: dict | None = None,
    masks: str = "unused", network_def: dict | None = None,
) -> str:
    """A bundle directory whose network is one small GradICON U-Net (fast on CPU); no weights.

    Args:
        root: where to write it.
        shape: the network grid.
        channels: U-Net channels.
        intensity: intensity transforms (config items on key ``image``) before the network grid; none by default.
        convention: the ``ToNetworkGridd`` convention (default: RAS, ``align_corners=True``).
        masks: the mask policy.
        network_def: another network config.
    """
    os.makedirs(os.path.join(root, "configs"), exist_ok=True)
    os.makedirs(os.path.join(root, "models"), exist_ok=True)
    config = {
        "network_def": network_def or {
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
        "weights_file": "$@bundle_root + '/models/model.pt'",
        "allow_untrained": False,
        "scan_preprocessing": list(intensity or []) + [grid_transform(shape, convention)],
        "registration_model": registration_model_item(os.path.basename(os.path.normpath(root)), masks),
    }
    with open(os.path.join(root, "configs", "inference.json"), "w") as f:
        json.dump(config, f, indent=1)
    return root


WEIGHT_KINDS = ("smooth", "noisy", "antisymmetric")


def write_random_weights(bundle: str, seed: int = 0, std: float = 0.5, kind: str = "smooth") -> str:
    """Give the tiny bundle a seeded ``models/model.pt`` whose last convolution is random, so that it deforms.

    The network is initialised with ``torch.manual_seed(seed)`` (inside ``fork_rng``, so the caller's
    global RNG is untouched) and only the last convolution of each GradICON U-Net is then drawn from a
    ``torch.Generator`` seeded with ``seed``: the whole state dict is a function of ``seed``. The
    U-Net's output ``u`` is in [0, 1] units (divided by 10 by the U-Net).

    * ``kind="smooth"`` (default): only the centre tap on the two input-image channels (the U-Net's skip
      of its own input) and the bias, each ``N(0, std²)``: ``u_c(x) = (a_c·moving(x) + b_c·fixed(x) + t_c) / 10``,
      as smooth as the images and different for ``(A, B)`` and ``(B, A)``. On the pairs of
      ``test_register.py`` (intensities in [−0.9, 1.1], 0.9–2.5 mm voxels) ``std=0.5`` gives a mean
      displacement of 1.5–3.9 mm (max 2.7–10.3 mm) for seeds 0–2, with no folds (det ≥ 0.47).
    * ``kind="noisy"``: every weight and bias of the last convolution ``N(0, std²)``, drawn in the
      same order as this helper's earlier (only) behaviour, so ``kind="noisy", std=0.01`` gives the
      earlier last layer (sub-mm); a rough field that folds from ``std ≈ 0.03`` (some seeds) and
      on 10–17 % of the cells at ``std=0.1``.
    * ``kind="antisymmetric"``: like ``"smooth"`` with ``b_c = −a_c`` and ``t_c = 0``:
      ``u_c(x) = a_c·(moving(x) − fixed(x)) / 10``, a deformation that is exactly zero when the two
      network inputs are equal voxel for voxel.

    Args:
        bundle: a bundle written by :func:`write_tiny_bundle`.
        seed: seed of the ``torch.Generator`` drawing the weights.
        std: standard deviation of the drawn values.
        kind: ``"smooth"``, ``"noisy"`` or ``"antisymmetric"``.

    Returns:
        the path of the written ``model.pt``.
    """
    import torch
    from monai.bundle import ConfigParser

    from monai_gradicon.networks import GradICONUNet

    if kind not in WEIGHT_KINDS:
        raise ValueError(f"kind must be one of {WEIGHT_KINDS}, got {kind!r}.")
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle, "configs", "inference.json"))
    with torch.random.fork_rng():  # the other layers initialise from the global RNG: seed it too, leave it as it was
        torch.manual_seed(seed)
        network = parser.get_parsed_content("network_def")
    generator = torch.Generator().manual_seed(seed)
    unets = [m for m in network.modules() if isinstance(m, GradICONUNet)]
    if not unets:
        raise ValueError(f"the network of {bundle!r} has no GradICONUNet whose last convolution could be set.")
    with torch.no_grad():
        for unet in unets:
            conv = unet.last_conv
            if kind == "noisy":
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * std)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * std)
                continue
            conv.weight.zero_()
            conv.bias.zero_()
            out_channels, in_channels = conv.weight.shape[:2]
            images = unet.in_channels  # the last 2 * in_channels input channels: moving, then fixed
            centre = tuple(k // 2 for k in conv.weight.shape[2:])
            a = torch.randn(out_channels, images, generator=generator) * std
            b = -a if kind == "antisymmetric" else torch.randn(out_channels, images, generator=generator) * std
            t = torch.zeros(out_channels) if kind == "antisymmetric" else torch.randn(out_channels, generator=generator) * std
            conv.weight[(slice(None), slice(in_channels - 2 * images, in_channels - images)) + centre] = a
            conv.weight[(slice(None), slice(in_channels - images, in_channels)) + centre] = b
            conv.bias.copy_(t)
    path = os.path.join(bundle, "models", "model.pt")
    torch.save(network.state_dict(), path)
    return path


def load_bundle_network(bundle: str):
    """The bundle's ``network_def`` with its ``models/model.pt`` loaded, in eval mode, built without ``monai_gradicon.app``."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle, "configs", "inference.json"))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(os.path.join(bundle, "models", "model.pt"), weights_only=True), strict=True)
    return network.eval()


def jacobian_determinant_numpy(ddf_voxels: np.ndarray) -> np.ndarray:
    """``det(I + ∇u)`` of a 3D DDF ``(3, *S)`` in voxel units, on the ``(S − 1)`` cell grid, by ``np.linalg.det``.

    An independent implementation of the fold convention of ``monai_gradicon.maps`` (the reference's):
    one-sided differences from each voxel's −1 neighbours towards the voxel, at ``[1:, 1:, 1:]``.
    """
    u = np.asarray(ddf_voxels, dtype=np.float64)
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in u.shape[1:]], indexing="ij"))
    phi = index + u
    corner = phi[:, 1:, 1:, 1:]
    columns = [corner - phi[:, :-1, 1:, 1:], corner - phi[:, 1:, :-1, 1:], corner - phi[:, 1:, 1:, :-1]]
    matrix = np.stack(columns, axis=-1)  # (3 rows = map component, *cells, 3 columns = axis)
    return np.linalg.det(np.moveaxis(matrix, 0, -2))


def read_field(path: str) -> np.ndarray:
    """A displacement NIfTI written by ``register`` as ``(3, *S)`` RAS mm, read with nibabel only."""
    data = np.asarray(nib.load(path).dataobj, dtype=np.float64)
    assert data.ndim == 5 and data.shape[3] == 1 and data.shape[4] == 3, data.shape
    return np.moveaxis(data[:, :, :, 0, :], -1, 0)


def sample_linear(volume: np.ndarray, index: np.ndarray, order: int = 1) -> np.ndarray:
    """``volume`` at continuous voxel indices ``(P, 3)`` by ``scipy.ndimage.map_coordinates`` (interior points)."""
    from scipy.ndimage import map_coordinates

    return map_coordinates(np.asarray(volume, dtype=np.float64), np.asarray(index, dtype=np.float64).T, order=order, mode="nearest")


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


ANALYTIC_CONVENTION = {"order": "file", "align_corners": True, "axcodes": None}  # AnalyticNetwork's default convention


def _analytic_geometries(moving_affine, moving_shape, fixed_affine, fixed_shape, network_shape, convention):
    """The two images' ``PairGeometry`` as ``register`` builds them (axis codes: the bundle's, else the fixed image's)."""
    from monai_gradicon.transforms.network_grid import PairGeometry, axis_codes

    convention = dict(ANALYTIC_CONVENTION if convention is None else convention)
    codes = convention["axcodes"] or axis_codes(fixed_affine)
    common = dict(network_shape=tuple(network_shape), order=convention["order"], align_corners=convention["align_corners"], axcodes=codes)
    return (
        PairGeometry.from_affine(tuple(moving_shape), moving_affine, **common),
        PairGeometry.from_affine(tuple(fixed_shape), fixed_affine, **common),
    )


class AnalyticNetwork:
    """Builds a network that returns the network-grid DDF of :func:`analytic_transform` (or its inverse).

    The direction is told apart by intensity: the moving test image is brighter than the fixed one,
    so ``forward(moving, fixed)`` with the brighter image as ``moving`` returns ``Φ_AB``. The network grid
    is placed as ``register`` places it under ``convention`` (default: file axis order, ``align_corners=True``,
    both images brought to the fixed image's axis codes); :func:`analytic_model` wraps it in a
    ``RegistrationModel`` with that convention.
    """

    @staticmethod
    def build(moving_affine, moving_shape, fixed_affine, fixed_shape, network_shape, convention: dict | None = None):
        import torch
        from torch import nn

        geo_a, geo_b = _analytic_geometries(moving_affine, moving_shape, fixed_affine, fixed_shape, network_shape, convention)
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


def scan_preprocessing(network_shape, convention: dict | None = None, intensity: list | None = None):
    """A ``Compose`` of ``intensity`` transforms and the ``ToNetworkGridd`` of ``convention`` (RAS by default)."""
    from monai.transforms import Compose

    from monai_gradicon.transforms import ToNetworkGridd

    convention = dict(RAS_CONVENTION if convention is None else convention)
    grid = ToNetworkGridd(keys=["image", "mask"], network_shape=network_shape, mask_keys="mask", allow_missing_keys=True, **convention)
    return Compose([*(intensity or []), grid])


def analytic_model(moving_affine, moving_shape, fixed_affine, fixed_shape, network_shape, convention: dict | None = None):
    """A ``RegistrationModel`` whose network is :class:`AnalyticNetwork` under ``convention`` (its default if ``None``)."""
    from monai_gradicon.app import RegistrationModel

    convention = dict(ANALYTIC_CONVENTION if convention is None else convention)
    network = AnalyticNetwork.build(moving_affine, moving_shape, fixed_affine, fixed_shape, network_shape, convention)
    return RegistrationModel(network=network, scan_preprocessing=scan_preprocessing(network_shape, convention), name="analytic")


# --- networks for the error paths ---------------------------------------------------------------------

def broken_network(failure: str = "runtime"):
    """A network (``forward(moving, fixed)``) that fails inside ``forward``: an internal error, not bad input.

    Args:
        failure: ``"runtime"`` raises ``RuntimeError`` (a bug), ``"memory"`` raises ``MemoryError``.
    """
    import torch
    from torch import nn

    class _Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.ones(1))

        def forward(self, moving, fixed):
            if failure == "memory":
                raise MemoryError("cannot allocate the network's activations (test)")
            raise RuntimeError("broken_network: a bug inside forward (test)")

    return _Broken()


def write_large_files(bundle: str, url: str = "https://example.org/w.pt", path: str = "models/model.pt") -> str:
    """A model-zoo ``large_files.yml`` naming ``url`` as the release asset of ``path`` in ``bundle``."""
    listing = os.path.join(bundle, "large_files.yml")
    with open(listing, "w") as f:
        f.write(f"large_files:\n  - path: {path}\n    url: {url}\n")
    return listing


# --- a tiny bundle with per-scan modalities (as the uniGradICON / multiGradICON bundles) -------------

def modality_intensity_item() -> dict:
    """The ``ByModalityd`` config item of the uni/multiGradICON bundles: CT window, MR order statistics, optional masks."""
    mask = {"_target_": "monai_gradicon.transforms.ApplyMaskd", "keys": "image", "mask_key": "mask", "required": False}
    return {
        "_target_": "monai_gradicon.transforms.intensity.ByModalityd",
        "default": "@modality",
        "transforms": {
            "ct": [{"_target_": "monai_gradicon.transforms.UnitWindowd", "keys": "image", "low": "@ct_window#0", "high": "@ct_window#1"}, mask],
            "mri": [{"_target_": "monai_gradicon.transforms.UnitWindowd", "keys": "image", "low": None, "high": None,
                     "low_quantile": "@quantile_range#0", "high_quantile": "@quantile_range#1"}, mask],
        },
    }


def write_tiny_modality_bundle(root: str, shape=TINY_SHAPE, masks: str = "optional") -> str:
    """:func:`write_tiny_bundle` with the uni/multiGradICON settings ``modality``, ``ct_window``, ``quantile_range``."""
    write_tiny_bundle(root, shape=shape, intensity=[modality_intensity_item()], masks=masks)
    path = os.path.join(root, "configs", "inference.json")
    with open(path) as f:
        config = json.load(f)
    config.update({"modality": "ct", "ct_window": [-1000.0, 1000.0], "quantile_range": [None, 0.99]})
    with open(path, "w") as f:
        json.dump(config, f, indent=1)
    return root
