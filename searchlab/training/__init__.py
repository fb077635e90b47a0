"""Training: one configuration fitted from its `_target_`s by Lightning, on one device or over DDP ranks, with its
checkpoints and the checks of its data. Knows nothing of the study, Optuna or MLflow."""

from searchlab.training.checkpoints import CheckpointPlan
from searchlab.training.fitting import check_targets, fit, preflight
from searchlab.training.lightning import TrainResult, Weights, check_devices, resolve_device

__all__ = ["CheckpointPlan", "TrainResult", "Weights", "check_devices", "check_targets", "fit", "preflight",
           "resolve_device"]
