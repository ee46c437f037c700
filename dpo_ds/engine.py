"""Everything DeepSpeed: process group, engines, backward/step, checkpoint I/O, collectives.

This is the only module that imports deepspeed. The trainer sees a `Policy`
(trainable, ZeRO-2/3; its trainable values can be swapped for a reference's
forward), a frozen reference engine (ZeRO-3 inference, parameters offloaded),
and a handful of collective helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import logging
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import deepspeed
import psutil
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.checkpoint import ds_to_universal
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.runtime.zero.partitioned_param_coordinator import ZeRoTraceMode

from dpo_ds import launchenv
from dpo_ds.config import OptimConfig

log = logging.getLogger("dpo_ds")

# DeepSpeed compiles its CPU ops (shm communication, CPU Adam) into torch's extensions folder, which every
# Python environment of a user shares (~/.cache/torch_extensions): two venvs on one machine rebuild each
# other's ops (minutes, under a lock the others wait on) at every switch. So each environment gets its own
# (sys.prefix is the venv; torch reads the variable when it builds). An explicit TORCH_EXTENSIONS_DIR wins.
if os.access(sys.prefix, os.W_OK):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
# torch builds with the first `ninja` on PATH. The environment's own (pip's) and the system's differ in
# version and ninja log, so a process started without the venv's bin/ on PATH (`.venv/bin/python ...`)
# would rebuild what one started with it built (about 45 s on 2 cores), and the other way round.
_bin = os.path.dirname(sys.executable)
if os.path.isfile(os.path.join(_bin, "ninja")) and os.environ.get("PATH", "").split(os.pathsep)[0] != _bin:
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")

# The ZeRO-3 parameter coordinator's step state (private to DeepSpeed 0.19's PartitionedParameterCoordinator):
# its trace mode, position in the trace and count of gathered elements, which the reference's forward inside the
# policy must leave as it found them (Policy.values_swapped_in).
_COORDINATOR_STEP = tuple(f"_PartitionedParameterCoordinator__{name}"
                          for name in ("trace_mode", "step_id", "n_available_params"))

LATEST = "latest"
COMPLETE = "COMPLETE"
UNIVERSAL = "universal"  # <tag>/universal: the tag converted by ds_to_universal, loadable on any world size


# ---------------------------------------------------------------- processes

# (host name, pid, process start time) of every rank, gathered at init: what a survivor needs to tell
# which peer is gone when a collective fails (a dead peer's exit is seen by its launcher only, and
# DeepSpeed's launcher does not say which rank it was).
_PEERS: list[tuple[str, int, float]] = []
# A gloo group over all ranks for flags the host holds (any_rank): agreeing on them through nccl would copy
# them to the GPU and read the answer back, waiting for all queued GPU work. None: the default group (CPU).
_HOST_GROUP = None


def init_distributed(timeout_minutes: float = 30.0) -> None:
    """Join the process group (gloo on CPU, nccl on NVIDIA GPUs); a single process forms a group of one.

    Ranks come from the launcher, as dpo_ds.launchenv reads it: RANK/WORLD_SIZE (deepspeed, torchrun),
    srun's job-step variables, or mpi4py (mpirun). A rank that dies makes its peers' collectives fail
    (gloo at once, nccl after `timeout_minutes`), and every launcher then ends the job; each rank records
    every peer's host and pid here, so that a survivor can say which rank it was (describe_lost_peers).
    """
    kind = launchenv.launcher()
    if kind == "srun":
        _env_from_slurm()
    elif kind in ("openmpi", "mpi"):
        _env_from_mpi()
    elif kind is None:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(29500 + os.getpid() % 1000)))
    if not has_gpu():
        clear_stale_build_lock()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               auto_mpi_discovery=False, timeout=datetime.timedelta(minutes=timeout_minutes))
    if has_gpu():
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
        global _HOST_GROUP
        _HOST_GROUP = dist.new_group(backend="gloo")
    else:
        _unlink_shm_workspace()
    _PEERS[:] = all_gather_object((socket.gethostname(), os.getpid(), psutil.Process().create_time()))


def describe_lost_peers(wait_s: float = 5.0) -> str:
    """Which peers are gone, in words, for a rank whose collective just failed.

    Peers on this host are looked up by pid (a zombie, or a pid now used by a younger process, is
    gone); a peer that is still exiting gets up to wait_s to go. Peers on other hosts cannot be seen
    from here and are named as unchecked.
    """
    host, me = socket.gethostname(), rank()
    local = {r: pid for r, (h, pid, _) in enumerate(_PEERS) if h == host and r != me}
    remote = [f"rank {r} on {h}" for r, (h, _, _) in enumerate(_PEERS) if h != host]
    deadline = time.monotonic() + wait_s
    while True:
        gone = [r for r in local if not _is_running(*_PEERS[r][1:])]
        if gone or not local or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    words = [f"rank {r} (pid {local[r]} on host {host}) died" for r in gone]
    if not gone and local:
        words.append(f"no peer on host {host} is gone (ranks {', '.join(map(str, local))} still run)")
    if remote:
        words.append(f"{', '.join(remote)} could not be checked from this host")
    return "; ".join(words) if words else "this rank has no peers"


def _is_running(pid: int, create_time: float) -> bool:
    try:
        p = psutil.Process(pid)
        return p.create_time() == create_time and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ZombieProcess included
        return False


STALE_BUILD_LOCK_S = 600  # the op compiles in under a minute; a lock this old belongs to a killed build


def clear_stale_build_lock(name: str = "deepspeed_shm_comm") -> bool:
    """Remove torch's build lock of DeepSpeed's CPU communication op when its builder is long gone.

    DeepSpeed compiles the op on first use, under a lock file in the torch extensions folder.
    A build that was killed (preemption, OOM, a timeout) leaves the lock behind, and every later
    run then waits on it forever without a word. Returns whether a stale lock was removed.
    """
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_BUILD_LOCK_S:
        return False
    log.warning("removing %s: a build lock %.0f s old, left by a compile that was killed", lock, age)
    lock.unlink(missing_ok=True)
    return True


def build_cpu_ops() -> None:
    """Compile DeepSpeed's CPU ops now, into this environment's extensions folder: the communication
    op every CPU run loads, and the CPU Adam of ds_configs/zero3_offload.json.

    `make venv` calls this once, so a fresh clone's first run does not spend about a minute compiling
    before its first step. Does nothing on other accelerators (GPUs build their own ops)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    if get_accelerator().device_name() != "cpu":
        return
    clear_stale_build_lock()
    build_shm_op()
    clear_stale_build_lock("cpu_adam")
    get_accelerator().create_op_builder("CPUAdamBuilder").load()


