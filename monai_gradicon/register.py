"""Register two scans in physical space and write files that ITK, SimpleITK, 3D Slicer and nibabel open.

Pipeline (``register``):

1. read both images with their RAS affines (:func:`monai_gradicon.io.load_image`), plus optional
   masks and a moving label map, each checked to lie on its image's grid;
2. the bundle's intensity preprocessing, then a resize to the network grid (linear). ``bundle="knee"`` /
   ``"lung"`` resize like the reference's ITK wrapper (index axes reversed into ITK array order,
   ``align_corners=False``), which is what the authors' released weights were trained on; a bundle
   directory uses its own configs' convention (``registration`` section of ``inference.json``; default:
   reorient to RAS as ``Orientationd``, then ``Resized(align_corners=True)``), see
   :class:`PairGeometry`;
3. ``Φ_AB`` and ``Φ_BA`` from the network, optionally after instance optimisation;
4. every fixed voxel ``x`` is carried to the network grid, through ``Φ_AB`` (the exact composition of
   the network's fields), back to the moving image's voxel grid and to millimetres: this gives the
   displacement ``u(x) = T(x) − x`` in mm, the warped moving image ``moving(T(x))`` and the warped label
   map (nearest neighbour). The same with ``Φ_BA`` on the moving grid gives the inverse.

Interpolation outside the moving image follows ITK's resampler: a point up to half a voxel outside
takes the border value, further out the value is 0, so ITK resampling with the written transform
reproduces the warped image.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .instance_optimization import DEFAULT_IO_LEARNING_RATE, instance_optimize
from .io import (
    ImageReadError,
    PhysicalImage,
    apply_affine,
    load_image,
    sample_at_voxel_indices,
    save_nifti,
    write_displacement_nifti,
    write_itk_displacement_transform,
)
from .losses import NCCLoss
from .maps import Deformation, jacobian_determinant, warp
from .registration_model import RegistrationModel, load_registration_model

__all__ = ["register", "RegistrationOutputs", "PairGeometry", "physical_transform", "OUTPUT_FILES"]

OUTPUT_FILES = {
    "warped_moving": "warped_moving.nii.gz",
    "displacement": "displacement_mm.nii.gz",
    "transform": "transform.h5",
    "inverse_warped_fixed": "inverse_warped_fixed.nii.gz",
    "inverse_displacement": "inverse_displacement_mm.nii.gz",
    "inverse_transform": "inverse_transform.h5",
    "warped_moving_labels": "warped_moving_labels.nii.gz",
    "report": "report.json",
    "overview": "overview.png",
}
_CHUNK_POINTS = 1 << 21


@dataclass
class PairGeometry:
    """How one image grid sits on the network grid (a linear resize, as ``F.interpolate``).

    Network axis ``a`` shows file axis ``f = axis_order[a]`` (default: ``D-1-a`` when ``reverse_axes``,
    the ITK array order of the reference's wrapper, else ``a``), read backwards when ``flips[f]``
    (``c' = S-1-c``; what ``Orientationd(axcodes="RAS")`` does to a non-RAS file). File voxel index
    ``c'`` and network coordinate ``x ∈ [0, 1]`` relate by ``n = (c' + 0.5)·N/S − 0.5``,
    ``x = n/(N − 1)`` with ``align_corners=False`` (the reference's ITK wrapper), or ``x = c'/(S − 1)``
    with ``align_corners=True`` (MONAI ``Resized(align_corners=True)``, the bundles' configs).

    Args:
        image_shape: spatial shape of the file's voxel array.
        network_shape: spatial shape of the network grid (network axis order).
        reverse_axes: feed the file's index axes reversed (ignored when ``axis_order`` is given).
        align_corners: the resize convention (see above).
        axis_order: file axis shown along each network axis (a permutation), or ``None``.
        flips: per file axis, whether it is read backwards; empty: no flips.
    """

    image_shape: tuple[int, ...]
    network_shape: tuple[int, ...]
    reverse_axes: bool
    align_corners: bool = False
    axis_order: tuple[int, ...] | None = None
    flips: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        dims = len(self.image_shape)
        if len(self.network_shape) != dims:
            raise ValueError(f"image shape {self.image_shape} and network shape {self.network_shape} differ in dimension.")
        if self.axis_order is not None and sorted(self.axis_order) != list(range(dims)):
            raise ValueError(f"axis_order must be a permutation of {list(range(dims))}, got {self.axis_order}.")
        if self.flips and len(self.flips) != dims:
            raise ValueError(f"flips must give one flag per file axis ({dims}), got {self.flips}.")

    @classmethod
    def for_image(cls, image: PhysicalImage, model: RegistrationModel) -> "PairGeometry":
        """The placement of ``image`` on ``model``'s grid, by the model's ``orientation``/``reverse_axes``/``align_corners``.

        Args:
            image: the image (its RAS affine decides the reorientation when ``model.orientation == "RAS"``).
            model: the registration model.

        Returns:
            the geometry.
        """
        if model.orientation == "RAS":
            import nibabel as nib

            ornt = nib.orientations.io_orientation(image.affine)  # per file axis: (RAS axis, +1 | -1)
            order = [0] * len(image.spatial_shape)
            for f, (axis, sign) in enumerate(ornt):
                order[int(axis)] = f
            return cls(
                image.spatial_shape, model.spatial_shape, False, model.align_corners,
                tuple(order), tuple(bool(sign < 0) for _, sign in ornt),
            )
        return cls(image.spatial_shape, model.spatial_shape, model.reverse_axes, model.align_corners)

    def _axes(self) -> list[int]:
        if self.axis_order is not None:
            return list(self.axis_order)
        dims = len(self.image_shape)
        return list(reversed(range(dims))) if self.reverse_axes else list(range(dims))

    def _flipped(self, f: int) -> bool:
        return bool(self.flips[f]) if self.flips else False

    def to_network_layout(self, array: torch.Tensor) -> torch.Tensor:
        """``(B, C, *file axes)`` -> ``(B, C, *network axes)`` (no resampling)."""
        flipped = [2 + f for f in range(len(self.image_shape)) if self._flipped(f)]
        if flipped:
            array = array.flip(flipped)
        axes = self._axes()
        return array if axes == sorted(axes) else array.permute(0, 1, *[2 + f for f in axes])

    def _to_grid(self, c: torch.Tensor, n_net: int, n_img: int) -> torch.Tensor:
        if self.align_corners:
            return c / max(n_img - 1, 1)
        return ((c + 0.5) * n_net / n_img - 0.5) / (n_net - 1)

    def index_to_unit(self, index: torch.Tensor) -> torch.Tensor:
        """File voxel indices ``(P, D)`` -> network coordinates ``(1, D, P, 1[, 1])`` in [0, 1]."""
        dims = len(self.image_shape)
        columns = []
        for a, f in enumerate(self._axes()):
            n_net, n_img = self.network_shape[a], self.image_shape[f]
            c = (n_img - 1) - index[:, f] if self._flipped(f) else index[:, f]
            columns.append(self._to_grid(c, n_net, n_img))
        return torch.stack(columns, 0).reshape(1, dims, -1, *([1] * (dims - 1)))

    def unit_to_index(self, unit: torch.Tensor) -> torch.Tensor:
        """Network coordinates ``(1, D, P, ...)`` -> file voxel indices ``(P, D)``."""
        dims = len(self.image_shape)
        flat = unit.reshape(dims, -1)
        index = torch.empty(flat.shape[1], dims, dtype=flat.dtype, device=flat.device)
        for a, f in enumerate(self._axes()):
            n_net, n_img = self.network_shape[a], self.image_shape[f]
            if self.align_corners:
                c = flat[a] * max(n_img - 1, 1)
            else:
                c = (flat[a] * (n_net - 1) + 0.5) * n_img / n_net - 0.5
            index[:, f] = (n_img - 1) - c if self._flipped(f) else c
        return index


def _voxel_indices(shape: Sequence[int], start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Indices ``(P, D)`` of the voxels whose first index lies in ``[start, stop)`` (C order)."""
    axes = [torch.arange(start, stop, device=device, dtype=torch.float64)]
    axes += [torch.arange(n, device=device, dtype=torch.float64) for n in shape[1:]]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


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
    ref = phi.fields[0]
    unit = source.index_to_unit(index).to(ref.dtype)
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


def _resample_direction(
    phi: Deformation,
    source: PhysicalImage,
    target: PhysicalImage,
    source_geometry: PairGeometry,
    target_geometry: PairGeometry,
    labels: PhysicalImage | None,
) -> _Direction:
    shape = source.spatial_shape
    dims = len(shape)
    device = phi.fields[0].device
    target_image = target.array[None].to(device)
    label_image = labels.array[None].to(device) if labels is not None else None
    displacement = np.empty((int(np.prod(shape)), dims), np.float32)
    warped = np.empty(int(np.prod(shape)), np.float32)
    warped_labels = np.empty(int(np.prod(shape)), np.float32) if labels is not None else None
    per_slab = max(1, int(np.prod(shape[1:])))
    step = max(1, _CHUNK_POINTS // per_slab)
    for start in range(0, shape[0], step):
        stop = min(shape[0], start + step)
        index = _voxel_indices(shape, start, stop, device)
        target_index, mm = physical_transform(phi, source_geometry, target_geometry, source.affine, target.affine, index)
        rows = slice(start * per_slab, stop * per_slab)
        displacement[rows] = mm.numpy()
        warped[rows] = sample_at_voxel_indices(target_image, target_index, "bilinear")[0].cpu().numpy()
        if label_image is not None:
            warped_labels[rows] = sample_at_voxel_indices(label_image, target_index, "nearest")[0].cpu().numpy()
    return _Direction(
        displacement=np.moveaxis(displacement.reshape(*shape, dims), -1, 0),
        warped=warped.reshape(shape),
        warped_labels=warped_labels.reshape(shape) if warped_labels is not None else None,
    )


def _to_network(image: torch.Tensor, geometry: PairGeometry, device: torch.device) -> torch.Tensor:
    """Preprocessed ``(1, *S)`` image -> ``(1, 1, *network shape)`` (linear resize, ``geometry.align_corners``)."""
    x = geometry.to_network_layout(image[None].to(device))
    mode = "trilinear" if x.ndim == 5 else "bilinear"
    return F.interpolate(x, size=tuple(geometry.network_shape), mode=mode, align_corners=geometry.align_corners)


def _check_same_grid(image: PhysicalImage, other: PhysicalImage, what: str) -> None:
    if image.spatial_shape != other.spatial_shape or not np.allclose(image.affine, other.affine, atol=1e-3):
        raise ImageReadError(
            f"{what} {other.path!r} must lie on the grid of {image.path!r} (shape {image.spatial_shape}); "
            f"got shape {other.spatial_shape} and a different affine."
            if image.spatial_shape == other.spatial_shape
            else f"{what} {other.path!r} must lie on the grid of {image.path!r}: expected shape {image.spatial_shape}, "
            f"got {other.spatial_shape}."
        )


def _prepare_output_dir(out: str) -> str:
    """Create ``out`` if needed, check it is writable, and return a private staging folder inside it."""
    try:
        os.makedirs(out, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".monai-gradicon-partial-", dir=out)
    except OSError as error:
        raise OSError(f"output folder {out!r} is not writable ({error.strerror or error}).") from None
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
) -> RegistrationOutputs:
    """Register ``moving`` to ``fixed`` and write the results to ``out``.

    Args:
        moving: moving image file (image A).
        fixed: fixed image file (image B); outputs of the forward direction live on its grid.
        bundle: ``"knee"``, ``"lung"``, a bundle directory, or a :class:`RegistrationModel`.
        out: output folder (created; files are staged and moved in only when all succeeded).
        moving_labels: optional label map on the moving grid, warped with nearest neighbour.
        moving_mask: optional mask on the moving image's grid (used by the lung preprocessing).
        fixed_mask: optional mask on the fixed image's grid (used by the lung preprocessing).
        weights: weights file overriding the bundle's.
        io_steps: instance-optimisation steps (0: none; the reference's default when used is 50).
        io_learning_rate: Adam learning rate of instance optimisation (reference: 2e-5).
        overview: also write ``overview.png``.
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available.
        progress: show a progress bar during instance optimisation.
        seed: seeds the GradICON perturbation of instance optimisation.

    Returns:
        :class:`RegistrationOutputs` (report, written files, network-grid maps).

    Raises:
        ImageReadError: missing/unreadable/NaN/wrong-dimension inputs, or grids that do not match.
        OSError: the output folder cannot be written.
        ValueError: bad options.
    """
    started = time.perf_counter()
    if int(io_steps) != io_steps or io_steps < 0:
        raise ValueError(f"io_steps must be a non-negative integer, got {io_steps!r}.")
    model = bundle if isinstance(bundle, RegistrationModel) else load_registration_model(
        os.fspath(bundle), os.fspath(weights) if weights else None, device
    )
    tensors = list(model.network.parameters()) + list(model.network.buffers())
    run_device = tensors[0].device if tensors else torch.device("cpu")
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
    out = os.fspath(out)
    staging = _prepare_output_dir(out)
    try:
        geometry_A = PairGeometry.for_image(moving_image, model)
        geometry_B = PairGeometry.for_image(fixed_image, model)
        A = _to_network(model.preprocess(moving_image.array, masks[0].array if masks[0] else None), geometry_A, run_device)
        B = _to_network(model.preprocess(fixed_image.array, masks[1].array if masks[1] else None), geometry_B, run_device)
        objective = model.objective().to(run_device)
        generator = torch.Generator().manual_seed(int(seed))
        objective.regularizer.generator = generator
        with torch.no_grad():
            phi_AB = model.deformation(A, B)
            phi_BA = model.deformation(B, A)
        io_report = None
        if io_steps > 0:
            result = instance_optimize(
                model.deformation, model.network, A, B, objective, int(io_steps), io_learning_rate, progress, generator
            )
            phi_AB, phi_BA = result.phi_AB, result.phi_BA
            io_report = {
                "steps": int(io_steps),
                "learning_rate": io_learning_rate,
                "objective_before": result.losses[0],
                "objective_after": result.final_loss,
            }
        network_time = time.perf_counter() - started
        forward = _resample_direction(phi_AB, fixed_image, moving_image, geometry_B, geometry_A, labels)
        inverse = _resample_direction(phi_BA, moving_image, fixed_image, geometry_A, geometry_B, None)
        files = {}

        def stage(key: str) -> str:
            files[key] = os.path.join(out, OUTPUT_FILES[key])
            return os.path.join(staging, OUTPUT_FILES[key])

        save_nifti(forward.warped, fixed_image.affine, stage("warped_moving"))
        write_displacement_nifti(forward.displacement, fixed_image.affine, stage("displacement"))
        write_itk_displacement_transform(forward.displacement, fixed_image.affine, stage("transform"))
        save_nifti(inverse.warped, moving_image.affine, stage("inverse_warped_fixed"))
        write_displacement_nifti(inverse.displacement, moving_image.affine, stage("inverse_displacement"))
        write_itk_displacement_transform(inverse.displacement, moving_image.affine, stage("inverse_transform"))
        if forward.warped_labels is not None:
            save_nifti(np.rint(forward.warped_labels), fixed_image.affine, stage("warped_moving_labels"), dtype=np.int32)
        if overview:
            from .registration_overview import save_overview

            save_overview(fixed_image, forward, stage("overview"))
        with torch.no_grad():
            ddf_AB = phi_AB.ddf(model.spatial_shape)
            ddf_BA = phi_BA.ddf(model.spatial_shape)
            warped_A = warp(A, ddf_AB)
        magnitude = float(np.linalg.norm(forward.displacement, axis=0).max())
        report = {
            "moving": os.path.abspath(os.fspath(moving)),
            "fixed": os.path.abspath(os.fspath(fixed)),
            "moving_labels": os.path.abspath(os.fspath(moving_labels)) if moving_labels else None,
            "bundle": model.name,
            "weights": model.weights,
            "notes": list(model.notes),
            "network_shape": list(model.spatial_shape),
            "resampling": {
                "orientation": model.orientation,
                "reverse_axes": bool(model.reverse_axes) if model.orientation != "RAS" else False,
                "align_corners": bool(model.align_corners),
            },
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
            "runtime_seconds": {"network": network_time, "total": None},
            "files": {k: v for k, v in files.items()} | {"report": os.path.join(out, OUTPUT_FILES["report"])},
            "conventions": {
                "displacement": "u(x) = T(x) - x in mm at each fixed voxel; T maps fixed points to moving points; "
                "NIfTI vectors in RAS (intent DISPVECT, ITK reads them as LPS); transform.h5 in ITK LPS",
                "jacobian": "forward differences of the map on the network grid (voxel units); folds = det < 0",
            },
        }
        report["runtime_seconds"]["total"] = time.perf_counter() - started
        with open(stage("report"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        for key, path in files.items():
            os.replace(os.path.join(staging, os.path.basename(path)), path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return RegistrationOutputs(report=report, files=files, phi_AB=phi_AB, phi_BA=phi_BA)
