"""What needs an NVIDIA GPU, run by `make gpu-check` (bench/gpu_check.py); every test here is skipped without CUDA, so
`make test` passes on any machine. Trainings are tiny (digits, a 2x32 MLP, 2 epochs): these check that each path
works on a GPU, the bench parts of `make gpu-check` measure how fast."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import load_model, load_study

import searchlab.packing.engine as pack_module
from searchlab.attrs import MLFLOW_RUN_ID, WORKER_PID
from searchlab.cli import main
from searchlab.config import Composer
from searchlab.devices import cpu_count, detect_gpus, plan_workers, worker_env
from searchlab.packing.engine import PackedTraining
from searchlab.training import fit
from searchlab.training.build import load_data
from searchlab.training.lightning import resolve_device, resolve_precision

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = ["trainer.max_epochs=2", "model.width=32", "trainer.accelerator=gpu"]
FINISHED = ("COMPLETE", "PRUNED")


def _finite(history: list[dict[str, float]]) -> bool:
    return all(math.isfinite(v) for epoch in history for v in epoch.values())


@pytest.fixture(scope="module")
def composer() -> Composer:
    return Composer(TINY)


@pytest.fixture(scope="module")
def on_gpu(composer: Composer):
    """The digits splits, resident on the first GPU as a trial's data is."""
    return load_data(composer.base).to(resolve_device("gpu"))


def test_bf16_training_is_what_precision_auto_gives_and_it_learns(composer, on_gpu):
    if not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name(0)} has no bf16: precision auto is 32-true there")
    cfg = composer.base
    assert cfg.trainer.precision == "auto"
    assert resolve_precision(cfg.trainer.precision, on_gpu.x_train.device) == "bf16-mixed"
    result = fit(cfg, on_gpu)
    assert len(result.history) == 2 and _finite(result.history)
    assert result.best("val_acc", "maximize") > 0.5  # ten classes: chance is 0.1


def test_workers_auto_runs_one_worker_per_gpu_each_seeing_only_its_own(tmp_path, store_overrides, capsys):
    gpus = detect_gpus("auto")
    slots = plan_workers("auto", gpus, cpu_count())
    assert [s.cuda_visible_devices for s in slots] == gpus
    probe = "import torch; print(torch.cuda.device_count(), torch.cuda.get_device_properties(0).uuid)"
    seen = []
    for slot in slots:  # what a worker's process sees, with the environment the parent gives it
        out = subprocess.run([sys.executable, "-c", probe], env=worker_env(slot, dict(os.environ)),
                             capture_output=True, text=True, check=True).stdout.split()
        assert out[0] == "1", f"worker for GPU {slot.cuda_visible_devices} sees {out[0]} GPUs"
        seen.append(out[1])
    assert len(set(seen)) == len(slots)  # a different GPU each
    # A real study: one worker process per GPU (this process itself with one GPU), every trial finished.
    n = 2 * len(gpus)
    assert main(["search", "workers=auto", "study.name=pergpu", f"study.n_trials={n}", "study.pruner=none",
                 "tracking.log_models=none", *TINY, *store_overrides]) == 0
    if len(gpus) > 1:
        assert f"; {len(gpus)} workers" in capsys.readouterr().out
    trials = load_study(tmp_path, "pergpu").trials
    assert sum(t.state.name in FINISHED for t in trials) == n
    pids = {t.user_attrs[WORKER_PID] for t in trials}
    assert len(pids) <= len(gpus) and (len(gpus) > 1 or pids == {os.getpid()})


@pytest.mark.ddp
def test_ddp_trains_one_trial_over_the_gpus_present(composer):
    count = torch.cuda.device_count()
    if count < 2:
        pytest.skip(f"DDP needs 2 or more GPUs; this machine has {count}")
    cfg = Composer(["trainer=ddp", *TINY, f"trainer.devices={count}"]).base
    result = fit(cfg, load_data(cfg))
    assert len(result.history) == 2 and _finite(result.history) and result.stop_reason is None
    assert result.best("val_acc", "maximize") > 0.5


def test_packing_in_bf16_trains_every_member(tmp_path, store_overrides, composer, on_gpu):
    cfgs = [composer({"optimizer.lr": lr}) for lr in (1e-3, 3e-3, 1e-2, 3e-2)]
    pack = PackedTraining(cfgs, on_gpu)
    assert pack.bf16 == torch.cuda.is_bf16_supported() and pack.device.type == "cuda"
    results = pack.fit()
    assert all(len(r.history) == 2 and _finite(r.history) for r in results)
    # study.pack=4 in a real study on the GPU: four trials, each its own trial with a finite value.
    assert main(["search", "study.pack=4", "study.name=packed", "study.n_trials=4", "study.pruner=none",
                 "tracking.log_models=none", *TINY, *store_overrides]) == 0
    trials = load_study(tmp_path, "packed").trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4 and all(math.isfinite(t.value) for t in trials)


def test_a_compiled_pack_uses_torch_compile_and_trains_as_the_eager_one(composer, on_gpu, monkeypatch):
    """trainer.compile=true on the GPU (CUDA graphs): no fallback, and in float32 the losses agree with the eager
    pack's within 1e-3 relative (compiled kernels may sum in another order; TF32 stays off in both)."""
    monkeypatch.setattr(pack_module, "_compile_failure", None)
    members = [{"optimizer.lr": lr, "trainer.precision": "32-true"} for lr in (1e-3, 1e-2)]

    def histories(setting: bool) -> tuple[PackedTraining, list]:
        pack = PackedTraining([composer({**m, "trainer.compile": setting}) for m in members], on_gpu)
        return pack, [r.history for r in pack.fit()]

    _, eager = histories(False)
    pack, compiled = histories(True)
    assert pack._compiled_loss is not None and pack_module._compile_failure is None, pack_module._compile_failure
    for c, e in zip(compiled, eager, strict=True):
        for key in ("train_loss", "val_loss"):
            assert [m[key] for m in c] == pytest.approx([m[key] for m in e], rel=1e-3), key


def test_the_model_logged_from_a_gpu_trial_loads_and_predicts_on_the_cpu(tmp_path, store_overrides, composer):
    assert main(["search", "study.name=logged", "study.n_trials=2", "study.pruner=none", "tracking.log_models=best",
                 *TINY, *store_overrides]) == 0
    best = load_study(tmp_path, "logged").best_trial
    model = load_model(f"sqlite:///{tmp_path}/mlflow.db", f"runs:/{best.user_attrs[MLFLOW_RUN_ID]}/model")
    test = load_data(composer.base)  # on the CPU
    with torch.no_grad():
        out = model(test.x_test)
    assert out.device.type == "cpu" and out.shape == (len(test.x_test), 10)
    assert (out.argmax(1) == test.y_test).float().mean().item() > 0.5

