"""The study: a search's Optuna study, its trials and the processes that run them.

session  Session: tracker, storage, lock, parent run, dead workers, budget, the loop or a worker pool (one per run)
trial    THE trial lifecycle (run_next) and TrialWork, the part that differs: search_work.SearchWork (sample,
         compose, fit), pack_trials.PackWork (K trials at once), ablate.AblationWork, the Hydra sweeper's work
loop     sampler, pruner, open_study; run_trials and its stop rules; the best trial
budget   study.n_trials over every worker;   storage  Optuna storages, load_study;   faults  heartbeat, lost trials;
workers  worker processes and dead-worker recovery
"""

from searchlab.study.budget import Budget, budget_used
from searchlab.study.loop import (
    Best,
    StudyStopped,
    best_trial,
    check_sampler,
    make_pruner,
    make_sampler,
    open_study,
    run_trials,
    state_counts,
)
from searchlab.study.session import Session, SessionSettings, worker_slots
from searchlab.study.storage import load_study, open_storage, serve_storage_proxy
from searchlab.study.trial import Attempt, NotRun, TrialOutcome, TrialRun, TrialWork, Verdict, run_next, run_trial
from searchlab.study.workers import WORKER_INDEX_ENV, cli_command

__all__ = ["WORKER_INDEX_ENV", "Attempt", "Best", "Budget", "NotRun", "Session", "SessionSettings", "StudyStopped",
           "TrialOutcome", "TrialRun", "TrialWork", "Verdict", "best_trial", "budget_used", "check_sampler",
           "cli_command", "load_study", "make_pruner", "make_sampler", "open_storage", "open_study", "run_next",
           "run_trial", "run_trials", "serve_storage_proxy", "state_counts", "worker_slots"]
