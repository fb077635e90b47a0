"""`make gpu-check`: what needs an NVIDIA GPU, checked in one go of at most ~8 minutes, ending in one table.

    .venv/bin/python -m bench.gpu_check [--time-limit 480] [--out bench/out/gpu-check.md] [--repeats 2]
                                        [--ks 1,8,32,128]

Parts, in order, each in a child process (a part that hangs or overruns is stopped at the time limit, with its
processes; CUDA state does not carry from one part to the next):
  tests            pytest -m gpu tests/test_gpu.py: bf16 training, a worker per GPU, DDP on the GPUs present (2 or
                   more), packing in bf16, trainer.compile on the GPU, the model logged from a GPU trial
  overhead         the bench's overhead part on the GPU (bench.overhead, small repeats): seconds per trial of the
                   plain loop, the usual wiring and searchlab, with GPU utilization
  packing          the bench's packing part on the GPU (bench.packing, digits MLP 2x256): K = 1, 8, 32, 128 members
                   a pack, trials per hour and GPU utilization, eager
  packing compiled the same with trainer.compile=true (torch.compile, CUDA graphs): whether compiling pays

A part whose estimate (ESTIMATES, seconds on one GPU) is more than the time left is skipped with a line. Exit code:
0 when every part ran and every test passed or skipped, 1 otherwise, 2 without a GPU (one line, nothing run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("tests", "overhead", "packing", "packing compiled")
# Seconds each part is expected to take on one GPU (a guess until the first run on one: its table gives each part's
# seconds, to set these from). A part is started only when its estimate fits in the time left.
ESTIMATES = {"tests": 180.0, "overhead": 75.0, "packing": 60.0, "packing compiled": 150.0}
TEST_FILE = "tests/test_gpu.py"


@dataclass
class Row:
    """One line of the table. `k`: a pack's size, so its trials per hour are compared with the eager pack of 1."""

    part: str
    item: str
    result: str
    per_hour: float | None = None  # trials per hour
    util: float | None = None      # mean GPU utilization in percent while it ran
    k: int | None = None


@dataclass
class Part:
    name: str
    estimate: float


# --- running the parts within the time limit ------------------------------------------------------------------

Runner = Callable[[Part, float], list[Row]]


def _say(line: str) -> None:
    print(line, flush=True)  # before the children's own output, in order


def run_parts(parts: list[Part], limit: float, runner: Runner, clock: Callable[[], float] = time.monotonic,
              say: Callable[[str], None] = _say) -> list[Row]:
    """Runs each part that fits in what is left of `limit` seconds (its estimate against the time left; it is
    given the time left as its timeout); a part that does not fit is skipped with a line."""
    start = clock()
    rows: list[Row] = []
    for part in parts:
        left = limit - (clock() - start)
        if part.estimate > left:
            reason = f"skipped: needs about {part.estimate:.0f} s, {max(left, 0):.0f} s of the time limit left"
            say(f"gpu-check: {part.name} {reason}")
            rows.append(Row(part.name, "-", reason))
            continue
        say(f"gpu-check: {part.name} (about {part.estimate:.0f} s; {left:.0f} s left)")
        began = clock()
        rows += runner(part, left)
        say(f"gpu-check: {part.name} took {clock() - began:.0f} s")
    return rows


