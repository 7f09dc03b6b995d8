"""hydra/launcher=slurm (conf/hydra/launcher/slurm.yaml): each job of a multirun is a SLURM job.

hydra-submitit-launcher's SLURM launcher, with the changes a researcher on a real cluster needs:

- it waits for the jobs with ``squeue`` and their result files, never ``sacct``: on a cluster
  without accounting (AccountingStorageType=accounting_storage/none) submitit's sacct calls fail
  with a warning every few seconds, and a job that dies without writing its result (a bad option:
  train.py exits 1; scancel; out of memory) is then never seen to end, so the multirun waits
  forever;
- a job that fails is reported with its SLURM state, its error line and its log file, instead of
  submitit's exception and stack trace;
- a job that SLURM preempts or times out (with ``max_num_timeout`` > 0) is requeued with
  ``trainer.resume=true``: it continues from its checkpoint.pt (``trainer.checkpoint_every``);
- a job of several tasks (``tasks_per_node``, ``nodes``) is one data-parallel run, each task one
  rank: rank 0 alone writes Hydra's files and log (the trainer: the run's outputs); a rank that
  fails ends the job at once (srun --kill-on-bad-exit) instead of leaving the others waiting for
  it until the process group's timeout, and the report names the rank that failed first.

Plugins live in the ``hydra_plugins`` namespace (Hydra only instantiates launchers from there);
this one is found wherever ``importance_sampling`` is, in the submitting process and in the jobs.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

# squeue states of a job that may still write its results (a requeued job goes back to PENDING)
ACTIVE = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "SIGNALING",
    "STAGE_OUT",
    "PREEMPTED",  # until SLURM requeues or cancels it
}
# After SLURM says a job completed, its result files may take a while to show on a shared filesystem.
RESULT_GRACE_S = 15.0
MAX_POLL_S = 30.0
# Hydra's overrides for the ranks other than 0 of a job of several tasks (each task one rank)
QUIET_RANK = ["hydra.output_subdir=null", "hydra/job_logging=disabled"]


def squeue_states(job_ids: Sequence[str]) -> dict[str, str] | None:
    """{job id: state} of the jobs squeue lists (e.g. {"12_0": "RUNNING", "12_1": "FAILED"}).

    squeue lists a job until MinJobAge (default 300 s) after it ended, with or without accounting;
    a job it no longer lists is absent. None when squeue itself fails (the controller is busy).
    """
    from submitit.slurm.slurm import read_job_id  # "12_[3-5]" -> [("12", "3", "5")]

    arrays = sorted({job_id.split("_")[0] for job_id in job_ids})
    cmd = ["squeue", "--noheader", "--array", "--states=all", "--format=%i %T"]
    try:
        proc = subprocess.run(
            [*cmd, f"--jobs={','.join(arrays)}"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning(f"squeue failed ({e}); retrying")
        return None
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:  # all of them ended more than MinJobAge ago
            return {}
        log.warning(f"squeue failed ({proc.stderr.strip()}); retrying")
        return None
    states = {}
    for line in proc.stdout.splitlines():
        if not line.strip():
            continue
        listed, state = line.split()
        for main, *tasks in read_job_id(listed):
            first, last = (tasks + tasks)[:2] if tasks else (None, None)
            if first is None:
                states[main] = state
            else:
                states.update({f"{main}_{i}": state for i in range(int(first), int(last) + 1)})
    return states


def has_results(job: Any) -> bool:
    """Every task of the submitit job wrote its result file (its return value or exception)."""
    return all(job.task(k).paths.result_pickle.exists() for k in range(job.num_tasks))


def wait_for(jobs: Sequence[Any]) -> dict[str, str]:
    """Wait until every job wrote its results or left SLURM's queue without them.

    Returns ``{job id: state}`` of the jobs that ended without results ("ENDED" for a job that
    squeue no longer lists). Result files are looked for every second; squeue is asked every
    second at first, then less and less often (at most every 30 s), as submitit asks sacct.
    """
    waiting, failed = list(jobs), {}
    ended_at: dict[str, float] = {}  # when squeue first showed the job ended without results
    delay, next_squeue = 1.0, 0.0
    while waiting:
        waiting = [job for job in waiting if not has_results(job)]
        if waiting and time.time() >= next_squeue:
            states = squeue_states([job.job_id for job in waiting])
            still = []
            for job in waiting:
                state = "RUNNING" if states is None else states.get(job.job_id, "ENDED")
                if state in ACTIVE or has_results(job):
                    ended_at.pop(job.job_id, None)
                    still.append(job)
                elif state in ("COMPLETED", "ENDED") and (
                    time.time() - ended_at.setdefault(job.job_id, time.time()) < RESULT_GRACE_S
                ):  # it may have written its results: a shared filesystem can show them late
                    still.append(job)
                else:
                    failed[job.job_id] = state
            waiting = still
            next_squeue, delay = time.time() + delay, min(1.5 * delay, MAX_POLL_S)
        if waiting:
            time.sleep(1.0)
    return failed


def error_line(log_file: Path) -> str:
    """The line of a task's stderr that says what went wrong.

    train.py's own ``error: ...`` line if there is one, else SLURM's notice (``*** JOB 12 ON node
    CANCELLED AT ... ***``, ``DUE TO TIME LIMIT``), else the last line that is neither srun's nor
    slurmstepd's (the exception of a traceback), else slurmstepd's notice. torch prefixes the traceback of a process in a
    process group with ``[rank1]:``; that is dropped.
    """
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return "(no log)"
    lines = [re.sub(r"^\[rank\d+\]:", "", line).strip() for line in text.splitlines()]
    for pick in (
        lambda line: line.startswith("error:"),
        lambda line: "*** JOB" in line,
        lambda line: line and not line.startswith(("srun:", "slurmstepd")),
        lambda line: "***" in line,  # *** STEP 12.0 ON node CANCELLED AT ... ***
    ):
        found = [line for line in lines if pick(line)]
        if found:
            return found[-1]
    return "(empty log)"


def srun_verdicts(batch_log: Path) -> list[tuple[list[int], str]]:
    """srun's lines on the tasks that ended badly, in the order they ended, e.g.
    ``srun: error: node1: task 1: Killed`` -> ``([1], "srun: error: node1: task 1: Killed")``.

    srun writes them into the job's own stderr, which is task 0's."""
    try:
        text = batch_log.read_text(errors="replace")
    except OSError:
        return []
    verdicts = []
    for found in re.finditer(r"^srun: error: \S+: tasks? ([\d,-]+): .*$", text, re.M):
        tasks = []
        for part in found.group(1).split(","):  # "0-3,5"
            first, _, last = part.partition("-")
            tasks += range(int(first), int(last or first) + 1)
        verdicts.append((tasks, found.group(0)))
    return verdicts


def task_result(task: Any) -> tuple[str, Any] | None:
    """What a submitit task wrote: ("success", its JobReturn) or ("error", the traceback of
    the exception that ended it); None if it wrote nothing (killed, or train.py exited 1)."""
    from submitit.core.utils import pickle_load

    path = task.paths.result_pickle
    return pickle_load(path) if path.exists() else None


def task_error(result: tuple[str, Any] | None) -> str | None:
    """The exception a task's result holds (None for a successful run, or no result)."""
    if result is None:
        return None
    outcome, value = result
    if outcome == "error":  # a traceback
        return [line for line in str(value).splitlines() if line.strip()][-1].strip()
    if value.status == JobStatus.FAILED:  # a JobReturn (the property would raise the exception)
        e = value._return_value
        return f"{type(e).__name__}: {e}"
    return None


