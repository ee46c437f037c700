"""Multi-node launch paths for real, on one machine pretending to be two nodes.

The infrastructure (sshd on 127.0.0.1 and 127.0.0.2, pdsh, munge + a single-node SLURM, Open MPI)
comes from `tools/ci_infra.sh start`, which leaves $DPO_DS_INFRA_DIR/infra.env for these tests.
A missing piece skips its test with the reason, or fails it when DPO_DS_REQUIRE_INFRA=1 (CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN, REPO, env, free_port, read_scalars, write_run_config

pytestmark = pytest.mark.slow

INFRA_DIR = Path(os.environ.get("DPO_DS_INFRA_DIR", "/tmp/dpo_ds_infra"))
LOOPBACK_ENV = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}  # collectives stay on loopback
# Open MPI: run as root in CI containers, two ranks on one small machine, loopback only.
MPIRUN_ARGS = ["--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "--mca", "btl", "self,tcp",
               "--mca", "btl_tcp_if_include", "lo", "--mca", "oob_tcp_if_include", "lo"]


def missing(reason: str):
    """Skip, or fail when CI promised the infrastructure (DPO_DS_REQUIRE_INFRA=1)."""
    if os.environ.get("DPO_DS_REQUIRE_INFRA") == "1":
        pytest.fail(f"{reason} (DPO_DS_REQUIRE_INFRA=1; run `tools/ci_infra.sh start` as root)")
    pytest.skip(f"{reason}; run `sudo tools/ci_infra.sh start` to test it")


def infra_env() -> dict[str, str]:
    path = INFRA_DIR / "infra.env"
    if not path.is_file():
        missing(f"no {path}")
    return dict(line.split("=", 1) for line in path.read_text().split())


def ssh_args(infra: dict) -> list[str]:
    return ["-i", infra["DPO_DS_SSH_KEY"], "-p", infra["DPO_DS_SSH_PORT"], "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]


@pytest.fixture
def ssh_nodes() -> dict:
    """sshd answering on both loopback "nodes" with the test key, and pdsh."""
    infra = infra_env()
    if shutil.which("pdsh") is None or shutil.which("ssh") is None:
        missing("pdsh or ssh not installed")
    for host in ("127.0.0.1", "127.0.0.2"):
        probe = subprocess.run(["ssh", *ssh_args(infra), host, "true"], capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            missing(f"ssh to {host}:{infra['DPO_DS_SSH_PORT']} failed: {probe.stderr.strip()}")
    return infra


@pytest.fixture
def mpi() -> None:
    if shutil.which("mpirun") is None:
        missing("mpirun not installed (Debian: openmpi-bin)")
    probe = subprocess.run(["mpirun", "-np", "2", *MPIRUN_ARGS, sys.executable, "-c",
                            "from mpi4py import MPI; assert MPI.COMM_WORLD.Get_size() == 2"],
                           capture_output=True, text=True, timeout=60, env=env())
    if probe.returncode != 0:
        missing(f"mpi4py does not run under this mpirun: {probe.stderr.strip()[-500:]}")


@pytest.fixture
def slurm() -> dict:
    """Environment for sbatch/squeue against the test cluster, with an idle node."""
    infra = infra_env()
    if shutil.which("sbatch") is None:
        missing("SLURM not installed (Debian: slurm-wlm)")
    e = {**env(), "SLURM_CONF": infra["SLURM_CONF"]}
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30, env=e)
    if probe.returncode != 0 or not {"idle", "mixed"} & set(probe.stdout.split()):
        missing(f"no idle SLURM node: {probe.stdout.strip()} {probe.stderr.strip()}")
    return e


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, \
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def assert_trained_on_two_ranks(run: Path, max_steps: int) -> None:
    """Both ranks wrote their ZeRO-3 shard of the last checkpoint, and every step was logged."""
    tag = f"step_{max_steps:08d}"
    assert (run / "checkpoints" / "latest").read_text() == tag
    shards = sorted(p.name for p in (run / "checkpoints" / tag).glob("zero_pp_rank_*_optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    steps = [s for s, _ in read_scalars(run / "tensorboard")["train/loss"]]
    assert steps == list(range(1, max_steps + 1))
    assert (run / "export" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_hostfile_launch_over_ssh(ssh_nodes, tiny, tmp_path):
    """`deepspeed --hostfile` with pdsh over ssh: one rank on each of two loopback "nodes"."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    # What the "remote" shells get: the launcher exports PYTHON* and the lines of this file.
    ds_env = tmp_path / "deepspeed_env"
    ds_env.write_text("".join(f"{k}={v}\n" for k, v in {"PATH": f"{BIN}:{os.environ['PATH']}", **LOOPBACK_ENV}.items()))
    cfg = write_run_config(tmp_path / "run.yaml", tiny, tmp_path / "run", train={"max_steps": 2})
    # pdsh's ssh takes the key and options from here; the launcher adds `-p` from --ssh_port.
    ssh_options = [a for a in ssh_args(ssh_nodes) if a not in ("-p", ssh_nodes["DPO_DS_SSH_PORT"])]
    e = {**env(), **LOOPBACK_ENV, "DS_ENV_FILE": str(ds_env), "PDSH_SSH_ARGS_APPEND": " ".join(ssh_options)}
    cmd = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--ssh_port", ssh_nodes["DPO_DS_SSH_PORT"], "--no_ssh_check",
           "launch/train.py", "--deepspeed", "ds_configs/zero3.json", "--config", str(cfg)]
    proc = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=300)
    ok(proc)
    out = proc.stdout + proc.stderr
    assert "127.0.0.2: " in out, "nothing ran on the second node"  # pdsh prefixes each node's output
    assert_trained_on_two_ranks(tmp_path / "run", 2)