def shm_workspace_path(rank: int) -> Path:
    """Where DeepSpeed's CPU backend puts a rank's shared-memory all-reduce workspace (see its shm.cpp)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def _unlink_shm_workspace() -> None:
    """Remove this rank's /dev/shm workspace name once every peer has mapped it.

    When all ranks share a node, DeepSpeed's CPU backend creates a ~70 MB /dev/shm file per rank
    and never unlinks it, so every run leaks RAM (tmpfs) until the machine runs out. The mappings
    stay valid after the unlink; the memory is freed when the last process exits, kill -9 included.
    Every rank has opened every peer's file before it returns from initialisation, hence the barrier.
    """
    dist.barrier()
    shm_workspace_path(dist.get_rank()).unlink(missing_ok=True)


def _env_from_slurm() -> None:
    """torch.distributed's variables from srun's; the first node of the job hosts the rendezvous.

    The port defaults to one derived from the job id, so that two jobs sharing a node do not collide.
    """
    if "MASTER_ADDR" not in os.environ:
        hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               check=True, capture_output=True, text=True).stdout.split()
        os.environ["MASTER_ADDR"] = hosts[0]
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", 0)) % 20000))
    rank, world_size, local_rank = launchenv.rank_world_local()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))


def _env_from_mpi() -> None:
    """torch.distributed's variables through mpi4py; rank 0's host address unless MASTER_ADDR is given.

    DeepSpeed's own discovery takes `hostname -I` and a fixed port; this one honours
    MASTER_ADDR/MASTER_PORT (`mpirun -x MASTER_ADDR=... -x MASTER_PORT=...`).
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    addr = os.environ.get("MASTER_ADDR") or (socket.gethostbyname(socket.gethostname()) if comm.rank == 0 else None)
    os.environ.update(RANK=str(comm.rank), WORLD_SIZE=str(comm.size),
                      LOCAL_RANK=str(comm.Split_type(MPI.COMM_TYPE_SHARED).rank),
                      MASTER_ADDR=comm.bcast(addr, root=0), MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))


def has_gpu() -> bool:
    return get_accelerator().device_name() != "cpu"


