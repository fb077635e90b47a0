"""The names of the user attrs searchlab keeps on Optuna trials and studies: one place, so every room (the trial,
the budget, fault recovery, the report, ablation) reads and writes the same keys."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optuna.trial import BaseTrial

# On a trial
MLFLOW_RUN_ID = "mlflow_run_id"  # the trial's MLflow child run
OVERRIDES = "overrides"  # the training overrides that re-run the trial alone (`searchlab train ...`)
REASON = "reason"  # why a trial was pruned, stopped or failed, in words
CONSTRAINED = "constrained"  # keys a space constraint set instead of drawing them
WORKER_PID, WORKER_HOST = "worker.pid", "worker.host"  # the process running it: a dead worker's trial is found
SURPLUS = "surplus"  # given back unrun: other workers had taken the budget (storages without a lock)
RETRY_OF = "retry_of"  # the trial this one retries (a dead worker's, an interrupted one) with the same params
CHECKPOINT_OF = "checkpoint_of"  # the trial number naming the checkpoint folder of this trial and of its retries
RESUMED_FROM_EPOCH = "resumed_from_epoch"  # this attempt started from its checkpoint of that epoch
EPOCHS_TRAINED = "epochs_trained"  # epochs this attempt trained (after the one it resumed from)
PRUNED_BY_CALLBACK = "searchlab.pruned"  # the Hydra sweeper's job was stopped by the pruner: why, in words
EPOCHS_REPORTED = "searchlab.epochs"  # epochs searchlab.hydra.TrialCallback saw in the sweeper's job
WARM_START_OF = "warm_start_of"  # enqueued by study.warm_start: the earlier study and trial it repeats (name#number)
# Of one attempt at a trial, not of its configuration: a retried trial starts without them.
ATTEMPT_ATTRS = (WORKER_PID, WORKER_HOST, MLFLOW_RUN_ID, REASON, RESUMED_FROM_EPOCH, EPOCHS_TRAINED)

# On a study
MLFLOW_PARENT_RUN_ID = "mlflow_parent_run_id"  # the study's MLflow parent run
METRIC = "metric"  # study.metric the study optimizes (a resumed study must keep it)
STOPPED = "stopped"  # why study.stop_when stopped the study's last run before its budget (None: it did not)
APP_COMMAND = "app_command"  # a Hydra sweeper's study: the command (the app, its fixed overrides) re-running a trial
APP_VALUE = "app_value"  # a Hydra sweeper's study: the name of what the app returns (its optimized_metric)


def checkpoint_of(trial: BaseTrial) -> int:
    """The trial number naming the checkpoint folder of `trial`: its first attempt's, shared by all its retries."""
    return trial.user_attrs.get(CHECKPOINT_OF, trial.number)


def retry_attrs(trial: BaseTrial) -> dict[str, Any]:
    """The user attrs a re-queued retry of `trial` starts with: the trial it retries and the checkpoint it resumes."""
    return {RETRY_OF: trial.number, CHECKPOINT_OF: checkpoint_of(trial)}

# MLflow tags of the runs searchlab writes (searchlab.tracking writes every one of them)
ROLE_TAG = "searchlab.role"  # what a run is: one of the roles below
ROLE_STUDY, ROLE_TRIAL, ROLE_TRAIN = "study", "trial", "train"  # a study's parent run, a trial's, `searchlab train`'s
ROLE_ABLATION, ROLE_ABLATION_RUN = "ablation", "ablation-run"  # an ablation's run, and one training of it
STUDY_NAME_TAG = "optuna.study_name"
TRIAL_NUMBER_TAG, TRIAL_STATE_TAG, TRIAL_REASON_TAG = "optuna.trial.number", "optuna.trial.state", "optuna.trial.reason"
STOPPED_TAG = "searchlab.stopped"  # on a study's parent run: why study.stop_when ended it before its budget
ENGINE_TAG = "searchlab.engine"  # what trained a trial: "lightning", or "packed" (the packing engine, alone or packed)
COMMAND_TAG = "searchlab.command"  # the shell command that trains the run's configuration alone
OUTPUT_DIR_TAG = "searchlab.output_dir"  # a Hydra sweeper's trial: its job's output folder (the job's own logs)
RESUMED_FROM_TAG, CONTINUES_TAG = "searchlab.resumed_from_epoch", "searchlab.continues_run"  # a resumed trial
ABLATION_STUDY_TAG = "searchlab.ablation_study"  # on an ablation's run: its Optuna study
VARIANT_TAG, FAMILY_TAG, SEED_TAG = "searchlab.variant", "searchlab.family", "searchlab.seed"  # an ablation training
