"""A registration model as a bundle defines it: network, weights, how scans reach the network, masks.

The bundle is the single source of truth. Its ``configs/inference.json`` defines one item,
``registration_model``, a :class:`RegistrationModel` built from

* ``network_def`` (the network) and the weights file it was trained with (``weights_file``);
* ``scan_preprocessing``: the MONAI dictionary transforms that take one scan (``image``, optional
  ``mask``) from its file grid to the network grid, ending with
  :class:`~monai_gradicon.transforms.ToNetworkGridd` — the resampling convention of the weights;
* the mask policy (``"unused"``, ``"required"``, ``"optional"``) and the instance-optimisation
  objective (λ, LNCC σ, sparse GradICON term).

``monai-gradicon register``/``evaluate``, the Deploy app and ``python -m monai.bundle run --config_file
configs/inference.json`` all get their model from that item (:func:`load_registration_model` parses it,
the bundle's ``run`` uses it directly), so the same pair and weights give the same displacement.
Short names (``knee``, ``lung``, ``brain``, ``unigradicon``, ``multigradicon``) are bundle directories
under ``bundles/`` (:data:`BUNDLE_ALIASES`).

No silent wrong answers: a missing weights file is refused with the release URL and the destination
(unless ``allow_untrained``), and the authors' released weights are refused in a bundle whose
convention is not theirs (ITK array order, ``align_corners=False``, the stored axis codes).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..losses import GradICONLoss, GradICONObjective, LNCCLoss, MINDSSCLoss
from ..maps import Deformation
from ..networks import MultiStepRegistrationNet, load_reference_weights
from ..transforms.intensity import ByModalityd
from ..transforms.network_grid import PairGeometry, ToNetworkGridd
from .errors import USER_ERRORS, InputError, MissingWeightsError, raised_inside

__all__ = [
    "BUNDLE_ALIASES",
    "MASK_POLICIES",
    "IO_SIMILARITIES",
    "RegistrationModel",
    "bundle_directory",
    "load_registration_model",
    "convert_reference_weights",
]

BUNDLE_ALIASES = {
    "knee": "gradicon_knee_mri",
    "lung": "gradicon_lung_ct",
    "brain": "gradicon_brain_mri",
    "unigradicon": "unigradicon",
    "multigradicon": "multigradicon",
}
MASK_POLICIES = ("unused", "required", "optional")
# similarity of the instance-optimisation objective (uniGradICON's --io_sim): LNCC, squared LNCC, MIND-SSC(2, 2)
IO_SIMILARITIES = ("lncc", "lncc2", "mind")
AUTHORS_CONVENTION = {"order": "itk", "align_corners": False, "axcodes": None}


def bundles_root() -> str:
    """The folder holding the bundles: ``$MONAI_GRADICON_BUNDLES``, else ``bundles/`` beside the package."""
    root = os.environ.get("MONAI_GRADICON_BUNDLES")
    if root:
        return os.path.abspath(root)
    return os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "bundles"))


def bundle_directory(bundle: str | os.PathLike) -> str:
    """Resolve a short name (:data:`BUNDLE_ALIASES`) or a path into a bundle directory with ``configs/inference.json``.

    Args:
        bundle: short name or path.

    Returns:
        the absolute bundle directory.

    Raises:
        InputError: neither a known name nor a bundle directory.
    """
    name = os.fspath(bundle)
    path = os.path.join(bundles_root(), BUNDLE_ALIASES[name]) if name in BUNDLE_ALIASES else name
    if not os.path.isfile(os.path.join(path, "configs", "inference.json")):
        raise InputError(
            f"bundle must be one of {sorted(BUNDLE_ALIASES)} or a bundle directory with configs/inference.json, "
            f"got {name!r}" + (f" (looked in {path!r})" if path != name else "") + "."
        )
    return os.path.abspath(path)


def _release_asset(bundle_root: str | None, weights: str) -> str | None:
    """The URL ``large_files.yml`` of ``bundle_root`` gives for ``weights``, if any."""
    if not bundle_root:
        return None
    listing = os.path.join(bundle_root, "large_files.yml")
    if not os.path.isfile(listing):
        return None
    import yaml

    with open(listing, encoding="utf-8") as f:
        entries = (yaml.safe_load(f) or {}).get("large_files", [])
    target = os.path.abspath(weights)
    for entry in entries:
        if os.path.abspath(os.path.join(bundle_root, entry.get("path", ""))) == target:
            return entry.get("url")
    return None


def _pair_network(network: nn.Module) -> nn.Module:
    """``forward(moving, fixed) -> ddf``: the multistep net inside a wrapper, or an adapter for ``[moving, fixed]`` nets."""
    inner = [m for m in network.modules() if isinstance(m, MultiStepRegistrationNet)]
    if inner:
        return inner[0]
    parameters = [
        p for p in inspect.signature(network.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return network if len(parameters) >= 2 else _ConcatenatedInput(network)


class _ConcatenatedInput(nn.Module):
    """Adapter for a network that takes one ``[moving, fixed]`` tensor and returns a DDF."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.network(torch.cat([moving, fixed], dim=1))


