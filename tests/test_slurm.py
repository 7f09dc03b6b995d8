"""SLURM for real: scripts/local_slurm.sh starts a single-node cluster (munged, slurmctld, slurmd)
and Hydra multiruns go through it with hydra/launcher=slurm, as the README shows.

Needs Debian's slurm-wlm and munge and root (make test installs them as root): without them the
cluster tests skip, and fail under CI=true. The cluster has no accounting (no slurmdbd), like many
small clusters: sacct fails there, and the launcher must do without it.
"""

import csv
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import documented_shell_lines

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "local_slurm.sh"
NEEDED = ["munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol"]


def readme_command(tasks: int = 1) -> list[str]:
    """The arguments of the documented SLURM command on one machine whose jobs have ``tasks``
    tasks (1: the sweep, 2: one data-parallel run); the tests run those commands."""
    pattern = r"^python train\.py -m hydra/launcher=slurm .*partition=local"
    lines = [line for line in documented_shell_lines() if re.match(pattern, line)]
    (line,) = [
        line
        for line in lines
        if f"tasks_per_node={tasks} " in line or (tasks == 1 and "tasks_per_node" not in line)
    ]
    return shlex.split(line, comments=True)[2:]


# ---------------------------------------------------------------- no cluster needed
def test_error_line_finds_what_went_wrong_in_a_job_log(tmp_path):
    from hydra_plugins.importance_sampling_slurm.slurm_launcher import error_line

    log = tmp_path / "log.err"
    log.write_text(
        "error: sampler: sampler.batch_size must be an integer >= 1, got -3\n"
        "srun: error: node1: task 0: Exited with exit code 1\n"
    )
    assert error_line(log) == "error: sampler: sampler.batch_size must be an integer >= 1, got -3"
    log.write_text(
        "submitit WARNING - Bypassing signal SIGTERM\n"
        "slurmstepd: error: *** JOB 7 ON node1 CANCELLED AT 2026-01-01T00:00:00 ***\n"
        "srun: forcing job termination\n"
    )
    assert (
        error_line(log)
        == "slurmstepd: error: *** JOB 7 ON node1 CANCELLED AT 2026-01-01T00:00:00 ***"
    )
    log.write_text("Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory\n")
    assert error_line(log) == "RuntimeError: CUDA out of memory"
    assert error_line(tmp_path / "missing.err") == "(no log)"


