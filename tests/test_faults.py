"""Faults of a 2-process job: a stop signal, a rank killed with -9, a checkpoint cut off mid-write."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import safetensors.torch
import torch

from conftest import BIN, REPO, env, fork_train, free_port, read_scalars, write_run_config
from test_launchers import LOOPBACK_ENV, MPIRUN_ARGS, missing

pytestmark = pytest.mark.slow

MAX_STEPS = 6
PREEMPTED = 75  # dpo_ds.train.PREEMPTED


def launch(config: Path, *overrides: str) -> subprocess.Popen:
    """The real `deepspeed` launcher, 2 CPU processes, in its own process group."""
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "launch" / "train.py"), "--deepspeed", str(REPO / "ds_configs" / "zero3.json"),
           "--config", str(config), *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env={**env(), **LOOPBACK_ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} never appeared (exit {proc.returncode})\n{proc.communicate()[0][-6000:]}")
        time.sleep(0.2)


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """The training process of `rank` under a deepspeed launcher (not its data loader workers)."""
    for p in psutil.Process(launcher.pid).children(recursive=True):
        cmd = p.cmdline()
        if f"--local_rank={rank}" in cmd and "deepspeed.launcher.launch" in " ".join(p.parent().cmdline()):
            return p
    raise AssertionError(f"no rank {rank} process under {launcher.pid}")


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running after {timeout} s:\n{proc.communicate()[0][-6000:]}")
    return proc.returncode, out


def unet_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "export" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory) -> Path:
    """An uninterrupted run of MAX_STEPS steps (checkpoints every 2, keep 3)."""
    out = tmp_path_factory.mktemp("straight")
    cfg = write_run_config(out / "run.yaml", tiny, out / "run", train={"max_steps": MAX_STEPS},
                           checkpoint={"every_steps": 2, "keep_last": 3})
    code, text = finish(launch(cfg))
    assert code == 0, text[-6000:]
    return out / "run"


def test_signal_to_one_rank_stops_all_then_resume_is_exact(straight, tiny, tmp_path):
    """SIGUSR1 to rank 1 only: both ranks stop after the same step, checkpoint, exit 75; resuming
    to MAX_STEPS gives bitwise the weights of the uninterrupted run."""
    run = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", tiny, run, train={"max_steps": MAX_STEPS},
                           checkpoint={"every_steps": 2, "keep_last": 3})
    proc = launch(cfg)
    wait_for(run / "checkpoints" / "latest", proc)
    rank_process(proc, 1).send_signal(signal.SIGUSR1)
    code, text = finish(proc)
    assert code == PREEMPTED, text[-6000:]
    stopped_at = int((run / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert 2 <= stopped_at < MAX_STEPS, text[-6000:]
    assert f"rank 0: stopped by a signal at step {stopped_at}" in text
    shards = sorted((run / "checkpoints" / f"step_{stopped_at:08d}").glob("zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == 2
    assert not (run / "export").exists()

    code, text = finish(launch(cfg, "--checkpoint.resume=auto"))
    assert code == 0, text[-6000:]
    assert f"at step {stopped_at} " in text
    steps = [s for s, _ in read_scalars(run / "tensorboard")["train/loss"]]
    assert steps == list(range(1, MAX_STEPS + 1))
    a, b = unet_weights(straight), unet_weights(run)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after stop and resume"


def test_sigterm_to_every_rank_stops_with_a_checkpoint(tiny, tmp_path):
    """SIGTERM (what SLURM sends on preemption) to both ranks: a complete checkpoint and exit 75."""
    run = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", tiny, run, train={"max_steps": 50},
                           checkpoint={"every_steps": 2, "keep_last": 2, "export": False})
    proc = launch(cfg)
    wait_for(run / "checkpoints" / "latest", proc)
    for rank in (0, 1):
        rank_process(proc, rank).send_signal(signal.SIGTERM)
    code, text = finish(proc)
    assert code == PREEMPTED, text[-6000:]
    tag = (run / "checkpoints" / "latest").read_text()
    assert (run / "checkpoints" / tag / "COMPLETE").is_file()
    assert int(tag.removeprefix("step_")) < 50


def test_killed_rank_ends_the_job_and_is_named(tiny, tmp_path):
    """kill -9 of one rank under mpirun: the job exits non-zero in bounded time, naming the rank."""
    if shutil.which("mpirun") is None:
        missing("mpirun not installed (Debian: openmpi-bin)")
    run = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", tiny, run, train={"max_steps": 200},
                           checkpoint={"every_steps": 1, "keep_last": 1, "export": False})
    e = {**env(), **LOOPBACK_ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    cmd = ["mpirun", "-np", "2", *MPIRUN_ARGS,
           *[a for k in ("PATH", "MASTER_ADDR", "MASTER_PORT", *LOOPBACK_ENV) for a in ("-x", k)],
           sys.executable, "launch/train.py", "--deepspeed", "ds_configs/zero3.json", "--config", str(cfg)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    wait_for(run / "checkpoints" / "latest", proc)
    victim = next(p for p in psutil.Process(proc.pid).children()
                  if p.environ().get("OMPI_COMM_WORLD_RANK") == "1")
    killed_at = time.monotonic()
    victim.kill()
    code, text = finish(proc, timeout=120)
    assert code != 0, text[-6000:]
    assert time.monotonic() - killed_at < 120
    assert "rank 1" in text and "signal 9" in text, text[-6000:]


def test_killed_rank_is_named_under_the_deepspeed_launcher(tiny, tmp_path):
    """kill -9 of rank 0 under `deepspeed`: the job ends in bounded time, and the survivor names the dead
    rank (the launcher's own last line names the last-started rank's command, whichever rank died)."""
    run = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", tiny, run, train={"max_steps": 200},
                           checkpoint={"every_steps": 1, "keep_last": 1, "export": False})
    proc = launch(cfg)
    wait_for(run / "checkpoints" / "latest", proc)
    victim = rank_process(proc, 0)
    killed_at = time.monotonic()
    victim.kill()
    code, text = finish(proc, timeout=120)
    assert code != 0, text[-6000:]
    assert time.monotonic() - killed_at < 60
    assert f"dpo_ds.train: rank 1: rank 0 (pid {victim.pid} on host {socket.gethostname()}) died" in text, text[-6000:]


def test_cut_off_checkpoint_is_never_resumed(straight, tmp_path):
    """A newer checkpoint whose write was cut off (a truncated file, no COMPLETE, `latest` not moved)
    is skipped by resume=auto; one named explicitly is refused."""
    from dpo_ds import engine

    ckpt = tmp_path / "checkpoints"
    shutil.copytree(straight / "checkpoints", ckpt)
    last = f"step_{MAX_STEPS:08d}"
    cut = ckpt / f"step_{MAX_STEPS + 2:08d}"
    shutil.copytree(ckpt / last, cut)
    (cut / "COMPLETE").unlink()
    shard = next(cut.glob("zero_pp_rank_1_*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    assert engine.find_resume_tag(str(ckpt), "auto") == last
    with pytest.raises(ValueError, match="checkpoint.resume: checkpoint .* is incomplete"):
        engine.find_resume_tag(str(ckpt), cut.name)
    # A crash between the rank writes and `latest` leaves `latest` on the previous complete one.
    (ckpt / "latest").write_text(f"step_{MAX_STEPS - 2:08d}")
    assert engine.find_resume_tag(str(ckpt), "auto") == f"step_{MAX_STEPS - 2:08d}"


def rewrite_shards(tiny: Path, out: Path, change) -> Path:
    """tiny's shards with change(index, tensors) applied to every pair (None: the pair is left out), written
    by hand (so bad pairs are possible) without index.json."""
    from conftest import write_raw_tar
    from dpo_ds import data

    out.mkdir()
    index = 0
    for shard in data.list_shards(str(tiny / "shards")):
        samples = []
        for key, members in data.tar_samples(shard.url):
            tensors = safetensors.torch.load(members["safetensors"])
            change(index, tensors)
            samples.append((key, {"json": members["json"], "safetensors": safetensors.torch.save(tensors)}))
            index += 1
        write_raw_tar(out / Path(shard.url).name, samples)
    return out


def stop_lines(text: str) -> list[str]:
    """The ranks' closing lines; each must be whole (ranks share the launcher's pipe)."""
    lines = [line for line in text.splitlines() if line.startswith("dpo_ds.train: rank") and ": stopped: " in line]
    assert all(line.count("dpo_ds.train:") == 1 for line in lines), lines
    return lines


def test_every_pair_bad_stops_every_rank_through_the_data_guard(tiny, tmp_path):
    """Conditioning of the wrong width in every pair: no rank has a batch, and every rank stops together with
    exit 3 and one line, instead of a traceback from a loader worker (or a rank left waiting)."""
    def narrow(_, tensors):
        tensors["prompt_embeds"] = tensors["prompt_embeds"][:, :-1].contiguous()
    shards = rewrite_shards(tiny, tmp_path / "shards", narrow)
    cfg = write_run_config(tmp_path / "run.yaml", tiny, tmp_path / "run", data={"shards": str(shards)},
                           checkpoint={"every_steps": 100, "export": False})
    proc = fork_train(cfg, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 3, text[-6000:]
    assert "Traceback" not in text, text[-6000:]
    lines = stop_lines(text)
    assert lines and all("found no good pair in epoch 0" in line for line in lines), text[-6000:]
    assert "prompt_embeds has shape" in text  # the warning that says why, per pair


def test_bad_fraction_counts_pairs_read_without_padding(tiny, tmp_path):
    """One bad pair of 32: a batch short of it is padded with a repeat, which is not a pair read (1 of 32, not 33)."""
    def one_nan(index, tensors):
        if index == 5:
            tensors["latents_w"] = torch.full_like(tensors["latents_w"], float("nan"))
    shards = rewrite_shards(tiny, tmp_path / "shards", one_nan)
    cfg = write_run_config(tmp_path / "run.yaml", tiny, tmp_path / "run", data={"shards": str(shards),
                           "max_bad_fraction": 0.0}, train={"max_steps": 8}, logging={"every_steps": 8},
                           checkpoint={"every_steps": 100, "export": False})
    proc = fork_train(cfg, timeout=400)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 3, text[-6000:]
    lines = stop_lines(text)
    assert lines and all("stopped: 1 of 32 pairs read were bad" in line for line in lines), text[-6000:]
