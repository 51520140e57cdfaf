"""monai-gradicon: GradICON deep image registration (Tian, Greer et al., CVPR 2023) as MONAI components."""

__version__ = "0.1.0"
