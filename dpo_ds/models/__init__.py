"""Model families behind one interface (dpo_ds/models/family.py), building the run's family, and the
families' encoders.

One module per family (`sdxl`, `sd15`, ...), its encoder beside it (`sdxl_encoder`, ...). Nothing
here knows about DeepSpeed: a family's `errors` takes any callable module, a bare one or an engine
wrapping it.
"""

from __future__ import annotations

import fnmatch
import json
import os

import torch

from dpo_ds.models.family import Family, checkpoint_block
from dpo_ds.models.motion import Motion
from dpo_ds.models.sd15 import SD15
from dpo_ds.models.sd15_encoder import SD15Encoder
from dpo_ds.models.sdxl import SDXL
from dpo_ds.models.sdxl_encoder import SDXLEncoder
from dpo_ds.models.svd import SVD
from dpo_ds.models.svd_encoder import SVDEncoder
from dpo_ds.models.unet3d import UNet3D
from dpo_ds.models.unet3d_encoder import MotionEncoder, UNet3DEncoder
from dpo_ds.models.wan import Wan
from dpo_ds.models.wan_encoder import WanEncoder

FAMILIES: dict[str, type[Family]] = {"sdxl": SDXL, "sd15": SD15, "unet3d": UNet3D, "motion": Motion, "wan": Wan,
                                 "svd": SVD}
# Family name -> its encoder: captions and pixels to the family's shard samples (tools/encode_pairs.py).
ENCODERS: dict[str, type] = {"sdxl": SDXLEncoder, "sd15": SD15Encoder, "unet3d": UNet3DEncoder,
                             "motion": MotionEncoder, "wan": WanEncoder, "svd": SVDEncoder}


def family_class(name: str) -> type[Family]:
    if name not in FAMILIES:
        raise ValueError(f"model.family {name!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def encoder_class(name: str) -> type:
    if name not in ENCODERS:
        raise ValueError(f"family {name!r} has no encoder; encoders: {sorted(ENCODERS)}")
    return ENCODERS[name]


def load_scheduler_config(pretrained_path: str | None, scheduler_config: str | None) -> dict:
    path = scheduler_config or os.path.join(pretrained_path or "", "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        raise ValueError(f"scheduler config {path} does not exist; set model.scheduler_config")
    with open(path) as f:
        return json.load(f)


def build(cfg) -> Family:
    """The run's family (cfg: a RunConfig), its scheduler config read once; raises ValueError naming the setting."""
    cls = family_class(cfg.model.family)
    cls.check_source(cfg.model.pretrained_path, cfg.model.denoiser_config)
    scheduler = load_scheduler_config(cfg.model.pretrained_path, cfg.model.scheduler_config)
    return cls.from_settings(cfg.model, cfg.data, scheduler)


def select_trainable(denoiser: torch.nn.Module, patterns: list[str] | None) -> None:
    """Freeze every parameter of `denoiser` whose name matches none of `patterns` (model.trainable, fnmatch);
    None keeps all trainable. Raises ValueError naming the setting for a pattern that matches no parameter,
    or an empty list (nothing to train)."""
    if patterns is None:
        return
    names = [name for name, _ in denoiser.named_parameters()]
    unmatched = [pattern for pattern in patterns if not any(fnmatch.fnmatchcase(n, pattern) for n in names)]
    if unmatched or not patterns:
        raise ValueError(f"model.trainable: {unmatched or patterns} match no parameter of the denoiser; patterns are "
                         f"fnmatch-style on parameter names such as {names[0]!r} (`*` matches dots too)")
    for name, param in denoiser.named_parameters():
        param.requires_grad_(any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns))


def prepare_policy(family: Family, denoiser: torch.nn.Module, model) -> None:
    """The policy's speed and memory settings (model: the run's ModelConfig), applied before the engine wraps it:
    activation checkpointing, channels-last convolutions, and each repeated block compiled."""
    if model.gradient_checkpointing == "selective":
        for block in family.blocks(denoiser)[::2]:
            checkpoint_block(block)
    elif model.gradient_checkpointing:
        family.enable_gradient_checkpointing(denoiser)
    if model.channels_last:
        for module in denoiser.modules():
            if isinstance(module, torch.nn.Conv2d):  # the spatial ones: nearly all of a UNet's convolution FLOPs
                module.register_forward_pre_hook(_channels_last_input)
    if model.compile != "none":
        for block in family.blocks(denoiser):
            block.compile(mode=model.compile)


def _channels_last_input(conv: torch.nn.Module, args: tuple) -> tuple:
    """A convolution's input channels-last, so that the convolution runs and returns channels-last. What
    converting the weights does in PyTorch's kernels, which follow either operand's format; but DeepSpeed keeps
    weights in flat buffers of the default layout (and cannot broadcast channels-last ones). Where the input
    already is (from the convolution before), nothing is copied; attention and temporal layers return the
    default layout, and the next convolution converts once."""
    return (channels_last(args[0]), *args[1:])


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] `x` with its channels innermost in memory (same shape and values)."""
    return x.contiguous(memory_format=torch.channels_last)
