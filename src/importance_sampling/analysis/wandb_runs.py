"""A W&B sweep's runs in the analysis's tidy table: from the offline files W&B wrote beside each
run, or from W&B's servers through its public API.

A run reaches the table through one conversion, ``runs.run_table`` (its config, the Hydra group
choices, its metrics rows and its summary), whichever way it was read: from its run directory
(metrics.csv, .hydra/, summary.json), from its offline W&B run (``wandb/offline-run-*``), or from
the API. The W&B run carries all of it: the logger (engine/wandb_logger.py) logs the resolved
config with the group choices (``hydra_choices``), every metrics row and the summary.

    runs = load_wandb("multirun/wandb-<sweep id>")            # the offline runs under a folder
    runs = load_wandb("<entity>/<project>/<sweep id>")         # the API: an account, the network

Reading the API needs ``wandb login`` (or WANDB_API_KEY) and the network; without them
``load_wandb`` raises WandbUnavailable with one line saying so.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pandas as pd

from .runs import run_table

# W&B's own keys in a history row (_step, _runtime, _timestamp, ...): not metrics
PRIVATE = "_"


class WandbUnavailable(RuntimeError):
    """W&B's servers cannot be read (no account configured, no network, no such sweep)."""


# ---------------------------------------------------------------- offline runs
def read_records(run_dir: str | Path) -> dict[str, list]:
    """The records of an offline W&B run's ``run-<id>.wandb`` file by kind (run, history,
    summary, exit, ...). The file is a log of protocol-buffer records in 32 KiB blocks, each
    record in one or more fragments behind a 7-byte header (checksum, length, fragment type);
    wandb's own Python reader went with its Go service, so this one reads the format itself."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(Path(run_dir).glob("*.wandb"))
    if not files:
        raise FileNotFoundError(f"no .wandb file in {run_dir}")
    data, pos, block, records, chunk = files[0].read_bytes(), 7, 32768, {}, b""
    while pos + 7 <= len(data):  # the first 7 bytes are the file's own header
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last fragment of one
            record = pb.Record()
            record.ParseFromString(chunk)
            which = record.WhichOneof("record_type")
            records.setdefault(which, []).append(getattr(record, which))
            chunk = b""
        elif kind == 0:  # zeros: the end of what was written
            break
    return records


def _items(updates) -> dict:
    """{key: value} of a record's items (config, summary or history), values decoded."""
    return {(u.nested_key[0] if u.nested_key else u.key): json.loads(u.value_json) for u in updates}


def offline_run(run_dir: str | Path) -> pd.DataFrame:
    """One offline W&B run as ``run_table`` rows, named by the W&B run's display name."""
    records = read_records(run_dir)
    if not records.get("run"):
        raise FileNotFoundError(f"{run_dir} has no run record: not a W&B run")
    run = records["run"][0]
    config = _items(run.config.update)
    for extra in records.get("config", []):
        config.update(_items(extra.update))
    summary: dict = {}
    for s in records.get("summary", []):
        summary.update(_items(s.update))
    rows = [_items(h.item) for h in records.get("history", [])]
    return _table(run.display_name or run.run_id, config, rows, summary)


def collect_offline(folder: str | Path) -> pd.DataFrame:
    """Every offline W&B run under ``folder`` (``**/offline-run-*``: beside each run's
    metrics.csv, or under WANDB_DIR), one tidy frame."""
    dirs = sorted(Path(folder).rglob("offline-run-*"))
    if not dirs:
        raise FileNotFoundError(f"no offline W&B run (offline-run-*) under {folder}")
    return _concat([offline_run(d) for d in dirs])


# ---------------------------------------------------------------- the API
def collect_api(path: str, timeout: int = 30) -> pd.DataFrame:
    """Every run of the sweep ``<entity>/<project>/<sweep id>`` read from W&B's servers."""
    try:
        import wandb

        sweep = wandb.Api(timeout=timeout).sweep(path)
        frames = []
        for run in sweep.runs:
            config = {k: v for k, v in dict(run.config).items() if not k.startswith(PRIVATE)}
            summary = dict(run.summary._json_dict)
            frames.append(_table(run.name, config, list(run.scan_history()), summary))
    except Exception as e:  # no key, no network, no such sweep: one line, not W&B's traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise WandbUnavailable(
            f"cannot read the W&B sweep {path} ({type(e).__name__}: {first}): reading W&B needs "
            "`wandb login` (or WANDB_API_KEY) and the network; offline runs are read from their "
            "folder instead (a path that exists)"
        ) from None
    if not frames:
        raise WandbUnavailable(f"the W&B sweep {path} has no runs yet")
    return _concat(frames)


# ---------------------------------------------------------------- both
def load_wandb(where: str | Path) -> pd.DataFrame:
    """The runs of a W&B sweep: the offline runs under ``where`` when it is a folder that
    exists, else the sweep ``<entity>/<project>/<sweep id>`` through the API."""
    if Path(where).exists():
        return collect_offline(where)
    if str(where).count("/") != 2:
        raise FileNotFoundError(
            f"{where} is neither a folder nor a W&B sweep path <entity>/<project>/<sweep id>"
        )
    return collect_api(str(where))


def _table(name: str, config: dict, rows: list[dict], summary: dict) -> pd.DataFrame:
    """A W&B run's config, history rows and summary through the one conversion."""
    config = dict(config)
    choices = config.pop("hydra_choices", None) or {}
    metrics = pd.DataFrame(
        [{k: v for k, v in r.items() if not k.startswith(PRIVATE)} for r in rows]
    )
    if "step" in metrics:
        metrics = metrics.dropna(subset=["step"]).reset_index(drop=True)
    return run_table(name, metrics, config, choices, summary)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frame = pd.concat(frames, ignore_index=True)
    return frame.sort_values(["sampler", "seed", "run", "step"], kind="stable", ignore_index=True)
