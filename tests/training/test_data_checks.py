"""Data a training cannot use is refused before any store is written (one line naming the file or `data._target_`,
the array and where), what trains fine is not, and a study whose first trials all diverge at epoch 1 stops.

The refusals run the real CLI in-process with the stores in tmp_path (test_bad_input's helpers); the passes and the
stop run real tiny searches.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_nothing_written, assert_rejected, load_study, runs_of, valid_arrays, write_npz, xy
from omegaconf import OmegaConf

from searchlab.config import ConfigError
from searchlab.data import Splits, as_splits, digits, synthetic
from searchlab.training.data_checks import DivergedAtStart, check_splits, diverged_rule

# cli: the CLI in-process with the stores in tmp_path; isolated: cwd in tmp_path, default conf/, Hydra cleared.
pytestmark = pytest.mark.usefixtures("isolated")

NAN_X = xy()[0].copy()
NAN_X[5, 3] = np.nan


def _with(array: np.ndarray, index: tuple[int, ...], value: float) -> np.ndarray:
    out = array.astype(np.float64 if abs(value) > 1e38 else array.dtype)
    out[index] = value
    return out


def _float_targets(n: int = 20) -> np.ndarray:
    return np.random.default_rng(1).normal(size=n).astype(np.float32)


# (npz arrays, extra overrides, what the line must say)
NPZ_CASES = {
    "nan-in-x_train": (valid_arrays(x_train=NAN_X), [], ["x_train has 1 NaN (row 5, column 3)", "clean or impute"]),
    "nan-kept-in-place-by-standardize": (valid_arrays(x_train=NAN_X), ["data.standardize=true"],
                                         ["x_train has 1 NaN (row 5, column 3)"]),
    "nan-in-x_test": (valid_arrays(x_test=NAN_X, y_test=xy()[1]), [], ["x_test has 1 NaN (row 5, column 3)"]),
    "two-nans-and-an-inf": (valid_arrays(x_val=_with(_with(NAN_X, (7, 0), np.inf), (9, 1), np.nan)), [],
                            ["x_val has 2 NaN and 1 ±inf (first at row 5, column 3)"]),
    "beyond-float32-reads-as-inf": (valid_arrays(x_train=_with(xy()[0], (2, 1), 1e39)), [],
                                    ["x_train has 1 ±inf (row 2, column 1)", "beyond float32"]),
    "square-overflows-float32": (valid_arrays(x_train=_with(xy()[0], (4, 2), -1e30)), [],
                                 ["x_train has 1 value beyond", "row 4, column 2", "data.standardize=true"]),
    "inf-in-regression-target": (valid_arrays(y_train=_float_targets(), y_val=_with(_float_targets(), (3,), -np.inf)),
                                 ["module=regressor", "study.metric=val_loss"], ["y_val has 1 ±inf (row 3)"]),
    "val-class-never-in-train": (valid_arrays(y_val=xy()[1] + 1), [],
                                 ["y_val has class 2 (10 rows, first at row 1)", "y_train never holds"]),
    "test-classes-never-in-train": (valid_arrays(x_test=xy()[0], y_test=xy()[1] + 5), [],
                                    ["y_test has classes 5 and 6"]),
    "negative-val-labels": (valid_arrays(y_val=xy()[1] - 1), [],
                            ["y_val holds negative class indices", "first at row 0"]),
    "labels-stored-as-floats": (valid_arrays(y_train=xy()[1].astype(np.float64), y_val=xy()[1].astype(np.float64)), [],
                                ["y_train holds class labels stored as floats", "astype('int64')"]),
    "labels-as-a-column": (valid_arrays(y_train=xy()[1][:, None], y_val=xy()[1][:, None]), [],
                           ["y_train has shape (20, 1)", "y.ravel()"]),
    "integer-train-float-val-targets": (valid_arrays(y_val=_float_targets()),
                                        ["module=regressor", "study.metric=val_loss"],
                                        ["y_val holds floats but y_train integers"]),
    "one-class": (valid_arrays(y_train=np.zeros(20, dtype=np.int64)), [], ["y_train holds only class 0"]),
    "constant-x": (valid_arrays(x_train=np.ones((20, 4), dtype=np.float32)), [],
                   ["x_train is the same in every one of its 20 rows"]),
    "constant-regression-target": (valid_arrays(y_train=np.full(20, 2.5, dtype=np.float32), y_val=_float_targets()),
                                   ["module=regressor", "study.metric=val_loss"], ["y_train is 2.5 in every one"]),
    "auroc-with-a-class-absent-from-val": (valid_arrays(y_train=np.arange(20) % 3, y_val=np.arange(20) % 2),
                                           ["study.metric=val_auroc"], ["y_val lacks class 2 of 0..2", "val_auroc"]),
}


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_npz_a_training_cannot_use_is_refused_with_one_line(cli, tmp_path, case):
    arrays, overrides, says = NPZ_CASES[case]
    path = write_npz(tmp_path / f"{case}.npz", **arrays)
    line = assert_rejected(cli("data=npz", f"data.path={path}", *overrides), f"data.path={path}", *says)
    assert "Traceback" not in line
    assert_nothing_written(tmp_path)


def test_train_refuses_the_same_data(cli, tmp_path):
    path = write_npz(tmp_path / "nan.npz", **valid_arrays(x_train=NAN_X))
    assert_rejected(cli("data=npz", f"data.path={path}", command="train"), f"data.path={path}", "x_train has 1 NaN")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("arrays, overrides", [
    pytest.param(valid_arrays(y_train=xy()[1] + 1, y_val=xy()[1] + 1), [], id="labels-with-a-gap-1..2"),
    pytest.param(valid_arrays(y_train=xy()[1] * 3 - 7, y_val=xy()[1] * 5),
                 ["module=regressor", "study.metric=val_loss"],
                 id="negative-integer-regression-targets"),
    pytest.param(valid_arrays(x_train=np.c_[xy()[0][:, :3], np.ones(20)]), [], id="one-constant-feature"),
    pytest.param(valid_arrays(x_train=_with(xy()[0], (0, 0), 1e15)), [], id="large-but-finite-squares"),
])
def test_npz_that_trains_is_not_refused(cli, tmp_path, arrays, overrides):
    path = write_npz(tmp_path / "fine.npz", **arrays)
    code, out, err = cli("data=npz", f"data.path={path}", *overrides, command="train")
    assert code == 0, err
    assert '"epochs": 1' in out, out


def test_builtin_generators_pass_every_check():
    for splits in (digits(), synthetic(), synthetic(classes=10, size=500, seed=3)):
        check_splits(splits, "data._target_=builtin", "classification", ["val_acc", "val_auroc"])
        check_splits(splits, "data._target_=builtin", "regression")


def test_half_precision_pixels_and_integer_inputs_pass():
    """Raw pixels in float16 (255 squared overflows float16, not the float32 a loss is computed in) and integer
    inputs (token ids for a user's embedding) are not refused."""
    x, y = xy()
    pixels = torch.full((20, 4), 255.0, dtype=torch.float16)
    pixels[::2] = 3.0
    check_splits(Splits(pixels, torch.as_tensor(y), pixels, torch.as_tensor(y)), "data._target_=mine", "classification")
    tokens = torch.arange(80).view(20, 4)
    check_splits(Splits(tokens, torch.as_tensor(y), tokens, torch.as_tensor(y)), "data._target_=mine", "")


def test_splits_of_non_tensors_empty_splits_and_shapes_are_refused():
    x, y = xy()
    good = as_splits(x, y, x, y)
    cases = [
        (Splits(x, good.y_train, good.x_val, good.y_val), "x_train is a numpy.ndarray, not a torch.Tensor"),
        (Splits(good.x_train, good.y_train, good.x_val[:0], good.y_val[:0]), "x_val and y_val are empty"),
        (Splits(good.x_train[:, 0], good.y_train, good.x_val[:, 0], good.y_val), "x_train has shape (20,)"),
        (Splits(good.x_train, good.y_train, good.x_val[:, :3], good.y_val), "x_val samples have shape (3,)"),
        (Splits(good.x_train, good.y_train[:5], good.x_val, good.y_val), "x_train has 20 rows but y_train has 5"),
        (Splits(good.x_train, good.y_train, good.x_val, good.y_val, good.x_val, None), "only one of x_test, y_test"),
        (Splits(good.x_train.to(torch.complex64), good.y_train, good.x_val, good.y_val), "complex"),
    ]
    for splits, says in cases:
        with pytest.raises(ConfigError, match="^data._target_=mine: ") as err:
            check_splits(splits, "data._target_=mine", "classification")
        assert says in str(err.value) and "\n" not in str(err.value)
    check_splits(as_splits(x, y, x, y), "data._target_=mine", "classification")


# --- a project of the user's: a data function and DataModules ---------------------------------------------------

MYDATA = '''
import numpy as np
import torch
import pytorch_lightning as pl
from torch.utils.data import DataLoader, TensorDataset

from searchlab.data import as_splits


def arrays(n=64, bad_row=None, bad_value=float("nan"), labels_shift=0):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + labels_shift
    if bad_row is not None:
        x[bad_row, 1] = bad_value
    return x, y


def nan_splits():
    x, y = arrays(bad_row=3)
    return as_splits(x, y, *arrays())


class Data(pl.LightningDataModule):
    """Unshuffled batches of 16: a bad row at 3 is in the first batch, at 40 only in a later one."""

    num_classes = 2
    input_shape = (4,)

    def __init__(self, batch_size=16, bad_row=None, labels_shift=0):
        super().__init__()
        self.batch_size, self.bad_row, self.labels_shift = batch_size, bad_row, labels_shift

    def setup(self, stage=None):
        self.train = TensorDataset(*map(torch.as_tensor, arrays(bad_row=self.bad_row, labels_shift=self.labels_shift)))
        self.val = TensorDataset(*map(torch.as_tensor, arrays()))

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=64)
'''


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """mydata.py and conf/data/{fn,dm}.yaml in tmp_path (the working directory), importable from there."""
    (tmp_path / "mydata.py").write_text(textwrap.dedent(MYDATA))
    conf = tmp_path / "conf" / "data"
    conf.mkdir(parents=True)
    (conf / "fn.yaml").write_text("_target_: mydata.nan_splits\nbatch_size: 16\n")
    (conf / "dm.yaml").write_text("_target_: mydata.Data\nbatch_size: 16\nbad_row: null\nlabels_shift: 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_data_function_of_the_users_is_checked_and_named(cli, project):
    line = assert_rejected(cli("--config-dir", str(project / "conf"), "data=fn"), "data._target_=mydata.nan_splits",
                           "x_train has 1 NaN (row 3, column 1)")
    assert "data.batch_size" not in line
    assert_nothing_written(project)


@pytest.mark.parametrize("overrides, says", [
    pytest.param(["data.bad_row=3"], ["data._target_=mydata.Data: the first training batch's x has 1 NaN (row 3, "
                                      "column 1)"], id="nan"),
    pytest.param(["data.labels_shift=-1"], ["data._target_=mydata.Data: the first training batch's y holds negative "
                                            "class indices"], id="negative-labels"),
    # A DataModule that fails to load is left to the preflight's training, which names the error in its one line.
    pytest.param(["data.bad_row=oops"], ["one training step on one batch failed: IndexError"], id="setup-fails"),
])
def test_a_datamodules_first_batch_is_checked_in_the_preflight(cli, project, overrides, says):
    assert_rejected(cli("--config-dir", str(project / "conf"), "data=dm", *overrides), *says)
    assert_nothing_written(project)


def test_a_study_whose_first_trials_all_diverge_at_epoch_1_stops_with_one_line(project, capsys):
    """NaN in the DataModule's third batch: the preflight's one batch is clean, every trial's train_loss is NaN at
    epoch 1 whatever its optimizer and learning rate; with max_diverged_at_start=3 the study stops after 3 of 20."""
    from searchlab.cli import main

    code = main(["search", "--config-dir", str(project / "conf"), "data=dm", "data.bad_row=40", "data.batch_size=16",
                 "study.name=diverging",
                 "study.n_trials=20", "study.max_diverged_at_start=3", "trainer.max_epochs=3", "model.width=8",
                 f"study.storage={project}/optuna.journal", f"tracking.uri=sqlite:///{project}/mlflow.db",
                 f"tracking.artifact_root={project}/artifacts", f"report.dir={project}/reports"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if "study stopped" in x]
    assert "the first 3 trials all diverged at epoch 1 (train_loss is nan) whatever their" in line
    assert "data._target_=mydata.Data" in line and "max_diverged_at_start=3" in line
    trials = load_study(project, "diverging").trials
    assert [t.state.name for t in trials] == ["PRUNED"] * 3
    assert all(t.user_attrs.get("reason", "").endswith("at epoch 1") for t in trials), [t.user_attrs for t in trials]
    _, parents, children = runs_of(project, "diverging")
    assert parents[0].info.status == "FAILED" and len(children) == 3


def test_max_diverged_at_start_must_be_a_non_negative_integer(cli, tmp_path):
    for value in ("-1", "two", "1.5"):
        assert_rejected(cli(f"study.max_diverged_at_start={value}"), "study.max_diverged_at_start")
    assert_nothing_written(tmp_path)


# --- the rule on its own ---------------------------------------------------------------------------------------

NAN1 = "diverged: train_loss is nan at epoch 1"


def test_rule_stops_at_its_limit_and_names_what_varied():
    rule = DivergedAtStart(3, "data.path=x.npz")
    params = [{"optimizer": "adam", "optimizer.lr": 0.1, "model.width": 8},
              {"optimizer": "sgd", "optimizer.lr": 0.01, "model.width": 8},
              {"optimizer": "adam", "optimizer.lr": 0.3, "model.width": 8}]
    assert rule.see("PRUNED", NAN1, params[0]) is None
    assert rule.see("PRUNED", NAN1, params[1]) is None
    why = rule.see("PRUNED", NAN1, params[2])
    assert why == ("the first 3 trials all diverged at epoch 1 (train_loss is nan) whatever their optimizer and "
                   "optimizer.lr: check the data (data.path=x.npz), then what every trial shares "
                   "(study.max_diverged_at_start=3)")
    assert rule.see("PRUNED", NAN1, params[0]) is None  # said once


@pytest.mark.parametrize("second", [
    pytest.param(("COMPLETE", None), id="a-trial-that-trains"),
    pytest.param(("PRUNED", "diverged: train_loss is nan at epoch 2"), id="diverged-later"),
    pytest.param(("PRUNED", "diverged: train_loss is inf at epoch 1"), id="diverged-another-way"),
    pytest.param(("PRUNED", None), id="pruned-by-the-pruner"),
    pytest.param(("FAIL", "ValueError: boom"), id="failed"),
])
def test_rule_is_disarmed_by_any_other_outcome_among_the_first(second):
    rule = DivergedAtStart(2)
    assert rule.see("PRUNED", NAN1) is None
    assert rule.see(*second) is None
    for _ in range(5):
        assert rule.see("PRUNED", NAN1) is None


def test_rule_setting_zero_or_null_turns_it_off():
    base = {"data": {"_target_": "searchlab.data.digits"}}
    assert diverged_rule(OmegaConf.create({**base, "study": {"max_diverged_at_start": 0}})) is None
    assert diverged_rule(OmegaConf.create({**base, "study": {"max_diverged_at_start": None}})) is None
    rule = diverged_rule(OmegaConf.create({**base, "study": {"max_diverged_at_start": 1}}))
    assert rule is not None and "data._target_=searchlab.data.digits" in rule.see("PRUNED", NAN1)
