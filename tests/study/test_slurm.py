"""SLURM for real: the `sbatch` recipe of docs/several-machines.md on a one-node cluster (munged, slurmctld, slurmd on
127.0.0.1, Debian's slurm-wlm 22.05), run as written but CPU-sized: a job array of `searchlab worker`s sharing one
study, a task preempted with `scontrol requeue` (SIGTERM: checkpoint, re-queue, the requeued task resumes it) and a
task killed hard (`scancel --signal=KILL` of its worker step: another task's worker retries its trial through the
journal storage's pid check). The whole module takes minutes: each task starts a fresh worker (imports, preflight)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest
from helpers import SEARCHLAB, assert_one_run_per_trial, free_port, load_study, runs_of, stop, wait_until

from searchlab.training.checkpoints import CHECKPOINT_FILE, read_saved

pytestmark = pytest.mark.slurm

RECIPE_PAGE = Path(__file__).resolve().parents[2] / "docs" / "several-machines.md"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "sinfo", "srun")
# A requeued job may start again only after the job credential's lifetime (slurm.conf's cred_expire, 120 s by
# default); 10 s here, and a scheduling pass every second instead of every minute, keep the preemption test short.
CRED_EXPIRE_S = 10
JOB_SECONDS = 300  # generous: the machine running the tests may be shared
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE"}
# Slow enough epochs to act mid-trial, a checkpoint at every epoch end, no model logged (no worker logs one).
LONG = ["study.pruner=none", "data.batch_size=16", "model.width=32", "model.batch_norm=false",
        "trainer.checkpoint_every_n_epochs=1", "tracking.log_models=none"]


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


@dataclass(frozen=True)
class Slurm:
    """The running cluster: its clients' environment (SLURM_CONF) and helpers a cluster user would type."""

    conf: Path
    env: dict[str, str]
    jobs: list[str] = field(default_factory=list)  # submitted by the running test: cancelled after it

    def __call__(self, *args: str) -> str:
        result = subprocess.run([_which(args[0]) or args[0], *args[1:]], env=self.env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, f"{' '.join(args)}: {result.stderr or result.stdout}"
        return result.stdout

    def submit(self, script: str, folder: Path) -> str:
        """sbatch from `folder` (the job's working folder and logs); returns the job id."""
        path = folder / "search.sbatch"
        path.write_text(script)
        job = self("sbatch", "--parsable", f"--chdir={folder}", f"--output={folder}/slurm-%A_%a.out",
                   str(path)).strip()
        self.jobs.append(job)
        return job

    def tasks(self, job: str) -> dict[str, dict[str, str]]:
        """The job's array tasks by task id (a pending range stays one record, e.g. "1-2"): JobState, Restarts, ..."""
        records = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in self("scontrol", "-o", "show", "job", job)
                   .splitlines() if line.strip()]
        return {r.get("ArrayTaskId", r["JobId"]): r for r in records}

    def wait_done(self, job: str, timeout: float = JOB_SECONDS) -> dict[str, dict[str, str]]:
        def done() -> dict[str, dict[str, str]] | None:
            tasks = self.tasks(job)
            return tasks if all(t["JobState"] in FINAL for t in tasks.values()) else None

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tasks = done()
            if tasks:
                return tasks
            time.sleep(0.2)
        raise AssertionError(f"job {job} not done within {timeout:.0f}s: {self.tasks(job)}")


