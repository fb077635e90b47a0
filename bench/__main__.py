"""`make bench`: every comparison in one go; prints the tables and writes bench/results.md and the plot.

    .venv/bin/python -m bench [--parts overhead,efficiency] [--device auto|cpu|cuda] [--configs 4] [--repeats 5]
                              [--seeds 5] [--max-trials 60] [--max-seconds 60] [--targets 0.975,0.985]
                              [--workers 1,2,4] [--scaling-trials 24] [--scaling-repeats 2] [--out bench]
    make bench BENCH_ARGS="--seeds 3 --max-seconds 40"

Every figure is a ratio or a side-by-side pair from the same run: the machines this runs on may be shared.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

import torch

PARTS = ("overhead", "efficiency", "scaling")


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    p.add_argument("--out", type=Path, default=Path(__file__).parent, help="where results.md and the plot go")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="overhead and scaling: auto runs the CPU and, when torch sees a GPU, the GPU (bf16-mixed) too")
    p.add_argument("--configs", type=int, default=4, help="overhead: configurations from the fixed list")
    p.add_argument("--repeats", type=int, default=5, help="overhead: interleaved repeats of each configuration")
    p.add_argument("--startup-runs", type=int, default=3, help="overhead: fresh interpreters per way (0: skip)")
    p.add_argument("--seeds", type=int, default=5, help="efficiency: study.seed 0..N-1 per method")
    p.add_argument("--max-trials", type=int, default=60, help="efficiency: trial cap per run")
    p.add_argument("--max-seconds", type=float, default=60.0, help="efficiency: time cap per run")
    p.add_argument("--targets", default="0.975,0.985",
                   help="efficiency: comma-separated best val_acc values to reach; a run stops at the highest")
    p.add_argument("--workers", default="1,2,4", help="scaling: comma-separated numbers of local workers")
    p.add_argument("--scaling-trials", type=int, default=24, help="scaling: trials per study")
    p.add_argument("--scaling-repeats", type=int, default=2, help="scaling: interleaved repeats of each K")
    p.add_argument("--extra", nargs="*", default=[], metavar="key=value",
                   help="overrides for both parts (e.g. trainer.max_epochs=5): change the fixed setting (smoke runs)")
    args = p.parse_args(argv)
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {', '.join(sorted(unknown))} (choose from {', '.join(PARTS)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench import scaling
    from bench.devices import pick_device
    from bench.efficiency import efficiency_markdown, plot_efficiency, run_efficiency
    from bench.overhead import overhead_markdown, run_overhead

    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    sections = [
        "# searchlab benchmarks",
        "",
        f"- Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC: `{command.strip()}`",
        f"- Machine: {machine()}",
        "- Every figure is a ratio or a side-by-side pair measured in this run.",
        "",
    ]
    # auto: the CPU, and the GPU too when torch sees one; cpu or cuda: that device only
    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if pick_device("auto") == "cuda" else [])
    else:
        devices = [pick_device(args.device)]
    with tempfile.TemporaryDirectory(prefix="searchlab-bench-") as scratch:
        if "overhead" in args.parts:
            for device in devices:
                result = run_overhead(Path(scratch) / f"overhead-{device}", args.configs, args.repeats, device,
                                      args.startup_runs, args.extra)
                sections.append(overhead_markdown(result))
                print(sections[-1], flush=True)
        if "efficiency" in args.parts:
            targets = [float(t) for t in args.targets.split(",") if t.strip()]
            result = run_efficiency(Path(scratch) / "efficiency", list(range(args.seeds)), targets,
                                    args.max_trials, args.max_seconds, args.extra)
            plot = args.out / "efficiency.png"
            plot_efficiency(result, plot)
            sections.append(efficiency_markdown(result, plot.name))
            print(sections[-1], flush=True)
        if "scaling" in args.parts:
            if not scaling.available():
                sections.append("### Scaling\n\nNot run: this checkout's config has no `workers` setting.\n")
                print(sections[-1], flush=True)
            for device in devices if scaling.available() else ():
                result = scaling.run_scaling(Path(scratch) / "scaling", [int(k) for k in args.workers.split(",")],
                                             args.scaling_trials, args.scaling_repeats, device, args.extra)
                sections.append(scaling.scaling_markdown(result))
                print(sections[-1], flush=True)
    (args.out / "results.md").write_text("\n".join(sections))
    print(f"wrote {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
