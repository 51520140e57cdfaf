"""The native CPU kernels (``trilinear.cpp``, ``upsample.cpp``, bound in ``native.cpp``): compiled on first use.

* :func:`trilinear` (with its autograd function): PyTorch's CPU ``grid_sampler_3d`` and its backward are
  scalar loops split by batch element only, and the interpolations of the composition (paper Eq. 6) and
  of the GradICON term (Eq. 2) are half the time of a training iteration on a CPU. ``trilinear.cpp`` does
  the one case those need, linear interpolation with border padding at points in [0, 1] coordinates, on
  every thread: values equal to ``grid_sample``'s (the same weights, in the same order, of the same voxel
  coordinates), gradients to float rounding.
* :func:`upsample_add_concat` (inference only, no gradient): the join of a U-Net decoder level,
  ``cat([base + upsample2(coarse), skip])``, in one pass over the output instead of three.

The C++ files are built as one extension by ``torch.utils.cpp_extension.load`` (a C++ compiler and ninja)
the first time a process needs it, about 45 s, and cached in ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``) for later processes. Where it cannot be built, or with
``MONAI_GRADICON_NATIVE=0``, their callers use PyTorch's own operations instead (one warning names why);
the results agree to float rounding either way.
"""

from __future__ import annotations

import logging
import os
import threading

import torch
from torch.autograd.function import once_differentiable

__all__ = ["native_available", "trilinear", "upsample_add_concat"]

_SOURCES = [os.path.join(os.path.dirname(os.path.abspath(__file__)), name) for name in ("native.cpp", "trilinear.cpp", "upsample.cpp")]
_lock = threading.Lock()
_module = None
_failure: str | None = None


def _load():
    """The compiled extension, or ``None`` (the reason kept in ``_failure`` and logged once)."""
    global _module, _failure
    with _lock:
        if _module is None and _failure is None:
            try:
                from torch.utils.cpp_extension import load

                _module = load(
                    name="monai_gradicon_native",
                    sources=_SOURCES,
                    extra_cflags=["-O3", "-fopenmp"],
                    extra_ldflags=["-fopenmp"],
                    verbose=False,
                )
            except Exception as error:  # no compiler, no ninja, a read-only cache: fall back to grid_sample
                _failure = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
                logging.getLogger(__name__).warning(
                    "monai_gradicon: the native CPU kernels could not be built (%s); using PyTorch's grid_sample "
                    "and interpolate instead, slower on CPU, same results to float rounding.",
                    _failure,
                )
        return _module


def native_available() -> bool:
    """Whether the native kernels run here and now (building them on the first call).

    ``False`` with ``MONAI_GRADICON_NATIVE=0``, when the extension cannot be built, and while a trace,
    TorchScript or ``torch.compile`` records the computation (they record PyTorch's own operators, which
    they know, instead of a kernel they cannot see into).

    Returns:
        ``True`` if the compiled kernels are loaded and the caller runs eagerly.
    """
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False
    if os.environ.get("MONAI_GRADICON_NATIVE", "1") == "0":
        return False
    return _load() is not None


class _Trilinear(torch.autograd.Function):
    """Autograd of the native kernel: gradients with respect to the field and the points."""

    @staticmethod
    def forward(ctx, field: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(field, coords)
        return _module.trilinear_forward(field, coords)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        field, coords = ctx.saved_tensors
        need_field, need_coords = ctx.needs_input_grad
        grad_field, grad_coords = _module.trilinear_backward(grad_out, field, coords, need_field, need_coords)
        return (grad_field if need_field else None), (grad_coords if need_coords else None)


def trilinear(field: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of a 3D ``field`` at ``coords`` in [0, 1] coordinates, border padding (CPU).

    The native counterpart of ``sample(field, coords)`` for this case (which ``sample`` calls by itself);
    the kernel is built on the first call.

    Args:
        field: ``(B, C, N0, N1, N2)`` float32 or float64 on CPU, any strides.
        coords: ``(B', 3, *S')`` in [0, 1] coordinates, channel ``k`` along spatial axis ``k``, same dtype;
            ``B`` and ``B'`` equal or one of them 1.

    Returns:
        ``(max(B, B'), C, *S')``, contiguous.

    Raises:
        RuntimeError: the kernel could not be built here (the reason is in the message).
    """
    if _load() is None:
        raise RuntimeError(f"the native trilinear kernel could not be built here ({_failure}); use maps.sample.")
    return _Trilinear.apply(field, coords.contiguous())


def upsample_add_concat(base: torch.Tensor, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``cat([base + upsample2(coarse), skip], 1)`` over the grid of ``skip``, one pass (3D, CPU, no gradient).

    ``upsample2`` is ``F.interpolate(coarse, scale_factor=2, mode="trilinear", align_corners=False)``
    (the same indices and weights; the eight products are added in corner order), and ``base`` and the
    upsampled field are cropped to the spatial size of ``skip`` (their first voxels). The decoder join of
    :class:`~monai_gradicon.networks.GradICONUNet` in inference.

    Args:
        base: ``(B, C, *S)``, float32 or float64, channels-last 3D.
        coarse: ``(B, C, *S_c)``, same dtype and layout, ``2·S_c >= S_skip``.
        skip: ``(B, C_s, *S_skip)``, same dtype and layout, ``S_skip <= S``.

    Returns:
        ``(B, C + C_s, *S_skip)`` in the channels-last 3D layout.

    Raises:
        RuntimeError: the kernel could not be built here, a tensor records gradients (there is no
            backward), or the tensors break the contract above (the message says which).
    """
    if _load() is None:
        raise RuntimeError(f"the native kernels could not be built here ({_failure}).")
    if torch.is_grad_enabled() and (base.requires_grad or coarse.requires_grad or skip.requires_grad):
        raise RuntimeError("upsample_add_concat has no backward: call it under torch.no_grad() or on tensors without gradients.")
    return _module.upsample_add_concat(base, coarse, skip)
