"""Hydra callbacks of train.py, configured in conf/config.yaml (``hydra.callbacks``).

The rest of the library does not know about Hydra; this module exists for the command line only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def sweep_report(sweep_dir: str | Path) -> str:
    """Where a multirun's results went, with one line per run directory (its summary.json).

    Launchers that run jobs in other processes (submitit, joblib) print the jobs' own output into
    their logs, not into the terminal; this says what happened without opening them."""
    sweep_dir = Path(sweep_dir).resolve()
    runs = (
        sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir())
        if sweep_dir.is_dir()
        else []
    )
    lines = [f"multirun: {len(runs)} runs in {sweep_dir}"]
    starved = []
    for run in runs:
        summary_path = run / "summary.json"
        if not summary_path.is_file():
            lines.append(f"  {run.name}: no summary.json (failed or killed; see its log)")
            continue
        s = json.loads(summary_path.read_text())
        loss, error = s.get("train_loss", math.nan), s.get("test_error", math.nan)
        share = s.get("machine_share")
        line = (
            f"  {run.name}: {s.get('status', '?')}, {s.get('step', '?')} steps, "
            f"train loss {loss:.4f}, test error {100 * error:.2f}%"
        )
        if share is not None:
            line += f", machine share {share:.2f}"
        if s.get("starved"):
            line += "  [STARVED]"
            starved.append(run.name)
        lines.append(line)
    if starved:
        lines.append(
            f"{len(starved)} run(s) [STARVED]: other processes took the CPUs from them, so their "
            "timings do not compare; rerun them on an otherwise idle machine"
        )
    lines.append(f"compare them: python scripts/aggregate.py {sweep_dir}")
    return "\n".join(lines)


class SweepReport(Callback):
    """At the end of a multirun, print ``sweep_report`` of its sweep directory."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        print(sweep_report(config.hydra.sweep.dir), flush=True)
