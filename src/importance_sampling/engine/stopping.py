"""A graceful stop on the signals a cluster sends before it kills a job.

SLURM sends SIGTERM at the time limit, on ``scancel`` and on preemption, then SIGKILL after its
``KillWait`` (30 s by default); some clusters send SIGUSR1 as a warning before the limit. While
``Trainer.fit`` runs, either signal only asks the loop to stop: the step in flight (or the
metrics row being evaluated) finishes, checkpoint.pt and summary.json (``"status": "preempted"``)
are written, and fit raises ``TrainingStopped``; train.py then exits with 128 + the signal's
number (143 for SIGTERM, 138 for SIGUSR1), the code a shell reports for a process that the signal
ended. A signal that arrives while the checkpoint is being saved is noted and ignored: the save
is atomic and finishes.

SIGUSR2 is left alone: submitit (hydra/launcher=slurm) uses it to requeue a job, with its own
handler.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType

STOP_SIGNALS = tuple(  # SIGUSR1 does not exist on Windows
    getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name)
)


def stop_exit_code(signum: int) -> int:
    """The exit status of a run stopped by signal ``signum``: 128 + its number (SIGTERM: 143)."""
    return 128 + signum


class StopRequest:
    """While entered (in the main thread), SIGTERM and SIGUSR1 set ``signum`` instead of ending
    the process; leaving restores the handlers that were there before (fit runs many times in
    one process: tests, joblib and submitit workers).

    ``signum``: the first stop signal received (0: none); ``ignored``: how many came after it.
    A process forked meanwhile (a DataLoader worker) keeps the default behaviour: the signal
    ends it.
    """

    def __init__(self) -> None:
        self.signum = self.ignored = 0
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopRequest:
        self.signum = self.ignored = 0
        self._pid = os.getpid()
        # Python sets signal handlers from the main thread only (fit in another thread: no stop)
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked child that inherited the handler: end it
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.signum:
            self.ignored += 1  # already stopping (maybe saving): nothing more to do
        else:
            self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            # None: the previous handler was not set from Python; the default is the best guess
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


class TrainingStopped(Exception):
    """A stop signal ended the run early; its state is saved and the run can be resumed.

    Attributes: ``signum``, ``step`` (the last step taken), ``exit_code`` (128 + signum).
    """

    def __init__(self, signum: int, step: int, out_dir: str | Path):
        self.signum, self.step, self.exit_code = signum, step, stop_exit_code(signum)
        super().__init__(
            f"{signal.Signals(signum).name} received: stopped after step {step}; checkpoint.pt "
            f'and summary.json ("status": "preempted") are in {out_dir}; to continue, run the '
            "same command with trainer.resume=true"
        )
