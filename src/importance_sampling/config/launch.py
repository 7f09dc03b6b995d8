"""How the command line finds its data-parallel ranks: torchrun or SLURM tasks.

The launcher says who is who through the environment:
- torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
- SLURM (one task per rank, e.g. Hydra's submitit launcher with ``tasks_per_node``):
  SLURM_PROCID, SLURM_STEP_NUM_TASKS, ...; submitit turns them into the torchrun variables.
``init_distributed`` joins the process group and returns the core's ``Distributed``.
"""

from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist

from ..core.collectives import Distributed


def _from_slurm() -> None:
    """In a SLURM step of several tasks (and not under torchrun), export torchrun's variables."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", 1)) <= 1:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError as e:
        raise RuntimeError(
            "a SLURM step of several tasks needs submitit to find its peers "
            "(pip install submitit), or launch the ranks with torchrun"
        ) from e
    # overwrite: sbatch copies the submitting shell's environment into the job, and a
    # MASTER_ADDR left there (a torchrun session) is not this job's first node. A MASTER_PORT
    # set there is kept (submitit's choice); without one, the port follows from the job id.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def launched_ranks() -> int:
    """How many processes the launcher started for this run (1 without torchrun or SLURM tasks)."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # torchrun sets both
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ:
        return int(os.environ.get("SLURM_STEP_NUM_TASKS", 1))
    return 1


def init_distributed(device_type: str | None = None) -> Distributed:
    """Join the launcher's process group (idempotent), or return a single process.

    One default group carries both kinds of tensors: CUDA tensors through NCCL, CPU tensors (the
    clock, object collectives) through gloo. ``device_type="cuda"`` also selects this rank's GPU
    (LOCAL_RANK, modulo the GPUs it sees)."""
    if launched_ranks() <= 1:
        return Distributed()
    _from_slurm()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30)
        )
    return Distributed(rank, world, local_rank)


def close_ranks() -> None:
    """Leave the process group, if this process joined one: all ranks together (a gloo peer that
    closes its connections while another rank still uses them makes that rank abort)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def shared_run_stamp() -> str:
    """The current time as YYYY-mm-dd_HH-MM-SS, rank 0's on every rank of a launch: run
    directories are named after it, and each rank would otherwise read its own clock."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    return init_distributed().broadcast_object(stamp)
