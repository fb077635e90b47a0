"""study.stop_when: stop starting trials once the study has converged, and end it FINISHED with the reason.

Two rules, each a stop rule of searchlab.study.loop.run_trials marked `done` (the study is done, not failed):

    stop_when: {patience: 20, min_delta: 0.001}   # the best value has not improved by more than min_delta in the
                                                   # last `patience` finished (complete or pruned) trials
    stop_when: {regret_bound: 0.002, min_trials: 20}   # a Gaussian process fitted to the complete trials bounds how
                                                   # much better than the best this space can do: below 0.002, stop

Both read the study, not the outcomes this process saw: every worker of the study judges the same history, and a
resumed study remembers its trials. The regret bound is Optuna's RegretBoundEvaluator (Makarova et al., "Automatic
termination for hyperparameter optimization", AutoML 2022: the upper bound of the regret with high probability under
the GP model, its UCB over the space minus its best LCB over the top trials). Its `optuna.terminator` module is
deprecated since Optuna 4.9 for removal in 6.0 (pyproject pins <6); the evaluator itself is what we need (its
Terminator wants cross-validation scores for the threshold, which a training does not have, so the threshold is the
user's, in the metric's units). A GP fit costs ~0.6-1 s here (7 s for the first, loading Optuna's GP code), once per
new complete trial after min_trials.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any, ClassVar

import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState

DEFAULT_MIN_TRIALS = 20  # as Optuna's terminator: a GP of fewer trials bounds little


class Patience:
    """The best value has not improved by more than `min_delta` in the last `patience` finished trials (in the order
    they finished; a pruned trial is a trial that did not improve it). Improvements as Keras' EarlyStopping counts
    them: a gain of min_delta or less does not reset the count (nor move the best)."""

    done: ClassVar[bool] = True  # run_trials: the study ends FINISHED, not FAILED

    def __init__(self, study: optuna.Study, patience: int, min_delta: float = 0.0) -> None:
        self.study, self.patience, self.min_delta = study, patience, min_delta

    def __call__(self, outcome: Any) -> None:
        """Nothing to keep: the rule reads the study (every worker's trials)."""

    def reason(self) -> str | None:
        finished = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        finished.sort(key=lambda t: (t.datetime_complete or datetime.datetime.min, t.number))
        maximize = self.study.direction == StudyDirection.MAXIMIZE
        best, since = None, 0
        for trial in finished:
            value = trial.value if trial.state == TrialState.COMPLETE else None
            gain = None if value is None or best is None else (value - best if maximize else best - value)
            if value is not None and (best is None or gain > self.min_delta):
                best, since = value, 0
            else:
                since += 1
        if best is None or since < self.patience:
            return None
        return (f"the best value ({best:.4g}) has not improved by more than {self.min_delta:g} in the last {since} "
                f"finished trials (study.stop_when.patience={self.patience})")


class RegretBound:
    """Optuna's regret bound of the complete trials (see the module's docstring) is below `bound`: the rest of the
    budget is unlikely to find a value better than the best by more than that."""

    done: ClassVar[bool] = True

    def __init__(self, study: optuna.Study, bound: float, min_trials: int = DEFAULT_MIN_TRIALS, seed: int = 0) -> None:
        self.study, self.bound, self.min_trials, self.seed = study, bound, min_trials, seed
        self.regret: float | None = None  # the last bound computed
        self._at = -1  # complete trials when it was computed: a new bound only with a new complete trial

    def __call__(self, outcome: Any) -> None:
        """Nothing to keep: the rule reads the study."""

    def reason(self) -> str | None:
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(complete) < self.min_trials:
            return None
        if len(complete) != self._at:
            self._at, self.regret = len(complete), self._evaluate(complete)
        if self.regret is None or self.regret >= self.bound:
            return None
        return (f"the regret bound of {len(complete)} complete trials is {self.regret:.3g}, below "
                f"study.stop_when.regret_bound={self.bound:g}: more trials are unlikely to beat the best by more")

    def _evaluate(self, complete: list[optuna.trial.FrozenTrial]) -> float | None:
        from optuna.terminator import RegretBoundEvaluator  # its GP code loads torch: only when a study uses it

        evaluator = RegretBoundEvaluator(min_n_trials=self.min_trials, seed=self.seed)
        try:
            return float(evaluator.evaluate(complete, self.study.direction))
        except ValueError:  # no key every complete trial drew (a space of conditional keys only): no bound
            return None


def stop_rules(study: optuna.Study, stop_when: Mapping[str, Any] | None, seed: int = 0) -> list[Any]:
    """The rules study.stop_when asks for (its keys are checked by searchlab.config.compose.validate_study); none for
    null."""
    if not stop_when:
        return []
    rules: list[Any] = []
    if "patience" in stop_when:
        rules.append(Patience(study, int(stop_when["patience"]), float(stop_when.get("min_delta", 0.0))))
    if "regret_bound" in stop_when:
        rules.append(RegretBound(study, float(stop_when["regret_bound"]),
                                 int(stop_when.get("min_trials", DEFAULT_MIN_TRIALS)), seed))
    return rules