def test_mpirun_launch(mpi, tiny, tmp_path):
    """`mpirun -np 2 python launch/train.py`: ranks from mpi4py, rendezvous from MASTER_ADDR/PORT."""
    cfg = write_run_config(tmp_path / "run.yaml", tiny, tmp_path / "run", train={"max_steps": 2})
    e = {**env(), **LOOPBACK_ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    cmd = ["mpirun", "-np", "2", *MPIRUN_ARGS, "--tag-output",
           *[a for k in ("PATH", "MASTER_ADDR", "MASTER_PORT", *LOOPBACK_ENV) for a in ("-x", k)],
           sys.executable, "launch/train.py", "--deepspeed", "ds_configs/zero3.json", "--config", str(cfg)]
    proc = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=300)
    ok(proc)
    assert "[1,1]<stderr>:" in proc.stdout + proc.stderr  # rank 1 of MPI_COMM_WORLD ran
    assert_trained_on_two_ranks(tmp_path / "run", 2)


def sbatch(slurm_env: dict, *args: str, cwd: Path = REPO) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=slurm_env, capture_output=True, text=True,
                          timeout=60)
    ok(proc)
    return proc.stdout.strip().split(";")[0]


def job_state(slurm_env: dict, job_id: str) -> tuple[str, int]:
    """(state, restart count) of a job, from scontrol."""
    out = subprocess.run(["scontrol", "show", "job", job_id], env=slurm_env, capture_output=True, text=True).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get("JobState", "UNKNOWN"), int(fields.get("Restarts", 0))


def wait_job(slurm_env: dict, job_id: str, timeout: float, log: Path) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, _ = job_state(slurm_env, job_id)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=slurm_env)
    pytest.fail(f"job {job_id} still {state} after {timeout} s\n{log.read_text()[-6000:] if log.exists() else ''}")


RANK_PROBE = ("from dpo_ds import engine, launchenv; r = launchenv.rank_world_local(); engine.init_distributed(); "
              "print('PROBE', *r, engine.rank(), engine.world_size(), flush=True); engine.destroy()")


def test_slurm_rank_map_with_and_without_srun(slurm, tmp_path):
    """Inside a 2-task allocation the batch script itself is one process (SLURM_NTASKS=2 there is the
    allocation's), and srun's two tasks are a group of two; the map the settings are resolved with
    (launchenv) and the process group (engine) agree in both."""
    script = tmp_path / "probe.sh"
    script.write_text(f"#!/bin/bash\nset -e\n{sys.executable} -c \"{RANK_PROBE}\"\n"
                      f"srun --ntasks=2 {sys.executable} -c \"{RANK_PROBE}\"\n")
    log = tmp_path / "job.out"
    job = sbatch({**slurm, **LOOPBACK_ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())},
                 "--ntasks=2", "--cpus-per-task=1", "--time=5", f"--output={log}", str(script))
    state = wait_job(slurm, job, 240, log)
    text = log.read_text()
    assert state == "COMPLETED", text[-6000:]
    probes = sorted(line.split()[1:] for line in text.splitlines() if line.startswith("PROBE"))
    # (launcher's rank, world size, local rank, group rank, group size): the lone script, then srun's two.
    assert probes == [["0", "1", "0", "0", "1"], ["0", "2", "0", "0", "2"], ["1", "2", "1", "1", "2"]], text[-3000:]


