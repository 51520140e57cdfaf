"""Engines: wiring networks and losses for two-direction (GradICON) training."""

from .any_network import PairNetwork, inverse_consistency_error

__all__ = ["PairNetwork", "inverse_consistency_error"]

# Bundle training pieces (two-direction SupervisedTrainer, handlers, metrics, resume).
from .checkpoints import latest_checkpoint
from .handlers import EpochSummaryHandler, GradICONTermsHandler, RegistrationImageHandler, training_log_values
from .registration_metrics import FoldPercentageMetric
from .two_direction import BidirectionalRegistration, GradICONTrainingLoss, PairToDDF, split_pair

__all__ += [
    "latest_checkpoint",
    "EpochSummaryHandler",
    "GradICONTermsHandler",
    "RegistrationImageHandler",
    "training_log_values",
    "FoldPercentageMetric",
    "BidirectionalRegistration",
    "GradICONTrainingLoss",
    "PairToDDF",
    "split_pair",
]
