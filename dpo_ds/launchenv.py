"""What the launcher told this process: rank, world size and local rank, before any process group exists.

The one map from launcher variables to ranks, for the trainer (dpo_ds.engine builds its process group
from it) and for the tools that need no process group. The deepspeed launcher and torchrun set
RANK/WORLD_SIZE/LOCAL_RANK; mpirun (Open MPI) sets OMPI_COMM_WORLD_*; MPICH and Intel MPI set PMI_*;
srun sets SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID. A SLURM batch script itself (no srun) also
has SLURM_PROCID and SLURM_NTASKS, of the allocation rather than of a step: it is one process, so only
a job step's SLURM_STEP_NUM_TASKS counts.
"""
from __future__ import annotations

import os

LAUNCHERS = {  # launcher -> (rank, world size, local rank) variables; first match wins
    "torch": ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    "mpi": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    "srun": ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
}
LAUNCHER_VARIABLES = tuple(LAUNCHERS.values())


def launcher() -> str | None:
    """Which launcher started this process (a key of LAUNCHERS), or None for a lone process."""
    for name, (rank_var, size_var, _) in LAUNCHERS.items():
        if rank_var in os.environ and size_var in os.environ:
            return name
    return None


def rank_world_local() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); (0, 1, 0) when no launcher announced any."""
    name = launcher()
    if name is None:
        return 0, 1, 0
    rank_var, size_var, local_var = LAUNCHERS[name]
    return int(os.environ[rank_var]), int(os.environ[size_var]), int(os.environ.get(local_var, "0"))
