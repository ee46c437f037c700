"""Rank, world size and local rank from each launcher's variables (the real launches are in test_launchers.py)."""

from __future__ import annotations

import pytest

from dpo_ds import launchenv

ALL_VARIABLES = [name for names in launchenv.LAUNCHER_VARIABLES for name in names]


@pytest.fixture
def clean_env(monkeypatch):
    for name in ALL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("names", launchenv.LAUNCHER_VARIABLES, ids=lambda names: names[0])
def test_each_launcher_is_read(clean_env, names):
    for name, value in zip(names, ("3", "8", "1")):
        clean_env.setenv(name, value)
    assert launchenv.rank_world_local() == (3, 8, 1)


def test_no_launcher_is_one_process(clean_env):
    assert launchenv.rank_world_local() == (0, 1, 0)


def test_a_slurm_batch_script_without_srun_is_one_process(clean_env):
    """sbatch --ntasks=8 sets SLURM_PROCID and SLURM_NTASKS in the batch script too; only srun's step counts."""
    for name, value in (("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", "0")):
        clean_env.setenv(name, value)
    clean_env.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    assert launchenv.launcher() is None and launchenv.rank_world_local() == (0, 1, 0)
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "8")
    assert launchenv.launcher() == "srun" and launchenv.rank_world_local() == (0, 8, 0)


def test_torch_style_variables_win_over_the_scheduler(clean_env):
    """Under srun + deepspeed both are set; the one the training processes were started with wins."""
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "1")
    clean_env.setenv("RANK", "5")
    clean_env.setenv("WORLD_SIZE", "6")
    assert launchenv.rank_world_local() == (5, 6, 0)