def test_squeue_states_expands_arrays_and_treats_forgotten_jobs_as_absent(tmp_path, monkeypatch):
    """squeue's own output format, from a stand-in squeue (the cluster tests run the real one)."""
    from hydra_plugins.importance_sampling_slurm.slurm_launcher import squeue_states

    fake = tmp_path / "squeue"
    fake.write_text(
        "#!/bin/sh\n"
        'echo "$@" > "$(dirname "$0")/args"\n'
        'case "$*" in *--jobs=99*) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1;; esac\n'
        "printf '12_0 COMPLETED\\n12_1 RUNNING\\n12_[2-4%%2] PENDING\\n13 FAILED\\n'\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    states = squeue_states(["12_0", "12_3", "13"])
    assert states == {
        "12_0": "COMPLETED",
        "12_1": "RUNNING",
        "12_2": "PENDING",
        "12_3": "PENDING",
        "12_4": "PENDING",
        "13": "FAILED",
    }
    assert "--jobs=12,13" in (tmp_path / "args").read_text()  # one call for all the jobs
    assert squeue_states(["99_0"]) == {}  # ended more than MinJobAge ago: no longer listed


class FakeJob:
    """A finished submitit job of ``num_tasks`` tasks: the files it leaves, as submitit names
    them (``<job>_<task>_log.err``, ``<job>_<task>_result.pkl``)."""

    def __init__(self, folder: Path, num_tasks: int):
        self.folder, self.num_tasks = folder, num_tasks

    def task(self, k: int):
        from types import SimpleNamespace

        return SimpleNamespace(
            paths=SimpleNamespace(
                stderr=self.folder / f"7_{k}_log.err",
                result_pickle=self.folder / f"7_{k}_result.pkl",
            )
        )

    def write(self, k: int, log: str, result: tuple | None = None) -> None:
        from submitit.core.utils import cloudpickle_dump

        self.task(k).paths.stderr.write_text(log)
        if result is not None:
            cloudpickle_dump(result, self.task(k).paths.result_pickle)


GLOO = (
    "RuntimeError: [gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:13031. "
    "This is typically caused by a remote worker crashing."
)


def test_a_failed_job_of_several_ranks_is_reported_by_the_rank_that_failed_first(tmp_path):
    """The ranks a failed rank takes down fail too (gloo's "connection closed", srun's stop): the
    report must name the first one, from the files a 2-task job leaves (as on the local cluster)."""
    from hydra.core.utils import JobReturn, JobStatus

    from hydra_plugins.importance_sampling_slurm.slurm_launcher import job_error, srun_verdicts

    def traceback(error: str, rank: int | None = None) -> str:
        """As submitit pickles it, or (rank) as torch prints it to a rank's stderr."""
        lines = ["Traceback (most recent call last):", "  ...", error]
        return "".join(
            f"[rank{rank}]: {line}\n" if rank is not None else line + "\n" for line in lines
        )

    stop = (
        "srun: launch/slurm: _step_signal: Terminating StepId=7.0\n"
        "slurmstepd-node1: error: *** STEP 7.0 ON node1 CANCELLED AT 2026-01-01T00:00:00 ***\n"
    )
    # rank 1 killed (the OOM killer: no traceback, no result); rank 0 fails in a collective
    job = FakeJob(tmp_path / "killed", 2)
    job.folder.mkdir()
    job.write(1, "")
    srun_lines = "srun: error: node1: task 1: Killed\n" + stop
    job.write(
        0,
        traceback(GLOO, 0) + srun_lines + "srun: error: node1: task 0: Terminated\n",
        ("error", traceback(GLOO)),
    )
    assert job_error(job) == ("srun: error: node1: task 1: Killed", job.task(0).paths.stderr)

    # rank 1 raised; rank 0 then failed in a collective: both wrote their traceback
    job = FakeJob(tmp_path / "raised", 2)
    job.folder.mkdir()
    job.write(1, traceback("RuntimeError: boom", 1), ("error", traceback("RuntimeError: boom")))
    batch = traceback(GLOO, 0) + "srun: error: node1: task 1: Exited with exit code 1\n" + stop
    job.write(0, batch + "srun: error: node1: task 0: Terminated\n", ("error", traceback(GLOO)))
    assert job_error(job) == ("RuntimeError: boom", job.task(1).paths.stderr)

    # a bad option on one rank (here rank 1's node lacks the GPU): train.py's one-line error
    job = FakeJob(tmp_path / "option", 2)
    job.folder.mkdir()
    error = "error: device: cuda:1 was asked for, but this machine has 1 CUDA devices"
    job.write(1, error + "\n")
    job.write(
        0,
        "srun: error: node1: task 1: Exited with exit code 1\n"
        + stop
        + "srun: error: node1: task 0: Killed\n",
    )
    assert job_error(job) == (error, job.task(1).paths.stderr)

    # one task, whose run raised (Hydra's JobReturn)
    job = FakeJob(tmp_path / "single", 1)
    job.folder.mkdir()
    failed = JobReturn(status=JobStatus.FAILED, _return_value=ValueError("bad value"))
    job.write(0, "Traceback (most recent call last):\nValueError: bad value\n", ("success", failed))
    assert job_error(job) == ("ValueError: bad value", job.task(0).paths.stderr)

    log = tmp_path / "ranges.err"
    log.write_text(
        "srun: error: node2: tasks 4-6,9: Exited with exit code 1\nsrun: error: node1: task 0: Killed\n"
    )
    assert srun_verdicts(log) == [
        ([4, 5, 6, 9], "srun: error: node2: tasks 4-6,9: Exited with exit code 1"),
        ([0], "srun: error: node1: task 0: Killed"),
    ]


def test_slurm_launcher_config_composes_over_the_plugin(tmp_path):
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    from importance_sampling.config.builder import compose

    cfg = compose("hydra/launcher=slurm", "hydra.launcher.partition=gpu", return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("importance_sampling_slurm.slurm_launcher.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.tasks_per_node == 1
    assert launcher.submitit_folder.endswith("/.submitit/%j")  # the plugin's own keys
    names = [f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Launcher)]
    assert launcher._target_ in names  # Hydra finds it (plugins live in hydra_plugins)


# ---------------------------------------------------------------- a real cluster
def free_port_pair() -> int:
    """A port p with p and p + 1 free (slurmctld and slurmd), away from a cluster already here."""
    for port in range(16817, 17817, 2):
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for slurmctld and slurmd")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A SLURM cluster for this module, started and stopped by scripts/local_slurm.sh."""
    missing = [cmd for cmd in NEEDED if shutil.which(cmd) is None]
    reason = None
    if os.geteuid() != 0:
        reason = "slurmd must run as root to start jobs (scripts/local_slurm.sh start as root)"
    elif missing:
        reason = f"{', '.join(missing)} not found: apt-get install slurm-wlm munge (make test does, as root)"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "LOCAL_SLURM_DIR": str(folder), "LOCAL_SLURM_PORT": str(free_port_pair())}
    started = subprocess.run(
        ["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=120
    )
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == f"export SLURM_CONF={folder}/slurm.conf"
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SLURM_CONF", str(folder / "slurm.conf"))
            yield folder
    finally:
        stopped = subprocess.run(
            ["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120
        )
        assert stopped.returncode == 0, stopped.stderr


def train(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """A multirun of train.py, submitted from cwd; waits for its jobs."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env={**os.environ, "IS_DATA_DIR": str(cwd / "data")},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_ids(output: str) -> list[str]:
    """The SLURM job ids the launcher printed, in job order ("#0 : ... : SLURM job 12_0")."""
    return re.findall(r"#\d+ : .* : SLURM job (\S+)", output)


def final_state(job_id: str) -> str:
    """The controller's own record of how a job ended (it keeps it for MinJobAge, 300 s).
    A job has written its results a moment before its processes have exited."""
    for _ in range(100):
        out = subprocess.run(
            ["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True
        ).stdout
        state = re.search(r"JobState=(\S+)", out).group(1)
        if state not in ("RUNNING", "COMPLETING"):
            return state
        time.sleep(0.2)
    return state


@pytest.mark.slow
def test_local_cluster_script_is_idempotent_and_reports_status(cluster):
    env = {**os.environ, "LOCAL_SLURM_DIR": str(cluster)}
    again = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "already running" in again.stderr
    status = subprocess.run(
        ["bash", str(SCRIPT), "status"], env=env, capture_output=True, text=True
    )
    assert status.returncode == 0
    for daemon in ("munged", "slurmctld", "slurmd"):
        assert f"{daemon} runs (pid" in status.stderr
    conf = (cluster / "slurm.conf").read_text()
    for line in ("ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none"):
        assert line in conf
    node = subprocess.run(
        ["scontrol", "show", "node"], capture_output=True, text=True, check=True
    ).stdout
    assert f"CPUTot={os.cpu_count()}" in node  # this machine's cores


@pytest.fixture(scope="module")
def sweep(cluster, tmp_path_factory):
    """The README's sweep on the local cluster: 2 samplers x 1 seed, 3 s of training each."""
    tmp = tmp_path_factory.mktemp("slurm_sweep")
    proc = train(
        *readme_command(),
        "trainer.progress=false",
        "hydra.launcher.timeout_min=5",
        'hydra.launcher.setup=["echo setup ran on $(hostname)"]',
        f"hydra.sweep.dir={tmp / 'sweep'}",
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "sweep", proc


@pytest.mark.slow
def test_sweep_runs_every_job_through_slurm(sweep):
    sweep_dir, proc = sweep
    args = readme_command()
    assert "hydra/launcher=slurm" in args and "sampler=uniform,upper_bound" in args
    ids = job_ids(proc.stderr + proc.stdout)
    assert len(ids) == 2
    for job_id, name in zip(ids, ["uniform_seed0_0", "upper_bound_seed0_1"], strict=True):
        run = sweep_dir / name
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["train_time"] >= 3
        assert len(pd.read_csv(run / "metrics.csv")) >= 3
        # SLURM ran it: the controller's record, and submitit's log of that job on the node
        assert final_state(job_id) == "COMPLETED"
        log = (sweep_dir / ".submitit" / job_id / f"{job_id}_0_log.out").read_text()
        assert f"JobEnvironment(job_id={job_id}," in log
        assert f"setup ran on {socket.gethostname()}" in log  # hydra.launcher.setup, before srun
        assert f"results in {run}" in log  # train.py's summary line, printed in the job
        array = job_id.split("_")[0]
        submission = sweep_dir / ".submitit" / array / f"{array}_submission.sh"
        assert "#SBATCH --partition=local" in submission.read_text()


@pytest.mark.slow
def test_a_cluster_without_accounting_gives_a_clean_output(sweep):
    _, proc = sweep
    output = proc.stdout + proc.stderr
    # submitit_slurm polls sacct, which fails here: one warning and one sacct line per poll
    assert "sacct" not in output and "accounting storage is disabled" not in output
    assert "WARNING" not in output and "Traceback" not in output


@pytest.mark.slow
def test_aggregation_script_reads_the_slurm_sweep(sweep, tmp_path):
    sweep_dir, _ = sweep
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "aggregate.py"),
            str(sweep_dir),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert runs["run"].nunique() == 2 and set(runs["sampler"]) == {"uniform", "upper_bound"}
    assert (tmp_path / "table.md").is_file()


@pytest.mark.slow
def test_a_failing_job_is_reported_with_its_log_and_error_line(cluster, tmp_path):
    """A bad option makes train.py exit 1 in the job, without a result: submitit_slurm would wait
    for it forever on this cluster (no sacct to say it failed)."""
    start = time.time()
    proc = train(
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=local",
        "sampler=uniform",
        "sampler.batch_size=-3,32",
        "threads=1",
        "trainer.time_budget=null",
        "trainer.max_steps=20",
        "trainer.progress=false",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
        timeout=180,
    )
    assert proc.returncode == 1
    bad, good = job_ids(proc.stderr + proc.stdout)
    error = "error: sampler: sampler.batch_size must be an integer >= 1, got -3"
    assert f"error: 1 of 2 SLURM jobs failed (runs in {tmp_path / 'sweep'}):" in proc.stderr
    assert f"#0 SLURM job {bad} FAILED (sampler=uniform sampler.batch_size=-3" in proc.stderr
    assert f"\n    {error}\n" in proc.stderr
    log = Path(re.search(r"log: (\S+)", proc.stderr).group(1))
    assert log == tmp_path / "sweep" / ".submitit" / bad / f"{bad}_0_log.err"
    assert error in log.read_text()
    assert "Traceback" not in proc.stderr and "JobError" not in proc.stderr  # submitit's
    assert final_state(bad) == "FAILED" and final_state(good) == "COMPLETED"
    summary = json.loads((tmp_path / "sweep" / "uniform_seed0_1" / "summary.json").read_text())
    assert summary["status"] == "completed"  # the other job is unaffected
    assert time.time() - start < 120


# ---------------------------------------------------------------- one run over several tasks
@pytest.fixture(scope="module")
def ddp_run(cluster, tmp_path_factory):
    """The README's 2-task job on the local cluster: one data-parallel run of 2 ranks (gloo),
    in the default sweep directory (multirun/<time>, from the submitting process's clock)."""
    tmp = tmp_path_factory.mktemp("slurm_ddp")
    proc = train(
        *readme_command(tasks=2), "trainer.progress=false", "hydra.launcher.timeout_min=5", cwd=tmp
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sweep_dir,) = (tmp / "multirun").iterdir()  # the ranks agree on ${now:...}: one directory
    return sweep_dir, proc


@pytest.mark.slow
def test_a_two_task_job_is_one_run_of_two_ranks(ddp_run):
    sweep_dir, proc = ddp_run
    args = readme_command(tasks=2)
    assert "hydra.launcher.tasks_per_node=2" in args and "trainer.max_steps=300" in args
    assert sorted(p.name for p in sweep_dir.iterdir()) == [
        ".submitit",
        "multirun.yaml",
        "upper_bound_seed0_0",
    ]
    run = sweep_dir / "upper_bound_seed0_0"
    assert sorted(p.name for p in run.iterdir()) == [
        ".hydra",
        "metrics.csv",
        "summary.json",
        "train.log",
    ]
    from omegaconf import OmegaConf

    b = OmegaConf.load(run / ".hydra" / "config.yaml").sampler.batch_size
    rows = pd.read_csv(run / "metrics.csv")
    assert rows["step"].tolist() == [0, 100, 200, 300]  # trainer.eval_every_steps=100
    assert (rows["world_size"] == 2).all()
    # each rank trains on b/2 points per step: samples and epoch count both ranks' points
    assert (rows["samples"] == 2 * rows["step"] * (b // 2)).all()
    assert rows["epoch"].tolist() == pytest.approx((rows["samples"] / 1437).tolist())  # digits
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 300
    assert summary["world_size"] == 2 and summary["samples"] == 300 * b
    assert "multirun: 1 runs in" in proc.stdout  # the launcher's one run, rank 0's JobReturn


@pytest.mark.slow
def test_both_ranks_of_a_two_task_job_run_and_rank_0_alone_writes(ddp_run):
    from omegaconf import OmegaConf
    from submitit.core.utils import pickle_load

    sweep_dir, proc = ddp_run
    run = sweep_dir / "upper_bound_seed0_0"
    (job_id,) = job_ids(proc.stderr + proc.stdout)
    assert final_state(job_id) == "COMPLETED"
    jobs = sweep_dir / ".submitit" / job_id
    submission = (jobs / f"{job_id}_submission.sh").read_text()
    assert "#SBATCH --ntasks-per-node=2" in submission and "--kill-on-bad-exit=1" in submission
    logs = [(jobs / f"{job_id}_{rank}_log.out").read_text() for rank in (0, 1)]
    for rank, log in enumerate(logs):
        assert f"Starting with JobEnvironment(job_id={job_id}," in log
        assert f"global_rank={rank}(2)" in log
    # init_distributed found the 2 ranks through SLURM's variables; the trainer's lines and its
    # summary are rank 0's (rank 1 runs with Hydra's job logging off, as under torchrun)
    assert "cpu x 2 processes" in logs[0] and f"results in {run}" in logs[0]
    assert "Job completed successfully" in logs[0]
    assert "[train]" not in logs[1] and "results in" not in logs[1]
    # every task returned: the same run, so the same final training loss on both ranks
    results = [pickle_load(jobs / f"{job_id}_{rank}_result.pkl") for rank in (0, 1)]
    assert [outcome for outcome, _ in results] == ["success", "success"]
    rets = [ret for _, ret in results]
    assert (
        rets[0].return_value
        == rets[1].return_value
        == json.loads((run / "summary.json").read_text())["train_loss"]
    )
    # Hydra's files and log are rank 0's alone (rank 1 used to rewrite .hydra/ and append its
    # lines to train.log)
    assert rets[0].hydra_cfg.hydra.output_subdir == ".hydra"
    assert rets[1].hydra_cfg.hydra.output_subdir is None
    written = OmegaConf.load(run / ".hydra" / "hydra.yaml").hydra  # by rank 0, not rank 1
    assert written.output_subdir == ".hydra" and "file" in written.job_logging.root.handlers
    assert (run / "train.log").read_text().count("Job completed successfully") == 1


@pytest.mark.slow
def test_a_rank_that_fails_ends_the_job_and_is_the_rank_reported(cluster, tmp_path, monkeypatch):
    """Rank 1 fails before the ranks meet (its node lacks the GPU asked for). Rank 0, waiting for
    it at the rendezvous, would wait for the process group's timeout (30 min) if srun did not
    stop it; the report shows rank 1's error, not rank 0's."""
    monkeypatch.setenv("IS_TEST_DEVICE_0", "cpu")
    monkeypatch.setenv("IS_TEST_DEVICE_1", "cuda:99")
    start = time.time()
    proc = train(
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=local",
        "hydra.launcher.tasks_per_node=2",
        "threads=1",
        "trainer.progress=false",
        'device="${oc.env:IS_TEST_DEVICE_${oc.env:SLURM_PROCID}}"',  # resolved in each task
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
        timeout=180,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert time.time() - start < 90
    (job_id,) = job_ids(proc.stderr + proc.stdout)
    jobs = tmp_path / "sweep" / ".submitit" / job_id
    assert f"#0 SLURM job {job_id} FAILED" in proc.stderr
    assert "\n    error: device: cuda:99 was asked for, but this machine has" in proc.stderr
    assert f"\n    log: {jobs / f'{job_id}_1_log.err'}\n" in proc.stderr
    assert "Traceback" not in proc.stderr
    # srun stopped rank 0 because rank 1 exited
    assert "task 1: Exited with exit code 1" in (jobs / f"{job_id}_0_log.err").read_text()
    assert final_state(job_id) == "FAILED"


@pytest.mark.slow
def test_a_rank_killed_mid_run_is_reported_and_does_not_hang_the_other(cluster, tmp_path):
    """SIGKILL (what the kernel's out-of-memory killer sends) leaves no traceback and no result:
    srun's own line says what happened to the rank."""
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            "hydra/launcher=slurm",
            "hydra.launcher.partition=local",
            "hydra.launcher.tasks_per_node=2",
            "sampler=upper_bound",
            "threads=1",
            "trainer.time_budget=120",
            "trainer.eval_every_seconds=0.5",
            "trainer.progress=false",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
        env={**os.environ, "IS_DATA_DIR": str(tmp_path / "data")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = sweep_dir / "upper_bound_seed0_0"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.csv").exists() and len(read_rows(run)) >= 2:  # both ranks train
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    (job_id,) = [p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir()]
    pids = subprocess.run(
        ["scontrol", "listpids", job_id], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    # PID JOBID STEPID LOCALID GLOBALID: rank 1 of the job's step 0
    (pid,) = [int(p.split()[0]) for p in pids if p.split()[2:5:2] == ["0", "1"]]
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert time.time() - killed < 60  # not the budget (120 s), nor the process group's timeout
    assert f"#0 SLURM job {job_id} FAILED" in stderr
    assert f"\n    srun: error: {socket.gethostname()}: task 1: Killed\n" in stderr
    assert f"\n    log: {sweep_dir / '.submitit' / job_id / f'{job_id}_0_log.err'}\n" in stderr


# ---------------------------------------------------------------- interrupted jobs resume
RESUMABLE = [
    "-m",
    "hydra/launcher=slurm",
    "hydra.launcher.partition=local",
    "sampler=upper_bound",
    "threads=1",
    "trainer.time_budget=12",
    "trainer.eval_every_seconds=0.5",
    "trainer.checkpoint_every=0.5",
    "trainer.progress=false",
]


def start_and_wait_for_a_checkpoint(sweep_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """Submit a resumable 1-job multirun; return once its run has a checkpoint past 1 s."""
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *RESUMABLE,
            f"hydra.sweep.dir={sweep_dir}",
            *extra,
        ],
        cwd=sweep_dir.parent,
        env={**os.environ, "IS_DATA_DIR": str(sweep_dir.parent / "data")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = sweep_dir / "upper_bound_seed0_0"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "checkpoint.pt").exists() and len(read_rows(run)) >= 4:  # train_time >= 1.5 s
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    (job_id,) = [p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir()]
    return proc, job_id


def read_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def checkpoint_rows(run: Path) -> list[dict]:
    from importance_sampling.engine.checkpoints import load_checkpoint

    return load_checkpoint(run / "checkpoint.pt")["rows"]


def assert_continues_from(run: Path, saved: list[dict]) -> None:
    """The run's metrics start with the checkpoint's rows, to the last digit of their timings
    (a run started again would not reproduce them), and go on from there to the budget."""
    rows = read_rows(run)
    assert len(rows) > len(saved)
    for row, kept in zip(rows, saved, strict=False):
        assert int(row["step"]) == kept["step"]
        assert float(row["train_time"]) == kept["train_time"]
        assert float(row["wall_time"]) == kept["wall_time"]
    after = rows[len(saved)]
    assert int(after["step"]) > saved[-1]["step"]
    assert float(after["train_time"]) > saved[-1]["train_time"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["train_time"] >= 12


@pytest.mark.slow
def test_a_cancelled_job_resumes_from_its_checkpoint_when_resubmitted(cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc, job_id = start_and_wait_for_a_checkpoint(sweep_dir)
    subprocess.run(["scancel", job_id], check=True)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert f"#0 SLURM job {job_id} CANCELLED" in stderr
    assert "CANCELLED AT" in stderr  # SLURM's notice, from the job's log
    assert f"trainer.resume=true hydra.sweep.dir={sweep_dir}" in stderr
    run = sweep_dir / "upper_bound_seed0_0"
    saved = checkpoint_rows(run)  # the job is gone: this is where it stopped
    assert saved[-1]["train_time"] < 12
    # SLURM's SIGTERM (submitit ignores it) stopped the run after a step, saved, before SIGKILL
    log = (sweep_dir / ".submitit" / job_id / f"{job_id}_0_log.err").read_text()
    assert "stopped: SIGTERM received: stopped after step" in log
    assert json.loads((run / "summary.json").read_text())["status"] == "preempted"

    resumed = train(*RESUMABLE, f"hydra.sweep.dir={sweep_dir}", "trainer.resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_continues_from(run, saved)


@pytest.mark.slow
def test_a_preempted_job_requeues_itself_and_resumes_from_its_checkpoint(cluster, tmp_path):
    """SIGUSR2 is submitit's signal for preemption and for a time limit near (hydra.launcher.
    signal_delay_s before it): the job requeues itself, with trainer.resume=true."""
    sweep_dir = tmp_path / "sweep"
    proc, job_id = start_and_wait_for_a_checkpoint(sweep_dir)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    deadline = time.time() + 60
    while time.time() < deadline:  # requeued: back to PENDING once its processes are gone
        squeue = subprocess.run(
            ["squeue", "--noheader", f"--jobs={job_id}", "--format=%T %r"],
            capture_output=True,
            text=True,
        ).stdout.split()
        if squeue == ["PENDING", "BeginTime"]:
            break
        time.sleep(0.2)
    assert squeue == ["PENDING", "BeginTime"]
    run = sweep_dir / "upper_bound_seed0_0"
    saved = checkpoint_rows(run)
    # SLURM holds a requeued job for cred_expire (15 s here, 120 s by default), then runs it
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-3000:]
    log = (sweep_dir / ".submitit" / job_id / f"{job_id}_0_log.out").read_text()
    assert "this job is preempted" in log and f"Requeued job {job_id}" in log
    assert_continues_from(run, saved)
