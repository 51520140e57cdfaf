"""Register two scans in physical space and write files that ITK, SimpleITK, 3D Slicer and nibabel open.

Pipeline (``register``), every step of it defined by the bundle (:mod:`monai_gradicon.app.model`):

1. read both images with their RAS affines (:func:`monai_gradicon.io.load_image`), plus optional
   masks and a moving label map, each checked to lie on its image's grid; masks are checked against
   the bundle's mask policy (required / optional / unused: never silently ignored);
2. both scans are brought to common axis codes — the bundle's, if it declares them, else the fixed
   image's (a permutation/flip of the moving array, no interpolation; the report says so) — and run
   through the bundle's ``scan_preprocessing`` (intensity transforms, masks, then
   :class:`~monai_gradicon.transforms.ToNetworkGridd`: the resampling convention of its weights);
3. ``Φ_AB`` and ``Φ_BA`` from the network, optionally after instance optimisation;
4. every fixed voxel ``x`` is carried to the network grid, through ``Φ_AB`` (the exact composition of
   the network's fields), back to the moving image's voxel grid and to millimetres: this gives the
   displacement ``u(x) = T(x) − x`` in mm, the warped moving image ``moving(T(x))`` and the warped label
   map (nearest neighbour). The same with ``Φ_BA`` on the moving grid gives the inverse.

Options of uniGradICON's ``unigradicon-register`` (and beyond): a modality per scan (the scan dict's
``modality`` key, dispatched by the bundle's :class:`~monai_gradicon.transforms.intensity.ByModalityd`),
the similarity of instance optimisation (``lncc``, ``lncc2``, ``mind``), loss masking (the masks restrict
each direction's similarity to its target image's mask instead of multiplying the images),
segmentations (Dice per label in the report; with a weight, a Dice term in instance optimisation) and
the Learn2Reg displacement (:func:`learn2reg_displacement`, ``displacement_learn2reg.nii.gz``).

Interpolation outside the moving image follows ITK's resampler: a point up to half a voxel outside
takes the border value, further out the value is 0, so ITK resampling with the written transform
reproduces the warped image. Fields are evaluated in slabs of at most 2^21 voxels, so a 512×512×600
CT needs no more memory than its outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..io import (
    ImageReadError,
    PhysicalImage,
    apply_affine,
    load_image,
    sample_at_voxel_indices,
    save_nifti,
    write_displacement_nifti,
    write_itk_displacement_transform,
)
from ..losses import NCCLoss
from ..metrics import label_dice
from ..maps import Deformation, jacobian_determinant, warp
from ..transforms.network_grid import PairGeometry, axis_codes
from .errors import InputError, raised_inside
from .instance_optimization import DEFAULT_IO_LEARNING_RATE, DiceTerm, instance_optimize
from .model import IO_SIMILARITIES, RegistrationModel, load_registration_model

__all__ = [
    "register",
    "prepare_pair",
    "network_maps",
    "write_registration",
    "PreparedPair",
    "RegistrationOutputs",
    "physical_transform",
    "learn2reg_displacement",
    "network_one_hot",
    "OUTPUT_FILES",
    "DISPLACEMENT_FORMATS",
]

OUTPUT_FILES = {
    "warped_moving": "warped_moving.nii.gz",
    "displacement": "displacement_mm.nii.gz",
    "transform": "transform.h5",
    "inverse_warped_fixed": "inverse_warped_fixed.nii.gz",
    "inverse_displacement": "inverse_displacement_mm.nii.gz",
    "inverse_transform": "inverse_transform.h5",
    "warped_moving_labels": "warped_moving_labels.nii.gz",
    "displacement_learn2reg": "displacement_learn2reg.nii.gz",
    "report": "report.json",
    "overview": "overview.png",
}
_CHUNK_POINTS = 1 << 21
DISPLACEMENT_FORMATS = ("mm", "learn2reg")  # mm: always written; learn2reg: also the voxel-unit field


def _voxel_indices(shape: Sequence[int], start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Indices ``(P, D)`` of the voxels whose first index lies in ``[start, stop)`` (C order)."""
    axes = [torch.arange(start, stop, device=device, dtype=torch.float64)]
    axes += [torch.arange(n, device=device, dtype=torch.float64) for n in shape[1:]]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


