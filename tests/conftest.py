"""Shared fixtures: tiny synthetic data and model made by the real tool, and a launcher helper."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# `make test` runs two pytest workers, each taking whole modules (pytest-xdist's --dist loadfile, in
# collection order): the longest modules go first, so that neither worker is left with one of them
# at the end while the other sits idle.
LONGEST_FIRST = ("test_alignment.py", "test_families.py", "test_e2e.py", "test_launchers.py", "test_faults.py",
                 "test_lora.py", "test_world_size_resume.py", "test_reference_cache.py", "test_encode.py",
                 "test_buckets.py", "test_tools_export_sample_score.py", "test_fast_paths.py", "test_video_alignment.py")


def pytest_collection_modifyitems(session, config, items) -> None:
    order = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: within a module unchanged


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    """The test's environment for child processes: this venv's tools first on PATH, no GPUs."""
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["PYTHONUNBUFFERED"] = "1"
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def make_synthetic(out: Path, *args: str) -> Path:
    """`tools/make_synthetic.py --out OUT ARGS...`, run in this process (whose torch and diffusers are imported
    already) instead of a fresh interpreter; returns OUT."""
    from tiny_sdxl import _make_synthetic

    assert _make_synthetic().main(["--out", str(out), *args]) == 0
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """32 synthetic pairs in 4 shards, and a tiny SDXL-shaped model folder, from tools/make_synthetic.py."""
    return make_synthetic(tmp_path_factory.mktemp("tiny"), "--num-pairs", "32", "--pairs-per-shard", "8",
                          "--resolution", "64", "--seed", "0")


def write_run_config(path: Path, tiny: Path, output_dir: Path, **sections) -> Path:
    """A run config for the tiny model; `sections` update it, e.g. train={"max_steps": 3}."""
    import yaml

    cfg = {
        "output_dir": str(output_dir),
        "seed": 0,
        "model": {"pretrained_path": str(tiny / "model")},
        "data": {"shards": str(tiny / "shards"), "resolution": 64, "num_workers": 1, "shuffle_buffer": 8},
        "dpo": {"beta": 500.0},
        "loss": {"sft_weight": 0.0},  # the paper's loss alone: at step 1 (policy = reference) it is log 2
        "train": {"micro_batch_size": 2, "max_steps": 4},
        "optim": {"lr": 1.0e-4},
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "logging": {"progress": True},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(cfg))
    return path


def deepspeed_train(config: Path, *overrides: str, nproc: int = 2, ds_config: str = "ds_configs/zero3.json",
                    timeout: float = 600) -> subprocess.CompletedProcess:
    """Train through the real `deepspeed` launcher with `nproc` CPU processes.

    Also checks that the run left no shared-memory workspace behind (engine.init_distributed
    unlinks DeepSpeed's, which would otherwise leak ~70 MB of RAM per rank and run).
    """
    port = free_port()
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port),
           str(REPO / "launch" / "train.py"), "--deepspeed", str(REPO / ds_config), "--config", str(config),
           *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    leaked = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"shared-memory workspaces left behind: {leaked}"
    return proc


def deepspeed_job(script: str, runs: list[tuple[str, Path]], timeout: float = 900) -> tuple[list, str]:
    """tests/SCRIPT (tests/train_many.py, tests/lora_probe.py) under the real `deepspeed` launcher with 2 CPU
    ranks: its (DeepSpeed JSON in ds_configs/, run config) pairs run one after another in one job. Returns rank
    0's RESULT JSON and the job's stderr; checks, as deepspeed_train, that no shared-memory workspace is left."""
    port = free_port()
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), str(REPO / "tests" / script),
           *[str(a) for ds, cfg in runs for a in (REPO / "ds_configs" / ds, cfg)]]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    leaked = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"shared-memory workspaces left behind: {leaked}"
    return json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0]), proc.stderr


def fork_train(config: Path, *overrides: str, nproc: int = 2, ds_config: str = "ds_configs/zero3.json",
               timeout: float = 600) -> subprocess.CompletedProcess:
    """deepspeed_train's run with ranks forked from a warm process (tests/ranks.py) instead of the launcher's
    four fresh interpreters: for tests whose subject is the trainer, not the launcher. Same ranks' environment,
    same entry point, same result (exit status, both streams)."""
    import ranks

    port = free_port()
    argv = ["--deepspeed", str(REPO / ds_config), "--config", str(config), *overrides]
    proc = ranks.train(argv, nproc=nproc, port=port, environ=env(), cwd=REPO, log_dir=Path(config).parent / "ranks",
                       timeout=timeout)
    leaked = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"shared-memory workspaces left behind: {leaked}"
    return proc


def _become_subreaper() -> None:
    """Orphans of the tests' process trees (a launcher's ranks after a timeout killed the launcher)
    become children of this process instead of init, so `_no_stray_processes` can end them."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


_become_subreaper()


@pytest.fixture(autouse=True)
def _no_stray_processes():
    """After every test, end whatever it started and left running: a hung rank must not eat the
    CPU and memory of every later test."""
    yield
    import psutil

    import ranks

    keep = ranks.server_pids()  # fork_train's warm fork server; the ranks it forked are strays like any other
    stray = [p for p in psutil.Process().children(recursive=True) if p.pid not in keep]
    for p in stray:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(stray, timeout=30)


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def write_raw_tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A tar written by hand, so it can hold what ShardWriter refuses to write."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
