"""Model families, and the family-independent way to get a pair's errors.

Each family module (one per family: `sdxl`, ...) provides LATENT_LAYOUT,
DENOISER_SUBFOLDER, load_denoiser, set_attention, sample_schema, predict and
export. Nothing here knows about DeepSpeed: `model` below is any callable
module, a bare one or an engine wrapping it.
"""

from __future__ import annotations

import json
import os
from types import ModuleType

import torch

from dpo_ds.losses import per_sample_error
from dpo_ds.noise import NoiseSchedule
from dpo_ds.models import sdxl

FAMILIES: dict[str, ModuleType] = {"sdxl": sdxl}


def family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"model.family {name!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def load_scheduler_config(pretrained_path: str | None, scheduler_config: str | None) -> dict:
    path = scheduler_config or os.path.join(pretrained_path or "", "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        raise ValueError(f"scheduler config {path} does not exist; set model.scheduler_config")
    with open(path) as f:
        return json.load(f)


def noisy_pair(batch: dict, schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise winner and loser with the pair's shared draw.

    Returns x_t [2B x ...] (winners then losers), the target [2B x ...], timesteps [2B].
    """
    x0 = torch.cat([batch["latents_w"], batch["latents_l"]])
    noise = batch["noise"].repeat(2, *([1] * (batch["noise"].ndim - 1)))
    t = batch["timesteps"].repeat(2)
    return schedule.add_noise(x0, noise, t), schedule.target(x0, noise, t), t


def pair_errors(spec: ModuleType, model, batch: dict, x_t: torch.Tensor, target: torch.Tensor,
                t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample errors [B] of `model` on winners and losers (one forward of 2B samples)."""
    pred = spec.predict(model, x_t.to(dtype), t, batch)
    err = per_sample_error(pred, target)
    return err.chunk(2)