def _slabs(shape: Sequence[int], device: torch.device):
    """``(rows, voxel indices (P, D))`` of the grid ``shape`` in slabs of at most ``_CHUNK_POINTS`` voxels (C order)."""
    per_slab = max(1, int(np.prod(shape[1:])))
    step = max(1, _CHUNK_POINTS // per_slab)
    for start in range(0, shape[0], step):
        stop = min(shape[0], start + step)
        yield slice(start * per_slab, stop * per_slab), _voxel_indices(shape, start, stop, device)


def physical_transform(
    phi: Deformation,
    source: PairGeometry,
    target: PairGeometry,
    source_affine: np.ndarray,
    target_affine: np.ndarray,
    index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Carry voxels of the ``source`` grid (fixed for ``Φ_AB``) through ``phi`` to the ``target`` grid.

    Args:
        phi: map on the network grid, [0, 1] coordinates.
        source: the source image's placement on the network grid (fixed image for ``Φ_AB``).
        target: the target image's placement on the network grid (moving image for ``Φ_AB``).
        source_affine: RAS voxel-to-mm matrix of the source image.
        target_affine: RAS voxel-to-mm matrix of the target image.
        index: source voxel indices ``(P, D)``.

    Returns:
        ``(target voxel indices (P, D), displacement in RAS mm (P, D))``.
    """
    unit = source.index_to_unit(index).to(phi.dtype)
    with torch.no_grad():
        mapped = phi(unit)
    target_index = target.unit_to_index(mapped.to(torch.float64))
    source_mm = apply_affine(source_affine, index.cpu().numpy())
    target_mm = apply_affine(target_affine, target_index.cpu().numpy())
    return target_index, torch.from_numpy(target_mm - source_mm)


@dataclass
class _Direction:
    """Outputs of one direction on its source grid."""

    displacement: np.ndarray  # (D, *S) RAS mm
    warped: np.ndarray  # (*S)
    warped_labels: np.ndarray | None
    warped_segmentation: np.ndarray | None = None


def _resample_direction(
    phi: Deformation,
    source: PhysicalImage,
    target: PhysicalImage,
    source_geometry: PairGeometry,
    target_geometry: PairGeometry,
    labels: PhysicalImage | None,
    segmentation: PhysicalImage | None = None,
) -> _Direction:
    """Every ``source`` voxel through the exact composed ``phi``: displacement (RAS mm, written channel
    first), warped ``target`` (and ``labels``)."""
    shape = source.spatial_shape
    dims = len(shape)
    device = phi.device
    target_image = target.array[None].to(device)
    maps = [m.array[None].to(device) if m is not None else None for m in (labels, segmentation)]
    points = int(np.prod(shape))
    displacement = np.empty((dims, points), np.float32)  # channel first: the (D, *S) output without a copy
    warped = np.empty(points, np.float32)
    warped_maps = [np.empty(points, np.float32) if m is not None else None for m in maps]
    for rows, index in _slabs(shape, device):
        target_index, mm = physical_transform(phi, source_geometry, target_geometry, source.affine, target.affine, index)
        displacement[:, rows] = mm.T.numpy()
        warped[rows] = sample_at_voxel_indices(target_image, target_index, "bilinear")[0].cpu().numpy()
        for label_image, out in zip(maps, warped_maps):
            if label_image is not None:
                out[rows] = sample_at_voxel_indices(label_image, target_index, "nearest")[0].cpu().numpy()
    warped_labels, warped_segmentation = (m.reshape(shape) if m is not None else None for m in warped_maps)
    return _Direction(
        displacement=displacement.reshape(dims, *shape),
        warped=warped.reshape(shape),
        warped_labels=warped_labels,
        warped_segmentation=warped_segmentation,
    )


def _resample_in_place(labels: PhysicalImage, grid: PhysicalImage) -> np.ndarray:
    """``labels`` (nearest neighbour) at the physical positions of the voxels of ``grid``: no registration."""
    shape = grid.spatial_shape
    to_labels = torch.from_numpy(np.linalg.inv(labels.affine) @ grid.affine)
    image = labels.array[None]
    out = np.empty(int(np.prod(shape)), np.float32)
    dims = len(shape)
    for rows, index in _slabs(shape, torch.device("cpu")):
        mapped = index @ to_labels[:dims, :dims].T + to_labels[:dims, dims]
        out[rows] = sample_at_voxel_indices(image, mapped, "nearest")[0].numpy()
    return out.reshape(shape)


def learn2reg_displacement(displacement_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The Learn2Reg displacement: voxel units of the fixed grid, ``(*spatial, D)``.

    ``u_vox(x) = index_fixed(T(x)) − x = M⁻¹ u_mm(x)`` with ``M`` the linear part of the fixed grid's
    voxel-to-mm ``affine``: component ``c`` moves along the file's voxel axis ``c``; for a pair on one grid
    ``moving(x + u_vox(x))`` (e.g. ``scipy.ndimage.map_coordinates``) is the warped moving image.

    Args:
        displacement_mm: ``(D, *spatial)`` ``u(x) = T(x) − x`` in RAS mm at each fixed voxel.
        affine: ``(D+1, D+1)`` the fixed grid's voxel-to-RAS-mm matrix.

    Returns:
        ``(*spatial, D)`` float32, spatial axes in the file's stored order.
    """
    dims = displacement_mm.shape[0]
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64)[:dims, :dims])
    return np.einsum("ij,j...->...i", inverse, np.asarray(displacement_mm, dtype=np.float64)).astype(np.float32)


def _check_same_grid(image: PhysicalImage, other: PhysicalImage, what: str) -> None:
    if image.spatial_shape != other.spatial_shape or not np.allclose(image.affine, other.affine, atol=1e-3):
        raise ImageReadError(
            f"{what} {other.path!r} must lie on the grid of {image.path!r} (shape {image.spatial_shape}); "
            f"got shape {other.spatial_shape} and a different affine."
            if image.spatial_shape == other.spatial_shape
            else f"{what} {other.path!r} must lie on the grid of {image.path!r}: expected shape {image.spatial_shape}, "
            f"got {other.spatial_shape}."
        )