def gpu_has_bf16() -> bool:
    return has_gpu() and get_accelerator().is_bf16_supported()


def device() -> torch.device:
    return torch.device(get_accelerator().current_device_name())


def device_name() -> str | None:
    """The accelerator's model name (e.g. "NVIDIA H100 80GB HBM3"); None on CPU."""
    return torch.cuda.get_device_name() if has_gpu() and torch.cuda.is_available() else None


def max_memory_allocated_gb() -> float:
    return get_accelerator().max_memory_allocated() / 2**30


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place, returned). CPU tensors go through gloo; GPU ones through nccl."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum over ranks (in place, returned)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_object(obj: object) -> list:
    """Every rank's `obj` (picklable, made by this program), in rank order; [obj] without a process group."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True when `flag` holds on at least one rank (every rank gets the same answer). Host to host: it does not
    wait for the GPU."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_HOST_GROUP)
    return bool(t.item() > 0)


def any_rank_true(flag: torch.Tensor) -> bool:
    """True when the device's [ ] bool `flag` holds on at least one rank: one host-device synchronisation."""
    return bool(all_reduce_sum(flag.reshape(1).float()).item() > 0)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- optimizer

def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of optim.lr at optimizer step `step` (0-based): linear warmup, then constant or cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _client_optimizer(params, cfg: OptimConfig, lr: float, offload: bool) -> torch.optim.Optimizer:
    if cfg.name == "adafactor":
        from transformers.optimization import Adafactor

        # Fixed lr (no relative step), so the schedule above is the only one.
        return Adafactor(params, lr=lr, weight_decay=cfg.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    # ZeRO hands the optimizer one flat fp32 partition per group: the fused kernel reads and writes it once per
    # step, where the others make a pass per operation (about ten), which is what the step's time is made of.
    implementation = cfg.implementation if cfg.implementation != "auto" else "fused" if has_gpu() else "default"
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False},
              "default": {}}[implementation]
    return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **kernel)


# ---------------------------------------------------------------- engines

