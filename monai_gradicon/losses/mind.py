"""MIND-SSC: the self-similarity context descriptor of Heinrich et al. and the distance between two images' descriptors.

Heinrich, Jenkinson, Papież, Brady, Schnabel, "Towards Realtime Multimodal Fusion for Image-Guided
Interventions Using Self-similarities", MICCAI 2013 (MIND-SSC; MIND: Heinrich et al., Medical Image
Analysis 16(7), 2012). For every voxel ``x`` and each of the 12 pairs ``(a, b)`` of six-neighbourhood
offsets at squared distance 2 (the edges of the neighbourhood's octahedron), scaled by a dilation ``d``:

``D_ab(x) = box_r * (I(· + d·a) − I(· + d·b))²`` (a cube of side ``2r + 1``, replicate padding),

``MIND_ab(x) = exp(−(D_ab(x) − min_c D_c(x)) / V(x))``, ``V(x) = mean_c (D_c(x) − min_c D_c(x))``,

``V`` clamped to ``[10⁻³ m, 10³ m]``, ``m`` the mean of ``V`` over the image (a constant: no gradient
through the bounds). The similarity loss is the mean of ``(MIND(I) − MIND(J))²`` over the 12 channels
and the voxels (or the voxels inside the target's mask). Modality independent: uniGradICON offers it
for instance optimisation on multimodal pairs (``--io_sim mind``, radius 2, dilation 2), as the
reference ``icon_registration.losses.MINDSSC``. 3D only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from .masking import masked_mean
from .ncc import check_similarity_inputs, reduce_batch

__all__ = ["MINDSSCLoss", "mind_ssc"]

# the 12 offset pairs, in the channel order of Heinrich's reference C++ implementation
_SSC_PAIRS = (
    ((1, 0, 0), (0, -1, 0)), ((0, 1, 0), (-1, 0, 0)), ((0, -1, 0), (-1, 0, 0)), ((0, 1, 0), (1, 0, 0)),
    ((0, -1, 0), (0, 0, -1)), ((0, 1, 0), (0, 0, 1)), ((0, 0, -1), (-1, 0, 0)), ((1, 0, 0), (0, 0, 1)),
    ((0, 1, 0), (0, 0, -1)), ((0, 0, 1), (0, -1, 0)), ((1, 0, 0), (0, 0, -1)), ((0, 0, 1), (-1, 0, 0)),
)


def _shifted(padded: torch.Tensor, offset: tuple[int, int, int], dilation: int, shape: tuple[int, ...]) -> torch.Tensor:
    """``I(x + dilation·offset)`` on the grid of ``shape``, from ``I`` replicate-padded by ``dilation``."""
    index = tuple(slice(dilation * (1 + o), dilation * (1 + o) + n) for o, n in zip(offset, shape))
    return padded[(Ellipsis, *index)]


def mind_ssc(image: torch.Tensor, radius: int = 2, dilation: int = 2) -> torch.Tensor:
    """The MIND-SSC descriptor (Heinrich et al., MICCAI 2013, Sec. 2) of each voxel of a 3D image.

    The features compared by :class:`MINDSSCLoss`, an ``L_sim`` for the objective of paper Sec. 5.1.

    Args:
        image: ``(B, 1, H, W, D)``.
        radius: half side of the box over which the patch distances are averaged (``2r + 1`` voxels).
        dilation: spacing of the six-neighbourhood, in voxels.

    Returns:
        ``(B, 12, H, W, D)`` descriptor in (0, 1], channels in the reference C++ order.

    Raises:
        ValueError: not a single-channel 3D batch.
    """
    if image.ndim != 5 or image.shape[1] != 1:
        raise ValueError(f"MIND-SSC needs a single-channel 3D image (B, 1, H, W, D), got shape {tuple(image.shape)}.")
    shape = tuple(image.shape[2:])
    padded = F.pad(image, (dilation,) * 6, mode="replicate")
    differences = torch.cat(
        [(_shifted(padded, a, dilation, shape) - _shifted(padded, b, dilation, shape)) ** 2 for a, b in _SSC_PAIRS], dim=1
    )
    distance = F.avg_pool3d(F.pad(differences, (radius,) * 6, mode="replicate"), 2 * radius + 1, stride=1)
    distance = distance - distance.min(dim=1, keepdim=True).values
    variance = distance.mean(dim=1, keepdim=True)
    level = variance.detach().flatten(1).mean(1).reshape(-1, 1, 1, 1, 1)
    variance = torch.clamp(variance, min=level * 1e-3, max=level * 1e3)
    return torch.exp(-distance / variance)


class MINDSSCLoss(_Loss):
    """Mean squared difference of the MIND-SSC descriptors of two 3D images (Heinrich et al., MICCAI 2013).

    ``L = mean_{c, x} (MIND_c(pred)(x) − MIND_c(target)(x))²`` (:func:`mind_ssc`), a modality-independent
    ``L_sim`` for the objective of paper Sec. 5.1 (uniGradICON's ``--io_sim mind``: radius 2, dilation 2).
    One difference from the reference ``icon_registration.losses.MINDSSC``: the variance bounds are
    computed per sample (the reference pools them over the batch), so a sample's loss does not depend
    on the other samples of its batch; for a batch of one they are the same.

    Args:
        spatial_dims: must be 3 (the descriptor is defined on the 3D six-neighbourhood).
        radius: patch radius ``r`` (box of ``2r + 1`` voxels).
        dilation: neighbourhood dilation ``d`` in voxels.
        reduction: ``"mean"`` | ``"sum"`` over the batch, or ``"none"`` for ``(B,)``.

    Raises:
        ValueError: ``spatial_dims`` other than 3, or a non-positive radius/dilation.
    """

    def __init__(
        self, spatial_dims: int = 3, radius: int = 2, dilation: int = 2, reduction: LossReduction | str = LossReduction.MEAN
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if spatial_dims != 3:
            raise ValueError(f"MIND-SSC is defined for 3D images only (spatial_dims=3), got spatial_dims={spatial_dims!r}.")
        for name, value in (("radius", radius), ("dilation", dilation)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        self.spatial_dims = 3
        self.radius = int(radius)
        self.dilation = int(dilation)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            pred: warped moving image ``(B, 1, H, W, D)``.
            target: fixed image, same shape.
            mask: optional mask of ``target`` ``(B, 1, H, W, D)``: the mean is taken over its nonzero voxels.

        Returns:
            the mean squared descriptor difference per sample, reduced over the batch as ``reduction`` says.
        """
        check_similarity_inputs(pred, target, self.spatial_dims)
        difference = mind_ssc(pred, self.radius, self.dilation) - mind_ssc(target, self.radius, self.dilation)
        return reduce_batch(masked_mean(difference**2, mask), self.reduction)