def _load_state(network: nn.Module, path: str) -> bool:
    """Load ``path`` strictly into ``network``; returns whether it was a checkpoint of the authors' code.

    Accepts a state dict of ``network`` (a bundle ``model.pt``, optionally under ``model``/``network``/
    ``state_dict``) or the authors' release format (:func:`~monai_gradicon.networks.load_reference_weights`).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and len(state) == 1 and next(iter(state)) in ("model", "network", "state_dict"):
        state = next(iter(state.values()))
    if not isinstance(state, Mapping):
        raise InputError(f"weights file {path!r} must hold a state dict, got {type(state).__name__}.")
    own = set(network.state_dict())
    if set(state) == own:
        network.load_state_dict(state, strict=True)
        return False
    if isinstance(network, MultiStepRegistrationNet):
        try:
            load_reference_weights(network, state)
            return True
        except ValueError:
            pass
    extra, missing = sorted(set(state) - own), sorted(own - set(state))
    raise InputError(
        f"weights file {path!r} does not fit the network: {len(extra)} unexpected key(s) {extra[:3]}, "
        f"{len(missing)} missing key(s) {missing[:3]}."
    )


@dataclass
class RegistrationModel:
    """A network plus everything needed to feed it a pair of scans (what a bundle's ``registration_model`` defines).

    Args:
        network: the bundle's ``network_def`` (``forward(moving, fixed)`` or ``forward([moving, fixed])``
            returning a DDF on the network grid); a :class:`MultiStepRegistrationNet` inside also
            offers the exact composed ``deformation``.
        scan_preprocessing: dictionary transform for one scan (keys ``image``, optional ``mask``, and
            ``axcodes``) that ends on the network grid: it must contain a
            :class:`~monai_gradicon.transforms.ToNetworkGridd`, whose convention is the model's.
        weights: the weights file (bundle ``model.pt`` or the authors' ``.trch``); ``None``: the network is
            used as it is handed over (a bundle always names its file).
        masks: ``"unused"`` (masks are refused), ``"required"`` (refused without), ``"optional"``.
        lmbda: ``λ`` of the instance-optimisation objective.
        lncc_sigma: σ of the LNCC similarity of instance optimisation.
        sparse: the sparse GradICON term (as the released models were trained).
        name: for messages and the report.
        bundle_root: the bundle directory (for ``large_files.yml``), or ``None``.
        allow_untrained: run without weights (the result is meaningless; noted in the report).
        notes: remarks for the report (filled here: weights missing or used as given).
        device: where the network runs (default: where it is). The network is put in eval mode: BatchNorm
            uses its running statistics, as the released models are used.

    Raises:
        MissingWeightsError: the weights file is missing and not ``allow_untrained``.
        ValueError: no ``ToNetworkGridd`` in the preprocessing or an unknown mask policy (a broken bundle).
        InputError: weights that do not fit, or the authors' weights in a bundle with another convention.
    """

    network: nn.Module
    scan_preprocessing: Callable
    weights: str | None = None
    masks: str = "unused"
    lmbda: float = 1.5
    lncc_sigma: int = 5
    sparse: bool = True
    name: str = ""
    bundle_root: str | None = None
    allow_untrained: bool = False
    device: str | torch.device | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.masks not in MASK_POLICIES:
            raise ValueError(f"masks must be one of {MASK_POLICIES}, got {self.masks!r}.")
        grids = [t for t in getattr(self.scan_preprocessing, "transforms", [self.scan_preprocessing]) if isinstance(t, ToNetworkGridd)]
        if len(grids) != 1:
            raise ValueError(
                f"the scan preprocessing of {self.name!r} must contain exactly one monai_gradicon.transforms.ToNetworkGridd "
                f"(the resampling convention of its weights), found {len(grids)}."
            )
        self.grid: ToNetworkGridd = grids[0]
        steps = getattr(self.scan_preprocessing, "transforms", [self.scan_preprocessing])
        by_modality = [t for t in steps if isinstance(t, ByModalityd)]
        self._by_modality: ByModalityd | None = by_modality[0] if by_modality else None
        self.network = _pair_network(self.network)
        self._attach_weights()
        if self.device is not None:
            self.network = self.network.to(torch.device(self.device))
        self.network.eval()

    @property
    def network_shape(self) -> tuple[int, ...]:
        return self.grid.network_shape

    @property
    def spatial_dims(self) -> int:
        return len(self.network_shape)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities a scan may name (a :class:`~monai_gradicon.transforms.intensity.ByModalityd` in the
        preprocessing); ``()`` when the bundle has one preprocessing for every scan."""
        return self._by_modality.modalities if self._by_modality is not None else ()

    @property
    def default_modality(self) -> str | None:
        """The modality of a scan that names none (the bundle's ``modality`` setting), or ``None``."""
        return self._by_modality.default if self._by_modality is not None else None

    @property
    def convention(self) -> dict:
        """The resampling convention, as the report states it."""
        return self.grid.convention

    def _attach_weights(self) -> None:
        if self.weights and os.path.isfile(self.weights):
            released = _load_state(self.network, self.weights)
            if released and self.convention != AUTHORS_CONVENTION:
                raise InputError(
                    f"{self.weights!r} holds the authors' released weights, trained on ITK-order arrays resized with "
                    f"align_corners=False in their stored axis codes, but bundle {self.name!r} feeds {self.convention}: "
                    "use the bundle made for those weights (--bundle knee|lung|brain|unigradicon|multigradicon)."
                )
            self.weights = os.path.abspath(self.weights)
            return
        if not self.weights:  # a network handed over as it is (its weights are the caller's business)
            self.notes.append("network used as given (no weights file)")
            return
        url = _release_asset(self.bundle_root, self.weights)
        if not self.allow_untrained:
            fetch = (
                f" Download {url} and put it at {os.path.abspath(self.weights)} (where a network is available: "
                f"`python -m monai.bundle download_large_files --bundle_path {self.bundle_root}`), or pass --weights FILE."
                if url else " Train it (configs/train.json) or pass --weights FILE."
            )
            raise MissingWeightsError(
                f"no trained weights for {self.name!r}: expected the weights file {os.path.abspath(self.weights)!r}.{fetch} "
                "(--allow-untrained runs the untrained network; its result is meaningless.)"
            )
        self.weights = None
        self.notes.append(f"no trained weights for {self.name!r} (allow_untrained): the result is not a registration.")

    def prepare(self, scan: dict) -> tuple[torch.Tensor, PairGeometry, dict]:
        """Run the scan preprocessing on ``scan`` (``image``/``mask`` MetaTensors with affines, ``axcodes``).

        Returns:
            ``(image (1, 1, *network_shape), its PairGeometry, the whole transformed dict)``.
        """
        out = self.scan_preprocessing(dict(scan))
        image = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).to(torch.float32)
        if tuple(image.shape[1:]) != self.network_shape:
            raise ValueError(
                f"the scan preprocessing of {self.name!r} produced shape {tuple(image.shape)}, expected (1, *{self.network_shape})."
            )
        return image[None], out[self.grid.geometry_key], out

    def deformation(self, moving: torch.Tensor, fixed: torch.Tensor) -> Deformation:
        """``Φ_AB`` for ``A = moving``, ``B = fixed`` on the network grid, as an exact :class:`Deformation`."""
        if hasattr(self.network, "deformation"):
            return self.network.deformation(moving, fixed)
        return Deformation.from_ddf(self.network(moving, fixed))

    def objective(self, similarity: str = "lncc") -> GradICONObjective:
        """The full GradICON objective of paper Sec. 5.1 for instance optimisation on one pair.

        Args:
            similarity: ``L_sim`` (:data:`IO_SIMILARITIES`): ``"lncc"`` (:class:`LNCCLoss`, σ = ``lncc_sigma``,
                what the released models were trained with), ``"lncc2"`` (squared LNCC, same σ) or ``"mind"``
                (:class:`MINDSSCLoss`, radius 2, dilation 2; 3D only), as uniGradICON's ``--io_sim``.

        Returns:
            ``L_sim`` both ways + ``λ`` × the (sparse) GradICON term.

        Raises:
            InputError: an unknown similarity, or ``"mind"`` for a 2D model.
        """
        if similarity not in IO_SIMILARITIES:
            raise InputError(f"the instance-optimisation similarity must be one of {IO_SIMILARITIES}, got {similarity!r}.")
        if similarity == "mind":
            if self.spatial_dims != 3:
                raise InputError(
                    f"the MIND-SSC similarity is defined for 3D images only; the {self.name!r} model registers "
                    f"{self.spatial_dims}D images (use lncc or lncc2)."
                )
            measure = MINDSSCLoss(3, radius=2, dilation=2)
        else:
            measure = LNCCLoss(self.spatial_dims, sigma=self.lncc_sigma, squared=similarity == "lncc2")
        return GradICONObjective(measure, GradICONLoss(self.spatial_dims, sparse=self.sparse), self.lmbda)


