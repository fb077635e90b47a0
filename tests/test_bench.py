"""Smoke runs of `make bench`'s parts (tiny sizes): they produce their outputs, well-formed. Timings are not checked:
the benchmark itself (`make bench`) reports them."""

from __future__ import annotations

import types
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import wait_until

from bench.__main__ import main, merge_results
from bench.devices import UtilizationSampler, device_overrides, pick_device
from bench.efficiency import METHODS as EFFICIENCY_METHODS
from bench.efficiency import SearchRun, _best_at
from bench.methods import METHODS, TASKS, MethodsResult, Run, load_runs, methods_markdown, run_one
from bench.overhead import LOOP, WAYS, OverheadResult, overhead_markdown, run_overhead
from bench.scaling import ScalingResult, run_scaling, scaling_markdown
from bench.scaling import available as scaling_available
from bench.timing import PartTimer

TINY = ["model.width=32", "trainer.max_epochs=2"]


def test_overhead_smoke_times_all_three_ways_and_splits_searchlab_into_parts(tmp_path):
    result = run_overhead(tmp_path, configs=2, repeats=1, device="cpu", startup_runs=0, extra=TINY)
    for way in WAYS:
        assert len(result.seconds[way]) == 2 and all(len(r) == 1 and r[0] > 0 for r in result.seconds[way])
    assert len(result.parts) == 2
    names = set(result.part_medians())
    for part in ("trial/ask", "trial/compose", "trial/tell", "trial/start_trial/create_run",
                 "trial/end_trial/set_terminated", f"trial/fit set-up/{LOOP}"):
        assert part in names
    # The parts add up to the trial's time, and the fixed cost is what is left without the steps.
    assert 0 < result.fixed_median() < result.per_trial("searchlab")
    text = overhead_markdown(result)
    assert text.count("| (a) plain") == 1 and "c/a = **" in text and "b/c = **" in text and "| trial/ask |" in text