class Policy:
    """The trainable denoiser inside a DeepSpeed engine (ZeRO stage from the DeepSpeed JSON)."""

    def __init__(self, model: torch.nn.Module, ds_config: dict, optim: OptimConfig, max_steps: int,
                 is_adapters_only: bool = False):
        """is_adapters_only (LoRA): checkpoints leave out the frozen parameters (the base model, which a resume
        rebuilds from model.pretrained_path), so they hold the adapters, their optimizer state and the rest."""
        self.is_adapters_only = is_adapters_only
        zero = ds_config.get("zero_optimization", {})
        is_offloaded = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
        if optim.name == "adafactor":
            ds_config = {**ds_config, "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
        params = [p for p in model.parameters() if p.requires_grad]
        num_trainable = sum(p.numel() for p in params)  # now: ZeRO-3 leaves each parameter an empty placeholder
        lr = optim.peak_lr(ds_config["train_batch_size"])
        optimizer = None if "optimizer" in ds_config else _client_optimizer(params, optim, lr, is_offloaded)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, optim, max_steps)),
        )
        self.is_zero3 = zero.get("stage", 0) == 3
        is_fused = optimizer is not None and optimizer.defaults.get("fused")
        log.info("policy: %s trainable parameters, ZeRO stage %d, optimizer %s%s, peak lr %.4g%s",
                 f"{num_trainable:,}", zero.get("stage", 0),
                 (f"{type(optimizer).__name__}{' (fused)' if is_fused else ''}" if optimizer is not None
                  else ds_config["optimizer"].get("type")),
                 ", its state offloaded to cpu" if is_offloaded else "", lr,
                 f" (optim.lr {optim.lr:g} x global batch {ds_config['train_batch_size']})" if optim.scale_lr else "")

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def train(self) -> None:
        self.engine.train()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def is_boundary(self) -> bool:
        return self.engine.is_gradient_accumulation_boundary()

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def state_bytes(self) -> dict[str, int]:
        """This rank's bytes of what ZeRO-3 partitions, after a step: "params" (the parameters left whole on
        the rank, below stage3_param_persistence_threshold, and the partitions of the others, working copy
        and fp32 master), "grads" (the gradient partitions) and "optimizer" (the optimizer's state). A
        storage shared by several is counted once (tools/bench.py's ZeRO-3 memory figure)."""
        assert self.is_zero3, "state_bytes reads ZeRO-3's partitions"
        opt, seen = self.optimizer, set()
        nbytes = lambda tensors: held_bytes(tensors, seen)  # noqa: E731  (one `seen` across the three kinds)

        return {"params": nbytes([p.data for p in self.module.parameters()] + list(opt.fp16_partitioned_groups_flat)
                                 + list(opt.fp32_partitioned_groups_flat)),
                "grads": nbytes([opt.grad_partitions_flat_buffer]),
                "optimizer": nbytes([v for state in opt.optimizer.state.values() for v in state.values()
                                     if torch.is_tensor(v)])}

    # ------------------------------------------------------------ a reference inside the policy

    def trainable_values(self) -> list[torch.Tensor]:
        """Copies of what this rank holds of the trainable parameters, in module order: each parameter whole under
        ZeRO-0/1/2, this rank's partition of it (param.ds_tensor) under ZeRO-3. Taken before the first step, they
        are the values of a reference that runs the policy's own module (values_swapped_in)."""
        if self.is_zero3:
            for p in self._trainable():
                if p.ds_tensor.final_location == "nvme":
                    raise ValueError("reference.mode=live with model.trainable: the policy's parameters are offloaded "
                                     "to nvme, which the reference inside the policy does not support; use "
                                     "reference.mode=cache, or offload_param to cpu")
            return [p.ds_tensor.detach().clone() for p in self._trainable()]
        return [p.detach().clone() for p in self._trainable()]

    @contextlib.contextmanager
    def values_swapped_in(self, values: list[torch.Tensor]):
        """The policy's module with its trainable parameters holding `values` (trainable_values' layout), for a
        forward under no_grad; on leaving, every parameter holds its own tensor again (the same storage, so the
        policy is bitwise what it was, and a pending backward sees its own forward's weights).

        Under ZeRO-3 the swap is of the partitions a forward gathers from. Every gathered parameter is released
        first (ZeRO-3 keeps some gathered for reuse, holding the policy's values) and again after (holding the
        swapped ones); the persistent ones (ds_persist, kept gathered between steps) are then gathered back, and
        hpZ's secondary partitions of the trainable ones dropped, so that the backward gathers from its own.
        The forward is hidden from the policy's parameter coordinator: it would start a new step of its trace
        in the middle of the policy's forward and backward, which then never matches and never prefetches."""
        params = self._trainable()
        assert len(values) == len(params), "values_swapped_in takes trainable_values' list"
        if not self.is_zero3:
            own = [p.data for p in params]
            try:
                for p, v in zip(params, values):
                    p.data = v
                yield self.module
            finally:
                for p, o in zip(params, own):
                    p.data = o
            return
        offload = self.engine.optimizer.parameter_offload
        persistent = [p for p in self.module.parameters() if p.ds_persist and p.ds_status == ZeroParamStatus.AVAILABLE]
        offload.partition_all_parameters()
        coordinator = offload.get_param_coordinator()
        trace = {name: getattr(coordinator, name) for name in _COORDINATOR_STEP}
        own = [p.ds_tensor.data for p in params]
        try:
            # No step starts (the root module's pre-forward hook), nothing is traced or prefetched: each
            # submodule gathers its parameters and releases them after.
            coordinator.reset_step = lambda: None
            setattr(coordinator, _COORDINATOR_STEP[0], ZeRoTraceMode.INVALID)
            for p, v in zip(params, values):
                p.ds_tensor.data, p.ds_secondary_tensor = v, None
            yield self.module
        finally:
            offload.partition_all_parameters()
            del coordinator.reset_step
            for name, value in trace.items():
                setattr(coordinator, name, value)
            for p, o in zip(params, own):
                p.ds_tensor.data, p.ds_secondary_tensor = o, None
            if persistent:
                persistent[0].all_gather(persistent)

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, ckpt_dir: str, tag: str, client_state: dict, keep_last: int, rank_state: dict) -> None:
        """Write a checkpoint on every rank; only then move `latest` to it and prune old ones.

        `latest` is written last, by rank 0, after a barrier and atomically, so a
        checkpoint cut off mid-write is never the one a resume picks. rank_state is this
        rank's own JSON state (read back with read_rank_state), kept out of DeepSpeed's files
        because a resume on another world size must read every old rank's.
        """
        client_state = {**client_state, "rng": _rng_state()}
        self.engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False,
                                    exclude_frozen_parameters=self.is_adapters_only)
        Path(ckpt_dir, tag, f"rank_state_{rank():05d}.json").write_text(json.dumps(rank_state))
        barrier()
        if rank() == 0:
            Path(ckpt_dir, tag, COMPLETE).write_text("")
            tmp = Path(ckpt_dir, LATEST + ".tmp")
            tmp.write_text(tag)
            os.replace(tmp, Path(ckpt_dir, LATEST))
            _prune(Path(ckpt_dir), keep_last, keep=tag)
        barrier()

    def load_checkpoint(self, ckpt_dir: str, tag: str) -> dict:
        """Restore model, optimizer, scheduler and RNG state; return the client state.

        A checkpoint written by another number of processes goes through DeepSpeed's universal
        checkpoint: rank 0 converts it once into <tag>/universal (fp32 weights and Adam's moments
        per parameter, unpartitioned), then every rank loads its new partition from there. Every
        rank then gets rank 0's client state; RNG states are identical on all ranks anyway
        (Trainer seeds every rank alike), so restoring rank 0's on all is what a fresh run has.
        """
        num_saved_ranks = checkpoint_world_size(ckpt_dir, tag)
        if num_saved_ranks == world_size():
            load_path, client_state = self.engine.load_checkpoint(ckpt_dir, tag=tag,
                                                                  load_module_strict=not self.is_adapters_only)
        else:
            if not self.engine.load_universal_checkpoint():
                raise RuntimeError(f"checkpoint {ckpt_dir}/{tag} was written by {num_saved_ranks} processes: build "
                                   "the Policy with the DeepSpeed config of engine.config_for_resume")
            universal = Path(ckpt_dir, tag, UNIVERSAL)
            if rank() == 0 and not universal.is_dir():
                log.info("checkpoint %s/%s was written by %d processes, this run has %d: converting it to "
                         "DeepSpeed's universal format in %s", ckpt_dir, tag, num_saved_ranks, world_size(), universal)
                _to_universal(Path(ckpt_dir, tag), universal)
            barrier()
            load_path, client_state = self.engine.load_checkpoint(str(Path(ckpt_dir, tag)), tag=UNIVERSAL,
                                                                  load_module_strict=not self.is_adapters_only)
        if load_path is None:
            raise ValueError(f"checkpoint {ckpt_dir}/{tag} could not be loaded")
        _set_rng_state(client_state.pop("rng"))
        return client_state

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """The whole model's weights on rank 0's CPU (empty elsewhere), gathered one tensor at a time;
        trainable_only: the trained parameters alone (LoRA's adapters), no buffers."""
        out: dict[str, torch.Tensor] = {}
        for name, p in self.module.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank() == 0:
                    out[name] = p.detach().to("cpu", copy=True)
        if rank() == 0 and not trainable_only:
            out.update({name: b.detach().to("cpu", copy=True) for name, b in self.module.named_buffers()})
        return out