def _slurm_conf(root: Path, socket_path: Path) -> str:
    """A one-node cluster on 127.0.0.1: 2 CPUs, one default partition, no cgroups, no accounting, all as root."""
    return "\n".join([
        "ClusterName=searchlab-test",
        "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={socket_path},cred_expire={CRED_EXPIRE_S}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "SchedulerType=sched/builtin",
        "SchedulerParameters=sched_interval=1",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",  # one CPU per array task: two tasks run at once
        "MinJobAge=600",  # finished jobs stay visible to `scontrol show job` for the test's assertions
        "ReturnToService=2",
        "NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN",
        "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


@pytest.fixture(scope="module")
def cluster() -> Iterator[Slurm]:
    """munged, slurmctld and slurmd in the foreground, config, key, state and logs in a temp dir; every job cancelled
    and the daemons stopped after."""
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)} not found): `make system` installs Debian's "
                    "slurm-wlm, slurmctld, slurmd and munge")
    if os.geteuid() != 0:
        pytest.skip("the one-node SLURM cluster needs root (munged, slurmctld and slurmd run as root)")
    root = Path(tempfile.mkdtemp(prefix="searchlab-slurm-"))
    root.chmod(0o755)  # munged wants its socket's folder reachable by all
    for folder in ("state", "spool", "munge"):
        (root / folder).mkdir()
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    socket_path = root / "munge.socket"
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, socket_path))
    # The jobs inherit this environment (sbatch's default --export=ALL); none of an outer SLURM job's settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["SLURM_CONF"] = str(conf)
    cluster = Slurm(conf, env)
    processes: list[subprocess.Popen] = []

    def start(command: list[str], log: Path) -> subprocess.Popen:
        with log.open("wb") as out:
            processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True))
        return processes[-1]

    def answers(*command: str) -> bool:
        return subprocess.run([_which(command[0]), *command[1:]], env=env, capture_output=True).returncode == 0

    try:
        munged = start([_which("munged"), "--foreground", f"--socket={socket_path}", f"--key-file={key}",
                        f"--pid-file={root / 'munge' / 'munged.pid'}", f"--seed-file={root / 'munge' / 'seed'}",
                        f"--log-file={root / 'munge' / 'munged.log'}"], root / "munged.out")
        wait_until(socket_path.exists, "munged", 30, munged, root / "munge" / "munged.log")
        ctld = start([_which("slurmctld"), "-D", "-i", "-f", str(conf)], root / "slurmctld.out")
        wait_until(lambda: answers("scontrol", "ping"), "slurmctld", 60, ctld, root / "slurmctld.log")
        slurmd = start([_which("slurmd"), "-D", "-N", "localhost", "-f", str(conf)], root / "slurmd.out")
        wait_until(lambda: cluster("sinfo", "-h", "-N", "-o", "%T").strip() == "idle", "slurmd (node idle)", 60,
                   slurmd, root / "slurmd.log")
        yield cluster
    finally:
        for process in reversed(processes):
            stop(process, timeout=10)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def slurm(cluster: Slurm) -> Iterator[Slurm]:
    """The cluster for one test; its jobs are cancelled after it (a failed test leaves no workers to the next)."""
    yield cluster
    jobs, cluster.jobs[:] = list(cluster.jobs), []
    for job in jobs:
        if any(t["JobState"] not in FINAL for t in cluster.tasks(job).values()):
            cluster("scancel", "--full", job)
            cluster.wait_done(job, timeout=60)


def docs_recipe() -> str:
    """The `sbatch` script of the docs' SLURM section, as a user copies it."""
    text = RECIPE_PAGE.read_text()
    section = text[text.index("**5. SLURM**"):]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, f"{RECIPE_PAGE}: no ```bash block after **5. SLURM**"
    return match.group(1)


def _edit(script: str, pattern: str, replacement: str) -> str:
    edited, count = re.subn(pattern, lambda _: replacement, script)
    assert count == 1, f"the docs' SLURM recipe has no (single) {pattern!r}: update this test to the recipe"
    return edited


