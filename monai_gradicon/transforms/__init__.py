"""MONAI dictionary transforms for registration pairs: datalists, intensity, the network grid, pictures."""

from .datalist import PAIR_KEYS, load_pair_datalist
from .intensity import ApplyMaskd, ScaleByMaximumd, UnitWindowd, order_statistic
from .network_grid import AXIS_ORDERS, PairGeometry, ToNetworkGridd, axis_codes
from .pairs import CheckPaird, NamePaird, WarpWithDDFd
from .pictures import SaveOverviewPNGd

__all__ = [
    "PAIR_KEYS",
    "load_pair_datalist",
    "ApplyMaskd",
    "ScaleByMaximumd",
    "UnitWindowd",
    "order_statistic",
    "AXIS_ORDERS",
    "PairGeometry",
    "ToNetworkGridd",
    "axis_codes",
    "CheckPaird",
    "WarpWithDDFd",
    "NamePaird",
    "SaveOverviewPNGd",
]