def build_reference(model: torch.nn.Module, policy_ds_config: dict, offload: str) -> "deepspeed.DeepSpeedEngine":
    """A frozen copy for inference: ZeRO-3 partitioned, parameters offloaded to CPU between uses."""
    for p in model.parameters():
        p.requires_grad_(False)
    zero = {"stage": 3}
    if offload == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": has_gpu()}
    ds_config = {
        "train_micro_batch_size_per_gpu": policy_ds_config["train_micro_batch_size_per_gpu"],
        "zero_optimization": zero,
        "bf16": {"enabled": policy_ds_config.get("bf16", {}).get("enabled", False)},
        "fp16": {"enabled": policy_ds_config.get("fp16", {}).get("enabled", False)},
    }
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


def held_bytes(tensors, seen: set | None = None) -> int:
    """Bytes of the storages behind `tensors`, each storage once (views of one buffer count it once); `seen`,
    the storages already counted elsewhere, is updated."""
    seen, total = set() if seen is None else seen, 0
    for t in tensors:
        storage = t.untyped_storage()
        if t.numel() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def module_held_bytes(model: torch.nn.Module) -> int:
    """This rank's bytes of a module's parameters as DeepSpeed holds them: under ZeRO-3 its partitions
    (param.ds_tensor) and the parameters gathered now (the persistent ones, after a forward), else the
    parameters themselves."""
    tensors = [p.data for p in model.parameters()]
    return held_bytes(tensors + [p.ds_tensor for p in model.parameters() if getattr(p, "ds_tensor", None) is not None])


