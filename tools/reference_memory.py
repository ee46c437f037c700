"""Measure: the live reference's memory per rank with model.trainable, the policy's module shared against a full copy.

Builds a family's tiny denoiser from config (nothing is downloaded) with model.trainable (default: the family's
DEFAULT_TRAINABLE, e.g. `motion`'s motion modules), the policy in a DeepSpeed engine (ZeRO-3 by default), and
beside it both live references training could use: the full frozen copy in its own ZeRO-3 engine
(dpo_ds.engine.build_reference, reference.offload) and the reference inside the policy
(dpo_ds.reference.SharedReference). Counts the bytes of the tensors each holds beside the policy on this rank,
every storage once: the full copy's ZeRO-3 partitions (param.ds_tensor; on the CPU when offloaded) and the
shared reference's initial trainable values (this rank's partitions under ZeRO-3). Not counted: the parameters
a forward gathers for a moment (both references gather theirs), and what the full copy keeps gathered after
its first forward (its persistent parameters, stage3_param_persistence_threshold; the shared reference's
persistent parameters are the policy's own). Prints one JSON line:
  {"family", "ds_config", "world_size", "num_params", "num_trainable", "trainable_share": num_trainable /
   num_params, "full_copy_bytes", "shared_bytes", "ratio": shared / full copy}

  python tools/reference_memory.py [--family motion] [--ds-config ds_configs/zero3.json] [--offload cpu|none]
  deepspeed --num_gpus 2 tools/reference_memory.py ...      per rank, on several ranks (printed by rank 0)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from types import SimpleNamespace

import torch

from dpo_ds import engine, models
from dpo_ds.config import OptimConfig, TrainConfig, resolve_ds_config
from dpo_ds.models import family_class
from dpo_ds.reference import SharedReference


def measure(family_name: str, ds_config_path: str, offload: str, trainable: list[str] | None) -> dict:
    """The JSON line's figures for this rank (a process group must exist: engine.init_distributed)."""
    cls = family_class(family_name)
    torch.manual_seed(0)
    denoiser = cls.denoiser_from_config(cls.TINY_DENOISER_CONFIG)
    models.select_trainable(denoiser, trainable if trainable is not None else cls.DEFAULT_TRAINABLE)
    num_params = sum(p.numel() for p in denoiser.parameters())
    num_trainable = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    run = SimpleNamespace(train=TrainConfig(max_steps=1), optim=OptimConfig())  # all resolve_ds_config reads
    ds_config = resolve_ds_config(ds_config_path, run, engine.world_size(), "fp32")
    full_copy = engine.build_reference(copy.deepcopy(denoiser), ds_config, offload)
    policy = engine.Policy(denoiser, ds_config, run.optim, max_steps=1)
    shared = SharedReference(None, torch.float32)
    shared.bind(policy)
    full_bytes, shared_bytes = engine.module_held_bytes(full_copy.module), shared.held_bytes()
    return {"family": family_name, "ds_config": ds_config_path, "world_size": engine.world_size(),
            "num_params": num_params, "num_trainable": num_trainable, "trainable_share": num_trainable / num_params,
            "full_copy_bytes": full_bytes, "shared_bytes": shared_bytes, "ratio": shared_bytes / full_bytes}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="motion")
    ap.add_argument("--ds-config", default="ds_configs/zero3.json", help="the policy's DeepSpeed JSON")
    ap.add_argument("--offload", choices=("cpu", "none"), default="cpu", help="the full copy's reference.offload")
    ap.add_argument("--trainable", default=None, help="model.trainable as JSON (default: the family's)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = ap.parse_args(argv)
    engine.init_distributed()
    result = measure(args.family, args.ds_config, args.offload,
                     json.loads(args.trainable) if args.trainable is not None else None)
    if engine.rank() == 0:
        print(json.dumps(result), flush=True)
    engine.destroy()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