def _prepare_output_dir_check(out: str | os.PathLike) -> None:
    """Fail early (before the network runs) when ``out`` cannot be created or written."""
    shutil.rmtree(_prepare_output_dir(os.fspath(out)), ignore_errors=True)


def _prepare_output_dir(out: str) -> str:
    """Create ``out`` if needed, check it is writable, and return a private staging folder inside it."""
    try:
        os.makedirs(out, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".monai-gradicon-partial-", dir=out)
    except OSError as error:
        raise InputError(f"output folder {out!r} is not writable ({error.strerror or error}).") from None
    return staging


@dataclass
class RegistrationOutputs:
    """What :func:`register` produced.

    Args:
        report: the JSON report as a dict.
        files: output name -> path (see :data:`OUTPUT_FILES`).
        phi_AB: ``Φ_AB`` on the network grid (moving = A, fixed = B).
        phi_BA: ``Φ_BA`` on the network grid.
    """

    report: dict
    files: dict[str, str]
    phi_AB: Deformation
    phi_BA: Deformation


def _ncc(a: torch.Tensor, b: torch.Tensor) -> float:
    """Global normalised cross-correlation in [−1, 1] (1 − the NCC loss)."""
    return float(1.0 - NCCLoss(a.ndim - 2)(a, b))


def _jacobian_summary(ddf: torch.Tensor) -> dict:
    """Folds and Jacobian determinant range of a network-grid DDF (forward differences, voxel units).

    The determinant is computed once; the fold count equals :func:`monai_gradicon.maps.fold_count`.
    """
    det = jacobian_determinant(ddf)[0]
    negative = det < 0
    return {
        "folds": int(negative.sum()),
        "folds_percent": float(negative.to(torch.float64).mean() * 100.0),
        "jacobian_determinant_min": float(det.min()),
        "jacobian_determinant_max": float(det.max()),
    }


def _check_masks(model: RegistrationModel, masks: Sequence[PhysicalImage | None]) -> None:
    given = [m is not None for m in masks]
    if model.masks == "unused" and any(given):
        raise InputError(
            f"the {model.name!r} model does not use masks (its preprocessing has none); remove --moving-mask/--fixed-mask."
        )
    if model.masks == "required" and not all(given):
        raise InputError(
            f"the {model.name!r} model was trained on masked images (image × mask): give both --moving-mask and "
            "--fixed-mask (e.g. lung segmentations); without them it would see what it never saw in training."
        )
    if model.masks == "optional" and any(given) and not all(given):
        raise InputError(f"give masks for both images or for none (the {model.name!r} model masks both alike).")


def _scan(image: PhysicalImage, mask: PhysicalImage | None, axcodes: str, modality: str | None = None, loss_masking: bool = False) -> dict:
    from monai.data import MetaTensor

    scan = {"image": MetaTensor(image.array, affine=torch.as_tensor(image.affine)), "axcodes": axcodes}
    if mask is not None:
        scan["mask"] = MetaTensor(mask.array, affine=torch.as_tensor(mask.affine))
    if modality is not None:
        scan["modality"] = modality
    if loss_masking:
        scan["loss_masking"] = True
    return scan


def _prepare(model: RegistrationModel, scan: dict, what: str, device: torch.device) -> tuple[torch.Tensor, PairGeometry, dict]:
    """The bundle's scan preprocessing; a ValueError inside a transform (MONAI wraps it) is bad input about ``what``."""
    try:
        image, geometry, out = model.prepare(scan)
    except RuntimeError as error:
        cause = raised_inside(error, ValueError)
        if cause is None:
            raise
        raise InputError(f"{what}: {cause}") from None
    return image.to(device), geometry, out


@dataclass
class PreparedPair:
    """A pair read, checked and on the network grid: what the network and the writer of :func:`register` need.

    Args:
        moving_image: the moving image as read (image A).
        fixed_image: the fixed image as read (image B).
        labels: the moving label map, or ``None``.
        masks: ``[moving mask, fixed mask]`` (either may be ``None``).
        paths: ``moving``/``fixed``/``moving_labels``/``moving_mask``/``fixed_mask`` -> absolute path or ``None``.
        codes: the stored axis codes of ``moving`` and ``fixed``.
        network_codes: the axis codes both scans were brought to.
        A: the preprocessed moving image ``(1, C, *network_shape)``.
        B: the preprocessed fixed image.
        geometry_A: the moving image's placement on the network grid.
        geometry_B: the fixed image's placement on the network grid.
        preprocessing_seconds: time spent reading and preprocessing.
        modalities: ``moving``/``fixed`` -> the modality each scan was preprocessed as (``None``: the bundle has one).
        loss_masks: ``(mask_A, mask_B)`` on the network grid ``(1, 1, *network_shape)`` for loss masking, or ``None``.
        segmentations: ``[moving, fixed]`` label maps with the same labels, or ``None``.
    """

    moving_image: PhysicalImage
    fixed_image: PhysicalImage
    labels: PhysicalImage | None
    masks: list
    paths: dict
    codes: dict
    network_codes: str
    A: torch.Tensor
    B: torch.Tensor
    geometry_A: PairGeometry
    geometry_B: PairGeometry
    preprocessing_seconds: float
    modalities: dict = field(default_factory=dict)
    loss_masks: tuple | None = None
    segmentations: list | None = None

    @property
    def segmentation_labels(self) -> list[int]:
        """The labels of the segmentations (without 0), ``[]`` without segmentations."""
        return _label_set(self.segmentations[1]) if self.segmentations else []


