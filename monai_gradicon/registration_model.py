"""What ``register`` needs from "a bundle": a network, its input grid, its intensity preprocessing.

A :class:`RegistrationModel` is resolved from

* ``"knee"`` / ``"lung"``: the paper's four-step GradICON network (:func:`four_step_network`) at the
  shape of the released models (knee 80×192×192, lung 175³; paper Sec. A.2/A.3) with the paper's
  preprocessing, LNCC(σ=5) similarity, ``λ = 1.5`` and the sparse GradICON term for instance
  optimisation (the released models' objective). Weights come from ``weights=`` (a bundle
  ``model.pt`` or a reference ``.trch`` checkpoint); without weights the zero-initialised last
  layers make the network predict the identity;
* a MONAI bundle directory: ``configs/inference.json`` is parsed with ``monai.bundle.ConfigParser``;
  ``network_def`` gives the network and the input shape is read from ``registration::spatial_shape``
  or one of ``network_shape``, ``image_shape``, ``spatial_shape``, ``spatial_size``, ``image_size``, ``input_shape``,
  ``roi_size`` (or ``metadata.json``'s ``network_data_format::inputs::image::spatial_shape`` when all
  integers). An optional ``registration`` section may set ``preprocessing`` (``"knee"`` | ``"lung"`` |
  ``"none"``), ``lmbda``, ``lncc_sigma``, ``sparse`` and the resampling convention ``orientation``
  (``"RAS"`` | ``"none"``), ``align_corners`` and ``reverse_axes``. Weights: ``models/model.pt``.

Resampling convention. The built-in ``"knee"``/``"lung"`` models feed the network the image array with
its index axes reversed (``reverse_axes=True``), i.e. in the ``(k, j, i)`` order of an ITK array, resized
with ``align_corners=False``: what the reference's ITK wrapper does, so the authors' released weights
see what they were trained on. A bundle directory defaults to what the bundles' own configs do
(``Orientationd(axcodes="RAS")`` then ``Resized(align_corners=True)``): ``orientation="RAS"``,
``align_corners=True``, ``reverse_axes=False``.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .losses import GradICONLoss, GradICONObjective, LNCCLoss
from .maps import Deformation
from .networks import MultiStepRegistrationNet, four_step_network, load_reference_weights

__all__ = [
    "RegistrationModel",
    "load_registration_model",
    "knee_intensity",
    "lung_intensity",
    "PREPROCESSING_CHOICES",
    "BUILTIN_MODELS",
    "convert_reference_weights",
]

PREPROCESSING_CHOICES = ("knee", "lung", "none")
ORIENTATION_CHOICES = ("RAS", "none")
BUILTIN_MODELS = {"knee": (80, 192, 192), "lung": (175, 175, 175)}
_SHAPE_KEYS = (
    "registration::spatial_shape", "network_shape", "image_shape", "spatial_shape", "spatial_size", "image_size", "input_shape", "roi_size"
)


KNEE_PERCENTILES = (1.0, 99.0)
LUNG_HU_WINDOW = (-1000.0, 0.0)


def _plain(x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x).as_subclass(torch.Tensor).to(torch.float32)


def knee_intensity(image: torch.Tensor) -> torch.Tensor:
    """Map the 1st/99th intensity percentiles to 0/1 and clamp to [0, 1] (paper Sec. A.2, OAI knees).

    Computed by MONAI's ``ScaleIntensityRangePercentiles(lower=1, upper=99, b_min=0, b_max=1, clip=True)``,
    the transform the knee bundle's configs use (``ScaleIntensityRangePercentilesd``), so ``register``
    and the bundle share one implementation. (The bundle applies it after the resize to the network
    grid, ``register`` before, on the file grid.)

    Args:
        image: ``(C, *spatial)`` float tensor.

    Returns:
        float32 tensor of the same shape in [0, 1].

    Raises:
        ValueError: the 1st and 99th percentiles coincide (nothing to normalise).
    """
    from monai.transforms import ScaleIntensityRangePercentiles

    flat = image.reshape(-1).to(torch.float64)
    low, high = torch.quantile(flat, torch.tensor([p / 100.0 for p in KNEE_PERCENTILES], dtype=torch.float64)).tolist()
    if high <= low:
        raise ValueError(f"the image is constant between its 1st and 99th percentiles ({low}); it cannot be normalised.")
    scale = ScaleIntensityRangePercentiles(lower=KNEE_PERCENTILES[0], upper=KNEE_PERCENTILES[1], b_min=0.0, b_max=1.0, clip=True)
    return _plain(scale(image.to(torch.float32)))


def lung_intensity(image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Clamp CT to [−1000, 0] HU, map to [0, 1] and multiply by the lung mask (paper Sec. A.3).

    Computed by MONAI's ``ScaleIntensityRange(a_min=-1000, a_max=0, b_min=0, b_max=1, clip=True)`` and
    ``MaskIntensity``, the transforms the lung bundle's configs use (``ScaleIntensityRanged``,
    ``MaskIntensityd``), so ``register`` and the bundle share one implementation.

    Args:
        image: ``(C, *spatial)`` CT in Hounsfield units.
        mask: optional lung mask on the same grid (nonzero inside the lungs).

    Returns:
        float32 tensor of the same shape in [0, 1] (0 outside the mask).

    Raises:
        ValueError: the mask is on another grid or empty.
    """
    from monai.transforms import MaskIntensity, ScaleIntensityRange

    window = ScaleIntensityRange(a_min=LUNG_HU_WINDOW[0], a_max=LUNG_HU_WINDOW[1], b_min=0.0, b_max=1.0, clip=True)
    out = _plain(window(image.to(torch.float32)))
    if mask is not None:
        if mask.shape != image.shape:
            raise ValueError(f"the lung mask must be on the image grid {tuple(image.shape)}, got {tuple(mask.shape)}.")
        if not (mask != 0).any():
            raise ValueError("the lung mask is empty (no nonzero voxel).")
        out = _plain(MaskIntensity(mask_data=torch.as_tensor(mask), select_fn=lambda m: m != 0)(out))
    return out


