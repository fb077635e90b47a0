"""Part 1 — overhead: the same fixed configurations trained three ways, interleaved in one process.

(a) plain: a hand-written PyTorch loop on device-resident tensors, no framework, no tracking — the limit.
(b) usual: the wiring of Optuna's and Lightning's own examples — DataLoader over a TensorDataset, Lightning's
    MLFlowLogger with per-step `self.log`, a pruning callback, Optuna on SQLite, `study.optimize`.
(c) searchlab: run_trial(SearchWork), the whole trial path (Hydra compose, Optuna journal, MLflow child run, and the
    packing engine or Lightning as trainer.engine chooses: bench/results.md says which).

Each configuration is enqueued (`study.enqueue_trial`) so (b) and (c) train exactly the configs (a) trains. Every
repeat runs each config by each way back to back (the order rotates per repeat), so the shared machine's noise hits
all three alike; figures are medians. Process start-up (imports) is measured apart, in fresh interpreters.
(c)'s fixed cost — everything but the training and validation steps — is split into parts by wrapping methods with
perf_counter here in the bench (bench/timing.py), never in searchlab's code.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.loops.fit_loop import _FitLoop
from torch.utils.data import DataLoader, TensorDataset

import searchlab.study.search_work
import searchlab.study.trial
import searchlab.tracking.mlflow
from bench.devices import UtilizationSampler, device_overrides, gpu_utilization_reader
from bench.timing import PartTimer
from searchlab.config import Composer
from searchlab.config.space import SearchSpace, parse_space
from searchlab.data import Splits
from searchlab.packing.engine import PackedTraining
from searchlab.study import make_pruner, make_sampler
from searchlab.study.search_work import SearchWork
from searchlab.study.storage import open_storage
from searchlab.tracking import Tracker
from searchlab.training.build import DataShape, build_network, load_data, optimizer_factory, schedule_factory

# The fixed setting: digits MLP 2x256, batch 64, 10 epochs, no pruning.
BASE = ["trainer.max_epochs=10", "data.batch_size=64", "model.width=256", "model.depth=2", "model.batch_norm=false",
        "study.pruner=none", "study.sampler=random", "study.n_trials=1000000", "study.name=bench"]
# The fixed list: optimizer, lr, schedule, regularization. `--configs N` takes the first N (cycling).
CONFIGS: list[dict[str, Any]] = [
    {"optimizer": "adam", "scheduler": "constant", "optimizer.lr": 1e-3, "optimizer.weight_decay": 0.0,
     "model.dropout": 0.0, "module.l1": 0.0},
    {"optimizer": "momentum", "scheduler": "cosine", "optimizer.lr": 0.05, "optimizer.weight_decay": 1e-4,
     "model.dropout": 0.1, "module.l1": 0.0},
    {"optimizer": "adamw", "scheduler": "onecycle", "optimizer.lr": 3e-3, "optimizer.weight_decay": 1e-2,
     "model.dropout": 0.2, "module.l1": 1e-5},
    {"optimizer": "rmsprop", "scheduler": "step", "optimizer.lr": 1e-3, "optimizer.weight_decay": 1e-4,
     "model.dropout": 0.0, "module.l1": 0.0},
]
# A space holding every config of the list, so an enqueued config is a valid trial of it.
SPACE = {
    "optimizer": {"choices": sorted({c["optimizer"] for c in CONFIGS})},
    "scheduler": {"choices": sorted({c["scheduler"] for c in CONFIGS})},
    "optimizer.lr": {"low": 1e-4, "high": 0.3, "log": True},
    "optimizer.weight_decay": {"low": 0.0, "high": 0.01},
    "model.dropout": {"low": 0.0, "high": 0.5},
    "module.l1": {"low": 0.0, "high": 1e-3},
}
BEFORE = "searchlab-before"  # (c) as it was: an MLflow write per epoch, SQLite's default journal (fsync per commit)
WAYS = ("plain", "usual", "searchlab", BEFORE)
# What a fresh process imports before its first trial, per way.
IMPORTS = {
    "plain": "import torch, searchlab.networks, searchlab.optim",
    "usual": "import torch, pytorch_lightning, optuna, mlflow, pytorch_lightning.loggers",
    "searchlab": "import searchlab.commands",
}
NAMES = {"plain": "(a) plain PyTorch loop", "usual": "(b) usual wiring", "searchlab": "(c) searchlab trial",
         BEFORE: "(c0) searchlab before: a write per epoch, SQLite defaults"}


def _shape(splits: Splits) -> DataShape:
    return DataShape(splits.sample_shape, splits.num_outputs("classification"))


def _schedule(cfg: DictConfig, optimizer: torch.optim.Optimizer, epochs: int, steps: int) -> dict | None:
    """Lightning's lr_scheduler dict for the config's schedule, made outside a Trainer."""
    factory = schedule_factory(cfg, SimpleNamespace(max_epochs=epochs, estimated_stepping_batches=steps))
    if factory is None:
        return None
    return {"scheduler": factory(optimizer), "interval": factory.lightning.get("interval", "epoch"),
            "monitor": "val_loss"}


# --- (a) the plain loop -----------------------------------------------------------------------------------------

def plain_loop(cfg: DictConfig, splits: Splits) -> float:
    """The limit: the same network, optimizer, schedule and regularization in a hand-written loop."""
    start = time.perf_counter()
    device = splits.x_train.device
    bf16 = cfg.trainer.precision == "bf16-mixed"
    torch.manual_seed(cfg.seed)
    net = build_network(cfg, _shape(splits)).to(device)
    opt = optimizer_factory(cfg)(net.parameters())
    n, size, epochs = len(splits.x_train), cfg.data.batch_size, cfg.trainer.max_epochs
    schedule = _schedule(cfg, opt, epochs, math.ceil(n / size) * epochs)
    penalized = [p for p in net.parameters() if p.dim() > 1]
    l1 = float(cfg.module.l1)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    for _ in range(epochs):
        net.train()
        order = torch.randperm(n, device=device, generator=generator)
        for i in range(0, n, size):
            index = order[i:i + size]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(net(splits.x_train[index]), splits.y_train[index])
            if l1 > 0:
                loss = loss + l1 * sum(p.abs().sum() for p in penalized)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if schedule and schedule["interval"] == "step":
                schedule["scheduler"].step()
        net.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = net(splits.x_val).float()
            torch.stack([F.cross_entropy(logits, splits.y_val), (logits.argmax(1) == splits.y_val).float().mean()
                         ]).tolist()
        if schedule and schedule["interval"] == "epoch":
            schedule["scheduler"].step()
    return time.perf_counter() - start


# --- (b) the usual wiring ---------------------------------------------------------------------------------------

class UsualModule(pl.LightningModule):
    """As the examples write it: loss and metrics through `self.log` every step."""

    def __init__(self, network: torch.nn.Module, cfg: DictConfig) -> None:
        super().__init__()
        self.network, self.cfg = network, cfg
        self.l1 = float(cfg.module.l1)
        self.penalized = [p for p in network.parameters() if p.dim() > 1]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.network(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        if self.l1 > 0:
            loss = loss + self.l1 * sum(p.abs().sum() for p in self.penalized)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.network(x)
        self.log("val_loss", F.cross_entropy(logits.float(), y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> dict:
        optimizer = optimizer_factory(self.cfg)(self.parameters())
        schedule = _schedule(self.cfg, optimizer, self.trainer.max_epochs, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": schedule} if schedule else {"optimizer": optimizer}


class PruningCallback(pl.Callback):
    """optuna-integration's PyTorchLightningPruningCallback subclasses lightning.pytorch's Callback, not
    pytorch_lightning's: this is the few-line equivalent the usual wiring needs."""

    def __init__(self, trial: optuna.Trial, monitor: str) -> None:
        self.trial, self.monitor = trial, monitor

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        epoch = trainer.current_epoch
        self.trial.report(float(trainer.callback_metrics[self.monitor]), epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")


@dataclass
class Usual:
    """Optuna study on SQLite whose objective trains with the usual Lightning wiring."""

    study: optuna.Study
    composer: Composer
    space: SearchSpace
    splits: Splits  # on the host: the DataLoader hands batches to Lightning, which moves them
    tracking_uri: str
    artifact_location: str

    def objective(self, trial: optuna.Trial) -> float:
        values = self.space.sample(trial)
        cfg = self.composer(values)
        pl.seed_everything(cfg.seed, verbose=False)
        network = build_network(cfg, _shape(self.splits))
        train = DataLoader(TensorDataset(self.splits.x_train, self.splits.y_train), batch_size=cfg.data.batch_size,
                           shuffle=True)
        val = DataLoader(TensorDataset(self.splits.x_val, self.splits.y_val), batch_size=cfg.trainer.eval_batch_size)
        logger = MLFlowLogger(experiment_name="usual", run_name=f"trial-{trial.number}",
                              tracking_uri=self.tracking_uri, artifact_location=self.artifact_location)
        logger.log_hyperparams(values)
        gpu = cfg.trainer.accelerator == "gpu"
        trainer = pl.Trainer(
            accelerator="gpu" if gpu else "cpu", devices=1, precision=cfg.trainer.precision,
            max_epochs=cfg.trainer.max_epochs, logger=logger, callbacks=[PruningCallback(trial, "val_acc")],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(UsualModule(network, cfg), train, val)
        return float(trainer.callback_metrics["val_acc"])

    def run(self) -> float:
        start = time.perf_counter()
        self.study.optimize(self.objective, n_trials=1)
        return time.perf_counter() - start


# --- (c) searchlab, instrumented --------------------------------------------------------------------------------

LOOP = "loop"  # the part holding the training and validation steps (Lightning's or the engine's): not fixed cost


def instrument(timer: PartTimer, runner: SearchWork) -> None:
    """Wraps the trial path's calls so each trial's wall time splits into parts (restored by timer.restore())."""
    storage = runner.study._storage
    timer.patch(searchlab.study.trial, "run_trial", "trial")
    timer.patch(runner.study, "ask")
    timer.patch(runner.study, "tell")
    timer.patch(runner.space, "sample", "sample (suggest)")
    timer.patch(runner, "composer", "compose")
    timer.patch(storage, "set_trial_user_attr", "user_attr")
    timer.patch(runner.tracker, "start_trial")
    timer.patch(runner.tracker, "log_epoch")
    timer.patch(runner.tracker, "end_trial")
    for name in ("create_run", "log_batch", "log_text", "set_terminated"):
        timer.patch(runner.tracker.client, name)
    timer.patch(optuna.trial.Trial, "report")
    timer.patch(optuna.trial.Trial, "should_prune")
    timer.patch(searchlab.study.search_work, "fit_alone", "fit set-up")  # its name for searchlab.packing.lone.fit_alone
    timer.patch(_FitLoop, "run", LOOP)  # the Lightning path's epochs (trainer.engine=lightning, or a config the
    timer.patch(PackedTraining, "run_epoch", LOOP)  # engine has not), or the packing engine's (searchlab.packing.lone)


GROUPS = {  # the last name of a part's path -> what it belongs to
    "MLflow": ("start_trial", "create_run", "log_batch", "log_text", "log_epoch", "end_trial", "set_terminated"),
    "Optuna": ("ask", "tell", "sample (suggest)", "user_attr", "report", "should_prune"),
    "Hydra compose": ("compose",),
    "training set-up and teardown (Lightning or the engine)": ("fit set-up",),
    "trial glue (to_yaml, overrides)": ("trial",),
}


def grouped(parts: dict[str, float]) -> dict[str, float]:
    """Fixed-cost parts summed by library."""
    return {group: sum(v for k, v in parts.items() if k.rsplit("/", 1)[-1] in names) for group, names in GROUPS.items()}


def fixed_cost(parts: dict[str, float]) -> float:
    return sum(v for k, v in parts.items() if not k.endswith("/" + LOOP))


# --- the benchmark ----------------------------------------------------------------------------------------------

@dataclass
class OverheadResult:
    device: str
    configs: int
    repeats: int
    seconds: dict[str, list[list[float]]]  # way -> per config, per repeat
    parts: list[dict[str, float]]  # searchlab's parts, one dict per timed trial
    startup: dict[str, float]
    first_trial: dict[str, float]
    gpu_util: dict[str, float | None] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)
    engine: str = "auto"  # trainer.engine of the setting: what trained searchlab's trials

    def per_trial(self, way: str) -> float:
        """Mean over configs of each config's median over repeats."""
        return statistics.fmean(statistics.median(r) for r in self.seconds[way])

    def ratio(self, top: str, bottom: str) -> float:
        """Median over (config, repeat) pairs of the ratio measured within the pair."""
        return statistics.median(t / b for ts, bs in zip(self.seconds[top], self.seconds[bottom], strict=True)
                                 for t, b in zip(ts, bs, strict=True))

    def part_medians(self) -> dict[str, float]:
        names = sorted({k for p in self.parts for k in p})
        return {k: statistics.median(p.get(k, 0.0) for p in self.parts) for k in names}

    def group_medians(self) -> dict[str, float]:
        groups = [grouped(p) for p in self.parts]
        return {g: statistics.median(x[g] for x in groups) for g in GROUPS}

    def fixed_median(self) -> float:
        return statistics.median(fixed_cost(p) for p in self.parts)

    def loop_over_plain(self) -> float:
        """The training loop's epochs (train + val steps; Lightning's or the engine's) in (c) over the whole plain
        loop (a), pair by pair."""
        loops = [sum(v for k, v in p.items() if k.endswith("/" + LOOP)) for p in self.parts]
        plain = [s for per_config in zip(*self.seconds["plain"], strict=True) for s in per_config]
        return statistics.median(loop / p for loop, p in zip(loops, plain, strict=True))


def startup_seconds(runs: int = 1) -> dict[str, float]:
    """Wall seconds of a fresh interpreter importing what each way needs (median of `runs`)."""
    out: dict[str, float] = {}
    for way, statement in IMPORTS.items() if runs > 0 else ():
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", statement], check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        out[way] = statistics.median(times)
    return out


def run_overhead(out: Path, configs: int = 4, repeats: int = 5, device: str = "cpu", startup_runs: int = 1,
                 extra: list[str] | None = None) -> OverheadResult:
    """Runs the ways over the first `configs` configs, `repeats` times each, interleaved; `extra` overrides
    change the fixed setting (the tests' smoke run uses it to shrink the network)."""
    out.mkdir(parents=True, exist_ok=True)
    chosen = [CONFIGS[i % len(CONFIGS)] for i in range(configs)]
    overrides = BASE + device_overrides(device) + list(extra or []) + [
        f"study.storage={out}/optuna.journal", f"tracking.uri=sqlite:///{out}/mlflow.db",
        f"tracking.artifact_root={out}/artifacts"]
    composer = Composer(overrides)
    cfg = composer.base
    host = load_data(cfg)
    splits = host.to(torch.device(device))
    space = parse_space(SPACE, composer.groups, {}, "bench")
    first: dict[str, float] = {}

    timer, parts = PartTimer(), []

    def searchlab_way(name: str, instrumented: bool, before: bool = False) -> Callable[[dict[str, Any]], float]:
        if before:  # as before this issue: a write per epoch, SQLite's defaults (an fsync per commit), own file
            real = searchlab.tracking.mlflow._sqlite_without_fsync_per_commit
            searchlab.tracking.mlflow._sqlite_without_fsync_per_commit = lambda client: None
            try:
                tracker = Tracker(f"sqlite:///{out}/mlflow-before.db", cfg.tracking.artifact_root, 0.0)
            finally:
                searchlab.tracking.mlflow._sqlite_without_fsync_per_commit = real
        else:
            tracker = Tracker(cfg.tracking.uri, cfg.tracking.artifact_root, cfg.tracking.flush_seconds)
        study = optuna.create_study(study_name=name, storage=open_storage(cfg.study.storage),
                                    sampler=make_sampler(cfg, space), pruner=make_pruner(cfg), direction="maximize")
        runner = SearchWork(study, cfg, overrides, composer, space, splits, tracker, tracker.study_run(name, {}))
        if instrumented:
            instrument(timer, runner)

        def run(values: dict[str, Any]) -> float:
            study.enqueue_trial(values)
            timer.active = instrumented
            start = time.perf_counter()
            searchlab.study.trial.run_trial(runner)
            seconds = time.perf_counter() - start
            if instrumented:
                timer.active = False
                parts.append(timer.take())
            return seconds

        return run

    def usual_way() -> Callable[[dict[str, Any]], float]:
        study = optuna.create_study(study_name="usual", storage=f"sqlite:///{out}/usual-optuna.db",
                                    sampler=optuna.samplers.RandomSampler(seed=0),
                                    pruner=optuna.pruners.NopPruner(), direction="maximize")
        usual = Usual(study, composer, space, host, f"sqlite:///{out}/usual-mlflow.db", f"{out}/usual-artifacts")

        def run(values: dict[str, Any]) -> float:
            study.enqueue_trial(values)
            return usual.run()

        return run

    makers: dict[str, Callable[[], Callable[[dict[str, Any]], float]]] = {
        "plain": lambda: lambda values: plain_loop(composer(values), splits),
        "usual": usual_way,
        "searchlab": lambda: searchlab_way("bench", True),
        BEFORE: lambda: searchlab_way("bench-before", False, before=True),
    }
    ways: dict[str, Callable[[dict[str, Any]], float]] = {}
    for way, make in makers.items():  # set-up and the first trial (warm-up), outside the figures
        start = time.perf_counter()
        ways[way] = make()
        ways[way](chosen[0])
        first[way] = time.perf_counter() - start
    if parts:
        parts.pop()  # the warm-up's

    sampler = UtilizationSampler(gpu_utilization_reader() if device == "cuda" else None)
    seconds: dict[str, list[list[float]]] = {way: [[] for _ in chosen] for way in WAYS}
    try:
        for repeat in range(repeats):
            for i, values in enumerate(chosen):
                for way in WAYS[repeat % len(WAYS):] + WAYS[:repeat % len(WAYS)]:
                    sampler.start(way)
                    seconds[way][i].append(ways[way](values))
                    sampler.stop()
    finally:
        timer.restore()
        sampler.stop()
    # parts are in (repeat, config) order, as loop_over_plain expects
    return OverheadResult(device, configs, repeats, seconds, parts, startup_seconds(startup_runs), first,
                          {way: sampler.mean(way) for way in WAYS} if device == "cuda" else {}, list(extra or []),
                          str(cfg.trainer.get("engine", "auto")))


def overhead_markdown(r: OverheadResult) -> str:
    """The part-1 section of bench/results.md."""
    configs = "; ".join(" ".join(f"{k}={v}" for k, v in CONFIGS[i % len(CONFIGS)].items()) for i in range(r.configs))
    lines = [
        f"### Overhead ({r.device}: {r.configs} configs x {r.repeats} repeats, interleaved; medians)",
        "",
        f"Fixed setting: `{' '.join(BASE[:5] + r.extra)}`" + (" (changed by --extra)" if r.extra else "")
        + f"; configs: {configs}.",
        "",
        "| way | s/trial | fresh-process import s | first trial s (warm-up) |"
        + (" GPU util % |" if r.gpu_util else ""),
        "|---|---|---|---|" + ("---|" if r.gpu_util else ""),
    ]
    for way in WAYS:
        value = r.per_trial(way)
        util = ""
        if r.gpu_util:
            mean = r.gpu_util.get(way)
            util = f" {'n/a' if mean is None else f'{mean:.0f}'} |"
        startup = f"{r.startup[way]:.2f}" if way in r.startup else ("as (c)" if way == BEFORE else "not measured")
        lines.append(f"| {NAMES[way]} | {value:.3f} | {startup} | {r.first_trial[way]:.2f} |{util}")
    lines += [
        "",
        f"- c/a = **{r.ratio('searchlab', 'plain'):.2f}** (target <= 1.10 on CPU); "
        f"b/c = **{r.ratio('usual', 'searchlab'):.2f}**; both medians of per-pair ratios.",
        f"- before/after this issue's tracking changes (buffered epoch metrics, SQLite WAL): c0/c = "
        f"{r.ratio(BEFORE, 'searchlab'):.2f}",
        f"- searchlab's training loop (train + val steps; trainer.engine={r.engine}) / the whole plain loop: "
        f"{r.loop_over_plain():.2f}",
        f"- searchlab's fixed cost per trial (all but the steps): **{r.fixed_median() * 1000:.1f} ms** median "
        "(target <= 30 ms); by library: " + ", ".join(f"{g} {v * 1000:.1f}" for g, v in r.group_medians().items())
        + " ms. By part (median ms per trial, exclusive of nested parts):",
        "",
        "| part | ms |",
        "|---|---|",
    ]
    for name, value in r.part_medians().items():
        lines.append(f"| {name}{' (train + val steps: not fixed cost)' if name.endswith('/' + LOOP) else ''} "
                     f"| {value * 1000:.1f} |")
    return "\n".join(lines) + "\n"
