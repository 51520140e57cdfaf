"""GradICON registration networks: the U-Net, the steps of Eq. 6, builders, reference-weight import."""

from .multistep import MultiStepRegistrationNet, four_step_network, multistep_network
from .reference_weights import convert_reference_state_dict, load_reference_weights
from .steps import CompositionStep, DisplacementStep, DownsampleStep
from .unet import GradICONUNet

__all__ = [
    "GradICONUNet",
    "DisplacementStep",
    "DownsampleStep",
    "CompositionStep",
    "MultiStepRegistrationNet",
    "multistep_network",
    "four_step_network",
    "load_reference_weights",
    "convert_reference_state_dict",
]
