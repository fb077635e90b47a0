"""`make bench`: every comparison in one go; prints the tables and writes bench/results.md and the plot.

    .venv/bin/python -m bench [--parts overhead,efficiency] [--device auto|cpu|cuda] [--configs 4] [--repeats 5]
                              [--seeds 5] [--max-trials 60] [--max-seconds 60] [--targets 0.975,0.985]
                              [--workers 1,2,4] [--scaling-trials 24] [--scaling-repeats 2]
                              [--methods-seeds 5] [--tasks digits,synthetic-hard] [--methods default,random,tpe]
                              [--methods-max-trials N] [--methods-max-seconds S] [--packing-ks 1,2,4,8,16,32]
                              [--packing-settings digits,signals] [--packing-repeats 3] [--packing-threads 1]
                              [--out bench]
    make bench BENCH_ARGS="--seeds 3 --max-seconds 40"
    make bench BENCH_ARGS="--parts methods --methods-seeds 3 --methods default,random,tpe"

results.md keeps the sections of the parts not run this time (from the earlier run, with their own run line).

Every figure is a ratio or a side-by-side pair from the same run: the machines this runs on may be shared.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import tempfile
from pathlib import Path

from bench.results import PARTS, machine, merge_results


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
    p.add_argument("--methods-seeds", type=int, default=5, help="methods: N study.seeds per task and method")
    p.add_argument("--methods-seed-start", type=int, default=0,
                   help="methods: the first study.seed (S..S+N-1: a run split over processes, or resumed)")
    p.add_argument("--tasks", default="", help="methods: comma-separated names of bench.methods.TASKS (default: all)")
    p.add_argument("--methods", default="",
                   help="methods: comma-separated names of bench.methods.METHODS (default: all)")
    p.add_argument("--methods-max-trials", type=int, default=None, help="methods: lower every task's trial cap")
    p.add_argument("--methods-max-seconds", type=float, default=None,
                   help="methods: lower every task's cap in CPU seconds")
    p.add_argument("--methods-threads", type=int, default=1, help="methods: torch threads during the runs (0: leave)")
    p.add_argument("--checkpoint-repeats", type=int, default=3, help="checkpoints: interleaved repeats per way")
    p.add_argument("--packing-ks", default="1,2,4,8,16,32", help="packing: pack sizes K (digits)")
    p.add_argument("--packing-settings", default="digits,signals",
                   help="packing: digits (MLP 2x256) and/or signals (examples/signals' Net1D, K up to 8)")
    p.add_argument("--packing-repeats", type=int, default=3, help="packing: interleaved repeats")
    p.add_argument("--packing-threads", type=int, default=1,
                   help="packing: torch threads for every way (0: leave torch's default)")
    p.add_argument("--extra", nargs="*", default=[], metavar="key=value",
                   help="overrides for every part (e.g. trainer.max_epochs=5): change the fixed setting (smoke runs)")
    args = p.parse_args(argv)
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {', '.join(sorted(unknown))} (choose from {', '.join(PARTS)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench import methods, scaling
    from bench.devices import pick_device
    from bench.efficiency import efficiency_markdown, plot_efficiency, run_efficiency
    from bench.overhead import overhead_markdown, run_overhead

    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    run_line = (f"- Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC: `{command.strip()}`\n"
                f"- Machine: {machine()}\n")
    new: dict[str, list[str]] = {part: [] for part in args.parts}

    def add(part: str, text: str) -> None:
        new[part].append(text)
        print(text, flush=True)

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
                add("overhead", overhead_markdown(result))
        if "efficiency" in args.parts:
            targets = [float(t) for t in args.targets.split(",") if t.strip()]
            result = run_efficiency(Path(scratch) / "efficiency", list(range(args.seeds)), targets,
                                    args.max_trials, args.max_seconds, args.extra)
            plot = args.out / "efficiency.png"
            plot_efficiency(result, plot)
            add("efficiency", efficiency_markdown(result, plot.name))
        if "scaling" in args.parts:
            if not scaling.available():
                add("scaling", "### Scaling\n\nNot run: this checkout's config has no `workers` setting.\n")
            for device in devices if scaling.available() else ():
                result = scaling.run_scaling(Path(scratch) / "scaling", [int(k) for k in args.workers.split(",")],
                                             args.scaling_trials, args.scaling_repeats, device, args.extra)
                add("scaling", scaling.scaling_markdown(result))
        if "methods" in args.parts:
            names = [n.strip() for n in args.methods.split(",") if n.strip()] or None
            tasks = [n.strip() for n in args.tasks.split(",") if n.strip()] or None
            seeds = list(range(args.methods_seed_start, args.methods_seed_start + args.methods_seeds))
            result = methods.run_methods(Path(scratch) / "methods", seeds, tasks, names,
                                         args.extra, args.methods_max_trials, args.methods_max_seconds,
                                         args.methods_threads or None, log=args.out / "methods-runs.jsonl",
                                         progress=lambda run: print(
                                             f"  {run.task} {run.method} seed {run.seed}: "
                                             f"{'reached' if run.reached else 'missed'} in {run.seconds:.1f} CPU s "
                                             f"({run.wall_seconds:.1f} s wall), "
                                             f"{run.trials} trials", flush=True))
            plot = args.out / "methods.png"  # the runs, one JSON line each, are in methods-runs.jsonl
            methods.plot_methods(result, plot)
            add("methods", methods.methods_markdown(result, plot.name))
        if "checkpoints" in args.parts:
            from bench.checkpoints import checkpoints_markdown, run_checkpoints

            for device in devices:
                rows = run_checkpoints(Path(scratch) / f"checkpoints-{device}", args.checkpoint_repeats, device,
                                       args.extra)
                add("checkpoints", checkpoints_markdown(rows))
        if "packing" in args.parts:
            from bench.packing import packing_markdown, run_packing

            ks = [int(k) for k in args.packing_ks.split(",") if k.strip()]
            for setting in [s.strip() for s in args.packing_settings.split(",") if s.strip()]:
                chosen = ks if setting == "digits" else [k for k in ks if k <= 8]
                result = run_packing(setting, chosen, args.packing_repeats, "cpu", args.extra,
                                     args.packing_threads or None)
                add("packing", packing_markdown(result))
            from bench.packing import run_study_packing, study_packing_markdown
            study_ks = sorted({1, *[k for k in ks if k in (8, 16)]})
            add("packing", study_packing_markdown(run_study_packing(study_ks, ["none", "hyperband"],
                                                                    threads=args.packing_threads or None,
                                                                    repeats=args.packing_repeats)))
            from bench.packing import mlp_paths, mlp_paths_markdown

            paths = mlp_paths(ks, args.packing_repeats, threads=args.packing_threads or None)
            add("packing", mlp_paths_markdown(paths))
    results = args.out / "results.md"
    results.write_text(merge_results(results.read_text() if results.is_file() else "", run_line, new))
    print(f"wrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
