"""What a crashed or finished run must not leave behind on the machine (CPU backend), and where it builds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import env


@pytest.fixture
def extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    return tmp_path


def test_stale_build_lock_is_removed_and_a_live_one_kept(extensions_dir):
    from torch.utils.cpp_extension import _get_build_directory

    from dpo_ds import engine

    lock = os.path.join(_get_build_directory("deepspeed_shm_comm", False), "lock")
    open(lock, "w").close()
    assert not engine.clear_stale_build_lock()  # a build in progress: keep its lock
    assert os.path.exists(lock)
    old = time.time() - engine.STALE_BUILD_LOCK_S - 5
    os.utime(lock, (old, old))
    assert engine.clear_stale_build_lock()  # left by a killed build: every run would wait forever
    assert not os.path.exists(lock)
    assert not engine.clear_stale_build_lock()


def test_shm_workspace_name_matches_deepspeeds(monkeypatch):
    """The name engine unlinks is the one DeepSpeed's shm.cpp creates (its format string, checked
    against the source that ships with the installed DeepSpeed)."""
    import deepspeed

    from dpo_ds import engine

    src = os.path.join(os.path.dirname(deepspeed.__file__), "ops", "csrc", "cpu", "comm", "shm.cpp")
    text = " ".join(open(src).read().split())
    assert '#define SHM_BUFFER_NAME "deepspeed_allreduce_buffer"' in text
    assert '"%s_%d_%s_%s", SHM_BUFFER_NAME, getuid(), addr_string, port_string);' in text
    assert 'snprintf(shm_name, NAME_BUF_SIZE, "%s_%d", shm_name_prefix, rank);' in text
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29511")
    assert engine.shm_workspace_path(1).name == f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29511_1"


def test_each_environment_builds_deepspeeds_ops_in_its_own_folder(tmp_path):
    """Two venvs on one machine must not rebuild each other's DeepSpeed ops in the one folder torch
    defaults to: without TORCH_EXTENSIONS_DIR, importing dpo_ds.engine puts the build under sys.prefix;
    an explicit TORCH_EXTENSIONS_DIR still wins."""
    probe = ("from dpo_ds import engine; from torch.utils.cpp_extension import _get_build_directory; "
             "print(_get_build_directory('deepspeed_shm_comm', False))")

    def build_dir(extensions_dir: str | None) -> Path:
        e = {k: v for k, v in env().items() if k != "TORCH_EXTENSIONS_DIR"}
        if extensions_dir is not None:
            e["TORCH_EXTENSIONS_DIR"] = extensions_dir
        out = subprocess.run([sys.executable, "-c", probe], env=e, capture_output=True, text=True, check=True)
        return Path(out.stdout.strip().splitlines()[-1])

    assert build_dir(None) == Path(sys.prefix) / "torch_extensions" / "deepspeed_shm_comm"
    assert build_dir(str(tmp_path)) == tmp_path / "deepspeed_shm_comm"
