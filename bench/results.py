"""bench/results.md: the line naming the machine a run's figures come from, and how a run's sections replace those of
the parts it ran while the other parts keep theirs. Used by `make bench` (bench/__main__.py), `--rebuild` of the
methods part and `make gpu-check`."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

PARTS = ("overhead", "efficiency", "scaling", "methods", "checkpoints", "packing")


def machine() -> str:
    """One line naming the machine the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.node()}: {os.cpu_count()} cores ({cpu}), {gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads; load average at start {load}")


def merge_results(old: str, run_line: str, new: dict[str, list[str]]) -> str:
    """results.md: each part's block (its run line, then its sections) between markers; the parts run now replace
    theirs, the others keep their block from the earlier file."""
    blocks = {}
    # gpu-check: the block `make gpu-check` writes (bench/gpu_check.py); notes: kept by hand (history, code's figures)
    for part in (*PARTS, "gpu-check", "notes"):
        begin, end = f"<!-- part:{part} -->", f"<!-- /part:{part} -->"
        if part in new:
            blocks[part] = f"{begin}\n{run_line}\n" + "\n".join(new[part]) + f"{end}\n"
        elif begin in old and end in old:
            blocks[part] = old[old.index(begin):old.index(end) + len(end)] + "\n"
    return "\n".join(["# searchlab benchmarks", "",
                      "Every figure is a ratio or a side-by-side pair measured in one run (the run line above it).",
                      "", *blocks.values()])