def _absolute(path: str | os.PathLike | None) -> str | None:
    return os.path.abspath(os.fspath(path)) if path else None


def prepare_pair(
    model: RegistrationModel,
    moving: str | os.PathLike,
    fixed: str | os.PathLike,
    moving_labels: str | os.PathLike | None = None,
    moving_mask: str | os.PathLike | None = None,
    fixed_mask: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    *,
    moving_modality: str | None = None,
    fixed_modality: str | None = None,
    loss_masking: bool = False,
    moving_segmentation: str | os.PathLike | None = None,
    fixed_segmentation: str | os.PathLike | None = None,
) -> PreparedPair:
    """Read a pair, check it against the model (grids, mask policy) and run the bundle's scan preprocessing.

    Args:
        model: the bundle's registration model.
        moving: moving image file (image A).
        fixed: fixed image file (image B).
        moving_labels: optional label map on the moving grid.
        moving_mask: optional mask on the moving grid.
        fixed_mask: optional mask on the fixed grid.
        device: where the preprocessed images are put.
        moving_modality: the moving scan's modality (one of ``model.modalities``); ``None``: the bundle's default.
        fixed_modality: the fixed scan's modality.
        loss_masking: the masks (both required) enter the similarity of instance optimisation instead of
            multiplying the images; they are brought to the network grid (``PreparedPair.loss_masks``).
        moving_segmentation: optional label map on the moving grid (Dice term and Dice report).
        fixed_segmentation: optional label map on the fixed grid, with the same labels.

    Returns:
        the :class:`PreparedPair`.

    Raises:
        ImageReadError: missing/unreadable/NaN/wrong-dimension inputs, or grids that do not match.
        InputError: masks against the bundle's policy, an image the preprocessing rejects, a modality the
            bundle does not offer, loss masking without both masks, segmentations with different labels.
    """
    started = time.perf_counter()
    dims = model.spatial_dims
    moving_image = load_image(moving, "moving image", dims)
    fixed_image = load_image(fixed, "fixed image", dims)
    labels = load_image(moving_labels, "moving label map", dims) if moving_labels else None
    masks = [load_image(m, n, dims) if m else None for m, n in ((moving_mask, "moving mask"), (fixed_mask, "fixed mask"))]
    if labels is not None:
        _check_same_grid(moving_image, labels, "moving label map")
    for image, mask, what in ((moving_image, masks[0], "moving mask"), (fixed_image, masks[1], "fixed mask")):
        if mask is not None:
            _check_same_grid(image, mask, what)
    _check_masks(model, masks)
    modalities = {"moving": _modality(model, moving_modality, "moving"), "fixed": _modality(model, fixed_modality, "fixed")}
    if loss_masking:
        _check_loss_masking(model, masks)
    segmentations = _segmentations(moving_image, fixed_image, moving_segmentation, fixed_segmentation, dims)
    codes = {"moving": axis_codes(moving_image.affine), "fixed": axis_codes(fixed_image.affine)}
    network_codes = model.grid.axcodes or codes["fixed"]
    device = torch.device(device)
    prepared = []
    for image, mask, role in ((moving_image, masks[0], "moving"), (fixed_image, masks[1], "fixed")):
        scan = _scan(image, mask, network_codes, modalities[role], loss_masking)
        prepared.append(_prepare(model, scan, f"{role} image {image.path!r}", device))
    (A, geometry_A, out_A), (B, geometry_B, out_B) = prepared
    loss_masks = (_network_mask(model, out_A, "moving", device), _network_mask(model, out_B, "fixed", device)) if loss_masking else None
    paths = {
        "moving": _absolute(moving), "fixed": _absolute(fixed), "moving_labels": _absolute(moving_labels),
        "moving_mask": _absolute(moving_mask), "fixed_mask": _absolute(fixed_mask),
        "moving_segmentation": _absolute(moving_segmentation), "fixed_segmentation": _absolute(fixed_segmentation),
    }
    return PreparedPair(
        moving_image, fixed_image, labels, masks, paths, codes, network_codes, A, B, geometry_A, geometry_B,
        time.perf_counter() - started, modalities=modalities, loss_masks=loss_masks, segmentations=segmentations,
    )


def _modality(model: RegistrationModel, modality: str | None, role: str) -> str | None:
    """The modality a scan is preprocessed as (``None``: the bundle has one preprocessing for all scans)."""
    if modality is None:
        return model.default_modality
    if not model.modalities:
        raise InputError(
            f"bundle {model.name!r} has one preprocessing for every scan and no per-scan modality; "
            f"--{role}-modality is for bundles that offer modalities (unigradicon, multigradicon), got {modality!r}."
        )
    if modality not in model.modalities:
        raise InputError(f"{role} modality must be one of {list(model.modalities)} (bundle {model.name!r}), got {modality!r}.")
    return modality


