"""GradICON losses: inverse consistency regularisers, similarities, the symmetric objective."""

from .adaptive_ncc import SelfAdaptiveNCCLoss
from .inverse_consistency import GradICONLoss, ICONLoss
from .lncc import LNCCLoss
from .mind import MINDSSCLoss
from .ncc import NCCLoss
from .objective import GradICONObjective, ObjectiveTerms

__all__ = [
    "GradICONLoss",
    "ICONLoss",
    "NCCLoss",
    "LNCCLoss",
    "MINDSSCLoss",
    "SelfAdaptiveNCCLoss",
    "GradICONObjective",
    "ObjectiveTerms",
]
