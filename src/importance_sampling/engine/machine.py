"""How much of the machine a run got while it trained.

Linux keeps, for every thread, the nanoseconds it spent running on a CPU and the nanoseconds it
spent runnable but waiting for one, in the run queue (``/proc/<pid>/task/<tid>/schedstat``).
Over the timed steps, the run's *machine share* is

    share = run / (run + wait),  summed over the threads of the process and of its children:

1 on an otherwise idle machine (a thread that is ready runs at once), about 1/2 when another
busy process wants every core the run uses, and far lower when torch's threads stall each other
behind a preempted one. The children are the run's DataLoader workers: a run whose own workers
and threads want more cores than there are is not timed fairly either, and is counted so. Only the wait for a CPU counts against the run: a thread that sleeps
(waiting for the GPU, for a DataLoader, for work) does not. That is why it is read from the
scheduler rather than computed as CPU time / (wall time x threads), which falls below 1 on an
idle machine whenever a thread has nothing to do and so cannot tell a starved run from one
with idle threads.

Where schedstat is missing (not Linux, or a kernel without CONFIG_SCHED_INFO) the share is NaN:
not measured, never flagged.

Beside it, over the same intervals, the *steal*: the fraction of every CPU's time that the
hypervisor gave to other virtual machines (``/proc/stat``'s steal column), which a virtual
machine's own scheduler never sees. A slower host shows in neither: reference.py times a fixed
workload for that.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

STARVED_BELOW = 0.9  # a run whose share of the machine is below this is flagged


def starved(share: float) -> bool:
    """Whether a run with this machine share is flagged (never when it was not measured)."""
    return share < STARVED_BELOW  # False for NaN


def starved_warning(summary: dict, threshold: float = STARVED_BELOW) -> str | None:
    """The one line a flagged run ends with (None for a run that is not flagged)."""
    share = summary.get("machine_share")
    if not summary.get("starved") or share is None:
        return None
    return (
        f"warning: this run's threads got {share:.0%} of the time they were ready to run "
        f"(machine_share {share:.2f} < {threshold}): other processes (or its own DataLoader "
        "workers, with more threads and workers than cores) took the CPUs, so its timings do "
        "not compare with other runs. Rerun it on an otherwise idle machine, one run at a time "
        "(docs/reliability.md#timed-runs-need-an-idle-machine)."
    )


def thread_times(pid: int | None = None) -> dict[int, tuple[int, int]] | None:
    """{thread id: (ns running, ns waiting in the run queue)} of a process (default: this one)
    and of its child processes (DataLoader workers); None where the kernel does not say."""
    out: dict[int, tuple[int, int]] = {}
    pending, seen = [pid or os.getpid()], set()
    while pending:
        process = pending.pop()
        seen.add(process)
        try:
            tasks = list(Path(f"/proc/{process}/task").iterdir())
        except OSError:
            if process == (pid or os.getpid()):
                return None
            continue  # a child that ended
        for task in tasks:
            try:
                run, wait, _ = (task / "schedstat").read_text().split()
            except (OSError, ValueError):
                continue  # a thread that ended while we read
            out[int(task.name)] = (int(run), int(wait))
            try:
                children = (task / "children").read_text().split()
            except OSError:
                children = []
            pending += [int(c) for c in children if int(c) not in seen]
    return out or None


def cpu_times() -> tuple[int, int] | None:
    """(ticks stolen by the hypervisor, all ticks) summed over the CPUs, from /proc/stat's
    ``cpu`` line; None where there is no such line."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        # user nice system idle iowait irq softirq steal (guest time is inside user and nice)
        ticks = [int(v) for v in fields[1:9]]
    except (OSError, ValueError):
        return None
    if fields[0] != "cpu" or len(ticks) < 8:
        return None
    return ticks[7], sum(ticks)


class MachineShare:
    """Accumulates the run and wait time of this process's threads over the intervals between
    ``start()`` and ``stop()`` (the timed steps of a run, not its evaluations).

    ``take_interval()`` gives the share and the steal over the intervals since its last call (a
    metrics row); ``share`` and ``steal`` are over every interval so far; NaN when not measured."""

    def __init__(self) -> None:
        self.available = thread_times() is not None
        self.run_ns = self.wait_ns = 0  # over the whole run (restored on resume)
        self.steal_ticks = self.all_ticks = 0
        self._interval = [0, 0, 0, 0]  # run ns, wait ns, stolen ticks, all ticks
        self._since: dict[int, tuple[int, int]] | None = None
        self._ticks_since: tuple[int, int] | None = None

    def start(self) -> None:
        self._ticks_since = cpu_times()
        if self.available:
            self._since = thread_times()

    def stop(self) -> None:
        ticks, self._ticks_since = self._ticks_since, None
        if ticks is not None and (now_ticks := cpu_times()) is not None:
            steal, every = now_ticks[0] - ticks[0], now_ticks[1] - ticks[1]
            self.steal_ticks, self.all_ticks = self.steal_ticks + steal, self.all_ticks + every
            self._interval[2] += steal
            self._interval[3] += every
        if not self.available or self._since is None:
            return
        now = thread_times() or {}
        run = wait = 0
        for tid, (r, w) in now.items():
            r0, w0 = self._since.get(tid, (0, 0))  # a thread started in the interval: all of it
            run, wait = run + r - r0, wait + w - w0
        self._since = None
        self.run_ns, self.wait_ns = self.run_ns + run, self.wait_ns + wait
        self._interval[0] += run
        self._interval[1] += wait

    @staticmethod
    def ratio(run: int, wait: int) -> float:
        return run / (run + wait) if run + wait > 0 else math.nan

    @property
    def share(self) -> float:
        if not self.available:
            return math.nan
        return self.ratio(self.run_ns, self.wait_ns)

    @property
    def steal(self) -> float:
        return self.steal_ticks / self.all_ticks if self.all_ticks else math.nan

    def take_interval(self) -> tuple[float, float]:
        """(share, steal) since the last call (NaN where nothing was measured), and start a new
        interval."""
        run, wait, steal, every = self._interval
        self._interval = [0, 0, 0, 0]
        share = self.ratio(run, wait) if self.available else math.nan
        return share, (steal / every if every else math.nan)

    def state_dict(self) -> dict:
        return {
            "run_ns": self.run_ns,
            "wait_ns": self.wait_ns,
            "steal_ticks": self.steal_ticks,
            "all_ticks": self.all_ticks,
        }

    def load_state_dict(self, state: dict) -> None:
        self.run_ns, self.wait_ns = int(state["run_ns"]), int(state["wait_ns"])
        # a checkpoint written before steal was measured: from here on
        self.steal_ticks, self.all_ticks = state.get("steal_ticks", 0), state.get("all_ticks", 0)