def _check_loss_masking(model: RegistrationModel, masks: Sequence[PhysicalImage | None]) -> None:
    if not all(m is not None for m in masks):
        raise InputError("--loss-masking needs both --moving-mask and --fixed-mask (the similarity is averaged inside them).")
    if model.masks == "required":
        raise InputError(
            f"the {model.name!r} model was trained on masked images (image × mask); --loss-masking would feed it "
            "unmasked images. Its masks always multiply the images: leave out --loss-masking."
        )


def _network_mask(model: RegistrationModel, out: dict, role: str, device: torch.device) -> torch.Tensor:
    """The scan's mask as the preprocessing left it on the network grid, ``(1, 1, *network_shape)``."""
    if out.get("mask") is None:
        raise InputError(f"the scan preprocessing of {model.name!r} does not bring masks to the network grid: --loss-masking is not available.")
    mask = (torch.as_tensor(out["mask"]).as_subclass(torch.Tensor) > 0).to(torch.float32)[None]
    if tuple(mask.shape[2:]) != model.network_shape or not bool(mask.any()):
        raise InputError(f"the {role} mask covers no voxel of the network grid {model.network_shape}: it cannot restrict the similarity.")
    return mask.to(device)


def _label_set(image: PhysicalImage) -> list[int]:
    return sorted(int(v) for v in torch.unique(torch.round(image.array)).tolist() if v != 0)


def _segmentations(moving_image, fixed_image, moving_segmentation, fixed_segmentation, dims) -> list | None:
    """Both segmentations read and checked (grids, the same nonzero labels), or ``None``."""
    if not moving_segmentation and not fixed_segmentation:
        return None
    if not (moving_segmentation and fixed_segmentation):
        raise InputError("give both --moving-segmentation and --fixed-segmentation (their labels are compared), or neither.")
    moving_seg = load_image(moving_segmentation, "moving segmentation", dims)
    fixed_seg = load_image(fixed_segmentation, "fixed segmentation", dims)
    _check_same_grid(moving_image, moving_seg, "moving segmentation")
    _check_same_grid(fixed_image, fixed_seg, "fixed segmentation")
    labels = [_label_set(moving_seg), _label_set(fixed_seg)]
    if labels[0] != labels[1]:
        raise InputError(
            f"the segmentations must have the same labels: moving segmentation {labels[0]}, fixed segmentation {labels[1]}."
        )
    if not labels[0]:
        raise InputError("the segmentations hold no label other than 0 (background).")
    return [moving_seg, fixed_seg]


def network_one_hot(segmentation: PhysicalImage, geometry: PairGeometry, labels: Sequence[int], device: torch.device) -> torch.Tensor:
    """A label map brought to the network grid (nearest neighbour) as a one-hot ``(1, len(labels), *network_shape)``.

    Args:
        segmentation: label map on its image's grid.
        geometry: that image's placement on the network grid.
        labels: the labels, one channel each (background 0 left out).
        device: where the result is put.

    Returns:
        float32 one-hot channels in the order of ``labels``.
    """
    on_grid = torch.round(geometry.to_network(segmentation.array[None], mode="nearest"))
    return torch.cat([(on_grid == label) for label in labels], dim=1).to(torch.float32).to(device)