def checkpoint_world_size(ckpt_dir: str, tag: str) -> int:
    """Processes that wrote the checkpoint: one ZeRO optimizer partition each (ZeRO-2 and -3)."""
    pattern = "*zero_pp_rank_*_optim_states.pt"
    num_ranks = len(glob.glob(os.path.join(glob.escape(os.path.join(ckpt_dir, tag)), pattern)))
    if num_ranks == 0:
        raise ValueError(f"checkpoint {ckpt_dir}/{tag} holds no ZeRO optimizer states ({pattern})")
    return num_ranks


def read_rank_state(ckpt_dir: str, tag: str, saved_rank: int) -> dict | None:
    """The rank_state that rank `saved_rank` wrote with the checkpoint (Policy.save_checkpoint);
    None for a checkpoint written before rank states were."""
    path = Path(ckpt_dir, tag, f"rank_state_{saved_rank:05d}.json")
    return json.loads(path.read_text()) if path.is_file() else None


def _to_universal(checkpoint: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal, into a temporary folder renamed at the end: a conversion cut off
    midway is redone, never loaded."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    num_workers = max(1, min(8, (os.cpu_count() or 1) // 2))
    ds_to_universal.main(argparse.Namespace(
        input_folder=str(checkpoint), output_folder=str(tmp), num_extract_workers=num_workers,
        num_merge_workers=num_workers, keep_temp_folder=False, no_strict=False, inject_missing_state=False))
    os.replace(tmp, out)
    Path(checkpoint, "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer to tmp


def config_for_resume(ds_config: dict, ckpt_dir: str, tag: str | None) -> dict:
    """The policy's DeepSpeed config for a run that resumes from ckpt_dir/tag (None: a fresh run).

    A checkpoint written by another number of processes is loaded through DeepSpeed's universal
    format, which its `checkpoint.load_universal` switch selects; it is read at load time only, and
    the same world size keeps DeepSpeed's exact path.
    """
    if tag is None or checkpoint_world_size(ckpt_dir, tag) == world_size():
        return ds_config
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def complete_tag(ckpt_dir: str, tag: str) -> str:
    """A complete checkpoint's tag: `latest` -> the tag it names; any other tag as given. Refuses a checkpoint
    cut off mid-write (no COMPLETE marker: rank 0 writes it once every rank's shards are on disk)."""
    if tag == LATEST:
        latest = Path(ckpt_dir, LATEST)
        if not latest.is_file():
            raise ValueError(f"{latest} does not exist: the run has saved no complete checkpoint yet; "
                             "pass a tag with one of the folders of checkpoints/")
        tag = latest.read_text().strip()
    folder = Path(ckpt_dir, tag)
    if (folder / COMPLETE).is_file():
        return tag
    complete = sorted(d.name for d in Path(ckpt_dir).iterdir() if (d / COMPLETE).is_file()) \
        if Path(ckpt_dir).is_dir() else []
    if not folder.is_dir():
        raise ValueError(f"checkpoint {folder} does not exist; complete checkpoints: {complete or 'none'}")
    raise ValueError(f"checkpoint {folder} is incomplete (no {COMPLETE} marker: cut off while being written); "
                     f"complete checkpoints: {complete or 'none'}")


def find_resume_tag(ckpt_dir: str, resume: str) -> str | None:
    """The checkpoint tag to resume from: `none` -> None; `auto` -> the newest complete one, if any; else that tag."""
    if resume == "none" or (resume == "auto" and not Path(ckpt_dir, LATEST).is_file()):
        return None
    try:
        return complete_tag(ckpt_dir, LATEST if resume == "auto" else resume)
    except ValueError as e:
        raise ValueError(f"checkpoint.resume: {e}") from None


def consolidated_state_dict(ckpt_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights, on CPU, merged from the shards of checkpoint `ckpt_dir/tag`.

    Works for ZeRO-2 and ZeRO-3 checkpoints of any world size, in one process and
    without a process group: the fp32 master copy is read from every rank's
    optimizer-state file, so a bf16 run exports its full-precision weights.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)


def _prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    # Tags are zero-padded step numbers, so name order is age order.
    tags = sorted(d for d in ckpt_dir.iterdir() if d.is_dir() and (d / COMPLETE).is_file())
    for d in tags[:-keep_last]:
        if d.name != keep:
            shutil.rmtree(d, ignore_errors=True)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if has_gpu():
        state["accelerator"] = get_accelerator().get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state and has_gpu():
        get_accelerator().set_rng_state(state["accelerator"])