@pytest.mark.slow
def test_efficiency_and_results_file_from_the_command(tmp_path):
    # A target every run reaches at once, and caps that end a run that does not: all outputs, in seconds.
    assert main(["--parts", "efficiency", "--out", str(tmp_path), "--seeds", "1", "--max-trials", "2",
                 "--max-seconds", "30", "--targets", "0.3,0.5", "--extra", *TINY]) == 0
    text = (tmp_path / "results.md").read_text()
    assert "Machine:" in text and "to 0.3: searchlab / random **" in text and "to 0.5: searchlab / random **" in text
    for method in EFFICIENCY_METHODS:
        assert f"| 0.3 | {method} | " in text and f"| 0.5 | {method} | " in text
    png = (tmp_path / "efficiency.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_a_run_that_misses_the_target_counts_as_the_caps():
    run = SearchRun("random, no pruning", 0, trace=[(1.0, 1, 0.5), (2.0, 2, None), (3.0, 3, 0.7)])
    assert run.cost(0.9, 60.0, 40) == (60.0, 40)
    assert [_best_at(run, t) for t in (0.5, 1.5, 3.5)] == [None, 0.5, 0.7]
    run.reached[0.9] = (3.0, 3)
    assert run.cost(0.9, 60.0, 40) == (3.0, 3) and run.cost(0.95, 60.0, 40) == (60.0, 40)


def test_part_timer_is_exclusive_and_restores_what_it_wrapped(monkeypatch):
    import bench.timing

    clock = [100.0]  # an injected clock: the work advances it, so the parts are exact on any machine load
    monkeypatch.setattr(bench.timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class Work:
        def outer(self) -> None:
            clock[0] += 0.02
            self.inner()

        def inner(self) -> None:
            clock[0] += 0.03

    work, timer = Work(), PartTimer()
    timer.patch(work, "outer")
    timer.patch(Work, "inner")
    work.outer()
    assert timer.take() == {}  # inactive: calls pass through
    timer.active = True
    work.outer()
    parts = timer.take()
    assert set(parts) == {"outer", "outer/inner"}
    assert parts["outer"] == pytest.approx(0.02) and parts["outer/inner"] == pytest.approx(0.03)
    timer.restore()
    assert "outer" not in vars(work) and Work.inner.__name__ == "inner" and not hasattr(Work.inner, "__wrapped__")


def test_gpu_path_is_chosen_by_the_device_argument_with_bf16():
    assert pick_device("auto", cuda_available=False) == "cpu"
    assert pick_device("auto", cuda_available=True) == "cuda"
    assert pick_device("cpu", cuda_available=True) == "cpu"
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        pick_device("cuda", cuda_available=False)
    assert "trainer.precision=bf16-mixed" in device_overrides("cuda")
    assert "trainer.precision=32-true" in device_overrides("cpu")


def test_gpu_utilization_is_sampled_per_way_and_reported():
    readings = iter(range(10, 1000, 10))
    sampler = UtilizationSampler(lambda: float(next(readings)), interval=0.005)
    sampler.start("searchlab")
    wait_until(lambda: len(sampler.samples["searchlab"]) >= 2, "two utilization samples", 60)
    sampler.stop()
    assert sampler.mean("searchlab") > 10 and sampler.mean("plain") is None
    assert UtilizationSampler(None).mean("plain") is None  # no reader (CPU, or no nvidia-smi): nothing sampled
    seconds = {way: [[0.2]] for way in WAYS}
    result = OverheadResult("cuda", 1, 1, seconds, [{"trial": 0.01, f"trial/fit set-up/{LOOP}": 0.19}],
                            {}, {way: 1.0 for way in WAYS}, {"plain": 80.0, "usual": None, "searchlab": 75.5})
    text = overhead_markdown(result)
    assert "GPU util % |" in text and "| 80 |" in text and "| n/a |" in text and "| 76 |" in text


def test_scaling_section_from_a_result():
    result = ScalingResult("cuda", 24, 2, {1: [(20.0, 30.0), (22.0, 34.0)], 2: [(30.0, 50.0), (34.0, 58.0)]},
                           {1: 40.0, 2: None})
    text = scaling_markdown(result)
    assert "| 1 | 21.0 | 32.0 | 1.00 | 40 |" in text and "| 2 | 32.0 | 54.0 | 1.69 | n/a |" in text


@pytest.mark.slow
@pytest.mark.skipif(not scaling_available(), reason="needs `workers=` in the config (the workers branch)")
def test_scaling_smoke_runs_the_command_with_each_number_of_workers(tmp_path):
    # No model logged at the study's end (a cold torch.export in each fresh process), the report kept in tmp_path
    # (bench.scaling leaves report.dir at its default, the checkout's mlruns/).
    extra = ["model.width=32", "tracking.log_models=none", f"report.dir={tmp_path}/reports"]
    result = run_scaling(tmp_path, [1, 2], trials=2, repeats=1, device="cpu", extra=extra)
    assert set(result.runs) == {1, 2} and all(whole > 0 and steady > 0 for (whole, steady), in result.runs.values())
    assert "| 2 |" in scaling_markdown(result)


@pytest.mark.slow
def test_methods_smoke_two_seeds_stop_at_the_target_or_the_caps(tmp_path):
    # Tiny: digits, a 2-epoch 32-wide net, 2 trials per run. 0.3 is reached by the first complete trial (the run
    # stops there); 0.999 is not, so that run goes to its trial cap.
    # No model logged at a study's end (the table and the plot are what this checks).
    tiny = [*TINY, "tracking.log_models=none"]
    reachable = replace(TASKS["digits"], target=0.3, max_trials=2, max_seconds=60)
    run = run_one(tmp_path / "a", "digits", reachable, "tpe-sh1", 0, tiny)
    assert run.reached and 1 <= run.trials <= 2 and run.seconds > 0 and run.trace[-1][1] >= 0.3
    assert main(["--parts", "methods", "--out", str(tmp_path), "--methods-seeds", "2", "--methods-seed-start", "3",
                 "--tasks", "digits",
                 "--methods", "default,random,tpe", "--methods-max-trials", "2", "--methods-max-seconds", "30",
                 "--extra", *tiny]) == 0
    text = (tmp_path / "results.md").read_text()
    assert "<!-- part:methods -->" in text and "Machine:" in text and "<!-- part:overhead -->" not in text
    for method in ("default", "random", "tpe"):
        assert f"| {METHODS[method].label} | " in text
    assert "| random, no pruning | 0/2 | >=30.0 |" in text  # missed: the CPU cap counts, as a lower bound
    again = load_runs(tmp_path / "methods-runs.jsonl", max_trials=2, max_seconds=30)  # the table from the raw runs
    assert len(again.runs) == 6 and again.seeds == [3, 4] and again.of("digits", "tpe")[0].trace
    png = (tmp_path / "methods.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_signals_task_makes_its_data_with_the_example_script_once_and_searches_its_net(tmp_path, monkeypatch):
    import sys

    import numpy as np

    import bench.methods

    monkeypatch.setattr(bench.methods, "SIGNALS_N", 200)
    monkeypatch.setattr(sys, "path", list(sys.path))  # prepare makes examples/signals importable
    path = tmp_path / "data" / "signals-200.npz"
    assert TASKS["signals"].prepare(tmp_path / "data") == (f"data.path={path}",)
    with np.load(path) as arrays:
        assert arrays["x_train"].shape == (120, 128) and arrays["x_val"].shape == (40, 128)
    made = path.stat().st_mtime_ns
    task = replace(TASKS["signals"], target=0.0, max_trials=2, max_seconds=60)  # the first complete trial reaches it
    run = run_one(tmp_path, "signals", task, "random", 0, ["trainer.max_epochs=1"])
    assert run.reached and run.trials == 1 and path.stat().st_mtime_ns == made


def test_friedman_task_writes_its_regression_data_once_and_searches_the_regressor(tmp_path):
    import numpy as np

    import bench.methods

    path = tmp_path / "data" / f"friedman-{bench.methods.FRIEDMAN_N}.npz"
    assert TASKS["friedman"].prepare(tmp_path / "data") == (f"data.path={path}",)
    with np.load(path) as arrays:
        assert arrays["x_train"].shape == (1200, 20) and arrays["y_val"].shape == (400,)
        assert arrays["y_train"].dtype == np.float32  # regression targets, not class indices
    made = path.stat().st_mtime_ns
    task = replace(TASKS["friedman"], target=-1e9, max_trials=3, max_seconds=60)  # the first complete trial
    run = run_one(tmp_path, "friedman", task, "random", 0, ["trainer.max_epochs=1"])
    assert run.reached and run.states["COMPLETE"] == 1 and path.stat().st_mtime_ns == made
    result = MethodsResult(tasks={"friedman": task}, methods=["random"], seeds=[0], extra=[], runs=[run])
    markdown = methods_markdown(result, "methods.png")
    assert "target: best val_r2 >= -1000000000.0" in markdown


def test_methods_are_override_entries_of_the_study_tables():
    from searchlab.config import Composer

    for name in ("tpe-hb2", "tpe5-sh1", "tpe-median", "random"):
        cfg = Composer(list(METHODS[name].overrides)).base
        sampler, pruner = cfg.study.samplers[cfg.study.sampler], cfg.study.pruners[cfg.study.pruner]
        assert sampler._target_.startswith("optuna.samplers.") and pruner._target_.startswith("optuna.pruners.")
    cfg = Composer(list(METHODS["tpe-hb2"].overrides)).base
    assert cfg.study.pruners[cfg.study.pruner].max_resource == cfg.trainer.max_epochs
    # the packed default: the default's sampler and pruner entries, then study.pack (and K times the trial cap)
    for k in (4, 8):
        packed = METHODS[f"tpe5-sh1-pack{k}"]
        assert packed.overrides == (*METHODS["tpe5-sh1"].overrides, f"study.pack={k}") and packed.max_trials_factor == k
        assert Composer(list(packed.overrides)).base.study.pack == k and "study.pack=" in packed.describe()
        shipped = METHODS[f"default-pack{k}"]  # conf as shipped, packed
        assert shipped.overrides == (f"study.pack={k}",) and shipped.max_trials_factor == k


def test_results_file_keeps_the_parts_not_run():
    old = merge_results("", "- Run A\n", {"overhead": ["### Overhead A\n"], "methods": ["### Methods A\n"]})
    new = merge_results(old, "- Run B\n", {"methods": ["### Methods B\n"]})
    assert "### Overhead A" in new and "- Run A" in new and "### Methods B" in new and "Methods A" not in new



def test_results_file_keeps_the_notes_kept_by_hand():
    """bench/results.md's notes block (the measurement history, the figures behind code choices) survives a run."""
    old = (Path(__file__).resolve().parents[1] / "bench" / "results.md").read_text()
    notes = old[old.index("<!-- part:notes -->"):old.index("<!-- /part:notes -->")]
    new = merge_results(old, "- Run B\n", {"overhead": ["### Overhead B\n"]})
    assert notes in new and "### Overhead B" in new and new.index(notes) > new.index("### Overhead B")


def test_methods_summary_counts_misses_as_the_caps():
    spec = replace(TASKS["digits"], max_trials=10, max_seconds=20.0)
    runs = [Run("digits", "random", 0, True, 5.0, 4), Run("digits", "random", 1, False, 21.0, 10),
            Run("digits", "random", 2, False, 19.5, 9), Run("digits", "tpe", 0, True, 2.0, 3)]
    result = MethodsResult({"digits": spec}, ["random", "tpe"], [0, 1, 2], [], runs)
    assert result.seconds("digits", "random") == [5.0, 21.0, 20.0] and result.median_is_bound("digits", "random")
    text = methods_markdown(result, "methods.png")
    assert "| random, no pruning | 1/3 | >=20.0 |" in text and "| TPE, no pruning | 1/1 | 2.0 |" in text


def test_methods_trace_of_a_pack_reads_each_member_at_the_check_that_saw_it():
    import optuna

    from bench.methods import _result

    trials = [optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=v) for v in (0.1, 0.3, 0.2, 0.9)]
    # two packs of two: the checks saw 2 finished trials at 1.5 CPU s, then 4 at 3.0
    run = _result(Run("digits", "tpe5-sh1-pack4", 0), trials, trials[0].datetime_start, 0.8, {2: 1.5, 4: 3.0})
    assert [cpu for cpu, _ in run.trace] == [1.5, 1.5, 3.0, 3.0] and run.reached and run.seconds == 3.0


# --- make gpu-check (bench/gpu_check.py): what runs without a GPU -------------------------------------------------

def test_gpu_check_without_a_gpu_says_so_in_one_line_and_exits_2():
    import os
    import subprocess
    import sys
    from pathlib import Path

    from bench import gpu_check

    assert gpu_check.main([], cuda_available=False) == 2
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check"], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA GPU visible to torch"), done.stderr


def test_gpu_check_table_from_fake_results():
    from bench.gpu_check import Row, render

    rows = [Row("tests", "bf16 training", "passed (3.1 s)"),
            Row("tests", "ddp on the gpus present", "skipped: DDP needs 2 or more GPUs; this machine has 1"),
            Row("overhead", "(a) plain PyTorch loop", "0.400 s/trial", 9000.0, 31.0),
            Row("packing", "pack K=1", "0.2000 s/trial", 18000.0, 20.0, k=1),
            Row("packing", "pack K=128", "0.0100 s/trial", 360000.0, 88.4, k=128),
            Row("packing compiled", "pack K=128", "0.0080 s/trial", 450000.0, None, k=128),
            Row("packing compiled", "-", "skipped: needs about 150 s, 40 s of the time limit left")]
    text = render(rows, "### GPU check: fake", seconds=312.4, limit=480)
    lines = text.splitlines()
    assert lines[0] == "### GPU check: fake"
    assert sum(line.startswith("|---") for line in lines) == 1  # one table
    table = [line for line in lines if line.startswith("| ")]
    assert table[0] == "| part | what | result | trials/hour | x pack K=1 (eager) | GPU util % |"
    assert len(table) == 1 + len(rows)
    assert "| tests | bf16 training | passed (3.1 s) |  |  |  |" in table
    assert "| overhead | (a) plain PyTorch loop | 0.400 s/trial | 9,000 |  | 31 |" in table
    assert "| packing | pack K=1 | 0.2000 s/trial | 18,000 | 1.00 | 20 |" in table
    assert "| packing | pack K=128 | 0.0100 s/trial | 360,000 | 20.00 | 88 |" in table
    assert "| packing compiled | pack K=128 | 0.0080 s/trial | 450,000 | 25.00 |  |" in table
    assert ("- packing: best pack K=128 (packing compiled) at 25.0x the trials per hour of pack K=1 (target >= 10)."
            in lines)
    assert "- 312 s in all (limit 480 s)." in lines


def test_gpu_check_skips_the_parts_that_would_run_past_the_time_limit():
    from bench.gpu_check import Part, Row, run_parts

    now = [1000.0]
    takes = {"tests": 90.0, "overhead": 120.0, "packing": 10.0}
    timeouts: dict[str, float] = {}

    def runner(part: Part, timeout: float) -> list[Row]:  # a part "runs" by moving the injected clock
        timeouts[part.name] = timeout
        now[0] += takes[part.name]
        return [Row(part.name, "x", "passed")]

    said: list[str] = []
    parts = [Part("tests", 100), Part("overhead", 100), Part("packing compiled", 100), Part("packing", 30)]
    rows = run_parts(parts, 250, runner, clock=lambda: now[0], say=said.append)
    # tests and overhead start (250 and 160 s left); 40 s left: the 100 s part is skipped, the 30 s one runs.
    assert timeouts == {"tests": 250, "overhead": 160, "packing": 40}
    assert [(r.part, r.result) for r in rows] == [
        ("tests", "passed"), ("overhead", "passed"),
        ("packing compiled", "skipped: needs about 100 s, 40 s of the time limit left"), ("packing", "passed")]
    assert "gpu-check: packing compiled skipped: needs about 100 s, 40 s of the time limit left" in said


def test_gpu_check_reads_the_tests_outcomes_from_pytests_report(tmp_path):
    from bench.gpu_check import junit_rows

    report = tmp_path / "junit.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_gpu" name="test_bf16_training" time="4.25"/>'
        '<testcase classname="tests.test_gpu" name="test_ddp_on_gpus" time="0.01">'
        '<skipped type="pytest.skip" message="DDP needs 2 or more GPUs; this machine has 1">why</skipped></testcase>'
        '<testcase classname="tests.test_gpu" name="test_packing" time="7.5">'
        '<failure message="AssertionError: assert False&#10;more">trace</failure></testcase>'
        '</testsuite></testsuites>')
    assert [(r.item, r.result) for r in junit_rows(report)] == [
        ("bf16 training", "passed (4.2 s)"),
        ("ddp on gpus", "skipped: DDP needs 2 or more GPUs; this machine has 1"),
        ("packing", "FAILED: AssertionError: assert False (7.5 s)")]