def _parser(bundle_dir: str, overrides: Mapping | None = None):
    """The bundle's inference config; an override of a setting the bundle does not have is refused (never ignored)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_dir, "configs", "inference.json"))
    parser["bundle_root"] = bundle_dir
    for key, value in (overrides or {}).items():
        if key not in parser:
            raise InputError(f"bundle {bundle_dir!r} has no setting {key!r} (its configs/inference.json does not use it).")
        parser[key] = value
    return parser


def load_registration_model(
    bundle: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    allow_untrained: bool = False,
    overrides: Mapping | None = None,
) -> RegistrationModel:
    """The ``registration_model`` of a bundle's ``configs/inference.json``.

    Args:
        bundle: short name (:data:`BUNDLE_ALIASES`) or bundle directory.
        weights: a weights file overriding the bundle's ``weights_file`` (a ``model.pt`` or the authors' ``.trch``).
        device: where to put the network (default: CUDA when available, else CPU).
        allow_untrained: accept a missing weights file.
        overrides: further config overrides (``{"modality": "mri"}``...).

    Returns:
        the model, its network in eval mode (BatchNorm uses running statistics) on ``device``.
    """
    bundle_dir = bundle_directory(bundle)
    settings = dict(overrides or {})
    if weights is not None:
        weights = os.fspath(weights)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"weights file not found: {weights!r}.")
        settings["weights_file"] = os.path.abspath(weights)
    settings["allow_untrained"] = bool(allow_untrained)
    parser = _parser(bundle_dir, settings)
    if "registration_model" not in parser:
        raise InputError(
            f"{os.path.join(bundle_dir, 'configs', 'inference.json')!r} defines no 'registration_model': "
            "this bundle cannot register files."
        )
    try:
        model = parser.get_parsed_content("registration_model", instantiate=True)
    except RuntimeError as error:  # MONAI wraps what the constructor raised: a user error stays one
        cause = raised_inside(error, USER_ERRORS)
        if cause is None:
            raise
        raise cause from None
    if not isinstance(model, RegistrationModel):
        raise ValueError(f"'registration_model' of {bundle_dir!r} must be a monai_gradicon.app.RegistrationModel, got {type(model).__name__}.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.network = model.network.to(device).eval()
    return model


def convert_reference_weights(source: str, out: str, bundle: str = "knee") -> str:
    """Convert weights released by the authors into a state dict of a bundle's network (``models/model.pt``).

    Args:
        source: the downloaded checkpoint (``*_model_weights_step_2.trch``, uniGradICON ``Step_2_final.trch``).
        out: where to write.
        bundle: short name or bundle directory whose ``network_def`` receives the weights (strictly).

    Returns:
        the path written.
    """
    if not os.path.isfile(source):
        raise FileNotFoundError(f"reference weights file not found: {source!r}.")
    parser = _parser(bundle_directory(bundle))
    grids = [t for t in parser.get_parsed_content("scan_preprocessing", instantiate=True) if isinstance(t, ToNetworkGridd)]
    convention = grids[0].convention if grids else None
    if convention != AUTHORS_CONVENTION:
        raise InputError(
            f"bundle {bundle!r} feeds its network {convention}, not the convention the authors' weights were trained "
            f"with {AUTHORS_CONVENTION}: convert into the bundle made for them (knee, lung, brain, unigradicon, multigradicon)."
        )
    network = parser.get_parsed_content("network_def", instantiate=True)
    inner = [m for m in network.modules() if isinstance(m, MultiStepRegistrationNet)]
    if not inner:
        raise InputError(f"the network of {bundle!r} contains no MultiStepRegistrationNet to receive reference weights.")
    load_reference_weights(inner[0], source)
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    torch.save(network.state_dict(), out)
    return out
