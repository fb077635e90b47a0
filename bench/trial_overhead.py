"""Seconds per trial of one fixed configuration: searchlab's whole trial path beside a plain PyTorch loop.

Digits, MLP 2x256, Adam, batch 64, 10 epochs, no pruning. Pairs run interleaved in one process, so the machine's
noise hits both sides alike; process start-up is excluded (reported apart by `make search`'s own timing).

    .venv/bin/python bench/trial_overhead.py [--pairs 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from searchlab.config import Composer
from searchlab.data import load_data
from searchlab.model import build_network
from searchlab.space import parse_space
from searchlab.study import make_pruner, make_sampler, open_storage, open_study
from searchlab.tracking import Tracker
from searchlab.trial import TrialRunner

FIXED = ["trainer.max_epochs=10", "data.batch_size=64", "model.width=256", "model.depth=2", "optimizer=adam",
         "scheduler=constant", "study.pruner=none", "study.sampler=random", "study.n_trials=1000000"]


def plain_loop(cfg, splits) -> float:
    """The limit: a hand-written loop on resident tensors, no framework, no tracking."""
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    net = build_network(cfg.model, splits.sample_shape, splits.n_classes)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.optimizer.lr, betas=(cfg.optimizer.beta1, cfg.optimizer.beta2))
    generator = torch.Generator().manual_seed(cfg.seed)
    n, size = len(splits.x_train), cfg.data.batch_size
    for _ in range(cfg.trainer.max_epochs):
        net.train()
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, size):
            index = order[i:i + size]
            loss = F.cross_entropy(net(splits.x_train[index]), splits.y_train[index])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            (net(splits.x_val).argmax(1) == splits.y_val).float().mean().item()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=10)
    args = parser.parse_args()
    out = tempfile.mkdtemp()
    composer = Composer(FIXED + [f"study.storage={out}/optuna.journal", "study.name=bench"])
    cfg = composer.base
    splits = load_data(cfg.data, cfg.seed)
    # One searched key with one choice: every trial trains the same configuration through the whole path.
    space = parse_space({"model.width": {"choices": [256]}}, composer.groups, {}, "bench")
    tracker = Tracker(f"sqlite:///{out}/mlflow.db", f"{out}/artifacts")
    study = open_study(cfg, open_storage(cfg.study.storage), make_sampler(cfg, space), make_pruner(cfg))
    parent = tracker.study_run("bench", {})
    runner = TrialRunner(study, cfg, FIXED, composer, space, splits, tracker, parent)
    runner.run(), plain_loop(cfg, splits)  # warm-up: first compose, first Lightning set-up, allocator
    searchlab, plain = [], []
    for _ in range(args.pairs):
        searchlab.append(runner.run().seconds)
        plain.append(plain_loop(cfg, splits))
    s, p = statistics.median(searchlab), statistics.median(plain)
    print(f"pairs={args.pairs} threads={torch.get_num_threads()}")
    print(f"plain PyTorch loop : median {p:.3f} s/trial (min {min(plain):.3f}, max {max(plain):.3f})")
    print(f"searchlab trial    : median {s:.3f} s/trial (min {min(searchlab):.3f}, max {max(searchlab):.3f})")
    print(f"ratio searchlab/plain: {s / p:.2f}")


if __name__ == "__main__":
    main()
