"""Smoke runs of `make bench`'s parts (tiny sizes): they produce their outputs, well-formed. Timings are not checked:
the benchmark itself (`make bench`) reports them."""

from __future__ import annotations

import time

import pytest

from bench.__main__ import main
from bench.devices import UtilizationSampler, device_overrides, pick_device
from bench.efficiency import METHODS, SearchRun, _best_at
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


def test_efficiency_and_results_file_from_the_command(tmp_path):
    # A target every run reaches at once, and caps that end a run that does not: all outputs, in seconds.
    assert main(["--parts", "efficiency", "--out", str(tmp_path), "--seeds", "1", "--max-trials", "2",
                 "--max-seconds", "30", "--targets", "0.3,0.5", "--extra", *TINY]) == 0
    text = (tmp_path / "results.md").read_text()
    assert "Machine:" in text and "to 0.3: searchlab / random **" in text and "to 0.5: searchlab / random **" in text
    for method in METHODS:
        assert f"| 0.3 | {method} | " in text and f"| 0.5 | {method} | " in text
    png = (tmp_path / "efficiency.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_a_run_that_misses_the_target_counts_as_the_caps():
    run = SearchRun("random, no pruning", 0, trace=[(1.0, 1, 0.5), (2.0, 2, None), (3.0, 3, 0.7)])
    assert run.cost(0.9, 60.0, 40) == (60.0, 40)
    assert [_best_at(run, t) for t in (0.5, 1.5, 3.5)] == [None, 0.5, 0.7]
    run.reached[0.9] = (3.0, 3)
    assert run.cost(0.9, 60.0, 40) == (3.0, 3) and run.cost(0.95, 60.0, 40) == (60.0, 40)


def test_part_timer_is_exclusive_and_restores_what_it_wrapped():
    class Work:
        def outer(self) -> None:
            time.sleep(0.02)
            self.inner()

        def inner(self) -> None:
            time.sleep(0.03)

    work, timer = Work(), PartTimer()
    timer.patch(work, "outer")
    timer.patch(Work, "inner")
    work.outer()
    assert timer.take() == {}  # inactive: calls pass through
    timer.active = True
    work.outer()
    parts = timer.take()
    assert set(parts) == {"outer", "outer/inner"}
    assert 0.015 < parts["outer"] < 0.03 and parts["outer/inner"] >= 0.03
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
    time.sleep(0.05)
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


@pytest.mark.skipif(not scaling_available(), reason="needs `workers=` in the config (the workers branch)")
def test_scaling_smoke_runs_the_command_with_each_number_of_workers(tmp_path):
    result = run_scaling(tmp_path, [1, 2], trials=2, repeats=1, device="cpu", extra=["model.width=32"])
    assert set(result.runs) == {1, 2} and all(whole > 0 and steady > 0 for (whole, steady), in result.runs.values())
    assert "| 2 |" in scaling_markdown(result)