def job_error(job: Any) -> tuple[str, Path]:
    """What went wrong in a failed job: (its error line, the log file it comes from).

    In a job of several tasks (one rank each), the rank that failed first, not the ranks it took
    down (srun stops them, or they fail in a collective when it is gone): train.py's error line
    of the first rank that has one (a bad option: every rank has it), else the first task srun
    says ended badly, else the first task that did not complete."""
    tasks = [job.task(k) for k in range(job.num_tasks)]
    logs = [task.paths.stderr for task in tasks]
    lines = [error_line(log) for log in logs]
    verdicts = srun_verdicts(logs[0])
    results = [task_result(task) for task in tasks]
    errors = [task_error(result) for result in results]
    users = [k for k, line in enumerate(lines) if line.startswith("error:")]
    failed = [k for k, r in enumerate(results) if r is None or errors[k] is not None]
    first = (users or [v[0][0] for v in verdicts] or failed or [0])[0]
    if first not in users and errors[first] is not None:
        return errors[first], logs[first]  # the exception, also at the end of its log
    if lines[first] in ("(no log)", "(empty log)") and verdicts:  # e.g. killed: srun says so
        said = [line for tasks, line in verdicts if first in tasks]
        return (said or [lines[first]])[0], logs[0]
    return lines[first], logs[first]


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """hydra-submitit-launcher's SlurmLauncher (same options), waiting and reporting as above."""

    def __call__(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> JobReturn:
        """Runs in each task of the SLURM job: one Hydra job, or one rank of it (the trainer
        finds its peers through SLURM's variables, see importance_sampling.config.launch)."""
        import submitit

        env = submitit.JobEnvironment()
        # A requeued task's result of its previous run (a rank that failed when rank 0 left to
        # requeue) must not pass for this run's while the launcher waits for every task.
        env.paths.result_pickle.unlink(missing_ok=True)
        if env.global_rank > 0:  # rank 0 alone writes .hydra/ and the job's log file
            sweep_overrides = [*sweep_overrides, *QUIET_RANK]
        ret = super().__call__(sweep_overrides, *args, **kwargs)
        if ret.status == JobStatus.FAILED:
            e = ret._return_value
            if env.num_tasks > 1:
                # Exit non-zero: srun (--kill-on-bad-exit) then stops the other ranks now, which
                # would otherwise wait for this one in a collective (or at the rendezvous) until
                # the process group's timeout. The traceback goes to the task's result and log.
                raise e
            # The traceback does not survive pickling back to the submitting process: log it here.
            traceback.print_exception(type(e), e, e.__traceback__)
        return ret

    def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        """Runs in the SLURM job when SLURM preempts it or its time is nearly up: requeue it so
        that it continues from its checkpoint.pt (a run without one starts again)."""
        overrides = [o for o in sweep_overrides if not o.startswith("trainer.resume=")]
        return super().checkpoint([*overrides, "trainer.resume=true"], *args, **kwargs)

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))

        # The plugin's options: those of BaseQueueConf are submitit's own, the others sbatch's
        # (submitit names them slurm_<key>).
        params = dict(self.params)
        executor = submitit.AutoExecutor(
            folder=params.pop("submitit_folder"),
            cluster="slurm",
            slurm_max_num_timeout=params.pop("max_num_timeout"),
        )
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{key if key in shared else f"slurm_{key}": v for key, v in params.items()}
        )
        if params["tasks_per_node"] * params["nodes"] > 1:
            # A task that fails ends the job's step (srun stops the other tasks) instead of
            # leaving its peers waiting for it until the process group's timeout.
            executor.update_parameters(slurm_srun_args=["--kill-on-bad-exit=1"])

        nums = range(initial_job_idx, initial_job_idx + len(job_overrides))
        jobs = executor.map_array(
            self,
            [list(o) for o in job_overrides],
            ["hydra.sweep.dir"] * len(nums),
            list(nums),
            [f"job_id_for_{num}" for num in nums],
            [Singleton.get_state()] * len(nums),
        )
        for num, overrides, job in zip(nums, job_overrides, jobs, strict=True):
            log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))} : SLURM job {job.job_id}")
        log.info(f"SLURM logs: {jobs[0].paths.folder.parent}/<job id>/")

        ended = wait_for(jobs)
        returns, failures = [], []
        for num, overrides, job in zip(nums, job_overrides, jobs, strict=True):
            what = f"#{num} SLURM job {job.job_id} %s ({' '.join(filter_overrides(overrides))})"
            state = ended.get(job.job_id, "FAILED")
            results = [task_result(job.task(k)) for k in range(job.num_tasks)]
            if job.job_id in ended or any(r is None or task_error(r) for r in results):
                failures.append((what % state, state, *job_error(job)))
            else:
                returns.append(results[0][1])  # rank 0's JobReturn
        if failures:
            # One message, no stack trace (a raised exception would get Hydra's traceback hint).
            print(report(failures, len(jobs), sweep_dir), file=sys.stderr)
            sys.exit(1)
        return returns


def report(failures: list[tuple[str, str, str, Path]], n_jobs: int, sweep_dir: Path) -> str:
    """What failed: per job (description, SLURM state, error line, log file)."""
    lines = [f"error: {len(failures)} of {n_jobs} SLURM jobs failed (runs in {sweep_dir}):"]
    for what, _, error, log_file in failures:
        lines += [f"  {what}", f"    {error}", f"    log: {log_file}"]
    if any(state != "FAILED" for _, state, _, _ in failures):  # cancelled, timed out, ...
        lines.append(
            "  a run that SLURM stopped continues from its checkpoint.pt (trainer.checkpoint_every) "
            f"when the same command runs again with trainer.resume=true hydra.sweep.dir={sweep_dir}"
        )
    return "\n".join(lines)
