"""Training ranks forked from a warm process: the training entry point with its imports paid once.

A run through the `deepspeed` launcher starts four Python processes (the runner, launch.py, two ranks),
and on this 2-core CPU machine about two thirds of its CPU time goes to importing torch, DeepSpeed,
diffusers, transformers and peft in each of them, and tearing them down again. Tests whose subject is
not the launcher (resume, buckets, caches, faults inside the trainer) start their ranks here instead:
the same `dpo_ds.train.main`, the same environment variables the deepspeed launcher sets (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE, MASTER_ADDR, MASTER_PORT), real processes joined by gloo, but forked
from a multiprocessing fork server that imported the heavy modules once per test worker. The launchers
themselves keep their own tests (tests/test_launchers.py, tests/test_faults.py, one run per family in
tests/test_families.py) through the real commands.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import subprocess
import sys
import time
from pathlib import Path

# Imported once by the fork server (by name: it does not see the tests' sys.path); every rank forked
# from it starts with them loaded. Only imports: nothing may start a thread or touch a device before a fork.
PRELOAD = ["dpo_ds.train", "dpo_ds.trainer", "dpo_ds.models", "torch.utils.tensorboard",
           "diffusers.models.unets.unet_2d_condition", "diffusers.models.transformers.transformer_wan",
           "diffusers.models.unets.unet_3d_condition", "diffusers.models.unets.unet_motion_model",
           "diffusers.models.unets.unet_spatio_temporal_condition",
           # DeepSpeed's ZeRO optimizer check and its stage 3 import it at every initialize, and torch's inductor with it
           "deepspeed.runtime.zero.muon.muon_optimizer"]

_context = None


def _ctx():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
        # torch reads it once, on import in the fork server: one thread per rank, as env() gives a launcher's
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    return _context


def server_pids() -> set[int]:
    """The fork server's pid and its resource tracker's (multiprocessing starts both with the first rank):
    the tests' stray-process guard leaves them be."""
    import multiprocessing.resource_tracker

    return {pid for pid in (getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None),
                            getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None)) if pid}


def _rank(argv: list[str], environ: dict, cwd: str, out_path: str, err_path: str) -> None:
    """One rank: the launcher's environment, output to files, then dpo_ds.train.main as launch/train.py runs it."""
    os.chdir(cwd)
    # dpo_ds.engine, imported by the fork server, pointed torch's extensions folder into this environment
    # (TORCH_EXTENSIONS_DIR, when the parent had none): without it the rank would build DeepSpeed's CPU ops
    # again in the folder every environment shares (~/.cache/torch_extensions), tens of seconds each time.
    inherited = {k: os.environ[k] for k in ("TORCH_EXTENSIONS_DIR",) if k in os.environ}
    os.environ.clear()
    os.environ.update({**inherited, **environ})
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(f, fd)
        os.close(f)
    from dpo_ds.train import main

    try:
        code = main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)


def train(argv: list[str], *, nproc: int, port: int, environ: dict, cwd: Path, log_dir: Path,
          timeout: float) -> subprocess.CompletedProcess:
    """Run `nproc` ranks of dpo_ds.train.main(argv) and wait for them, as the deepspeed launcher would:
    when one rank fails the others get 30 s to follow before they are killed. The result reads like
    the launcher's: the first failing rank's exit status (0 when all succeed), both streams of all ranks."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out, err = log_dir / f"ranks_{port}.out", log_dir / f"ranks_{port}.err"
    out.write_text("")
    err.write_text("")
    procs = []
    for rank in range(nproc):
        env = {**environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_SIZE": str(nproc), "CROSS_RANK": "0", "CROSS_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        p = _ctx().Process(target=_rank, args=([*argv, f"--local_rank={rank}"], env, str(cwd), str(out), str(err)))
        p.start()
        procs.append(p)
    deadline, failed_at, code = time.monotonic() + timeout, None, 0
    while any(p.is_alive() for p in procs):
        now = time.monotonic()
        if now > deadline or (failed_at is not None and now > failed_at + 30):
            for p in procs:
                p.kill()
            if now > deadline:
                for p in procs:
                    p.join(10)
                raise subprocess.TimeoutExpired(argv, timeout, out.read_text(), err.read_text())
        for p in procs:
            if p.exitcode not in (None, 0) and code == 0:
                code, failed_at = p.exitcode, now
        time.sleep(0.05)
    for p in procs:
        p.join()
        if p.exitcode != 0 and code == 0:
            code = p.exitcode
    return subprocess.CompletedProcess(argv, code, out.read_text(), err.read_text())