def cpu_sized(tmp_path: Path, array: str, name: str, n_trials: int, settings: list[str],
              artifact_root: str = "null") -> str:
    """The docs' recipe with only what this machine and the test need changed: the array's size, one worker of one
    CPU per task (no GPUs), a short time limit, the venv's searchlab, this test's study, stores and training."""
    env_file = tmp_path / "searchlab-env"
    env_file.write_text(f"export SEARCHLAB_STORAGE={tmp_path}/optuna.journal\n")
    env_file.chmod(0o600)
    script = docs_recipe()
    script = _edit(script, r"--array=\S+", f"--array={array}")
    script = _edit(script, r"#SBATCH --gpus-per-node=.*\n", "")
    script = _edit(script, r"--ntasks-per-node=\d+", "--ntasks-per-node=1")
    script = _edit(script, r"--cpus-per-task=\d+", "--cpus-per-task=1")
    script = _edit(script, r"--time=\S+", "--time=10:00")
    script = _edit(script, r"~/\.searchlab-env", str(env_file))
    script = _edit(script, r"exec searchlab worker", f"exec {SEARCHLAB} worker")
    script = _edit(script, r"study\.name=\S+ study\.n_trials=\d+", f"study.name={name} study.n_trials={n_trials}")
    script = _edit(script, r"tracking\.uri=\S+", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    return _edit(script, r"tracking\.artifact_root=null'", f"tracking.artifact_root={artifact_root} "
                 + " ".join(settings) + "'")


def _log(tmp_path: Path, job: str, task: str) -> str:
    path = tmp_path / f"slurm-{job}_{task}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def _printed_complete(tmp_path: Path, job: str, task: str, number: int) -> bool:
    """Whether the task's worker printed trial `number` as finished (the survivor ran the retry)."""
    return re.search(rf"trial\s+{number}\s+COMPLETE", _log(tmp_path, job, task)) is not None


def _checkpoint_epoch(tmp_path: Path, name: str, number: int) -> int:
    saved = read_saved(tmp_path / "artifacts" / name / "checkpoints" / f"trial-{number}" / CHECKPOINT_FILE)
    return 0 if saved is None else saved.epoch


def checkpointed(tmp_path: Path, name: str, epoch: int) -> list[optuna.trial.FrozenTrial]:
    """The study's RUNNING trials whose worker recorded itself and whose checkpoint is of `epoch` or later."""
    if not (tmp_path / "optuna.journal").exists():
        return []
    try:
        running = load_study(tmp_path, name).get_trials(states=(optuna.trial.TrialState.RUNNING,))
    except KeyError:  # the study is not created yet
        return []
    return [t for t in running if "worker.pid" in t.user_attrs and _checkpoint_epoch(tmp_path, name, t.number) >= epoch]


def poll(what: str, ready: Callable[[], Any], slurm: Slurm, job: str, timeout: float = JOB_SECONDS) -> Any:
    """Polls ready() until it returns something truthy; fails at once when a task of the job has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        tasks = slurm.tasks(job)
        assert not any(t["JobState"] in FINAL for t in tasks.values()), f"a task ended before {what}: {tasks}"
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout:.0f}s")


def assert_budget_exact(tmp_path: Path, name: str, n_trials: int) -> optuna.Study:
    study = load_study(tmp_path, name)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    assert len([t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]) == n_trials
    assert not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]
    assert_one_run_per_trial(tmp_path, name, study)
    return study


def test_the_docs_recipe_runs_a_job_array_on_one_study_with_an_exact_budget(slurm, tmp_path):
    job = slurm.submit(cpu_sized(tmp_path, "0-1", "array", 6, ["trainer.max_epochs=2", "model.width=32"]), tmp_path)
    tasks = slurm.wait_done(job)
    assert sorted(tasks) == ["0", "1"], tasks
    for task, record in tasks.items():  # each task ran a worker that joined the study and ended cleanly
        log = _log(tmp_path, job, task)
        assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (record, log)
        assert "study 'array'" in log and "Traceback" not in log, log
    assert_budget_exact(tmp_path, "array", 6)  # not 12: the budget is the study's, whichever task runs a trial


def test_a_requeued_task_checkpoints_its_trial_and_resumes_it_when_it_starts_again(slurm, tmp_path):
    # Epochs of ~30 ms on the packing engine: 150 make a trial of ~5 s, so scontrol requeue lands mid-trial (with 30
    # the trial ended before the SIGTERM arrived on a loaded CI run, and the interrupt hit its bookkeeping instead).
    epochs = 150
    script = cpu_sized(tmp_path, "0-0", "requeue", 1, [f"trainer.max_epochs={epochs}", *LONG],
                       artifact_root=f"{tmp_path}/artifacts")
    job = slurm.submit(script, tmp_path)
    (running,) = poll("running trial with a checkpoint", lambda: checkpointed(tmp_path, "requeue", 2), slurm, job)
    slurm("scontrol", "requeue", f"{job}_0")  # what a preemption with PreemptMode=REQUEUE does: SIGTERM, requeue
    (task,) = slurm.wait_done(job).values()
    log = _log(tmp_path, job, "0")
    assert task["JobState"] == "COMPLETED" and task["Restarts"] == "1", (task, log)

    stopped, retry = load_study(tmp_path, "requeue").trials
    assert stopped.number == running.number and stopped.state.name == "FAIL", stopped
    reason = stopped.user_attrs["reason"]
    saved_epoch = int(re.search(r"terminated \(SIGTERM\); resumable from its checkpoint of epoch (\d+)", reason)[1])
    assert saved_epoch >= 2
    assert retry.state.name == "COMPLETE" and retry.params == stopped.params
    assert retry.user_attrs["retry_of"] == stopped.number
    assert retry.user_attrs["worker.pid"] != stopped.user_attrs["worker.pid"]  # the requeued task's worker
    assert retry.user_attrs["resumed_from_epoch"] == saved_epoch  # nothing lost but the epoch under way
    assert retry.user_attrs["epochs_trained"] == epochs - saved_epoch
    # The log keeps both runs of the task (--open-mode=append): the preempted worker's exit, then the resume.
    assert "terminated (SIGTERM)" in log and f"(resumed from epoch {saved_epoch})" in log, log
    by_number = assert_one_run_per_trial(tmp_path, "requeue", load_study(tmp_path, "requeue"))
    client, _, _ = runs_of(tmp_path, "requeue")
    run = by_number[retry.number]
    assert run.data.tags["searchlab.resumed_from_epoch"] == str(saved_epoch)
    assert run.data.tags["searchlab.continues_run"] == stopped.user_attrs["mlflow_run_id"]
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc"))
    assert steps == list(range(1, epochs + 1))  # one curve over the whole training


def _array_task_of(pid: int) -> str:
    """The array task a worker process runs in, from its environment (SLURM sets it in every task)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    values = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
    return values["SLURM_ARRAY_TASK_ID"]


def test_a_task_killed_hard_has_its_trial_retried_by_another_task_from_its_checkpoint(slurm, tmp_path):
    epochs = 30  # as above: the kill lands mid-trial
    script = cpu_sized(tmp_path, "0-1", "killed", 4, [f"trainer.max_epochs={epochs}", *LONG],
                       artifact_root=f"{tmp_path}/artifacts")
    job = slurm.submit(script, tmp_path)

    def victims() -> list[optuna.trial.FrozenTrial]:  # once both tasks' workers are on the study: one can retry
        joined = all("study 'killed'" in _log(tmp_path, job, task) for task in ("0", "1"))
        return checkpointed(tmp_path, "killed", 2) if joined else []

    victim, *_ = poll("running trial with a checkpoint", victims, slurm, job)
    doomed = _array_task_of(victim.user_attrs["worker.pid"])
    # SIGKILL to the task's worker step alone, with no SIGTERM first, so no checkpoint is written on the way out
    # (`scancel --signal=KILL JOB` without the step cancels the job as plain scancel does: SIGTERM first).
    slurm("scancel", "--signal=KILL", f"{job}_{doomed}.0")
    tasks = slurm.wait_done(job)
    survivor = "1" if doomed == "0" else "0"
    assert tasks[doomed]["JobState"] == "FAILED" and tasks[doomed]["Restarts"] == "0", tasks
    assert "task 0: Killed" in _log(tmp_path, job, doomed)
    assert tasks[survivor]["JobState"] == "COMPLETED", (tasks, _log(tmp_path, job, survivor))

    study = assert_budget_exact(tmp_path, "killed", 4)
    lost = study.trials[victim.number]
    assert lost.state.name == "FAIL"
    assert lost.user_attrs["reason"] == (f"worker {victim.user_attrs['worker.pid']} on "
                                         f"{victim.user_attrs['worker.host']} died mid-trial; params re-queued")
    (retry,) = [t for t in study.trials if t.user_attrs.get("retry_of") == victim.number]
    assert retry.state.name == "COMPLETE" and retry.params == victim.params
    assert _printed_complete(tmp_path, job, survivor, retry.number)
    resumed_from = retry.user_attrs["resumed_from_epoch"]
    assert resumed_from >= 2 and retry.user_attrs["epochs_trained"] == epochs - resumed_from
    _, _, children = runs_of(tmp_path, "killed")
    (run,) = [r for r in children if r.info.run_id == victim.user_attrs["mlflow_run_id"]]
    assert run.info.status == "FAILED" and "died mid-trial" in run.data.tags["optuna.trial.reason"]
