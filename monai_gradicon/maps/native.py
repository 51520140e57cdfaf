"""The native CPU trilinear interpolation (``trilinear.cpp``): compiled on first use, with its autograd function.

PyTorch's CPU ``grid_sampler_3d`` and its backward are scalar loops split by batch element only, and the
interpolations of the composition (paper Eq. 6) and of the GradICON term (Eq. 2) are half the time of a
training iteration on a CPU. ``trilinear.cpp`` does the one case those need, linear interpolation with
border padding at points in [0, 1] coordinates, on every thread: values equal to ``grid_sample``'s (the
same weights, in the same order, of the same voxel coordinates), gradients to float rounding.

The C++ file is built by ``torch.utils.cpp_extension.load`` (a C++ compiler and ninja) the first time a
process needs it, about 40 s, and cached in ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``) for later processes. Where it cannot be built, or with
``MONAI_GRADICON_NATIVE=0``, :func:`~monai_gradicon.maps.grid.sample` uses ``grid_sample`` instead (one
warning names why); the results agree to float rounding either way.
"""

from __future__ import annotations

import logging
import os
import threading

import torch
from torch.autograd.function import once_differentiable

__all__ = ["native_trilinear_available", "trilinear"]

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trilinear.cpp")
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
                    name="monai_gradicon_trilinear",
                    sources=[_SOURCE],
                    extra_cflags=["-O3", "-fopenmp"],
                    extra_ldflags=["-fopenmp"],
                    verbose=False,
                )
            except Exception as error:  # no compiler, no ninja, a read-only cache: fall back to grid_sample
                _failure = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
                logging.getLogger(__name__).warning(
                    "monai_gradicon: the native trilinear interpolation could not be built (%s); using "
                    "torch.nn.functional.grid_sample, slower on CPU, same results to float rounding.",
                    _failure,
                )
        return _module


def native_trilinear_available() -> bool:
    """Whether :func:`trilinear` runs the native kernel in this process (building it on the first call).

    ``False`` with ``MONAI_GRADICON_NATIVE=0`` or when the extension cannot be built.

    Returns:
        ``True`` if the compiled kernel is loaded.
    """
    if os.environ.get("MONAI_GRADICON_NATIVE", "1") == "0":
        return False
    return _load() is not None


class _Trilinear(torch.autograd.Function):
    """Autograd of the native kernel: gradients with respect to the field and the points."""

    @staticmethod
    def forward(ctx, field: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(field, coords)
        return _module.forward(field, coords)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        field, coords = ctx.saved_tensors
        need_field, need_coords = ctx.needs_input_grad
        grad_field, grad_coords = _module.backward(grad_out, field, coords, need_field, need_coords)
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