def run_child(argv: list[str], timeout: float) -> tuple[int | None, float]:
    """Runs a command in its own process group; (exit code, or None when stopped at `timeout`, and seconds)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, start_new_session=True)
    try:
        code: int | None = proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if proc.poll() is None or code is None:  # the child and what it started (DDP ranks, workers)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return code, time.monotonic() - start


def junit_rows(junit: Path) -> list[Row]:
    """One row per test of a pytest JUnit XML report: passed, failed or skipped, with the reason and seconds."""
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name", "?").removeprefix("test_").replace("_", " ")
        seconds = float(case.get("time", 0.0))
        outcome = f"passed ({seconds:.1f} s)"
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                message = (found.get("message") or found.text or "").strip().splitlines()
                word = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                outcome = f"{word}: {message[0][:160] if message else tag}"
                if tag != "skipped":
                    outcome += f" ({seconds:.1f} s)"
                break
        rows.append(Row("tests", name, outcome))
    return rows


def child_runner(args: argparse.Namespace, scratch: Path) -> Runner:
    """Runs a part in a child process: pytest for the tests, this module with --part for the bench parts."""

    def run(part: Part, timeout: float) -> list[Row]:
        out = scratch / f"{part.name.replace(' ', '-')}.result"
        if part.name == "tests":
            argv = [sys.executable, "-m", "pytest", "-m", "gpu", TEST_FILE, "-q", "-p", "no:cacheprovider",
                    f"--junitxml={out}"]
        else:
            argv = [sys.executable, "-m", "bench.gpu_check", "--part", part.name, "--result", str(out),
                    "--repeats", str(args.repeats), "--ks", args.ks]
        code, seconds = run_child(argv, timeout)
        if code is None:
            return [Row(part.name, "-", f"stopped at the time limit after {seconds:.0f} s")]
        if not out.is_file():
            return [Row(part.name, "-", f"ERROR: exited {code} without results (its output is above)")]
        if part.name == "tests":
            return junit_rows(out) or [Row(part.name, "-", f"ERROR: pytest exited {code} and ran no test")]
        return [Row(**row) for row in json.loads(out.read_text())]

    return run


# --- the bench parts, in the child -----------------------------------------------------------------------------

def overhead_rows(repeats: int, scratch: Path, device: str = "cuda", extra: list[str] | None = None) -> list[Row]:
    from bench.overhead import NAMES, WAYS, run_overhead

    result = run_overhead(scratch / "overhead", configs=2, repeats=repeats, device=device, startup_runs=0,
                          extra=extra)
    rows = []
    for way in WAYS:
        seconds = result.per_trial(way)
        rows.append(Row("overhead", NAMES[way], f"{seconds:.3f} s/trial", 3600 / seconds, result.gpu_util.get(way)))
    return rows


def packing_rows(ks: list[int], repeats: int, compiled: bool, device: str = "cuda",
                 extra: list[str] | None = None) -> list[Row]:
    import searchlab.packing.engine
    from bench.packing import run_packing

    part = "packing compiled" if compiled else "packing"
    result = run_packing("digits", ks, repeats, device, [*(extra or []), *(["trainer.compile=true"] * compiled)])
    names = {"plain": "(a) plain PyTorch loop, one trial", "lightning": "(b) searchlab Lightning fit, one trial"}
    rows = []
    for way in result.seconds:
        if compiled and way in names:  # the one-trial ways do not compile: the eager part has them
            continue
        seconds = result.median(way)
        k = int(way.split()[1]) if way.startswith("pack ") else None
        rows.append(Row(part, names.get(way, f"pack K={k}"), f"{seconds:.4f} s/trial", 3600 / seconds,
                        result.gpu_util.get(way), k))
    if compiled and searchlab.packing.engine._compile_failure:
        rows.append(Row(part, "torch.compile", f"fell back to eager: {searchlab.packing.engine._compile_failure}"))
    if not compiled:
        rows.append(auto_row(device, extra or []))
    return rows


def auto_row(device: str, extra: list[str]) -> Row:
    """What study.pack=auto chooses for the packing part's digits MLP on this device, with conf/'s probe settings
    (no size cap but 128): the first reading of the probe on a GPU, where min_gain is meant to let packs in."""
    import torch

    from bench.devices import device_overrides
    from bench.packing import DIGITS
    from searchlab.config import Composer
    from searchlab.packing.probe import probe_pack_size
    from searchlab.training.build import load_data

    cfg = Composer([*DIGITS, *device_overrides(device), *extra]).base
    auto = cfg.study.pack_auto
    found = probe_pack_size(cfg, load_data(cfg).to(torch.device(device)), 128, float(auto.min_gain),
                            float(auto.seconds))
    return Row("packing", "study.pack=auto (the probe)", found.describe().removeprefix("study.pack=auto: "))


def run_part(name: str, args: argparse.Namespace) -> list[Row]:
    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    if name == "overhead":
        with tempfile.TemporaryDirectory(prefix="searchlab-gpu-check-") as scratch:
            return overhead_rows(args.repeats, Path(scratch))
    return packing_rows(ks, args.repeats, compiled=name == "packing compiled")


# --- the table ------------------------------------------------------------------------------------------------

def _number(value: float | None, digits: int = 0) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def render(rows: list[Row], heading: str, seconds: float, limit: float) -> str:
    """The one table (markdown), with a heading line above and the packing target below."""
    one = next((r.per_hour for r in rows if r.part == "packing" and r.k == 1 and r.per_hour), None)
    lines = [heading, "",
             "| part | what | result | trials/hour | x pack K=1 (eager) | GPU util % |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.per_hour / one if one and r.k is not None and r.per_hour else None
        lines.append(f"| {r.part} | {r.item} | {r.result} | {_number(r.per_hour)} | {_number(ratio, 2)} | "
                     f"{_number(r.util)} |")
    lines.append("")
    packs = [r for r in rows if r.k is not None and r.k > 1 and r.per_hour]
    if one and packs:
        best = max(packs, key=lambda r: r.per_hour or 0.0)
        lines.append(f"- packing: best {best.item} ({best.part}) at {best.per_hour / one:.1f}x the trials per hour of "
                     f"pack K=1 (target >= 10).")
    lines.append(f"- {seconds:.0f} s in all (limit {limit:.0f} s).")
    return "\n".join(lines) + "\n"


def write_results(path: Path, run_line: str, table: str) -> None:
    """The table as the gpu-check block of bench/results.md (`make bench` keeps that block as it is)."""
    from bench.results import merge_results

    old = path.read_text() if path.is_file() else ""
    path.write_text(merge_results(old, run_line, {"gpu-check": [table]}))


# --- the command ----------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--time-limit", type=float, default=480.0, help="seconds for everything (default 480: 8 minutes)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "gpu-check.md",
                   help="where the table is written")
    p.add_argument("--results-file", type=Path, default=Path(__file__).parent / "results.md",
                   help="the benchmarks' results file, whose gpu-check block gets the table")
    p.add_argument("--repeats", type=int, default=2, help="overhead and packing: interleaved repeats")
    p.add_argument("--ks", default="1,8,32,128", help="packing: pack sizes K")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    p.add_argument("--part", choices=PARTS[1:], help=argparse.SUPPRESS)  # a child: runs one bench part
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)        # where a child writes its rows (JSON)
    args = p.parse_args(argv)
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown {', '.join(unknown)} (choose from {', '.join(PARTS)})")
    return args


def no_gpu_line(cuda_available: bool | None = None) -> str | None:
    """The one line to print when torch sees no CUDA GPU, else None."""
    import torch

    if torch.cuda.is_available() if cuda_available is None else cuda_available:
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"gpu-check: no CUDA GPU visible to torch {torch.__version__} ({build}); nothing run: run it on a "
            "machine with an NVIDIA GPU and a CUDA build of torch")


def main(argv: list[str] | None = None, cuda_available: bool | None = None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    missing = no_gpu_line(cuda_available)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    if args.part:  # a child
        rows = run_part(args.part, args)
        args.result.write_text(json.dumps([asdict(r) for r in rows]))
        return 0
    from bench.results import machine

    command = " ".join(["python -m bench.gpu_check", *(sys.argv[1:] if argv is None else argv)])
    run_line = (f"- Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC: `{command}`\n"
                f"- Machine: {machine()}\n")
    parts = [Part(name, ESTIMATES[name]) for name in PARTS if name in args.parts]
    with tempfile.TemporaryDirectory(prefix="searchlab-gpu-check-") as scratch:
        left = args.time_limit - (time.monotonic() - start) - 5.0  # 5 s kept for the table
        rows = run_parts(parts, left, child_runner(args, Path(scratch)))
    table = render(rows, "### GPU check (`make gpu-check`)", time.monotonic() - start, args.time_limit)
    print(f"\n{run_line}\n{table}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"{run_line}\n{table}")
    write_results(args.results_file, run_line, table)
    print(f"wrote {args.out} and the gpu-check block of {args.results_file}")
    bad = [r for r in rows if r.result.startswith(("FAILED", "ERROR", "stopped", "skipped: needs"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
