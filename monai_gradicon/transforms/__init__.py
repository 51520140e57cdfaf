"""MONAI dictionary transforms for registration pairs and datalist loading."""

from .datalist import load_pair_datalist
from .landmarks import LandmarksToGridd, read_landmarks
from .pairs import CheckPaird, NamePaird, WarpWithDDFd
from .pictures import SaveOverviewPNGd

__all__ = ["load_pair_datalist", "LandmarksToGridd", "read_landmarks", "CheckPaird", "WarpWithDDFd", "NamePaird", "SaveOverviewPNGd"]
