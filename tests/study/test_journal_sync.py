"""storage.JournalFile: a trial's journal writes are visible to other processes at once and fsynced once, at the end
of the block; outside a block every write is fsynced, as Optuna's own backend does."""

from __future__ import annotations

import contextlib
import os
import signal

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from searchlab.study.storage import JournalFile, one_sync, open_storage


def test_writes_of_a_block_are_read_at_once_and_fsynced_once(tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "optuna.journal")
    storage = open_storage(path)
    assert isinstance(storage._backend, JournalFile)
    study = optuna.create_study(study_name="s", storage=storage)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    other = JournalStorage(JournalFileBackend(path))  # another process's view of the file
    with one_sync(storage):
        trial = study.ask()
        trial.set_user_attr("a", 1)
        for step in range(5):
            trial.report(0.1 * step, step)
        seen = optuna.load_study(study_name="s", storage=other).trials[0]
        assert seen.user_attrs == {"a": 1} and len(seen.intermediate_values) == 5
        assert synced == []
        study.tell(trial, 1.0)
    assert len(synced) == 1
    study.tell(study.ask(), 2.0)  # outside a block: Optuna's fsync per write
    assert len(synced) == 3
    assert [t.value for t in optuna.load_study(study_name="s", storage=other).trials] == [1.0, 2.0]


def test_other_storages_write_as_always(tmp_path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/o.db")
    with one_sync(storage):
        optuna.create_study(study_name="s", storage=storage).optimize(lambda t: 1.0, n_trials=1)


@pytest.mark.parametrize("in_block", [False, True], ids=["fsync-each", "one-sync"])
def test_an_interrupt_during_a_write_waits_for_the_lock_to_be_released(tmp_path, monkeypatch, in_block) -> None:
    """Ctrl-C landing just after the journal's lock is taken (before Optuna's get_lock_file enters its try) left the
    lock file behind: the study's other workers then waited its 30 s grace period (CI: a worker killed after
    Ctrl-C, its trial re-queued). The interrupt now comes once the write is done and the lock released."""
    backend = JournalFile(str(tmp_path / "optuna.journal"))
    taken = backend._lock.acquire

    def taken_then_interrupted() -> bool:
        got = taken()
        signal.raise_signal(signal.SIGINT)  # its handler runs before this returns: between acquire and the try
        return got

    monkeypatch.setattr(backend._lock, "acquire", taken_then_interrupted)
    with pytest.raises(KeyboardInterrupt), (one_sync_of(backend) if in_block else contextlib.nullcontext()):
        backend.append_logs([{"op_code": 0, "worker_id": "w", "study_name": "s", "directions": [1]}])
    assert not os.path.lexists(backend._lock._lock_file)
    assert list(backend.read_logs(0)) == [{"op_code": 0, "worker_id": "w", "study_name": "s", "directions": [1]}]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def one_sync_of(backend: JournalFile) -> contextlib.AbstractContextManager[None]:
    return backend.one_sync()
