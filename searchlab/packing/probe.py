"""study.pack=auto: the pack size from a short probe of this machine and this network, 1 where packing does not pay.

Why a probe and not a rule: what a pack gains is the device's idle time between a small network's kernels and the
per-step framework cost it shares, which depends on the network, the batch, the device and its load. A pack of K
trains its K members in one step, so the probe times the engine's epochs (the config's steps, then its validation)
for K = 1, 2, 4... copies of the study's base config, and compares seconds per member-epoch.

Why a threshold on the gain (study.pack_auto.min_gain): a pack's members are asked together, so the sampler sees
their results later than one by one, and with independent members only those that share a shape pack at all. On
the 2-core CPU the probe measures 1.3-3.1x for the methods bench's tasks, where packs of 8 reached the targets in
0.94-1.23x the CPU seconds of lone trials (docs/packing.md): a gain that only breaks even. The probe trains eagerly
(no trainer.compile: compiling per size would cost more than the probe) and leaves out the ~35 ms of tracking per
trial, which packing shares only in part.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig, OmegaConf

from searchlab.data import Splits
from searchlab.packing.engine import PackedTraining

# Probe epochs are the config's, up to this many steps each (enough for the per-step cost to dominate), each size
# timed over up to TIMED_EPOCHS epochs or TIMED_SECONDS.
PROBE_STEPS = 32
TIMED_EPOCHS = 3
TIMED_SECONDS = 0.3


@dataclass
class PackProbe:
    """What study.pack=auto measured and chose: seconds per member-epoch by pack size, and the size taken."""

    size: int
    seconds: dict[int, float] = field(default_factory=dict)
    why: str = ""

    def gain(self, size: int) -> float:
        return self.seconds[1] / self.seconds[size]

    def describe(self) -> str:
        """One line for the study's start: the choice, why, and the gain of each size probed."""
        gains = ", ".join(f"{k}: {self.gain(k):.1f}x" for k in sorted(self.seconds)) if 1 in self.seconds else "-"
        return f"study.pack=auto: packs of {self.size} ({self.why}; member-epochs per second against one: {gains})"


def member_epoch_seconds(cfg: DictConfig, splits: Splits, size: int) -> float:
    """Seconds per member-epoch of a pack of `size` copies of cfg: the fastest of up to TIMED_EPOCHS epochs (fewer
    once they add up to TIMED_SECONDS) over `size`. The first epoch is not timed (allocations, first kernels)."""
    pack = PackedTraining([cfg] * size, splits, grouped=True)
    pack.run_epoch()
    best, spent = float("inf"), 0.0
    for _ in range(TIMED_EPOCHS):
        start = time.perf_counter()
        pack.run_epoch()
        if pack.device.type == "cuda":
            torch.cuda.synchronize(pack.device)
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent >= TIMED_SECONDS:
            break
    return best / size


def probe_pack_size(cfg: DictConfig, splits: Splits, largest: int, min_gain: float, seconds: float = 3.0) -> PackProbe:
    """Doubles the pack from 1 while the next size trains at least 1.2x the member-epochs per second of the last,
    up to `largest`, within about `seconds` (a size whose probe would overrun them is not probed); a size that does
    not fit in the device's memory ends the doubling. Takes the fastest size if it gains at least `min_gain` over
    one, else 1."""
    probe = cfg.copy()
    limit = OmegaConf.select(cfg, "trainer.limit_train_batches")
    steps = PROBE_STEPS if limit is None or isinstance(limit, float) else min(int(limit), PROBE_STEPS)
    OmegaConf.update(probe, "trainer.limit_train_batches", steps, merge=False)
    OmegaConf.update(probe, "trainer.max_epochs", 1000, merge=False)  # run_epoch is called directly
    OmegaConf.update(probe, "trainer.compile", False, merge=False)
    found = PackProbe(1)
    start = time.perf_counter()
    stopped = f"reached {largest} (study.pack_auto.max_size, or study.n_trials)"
    size = 1
    while size <= largest:
        if size > 1:
            # The next size's epochs take about twice the last's, and it trains 1 + TIMED_EPOCHS of them.
            expected = 2 * found.seconds[size // 2] * (size // 2) * (1 + TIMED_EPOCHS)
            if time.perf_counter() - start + expected > seconds:
                stopped = f"a pack of {size} would overrun the probe's {seconds:g} s (study.pack_auto.seconds)"
                break
        try:
            found.seconds[size] = member_epoch_seconds(probe, splits, size)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            stopped = f"a pack of {size} does not fit in the device's memory"
            break
        if size > 1 and found.seconds[size] * 1.2 > found.seconds[size // 2]:
            stopped = f"a pack of {size} gained less than 1.2x over {size // 2}"
            break
        size *= 2
    # The candidates: the sizes that gained enough over half their size (a size that gained less is no choice,
    # even when a little faster: a bigger pack asks its members later).
    candidates = [k for k in found.seconds if k < size]
    if not candidates:  # one trial alone does not fit: the trials will say so
        found.why = stopped
        return found
    fastest = min(candidates, key=lambda k: found.seconds[k])
    if fastest == 1:
        found.why = f"no pack probed trained faster per member than one trial; the probe stopped at: {stopped}"
    elif found.gain(fastest) >= min_gain:
        found.size = fastest
        found.why = f"the fastest per member; the probe stopped at: {stopped}"
    else:
        found.why = (f"packing does not pay here: the fastest per member, {fastest}, trains {found.gain(fastest):.1f}x "
                     f"the member-epochs per second of one, under study.pack_auto.min_gain={min_gain:g}")
    return found