def write_registration(
    model: RegistrationModel,
    pair: PreparedPair,
    phi_AB: Deformation,
    phi_BA: Deformation,
    out: str | os.PathLike,
    io_report: dict | None = None,
    overview: bool = False,
    network_seconds: float = 0.0,
    displacement_format: str = "mm",
) -> RegistrationOutputs:
    """Carry the network-grid maps of a prepared pair to both images' grids and write every output to ``out``.

    Files are staged in a private folder inside ``out`` and moved in only when all succeeded.

    Args:
        model: the model that produced the maps.
        pair: the :class:`PreparedPair` the maps belong to.
        phi_AB: ``Φ_AB`` (moving = A, fixed = B) on the network grid.
        phi_BA: ``Φ_BA`` on the network grid.
        out: output folder (created).
        io_report: the instance-optimisation summary for the report, or ``None``.
        overview: also write ``overview.png``.
        network_seconds: time the network (and instance optimisation) took, for the report.
        displacement_format: ``"mm"`` (``displacement_mm.nii.gz``, always written) or ``"learn2reg"``: also
            ``displacement_learn2reg.nii.gz`` (:func:`learn2reg_displacement`, the fixed header).

    Returns:
        :class:`RegistrationOutputs` (report, written files, network-grid maps).

    Raises:
        InputError: the output folder cannot be written, an unknown ``displacement_format``.
    """
    _check_displacement_format(displacement_format)
    started = time.perf_counter()
    out = os.fspath(out)
    staging = _prepare_output_dir(out)
    moving_image, fixed_image, labels, masks, codes = pair.moving_image, pair.fixed_image, pair.labels, pair.masks, pair.codes
    network_codes, A, B, geometry_A, geometry_B = pair.network_codes, pair.A, pair.B, pair.geometry_A, pair.geometry_B
    run_device = phi_AB.fields[0].device
    try:
        segmentations = pair.segmentations
        forward = _resample_direction(
            phi_AB, fixed_image, moving_image, geometry_B, geometry_A, labels, segmentations[0] if segmentations else None
        )
        inverse = _resample_direction(phi_BA, moving_image, fixed_image, geometry_A, geometry_B, None)
        files = {}

        def stage(key: str) -> str:
            files[key] = os.path.join(out, OUTPUT_FILES[key])
            return os.path.join(staging, OUTPUT_FILES[key])

        save_nifti(forward.warped, fixed_image.affine, stage("warped_moving"))
        write_displacement_nifti(forward.displacement, fixed_image.affine, stage("displacement"))
        write_itk_displacement_transform(forward.displacement, fixed_image.affine, stage("transform"))
        if displacement_format == "learn2reg":
            save_nifti(learn2reg_displacement(forward.displacement, fixed_image.affine), fixed_image.affine, stage("displacement_learn2reg"))
        save_nifti(inverse.warped, moving_image.affine, stage("inverse_warped_fixed"))
        write_displacement_nifti(inverse.displacement, moving_image.affine, stage("inverse_displacement"))
        write_itk_displacement_transform(inverse.displacement, moving_image.affine, stage("inverse_transform"))
        if forward.warped_labels is not None:
            save_nifti(np.rint(forward.warped_labels), fixed_image.affine, stage("warped_moving_labels"), dtype=np.int32)
        if overview:
            from ..visualize import save_registration_overview

            save_registration_overview(fixed_image, forward, stage("overview"))
        with torch.no_grad():
            ddf_AB = phi_AB.ddf(model.network_shape)
            ddf_BA = phi_BA.ddf(model.network_shape)
            warped_A = warp(A, ddf_AB)
        magnitude = float(np.linalg.norm(forward.displacement, axis=0).max())
        report = {
            **pair.paths,
            "bundle": model.name,
            "weights": model.weights,
            "notes": list(model.notes),
            "network_shape": list(model.network_shape),
            "resampling": model.convention | {
                "moving": geometry_A.describe(),
                "fixed": geometry_B.describe(),
            },
            "axis_codes": {
                "moving_stored": codes["moving"],
                "fixed_stored": codes["fixed"],
                "network_input": network_codes,
                "moving_reoriented": codes["moving"] != network_codes,
                "fixed_reoriented": codes["fixed"] != network_codes,
            },
            "masks": {"policy": model.masks, "moving": bool(masks[0]), "fixed": bool(masks[1])},
            "mask_use": "restrict the similarity of instance optimisation (loss masking)" if pair.loss_masks is not None
            else ("multiply the images" if any(masks) else None),
            "modalities": dict(pair.modalities),
            "segmentation_dice": _segmentation_dice(pair, forward, (io_report or {}).get("dice_weight", 0.0)) if segmentations else None,
            "device": str(run_device),
            "fixed_affine_ras": fixed_image.affine.tolist(),
            "moving_affine_ras": moving_image.affine.tolist(),
            "forward": _jacobian_summary(ddf_AB),
            "inverse": _jacobian_summary(ddf_BA),
            "max_displacement_mm": magnitude,
            "similarity": {
                "measure": "global NCC of the preprocessed images on the network grid (1 = identical)",
                "before": _ncc(A, B),
                "after": _ncc(warped_A, B),
            },
            "instance_optimization": io_report,
            "runtime_seconds": {
                "preprocessing": pair.preprocessing_seconds,
                "network": network_seconds,
                "writing": None,
                "total": None,
            },
            "files": {k: v for k, v in files.items()} | {"report": os.path.join(out, OUTPUT_FILES["report"])},
            "conventions": {
                "displacement": "u(x) = T(x) - x in mm at each fixed voxel; T maps fixed points to moving points; "
                "NIfTI vectors in RAS (intent DISPVECT, ITK reads them as LPS); transform.h5 in ITK LPS",
                "jacobian": "forward differences of the map on the network grid (voxel units); folds = det < 0",
                "displacement_learn2reg": "u_vox(x) = index_fixed(T(x)) - x in voxels of the fixed grid, array (X, Y, Z, 3) "
                "in the file's stored axis order (nibabel's), component c along voxel axis c; the fixed header",
            },
        }
        report["runtime_seconds"]["writing"] = time.perf_counter() - started
        report["runtime_seconds"]["total"] = pair.preprocessing_seconds + network_seconds + report["runtime_seconds"]["writing"]
        with open(stage("report"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        for key, path in files.items():
            os.replace(os.path.join(staging, os.path.basename(path)), path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return RegistrationOutputs(report=report, files=files, phi_AB=phi_AB, phi_BA=phi_BA)


def _check_displacement_format(displacement_format: str) -> None:
    if displacement_format not in DISPLACEMENT_FORMATS:
        raise InputError(f"displacement format must be one of {list(DISPLACEMENT_FORMATS)}, got {displacement_format!r}.")


def _segmentation_dice(pair: PreparedPair, forward: _Direction, dice_weight: float) -> dict:
    """Dice per label (MONAI ``compute_dice``) of the moving segmentation on the fixed grid, unregistered and registered."""
    moving_seg, fixed_seg = pair.segmentations
    labels = pair.segmentation_labels
    reference = fixed_seg.array[0].numpy()
    before = label_dice(_resample_in_place(moving_seg, pair.fixed_image), reference, labels)
    after = label_dice(forward.warped_segmentation, reference, labels)
    return {
        "measure": "Dice per label on the fixed grid: the moving segmentation (nearest neighbour) at the fixed voxels' "
        "positions (before) and through the transform (after), against the fixed segmentation",
        "labels": labels,
        "before": {str(k): v for k, v in before.items()},
        "after": {str(k): v for k, v in after.items()},
        "mean_before": float(np.mean(list(before.values()))) if before else None,
        "mean_after": float(np.mean(list(after.values()))) if after else None,
        "dice_term_weight": float(dice_weight),
        "dice_term": "in the instance-optimisation objective" if dice_weight > 0
        else "not used: the segmentations are only scored (--dice-weight W > 0 with --io-steps N adds the Dice term)",
    }


def _check_options(io_steps, io_similarity, loss_masking, dice_weight, segmentations_given, displacement_format) -> None:
    """Options that need instance optimisation, or each other; refused before anything is read."""
    if int(io_steps) != io_steps or io_steps < 0:
        raise InputError(f"io_steps must be a non-negative integer, got {io_steps!r}.")
    _check_displacement_format(displacement_format)
    if io_similarity is not None and io_similarity not in IO_SIMILARITIES:
        raise InputError(f"the instance-optimisation similarity (--io-sim) must be one of {list(IO_SIMILARITIES)}, got {io_similarity!r}.")
    if not dice_weight >= 0:
        raise InputError(f"--dice-weight must be >= 0, got {dice_weight!r}.")
    if dice_weight > 0 and segmentations_given != 2:
        raise InputError("--dice-weight needs both --moving-segmentation and --fixed-segmentation.")
    needs_io = [n for n, v in (("--io-sim", io_similarity is not None), ("--loss-masking", loss_masking), ("--dice-weight", dice_weight > 0)) if v]
    if needs_io and io_steps == 0:
        raise InputError(f"{' and '.join(needs_io)} act on instance optimisation: give --io-steps N > 0 (the reference uses 50).")


def _io_similarity_name(model: RegistrationModel, name: str) -> str:
    return {
        "lncc": f"lncc: LNCC, 1 - mean(cc), Gaussian sigma {model.lncc_sigma}",
        "lncc2": f"lncc2: squared LNCC, 1 - mean(cc^2), Gaussian sigma {model.lncc_sigma}",
        "mind": "mind: MIND-SSC, radius 2, dilation 2",
    }[name]


def _check_windows(overrides: Mapping | None, modalities: dict) -> None:
    """A CT window with no CT scan (or an MR quantile range with no MR scan) would be silently unused: refused."""
    used = set(modalities.values())
    for key, modality, option in (("ct_window", "ct", "--ct-window"), ("quantile_range", "mri", "--quantile-range")):
        if key in (overrides or {}) and modality not in used:
            raise InputError(f"{option} applies to {modality} scans, but the moving and fixed scans are {sorted(used)}.")


def network_maps(
    model: RegistrationModel,
    pair: PreparedPair,
    objective,
    io_steps: int = 0,
    io_learning_rate: float = DEFAULT_IO_LEARNING_RATE,
    seed: int = 0,
    progress: bool = False,
    io_similarity: str | None = None,
    loss_masking: bool = False,
    dice_weight: float = 0.0,
) -> tuple[Deformation, Deformation, dict | None]:
    """``Φ_AB`` and ``Φ_BA`` of a prepared pair: the network's, or after instance optimisation on this pair (Sec. 5.3).

    Args:
        model: the registration model.
        pair: the :class:`PreparedPair` (``A``, ``B`` on the network's device).
        objective: ``model.objective(similarity)`` on that device (used with ``io_steps > 0``).
        io_steps: instance-optimisation steps (0: the network's maps, no gradients).
        io_learning_rate: Adam learning rate.
        seed: seeds the GradICON perturbation of instance optimisation.
        progress: progress bar over the steps.
        io_similarity: the similarity's name for the report (``None``: lncc).
        loss_masking: the pair's masks restrict the similarity (``pair.loss_masks``).
        dice_weight: weight of the Dice term of the pair's segmentations (0: none).

    Returns:
        ``(Φ_AB, Φ_BA, instance-optimisation report or None)``.
    """
    if io_steps == 0:
        with torch.no_grad():
            return model.deformation(pair.A, pair.B), model.deformation(pair.B, pair.A), None
    device = pair.A.device
    generator = torch.Generator().manual_seed(int(seed))
    objective.regularizer.generator = generator
    dice = None
    if dice_weight > 0:
        labels = pair.segmentation_labels
        dice = DiceTerm(*(
            network_one_hot(seg, geometry, labels, device)
            for seg, geometry in zip(pair.segmentations, (pair.geometry_A, pair.geometry_B))
        ))
    result = instance_optimize(
        model.deformation, model.network, pair.A, pair.B, objective, int(io_steps), io_learning_rate, progress, generator,
        masks=pair.loss_masks, dice=dice, dice_weight=dice_weight,
    )
    io_report = {
        "steps": int(io_steps),
        "learning_rate": io_learning_rate,
        "similarity": _io_similarity_name(model, io_similarity or "lncc"),
        "loss_masking": bool(loss_masking),
        "dice_weight": float(dice_weight),
        "objective_before": result.losses[0],
        "objective_after": result.final_loss,
        "dice_loss_before": result.dice_losses[0] if result.dice_losses else None,
        "dice_loss_after": result.dice_losses[-1] if result.dice_losses else None,
    }
    return result.phi_AB, result.phi_BA, io_report


def register(
    moving: str | os.PathLike,
    fixed: str | os.PathLike,
    bundle: str | RegistrationModel = "knee",
    out: str | os.PathLike = "registration",
    moving_labels: str | os.PathLike | None = None,
    moving_mask: str | os.PathLike | None = None,
    fixed_mask: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    io_steps: int = 0,
    io_learning_rate: float = DEFAULT_IO_LEARNING_RATE,
    overview: bool = False,
    device: str | None = None,
    progress: bool = True,
    seed: int = 0,
    allow_untrained: bool = False,
    overrides: Mapping | None = None,
    moving_modality: str | None = None,
    fixed_modality: str | None = None,
    io_similarity: str | None = None,
    loss_masking: bool = False,
    moving_segmentation: str | os.PathLike | None = None,
    fixed_segmentation: str | os.PathLike | None = None,
    dice_weight: float = 0.0,
    displacement_format: str = "mm",
) -> RegistrationOutputs:
    """Register ``moving`` to ``fixed`` and write the results to ``out``.

    Args:
        moving: moving image file (image A).
        fixed: fixed image file (image B); outputs of the forward direction live on its grid.
        bundle: a short name (``knee``, ``lung``, ``brain``, ``unigradicon``, ``multigradicon``), a
            bundle directory, or a :class:`RegistrationModel`.
        out: output folder (created; files are staged and moved in only when all succeeded).
        moving_labels: optional label map on the moving grid, warped with nearest neighbour.
        moving_mask: optional mask on the moving image's grid (as the bundle's mask policy allows).
        fixed_mask: optional mask on the fixed image's grid.
        weights: weights file overriding the bundle's (a ``model.pt`` or the authors' ``.trch``).
        io_steps: instance-optimisation steps (0: none; the reference's default when used is 50).
        io_learning_rate: Adam learning rate of instance optimisation (reference: 2e-5).
        overview: also write ``overview.png``.
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available.
        progress: show a progress bar during instance optimisation.
        seed: seeds the GradICON perturbation of instance optimisation.
        allow_untrained: run a bundle that has no weights file (the result is not a registration).
        overrides: bundle config overrides (e.g. ``{"modality": "mri"}`` for uniGradICON, ``{"ct_window": [-1000, 500]}``).
        moving_modality: the moving scan's modality (``ct``/``mri`` for uni/multiGradICON); default: the bundle's.
        fixed_modality: the fixed scan's modality.
        io_similarity: ``L_sim`` of instance optimisation, ``lncc`` (default), ``lncc2`` or ``mind``
            (:meth:`RegistrationModel.objective`); needs ``io_steps > 0``.
        loss_masking: the masks restrict the similarity of instance optimisation (each direction inside its
            target image's mask) instead of multiplying the images; needs both masks and ``io_steps > 0``.
        moving_segmentation: label map on the moving grid: Dice per label in the report, and the Dice term.
        fixed_segmentation: label map on the fixed grid, with the same labels.
        dice_weight: weight of the Dice term of instance optimisation (needs both segmentations and ``io_steps > 0``).
        displacement_format: ``"mm"``, or ``"learn2reg"`` to also write ``displacement_learn2reg.nii.gz``.

    Returns:
        :class:`RegistrationOutputs` (report, written files, network-grid maps).

    Raises:
        ImageReadError: missing/unreadable/NaN/wrong-dimension inputs, or grids that do not match.
        InputError: bad options, masks against the bundle's policy, an image the preprocessing rejects,
            an output folder that cannot be written.
        MissingWeightsError: the bundle's weights file is missing (the message says where to get it).
    """
    segmentations_given = sum(bool(p) for p in (moving_segmentation, fixed_segmentation))
    _check_options(io_steps, io_similarity, loss_masking, dice_weight, segmentations_given, displacement_format)
    if isinstance(bundle, RegistrationModel):
        given = [n for n, v in (("weights", weights), ("allow_untrained", allow_untrained), ("overrides", overrides)) if v]
        if given:
            raise InputError(f"{given} apply when the model is loaded from a bundle; this RegistrationModel is already built.")
        model = bundle
    else:
        model = load_registration_model(bundle, weights, device, allow_untrained=allow_untrained, overrides=overrides)
    tensors = list(model.network.parameters()) + list(model.network.buffers())
    run_device = tensors[0].device if tensors else torch.device("cpu")
    objective = model.objective(io_similarity or "lncc").to(run_device)
    pair = prepare_pair(
        model, moving, fixed, moving_labels, moving_mask, fixed_mask, run_device, moving_modality=moving_modality,
        fixed_modality=fixed_modality, loss_masking=loss_masking, moving_segmentation=moving_segmentation,
        fixed_segmentation=fixed_segmentation,
    )
    _check_windows(overrides, pair.modalities)
    _prepare_output_dir_check(out)
    started = time.perf_counter()
    phi_AB, phi_BA, io_report = network_maps(
        model, pair, objective, io_steps, io_learning_rate, seed, progress, io_similarity, loss_masking, dice_weight
    )
    return write_registration(
        model, pair, phi_AB, phi_BA, out, io_report, overview, time.perf_counter() - started, displacement_format=displacement_format
    )
