"""trainer.compile for packed trials (searchlab.packing), on the CPU: `auto` stays eager here, a compile that fails
falls back to the eager step with one line, and a step traced by torch.compile trains as the eager one.

Tolerances: the fallback redoes the failed step eagerly from the same state, so its metrics equal eager's exactly.
The traced step (torch.compile with the aot_eager backend: Dynamo and AOTAutograd trace forward and backward, no code
generation, so no C++ compiler or minutes of compiling on this machine) runs the same float32 ops, possibly in another
order after decomposition: losses within 1e-5 relative, as tests/packing/test_pack.py holds a pack to a lone trial.
"""

from __future__ import annotations

import pytest
import torch

import searchlab.packing.engine as pack_module
from searchlab.config import Composer, ConfigError
from searchlab.packing.engine import PackedTraining, use_compile

BASE = ["trainer.max_epochs=2", "trainer.limit_train_batches=4", "model.width=16", "study.metric=val_loss"]
MEMBERS = [{"optimizer.lr": 0.003}, {"optimizer.lr": 0.01, "optimizer.weight_decay": 1e-3}]
REL, ABS = 1e-5, 1e-6


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch):
    """No failure remembered from another test: each starts as a new process would."""
    monkeypatch.setattr(pack_module, "_compile_failure", None)


def _histories(composer: Composer, digits, setting: object, extra: dict | None = None,
               path: str = "auto") -> tuple[PackedTraining, list[list[dict]]]:
    pack = PackedTraining([composer({**m, **(extra or {}), "trainer.compile": setting}) for m in MEMBERS], digits,
                          path=path)
    results = pack.fit()
    return pack, [[{k: v for k, v in e.items() if k != "epoch_seconds"} for e in r.history] for r in results]


def test_the_setting_is_checked_and_auto_compiles_on_a_gpu_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert [use_compile(s, cpu) for s in (False, True, "auto")] == [False, True, False]
    assert [use_compile(s, cuda) for s in (False, True, "auto")] == [False, True, True]
    for bad in ("yes", 1, None):
        with pytest.raises(ConfigError, match=r"^trainer\.compile: expected false, true or auto"):
            use_compile(bad, cpu)


def test_auto_trains_eagerly_on_the_cpu(composer, digits, monkeypatch):
    def never(fn, device):
        raise AssertionError("trainer.compile=auto compiled on a CPU")

    monkeypatch.setattr(pack_module, "compile_step", never)
    pack, histories = _histories(composer, digits, "auto")
    assert pack.compiled is False and all(len(h) == 2 for h in histories)


def test_a_failing_compiler_trains_eagerly_with_one_line_and_the_eager_result(composer, digits, monkeypatch, capsys):
    _, eager = _histories(composer, digits, False)
    calls = []

    def broken(fn, device):
        calls.append(device)

        def step(*args):
            raise RuntimeError("InductorError: no working C++ compiler\nmore detail")
        return step

    monkeypatch.setattr(pack_module, "compile_step", broken)
    pack, fallen_back = _histories(composer, digits, True)
    assert pack.compiled is True and pack._compiled_loss is None  # it tried, then went eager
    assert fallen_back == eager  # exact: the failed step was redone eagerly from the same state
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["searchlab: trainer.compile: torch.compile failed (RuntimeError: InductorError: no working C++ "
                   "compiler); packs train eagerly"]
    # The next pack of this process does not try again, and says nothing more.
    pack, again = _histories(composer, digits, True)
    assert pack.compiled is False and len(calls) == 1 and again == eager
    assert capsys.readouterr().err == ""


# Batch norm on both paths: its running statistics are updated in place inside the traced step.
@pytest.mark.parametrize("path, extra", [("mlp", {}), ("mlp", {"model.batch_norm": True}),
                                         ("vmap", {"model.batch_norm": True})])
def test_a_traced_step_trains_as_the_eager_one(composer, digits, monkeypatch, path, extra):
    _, eager = _histories(composer, digits, False, extra, path)
    torch._dynamo.reset()
    monkeypatch.setattr(pack_module, "compile_step", lambda fn, device: torch.compile(fn, backend="aot_eager"))
    pack, traced = _histories(composer, digits, True, extra, path)
    assert pack.path == path
    assert pack._compiled_loss is not None and pack_module._compile_failure is None  # no fallback happened
    for t_epochs, e_epochs in zip(traced, eager, strict=True):
        for t, e in zip(t_epochs, e_epochs, strict=True):
            for key in e:
                assert t[key] == pytest.approx(e[key], rel=REL, abs=ABS if key != "val_acc" else 3e-3), key
    torch._dynamo.reset()