def test_gpu_check_stops_a_part_at_its_timeout_with_what_it_started(tmp_path):
    import os
    import sys

    from bench.gpu_check import run_child

    pid_file = tmp_path / "grandchild"
    script = ("import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    code, seconds = run_child([sys.executable, "-c", script], timeout=3)
    assert code is None and 3 <= seconds < 30
    grandchild = int(pid_file.read_text())

    def gone() -> bool:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            return True
        return False

    # SIGKILL is asynchronous: the grandchild goes within moments (init reaps it)
    wait_until(gone, "the part's own child to go after the timeout", 30)
    assert run_child([sys.executable, "-c", "raise SystemExit(3)"], timeout=30)[0] == 3


def test_gpu_check_runs_the_tests_marked_gpu_from_the_file_it_names():
    import importlib.util

    from bench.gpu_check import ROOT, TEST_FILE

    spec = importlib.util.spec_from_file_location("gpu_tests", ROOT / TEST_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "gpu" in [m.name for m in module.pytestmark]
    assert len([name for name in vars(module) if name.startswith("test_")]) >= 5


def test_packing_section_shows_gpu_utilization_on_a_gpu():
    from bench.packing import PackingResult, packing_markdown

    seconds = {"plain": [0.4], "lightning": [0.8], "pack 1": [0.3], "pack 8": [0.05]}
    result = PackingResult("digits", [1, 8], ["trainer.accelerator=gpu"], 1, seconds, "mlp", "cuda",
                           {"plain": 30.0, "lightning": None, "pack 1": 25.0, "pack 8": 71.6})
    text = packing_markdown(result)
    assert "(cuda, 1 torch threads" in text and "GPU util % |" in text
    assert "| (c) pack K=8 | 0.0500 | 72000 | 0.12 | 0.06 | 72 |" in text and "| n/a |" in text
    assert "GPU util" not in packing_markdown(PackingResult("digits", [1, 8], [], 1, seconds, "mlp"))


def test_gpu_check_command_prints_and_writes_one_table_and_its_results_block(tmp_path, monkeypatch, capsys):
    from bench import gpu_check
    from bench.__main__ import merge_results

    def fake_runner(args, scratch):
        def run(part, timeout):
            if part.name == "tests":
                return [gpu_check.Row("tests", "bf16 training", "passed (2.0 s)")]
            return [gpu_check.Row(part.name, "pack K=1", "0.1000 s/trial", 36000.0, 50.0, k=1)]
        return run

    monkeypatch.setattr(gpu_check, "child_runner", fake_runner)
    results = tmp_path / "results.md"
    results.write_text(merge_results("", "- Run A\n", {"overhead": ["### Overhead A\n"]}))
    out = tmp_path / "gpu-check.md"
    code = gpu_check.main(["--parts", "tests,packing", "--out", str(out), "--results-file", str(results)],
                          cuda_available=True)
    assert code == 0
    printed = capsys.readouterr().out
    table = out.read_text()
    assert table.startswith("- Run ") and "`python -m bench.gpu_check --parts tests,packing" in table
    assert "| tests | bf16 training | passed (2.0 s) |" in table and "| packing | pack K=1 |" in table
    assert table.strip() in printed and sum(line.startswith("|---") for line in table.splitlines()) == 1
    text = results.read_text()
    assert "### Overhead A" in text and "<!-- part:gpu-check -->" in text and "| packing | pack K=1 |" in text
    # make bench, run later for another part, keeps the gpu-check block
    assert "| packing | pack K=1 |" in merge_results(text, "- Run B\n", {"overhead": ["### Overhead B\n"]})
    failed = [gpu_check.Row("tests", "ddp", "FAILED: AssertionError")]
    monkeypatch.setattr(gpu_check, "child_runner", lambda args, scratch: lambda part, timeout: failed)
    assert gpu_check.main(["--parts", "tests", "--out", str(out), "--results-file", str(results)],
                          cuda_available=True) == 1


def test_gpu_check_rows_of_the_bench_parts_and_a_compile_that_fell_back(tmp_path, monkeypatch):
    """The parts' rows: the overhead part's from a made-up result (tests/test_bench.py runs it for real above), the
    packing part's from a real tiny run on the CPU (the command runs both on the GPU), with a compile that fails."""
    import bench.overhead
    import searchlab.packing.engine
    from bench.gpu_check import overhead_rows, packing_rows

    seconds = {way: [[0.5, 0.7], [0.6, 0.6]] for way in WAYS}  # per config, per repeat: 0.6 s a trial
    fake = OverheadResult("cuda", 2, 2, seconds, [], {}, {}, {way: 40.0 for way in WAYS})
    monkeypatch.setattr(bench.overhead, "run_overhead", lambda *args, **kwargs: fake)
    rows = overhead_rows(2, tmp_path)
    assert [r.item for r in rows] == [bench.overhead.NAMES[w] for w in WAYS]
    assert all(r.part == "overhead" and r.result == "0.600 s/trial" and r.per_hour == pytest.approx(6000)
               and r.util == 40.0 for r in rows)

    def broken(fn, device):
        def step(*args):
            raise RuntimeError("no compiler here")
        return step

    monkeypatch.setattr(searchlab.packing.engine, "compile_step", broken)
    monkeypatch.setattr(searchlab.packing.engine, "_compile_failure", None)
    tiny = ["model.width=16", "trainer.max_epochs=1", "trainer.limit_train_batches=2"]
    rows = packing_rows([1, 2], 1, compiled=True, device="cpu", extra=tiny)
    assert [(r.item, r.k) for r in rows] == [("pack K=1", 1), ("pack K=2", 2), ("torch.compile", None)]
    assert rows[-1].result == "fell back to eager: RuntimeError: no compiler here"
    assert all(r.part == "packing compiled" for r in rows)


def test_gpu_check_packing_part_says_what_study_pack_auto_chooses():
    """The eager packing part ends with the probe's choice (run here on the CPU, as the command runs it on the GPU):
    its size and why, with each size's gain."""
    from bench.gpu_check import packing_rows

    tiny = ["model.width=16", "trainer.max_epochs=1", "trainer.limit_train_batches=2"]
    rows = packing_rows([1], 1, compiled=False, device="cpu", extra=tiny)
    assert [r.item for r in rows][-1] == "study.pack=auto (the probe)"
    said = rows[-1].result
    assert said.startswith("packs of ") and "member-epochs per second against one: 1: 1.0x" in said


def test_study_packing_section_gives_each_pack_size_against_the_plain_loop():
    from bench.packing import StudyPackingResult, study_packing_markdown

    result = StudyPackingResult([1, 8], ["none"], 16, ["trainer.max_epochs=10"],
                                seconds={("none", 1): [0.24, 0.22], ("none", 8): [0.12, 0.13]},
                                epochs={("none", 1): [10.0, 10.0], ("none", 8): [10.0, 10.0]}, plain=[0.25, 0.23])
    table = study_packing_markdown(result)
    assert "| none | 1 | 0.230 | 15652 | 1.00 | 0.96 | 10.0 |" in table
    assert "| none | 8 | 0.125 | 28800 | 1.84 | 0.52 | 10.0 |" in table
    assert "0.240 s/trial" in table
