"""What the launcher told this process: rank, world size and local rank, before any process group exists.

The deepspeed launcher and torchrun set RANK/WORLD_SIZE/LOCAL_RANK; mpirun (Open MPI) sets
OMPI_COMM_WORLD_*; MPICH and Intel MPI set PMI_*; srun sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID.
Kept free of deepspeed so the encoding tools, which need no process group, read the same variables
as the trainer.
"""
from __future__ import annotations

import os

LAUNCHER_VARIABLES = (  # (rank, world size, local rank), first match wins
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


def rank_world_local() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); (0, 1, 0) when no launcher announced any."""
    for rank_var, size_var, local_var in LAUNCHER_VARIABLES:
        if rank_var in os.environ and size_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ[size_var]), int(os.environ.get(local_var, "0"))
    return 0, 1, 0