def test_slurm_sbatch_two_tasks(slurm, tiny, tmp_path):
    """`sbatch launch/slurm/train.sbatch` with 2 tasks: srun starts both ranks; the job completes."""
    cfg = write_run_config(tmp_path / "run.yaml", tiny, tmp_path / "run", train={"max_steps": 2})
    log = tmp_path / "job.out"
    job = sbatch({**slurm, **LOOPBACK_ENV}, "--ntasks=2", "--cpus-per-task=1", "--time=10", f"--output={log}",
                 "launch/slurm/train.sbatch", str(cfg), "ds_configs/zero3.json")
    state = wait_job(slurm, job, 240, log)
    text = log.read_text()
    assert state == "COMPLETED", text[-6000:]
    assert "2 tasks on" in text
    assert_trained_on_two_ranks(tmp_path / "run", 2)


def test_slurm_time_limit_signal_checkpoints_and_requeues(slurm, tiny, tmp_path):
    """USR1 to the batch script (what --signal=B:USR1@120 sends) -> checkpoint, exit 75, requeue, finish."""
    max_steps = 8
    run = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", tiny, run, train={"max_steps": max_steps},
                           checkpoint={"every_steps": 2, "keep_last": 3})
    log = tmp_path / "job.out"
    job = sbatch({**slurm, **LOOPBACK_ENV}, "--ntasks=2", "--cpus-per-task=1", "--time=10", f"--output={log}",
                 "launch/slurm/train.sbatch", str(cfg), "ds_configs/zero3.json")
    deadline = time.monotonic() + 180
    while not (run / "checkpoints" / "latest").is_file():
        assert time.monotonic() < deadline, log.read_text()[-6000:] if log.exists() else "no job output"
        time.sleep(0.5)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm, check=True)
    state = wait_job(slurm, job, 300, log)
    text = log.read_text()
    assert state == "COMPLETED", text[-6000:]
    assert "requeueing job" in text and "(restart 1)" in text, text[-6000:]
    assert "resumed from" in text, text[-6000:]
    assert (run / "checkpoints" / "latest").read_text() == f"step_{max_steps:08d}"
    steps = [s for s, _ in read_scalars(run / "tensorboard")["train/loss"]]
    assert sorted(set(steps)) == list(range(1, max_steps + 1))


def test_no_ssh_launch_one_launcher_per_node(tiny, tmp_path):
    """`deepspeed --no_ssh --node_rank=N` on each "node" (for clusters that forbid ssh): no ssh, no pdsh."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    cfg = write_run_config(tmp_path / "run.yaml", tiny, tmp_path / "run", train={"max_steps": 2})
    port = str(free_port())
    nodes = [subprocess.Popen([str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", f"--node_rank={n}",
                               "--master_addr", "127.0.0.1", "--master_port", port, "launch/train.py",
                               "--deepspeed", "ds_configs/zero3.json", "--config", str(cfg)],
                              cwd=REPO, env={**env(), **LOOPBACK_ENV}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    for p, out in zip(nodes, outs):
        assert p.returncode == 0, out[-6000:]
    assert_trained_on_two_ranks(tmp_path / "run", 2)


def test_slurm_precompute_two_tasks(slurm, tiny, tmp_path):
    """`sbatch launch/slurm/precompute_ref.sbatch` with 2 tasks: each rank writes its own shards' cache files."""
    import json

    cfg = write_run_config(tmp_path / "run.yaml", tiny, tmp_path / "run",
                           reference={"mode": "cache", "cache_dir": str(tmp_path / "cache")})
    log = tmp_path / "job.out"
    job = sbatch({**slurm, **LOOPBACK_ENV}, "--ntasks=2", "--cpus-per-task=1", "--time=10", f"--output={log}",
                 "launch/slurm/precompute_ref.sbatch", str(cfg), "2", "--batch-size", "8")
    state = wait_job(slurm, job, 240, log)
    text = log.read_text()
    assert state == "COMPLETED", text[-6000:]
    assert "2 tasks on" in text
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["fingerprint"]["num_draws"] == 2
    files = sorted(p.name for p in (tmp_path / "cache").glob("*.ref.safetensors"))
    assert files == [f"shard-{i:06d}.tar.ref.safetensors" for i in range(4)]