class _ConcatenatedInput(nn.Module):
    """Adapter for a bundle network that takes one ``[moving, fixed]`` tensor and returns a DDF."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.network(torch.cat([moving, fixed], dim=1))


@dataclass
class RegistrationModel:
    """A network plus everything needed to feed it a pair of scans.

    Args:
        network: ``forward(moving, fixed) -> ddf`` (voxel units of ``spatial_shape``); a
            :class:`MultiStepRegistrationNet` also offers the exact composed ``deformation``.
        spatial_shape: the grid the network runs on, in network axis order.
        preprocessing: ``"knee"`` (percentiles), ``"lung"`` (HU window × mask) or ``"none"``.
        lmbda: ``λ`` of the instance-optimisation objective.
        lncc_sigma: σ of the LNCC similarity used for instance optimisation.
        sparse: use the sparse GradICON term (as the released knee/lung models were trained).
        reverse_axes: feed the network the file's index axes reversed (ITK array order); ignored
            when ``orientation == "RAS"``.
        name: for the report.
        weights: the weights file loaded, or ``None``.
        notes: remarks for the report (e.g. "no trained weights").
        orientation: ``"RAS"``: reorient each image to RAS first (as ``Orientationd``); ``"none"``:
            use the file's index axes (see ``reverse_axes``).
        align_corners: the resize convention of ``F.interpolate`` (``False``: reference ITK wrapper,
            ``True``: MONAI ``Resized(align_corners=True)`` of the bundles' configs).
    """

    network: nn.Module
    spatial_shape: tuple[int, ...]
    preprocessing: str = "none"
    lmbda: float = 1.5
    lncc_sigma: int = 5
    sparse: bool = True
    reverse_axes: bool = True
    name: str = ""
    weights: str | None = None
    notes: list[str] = field(default_factory=list)
    orientation: str = "none"
    align_corners: bool = False

    def __post_init__(self) -> None:
        if self.orientation not in ORIENTATION_CHOICES:
            raise ValueError(f"orientation must be one of {ORIENTATION_CHOICES}, got {self.orientation!r}.")
        if self.preprocessing not in PREPROCESSING_CHOICES:
            raise ValueError(f"preprocessing must be one of {PREPROCESSING_CHOICES}, got {self.preprocessing!r}.")
        if len(self.spatial_shape) not in (2, 3):
            raise ValueError(f"the network shape must have 2 or 3 axes, got {self.spatial_shape}.")

    @property
    def spatial_dims(self) -> int:
        return len(self.spatial_shape)

    def preprocess(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The bundle's intensity preprocessing of one ``(1, *spatial)`` image (mask used by ``"lung"`` only)."""
        if self.preprocessing == "knee":
            return knee_intensity(image)
        if self.preprocessing == "lung":
            return lung_intensity(image, mask)
        return image.to(torch.float32)

    def deformation(self, moving: torch.Tensor, fixed: torch.Tensor) -> Deformation:
        """``Φ_AB`` for ``A = moving``, ``B = fixed`` on the network grid, as an exact :class:`Deformation`."""
        if hasattr(self.network, "deformation"):
            return self.network.deformation(moving, fixed)
        return Deformation.from_ddf(self.network(moving, fixed))

    def objective(self) -> GradICONObjective:
        """The full GradICON objective of paper Sec. 5.1 for instance optimisation on one pair."""
        return GradICONObjective(
            LNCCLoss(self.spatial_dims, sigma=self.lncc_sigma),
            GradICONLoss(self.spatial_dims, sparse=self.sparse),
            self.lmbda,
        )


def _load_weights(network: nn.Module, path: str) -> None:
    """Load a bundle ``model.pt`` (state dict, optionally under ``model``/``network``) or a reference checkpoint."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and len(state) == 1 and next(iter(state)) in ("model", "network", "state_dict"):
        state = next(iter(state.values()))
    if not isinstance(state, Mapping):
        raise ValueError(f"weights file {path!r} must hold a state dict, got {type(state).__name__}.")
    own = set(network.state_dict())
    if set(state) == own:
        network.load_state_dict(state, strict=True)
        return
    inner = [m for m in network.modules() if isinstance(m, MultiStepRegistrationNet)]
    if inner and set(state) == set(inner[0].state_dict()):
        inner[0].load_state_dict(state, strict=True)
        return
    if inner:
        try:  # a checkpoint saved by the reference implementation (icon_registration)
            load_reference_weights(inner[0], state)
            return
        except ValueError:
            pass
    extra, missing = sorted(set(state) - own), sorted(own - set(state))
    raise ValueError(
        f"weights file {path!r} does not fit the network: {len(extra)} unexpected key(s) {extra[:3]}, "
        f"{len(missing)} missing key(s) {missing[:3]}."
    )


def _as_pair_network(network: nn.Module) -> nn.Module:
    inner = [m for m in network.modules() if isinstance(m, MultiStepRegistrationNet)]
    if inner:
        return inner[0]
    parameters = [
        p for p in inspect.signature(network.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return network if len(parameters) >= 2 else _ConcatenatedInput(network)


def _shape_from_bundle(parser, bundle_dir: str) -> tuple[int, ...] | None:
    for key in _SHAPE_KEYS:
        if key in parser:
            value = parser.get_parsed_content(key)
            if isinstance(value, Sequence) and all(isinstance(v, int) for v in value):
                return tuple(int(v) for v in value)
    meta_path = os.path.join(bundle_dir, "configs", "metadata.json")
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        shape = meta.get("network_data_format", {}).get("inputs", {}).get("image", {}).get("spatial_shape")
        if isinstance(shape, list) and shape and all(isinstance(v, int) for v in shape):
            return tuple(shape)
    return None


def _from_bundle_directory(bundle_dir: str, weights: str | None) -> RegistrationModel:
    from monai.bundle import ConfigParser

    config_path = None
    for name in ("inference.json", "inference.yaml", "inference.yml"):
        candidate = os.path.join(bundle_dir, "configs", name)
        if os.path.isfile(candidate):
            config_path = candidate
            break
    if config_path is None:
        raise ValueError(f"bundle {bundle_dir!r} has no configs/inference.json: expected a MONAI bundle directory.")
    parser = ConfigParser()
    parser.read_config(config_path)
    parser["bundle_root"] = bundle_dir
    if "network_def" not in parser:
        raise ValueError(f"{config_path!r} defines no 'network_def': cannot build the registration network.")
    shape = _shape_from_bundle(parser, bundle_dir)
    if shape is None:
        raise ValueError(
            f"{config_path!r} does not give the network input shape: expected an integer list under one of "
            f"{list(_SHAPE_KEYS)} or metadata network_data_format::inputs::image::spatial_shape."
        )
    options = parser.get_parsed_content("registration") if "registration" in parser else {}
    name = os.path.basename(os.path.normpath(bundle_dir))
    default_pre = "lung" if "lung" in name else "knee" if "knee" in name else "none"
    network = parser.get_parsed_content("network_def", instantiate=True)
    weights = weights or os.path.join(bundle_dir, "models", "model.pt")
    model = RegistrationModel(
        network=network,
        spatial_shape=shape,
        preprocessing=str(options.get("preprocessing", default_pre)),
        lmbda=float(options.get("lmbda", 1.5)),
        lncc_sigma=int(options.get("lncc_sigma", 5)),
        sparse=bool(options.get("sparse", True)),
        reverse_axes=bool(options.get("reverse_axes", False)),
        orientation=str(options.get("orientation", "RAS")),
        align_corners=bool(options.get("align_corners", True)),
        name=name,
    )
    _attach_weights(model, weights, required=weights != os.path.join(bundle_dir, "models", "model.pt"))
    model.network = _as_pair_network(model.network)
    return model


def _attach_weights(model: RegistrationModel, weights: str | None, required: bool) -> None:
    if weights and os.path.isfile(weights):
        _load_weights(model.network, weights)
        model.weights = os.path.abspath(weights)
    elif weights and required:
        raise FileNotFoundError(f"weights file not found: {weights!r}.")
    else:
        note = f"no trained weights for {model.name!r}: the untrained network predicts (nearly) the identity."
        model.notes.append(note)
        warnings.warn(note, stacklevel=3)


def load_registration_model(
    bundle: str, weights: str | None = None, device: torch.device | str | None = None
) -> RegistrationModel:
    """Resolve ``bundle`` (``"knee"``, ``"lung"`` or a bundle directory) into a :class:`RegistrationModel`.

    Args:
        bundle: built-in name or path to a MONAI bundle directory.
        weights: optional weights file overriding the bundle's ``models/model.pt``.
        device: where to put the network (default: CUDA when available, else CPU).

    Returns:
        the model, its network in eval mode (BatchNorm uses running statistics) on ``device``.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if bundle in BUILTIN_MODELS:
        model = RegistrationModel(
            network=four_step_network(3), spatial_shape=BUILTIN_MODELS[bundle], preprocessing=bundle, name=bundle
        )
        _attach_weights(model, weights, required=weights is not None)
    elif os.path.isdir(bundle):
        model = _from_bundle_directory(os.path.abspath(bundle), weights)
    else:
        raise ValueError(f"bundle must be one of {sorted(BUILTIN_MODELS)} or a bundle directory, got {bundle!r} (not found).")
    model.network = model.network.to(device).eval()
    return model


def convert_reference_weights(source: str, out: str, bundle: str = "knee") -> str:
    """Convert weights released by the authors into a bundle's ``models/model.pt``.

    The knee/lung GradICON checkpoints (``{knee,lung}_model_weights_step_2.trch``) and uniGradICON's
    ``Step_2_final.trch`` are state dicts of the reference's network tree; they are loaded strictly
    into the bundle's network (every key must find its place, see
    :func:`~monai_gradicon.networks.load_reference_weights`) and saved as that network's state dict.

    Args:
        source: the downloaded reference checkpoint.
        out: where to write (e.g. ``bundles/gradicon_lung_ct/models/model.pt``).
        bundle: ``"knee"``/``"lung"`` (the four-step network) or a bundle directory (its ``network_def``).

    Returns:
        the path written.
    """
    if not os.path.isfile(source):
        raise FileNotFoundError(f"reference weights file not found: {source!r}.")
    if bundle in BUILTIN_MODELS:
        network: nn.Module = four_step_network(3)
    elif os.path.isdir(bundle):
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(os.path.join(bundle, "configs", "inference.json"))
        parser["bundle_root"] = os.path.abspath(bundle)
        network = parser.get_parsed_content("network_def", instantiate=True)
    else:
        raise ValueError(f"bundle must be one of {sorted(BUILTIN_MODELS)} or a bundle directory, got {bundle!r}.")
    inner = [m for m in network.modules() if isinstance(m, MultiStepRegistrationNet)]
    if not inner:
        raise ValueError(f"the network of {bundle!r} contains no MultiStepRegistrationNet to receive reference weights.")
    load_reference_weights(inner[0], source)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(network.state_dict(), out)
    return out
