"""The application layer: registering files with a bundle's model (CLI, pair lists, instance optimisation, Deploy).

Built on the library floors (``maps``, ``losses``, ``networks``, ``transforms``, ``metrics``, ``io``),
none of which imports from here.
"""

from .errors import USER_ERRORS, InputError, MissingWeightsError
from .model import BUNDLE_ALIASES, RegistrationModel, bundle_directory, convert_reference_weights, load_registration_model
from .register import OUTPUT_FILES, PreparedPair, RegistrationOutputs, physical_transform, prepare_pair, register, write_registration
from .pairs import FailedPairsError, register_pairs
from .evaluate import evaluate_pairs, evaluate_registration
from .transform_files import jacobian_map, warp_image

__all__ = [
    "USER_ERRORS",
    "InputError",
    "MissingWeightsError",
    "BUNDLE_ALIASES",
    "RegistrationModel",
    "bundle_directory",
    "convert_reference_weights",
    "load_registration_model",
    "OUTPUT_FILES",
    "RegistrationOutputs",
    "physical_transform",
    "register",
    "prepare_pair",
    "write_registration",
    "PreparedPair",
    "register_pairs",
    "FailedPairsError",
    "evaluate_pairs",
    "evaluate_registration",
    "warp_image",
    "jacobian_map",
]
