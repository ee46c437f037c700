"""SDXL family: UNet2DConditionModel with SDXL's text and micro-conditioning.

Legend: B = pairs in the batch; the denoiser runs on 2B samples, winners then
losers. Latents are CHW. Conditioning per pair: prompt_embeds [77, D] (the two
text encoders' penultimate states, concatenated; D = 2048 for SDXL),
pooled_prompt_embeds [P] (P = 1280), and one time_ids [6] per image
(original size, crop top-left, target size).
"""

from __future__ import annotations

import importlib.util
import json
import os

import torch

LATENT_LAYOUT = "CHW"
DENOISER_SUBFOLDER = "unet"
TEXT_SEQ_LEN = 77

# A UNet with SDXL's conditioning interface (text_time added embedding, two
# text-embedding streams), small enough to train on a laptop CPU. Tests and
# the demo build it from this config; nothing is downloaded.
TINY_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_head_dim": [2, 4],
    "transformer_layers_per_block": [1, 1],
    "use_linear_projection": True,
    "cross_attention_dim": 64,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,
    "norm_num_groups": 32,
}

# SDXL base's training scheduler (scaled-linear betas, epsilon prediction).
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}


def check_source(pretrained_path: str | None, config_path: str | None) -> None:
    """Fail early, with the path, when the denoiser cannot be found."""
    if config_path is not None:
        if not os.path.isfile(config_path):
            raise ValueError(f"model.unet_config: {config_path} does not exist")
    elif not os.path.isfile(os.path.join(pretrained_path, DENOISER_SUBFOLDER, "config.json")):
        raise ValueError(f"model.pretrained_path: {pretrained_path} has no {DENOISER_SUBFOLDER}/config.json; "
                         "point it at a diffusers model folder (the one holding unet/, vae/, scheduler/)")


def load_denoiser(pretrained_path: str | None, config_path: str | None) -> torch.nn.Module:
    """The UNet from a local diffusers folder (`<path>/unet`), or freshly built from a config.json."""
    from diffusers import UNet2DConditionModel

    check_source(pretrained_path, config_path)
    if config_path is not None:
        with open(config_path) as f:
            return UNet2DConditionModel.from_config(json.load(f))
    return UNet2DConditionModel.from_pretrained(os.path.join(pretrained_path, DENOISER_SUBFOLDER),
                                                torch_dtype=torch.float32)


def set_attention(unet: torch.nn.Module, kind: str) -> None:
    """SDPA is diffusers' default processor; xformers must be installed to be asked for."""
    if kind == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise ValueError("model.attention=xformers but xformers is not installed: "
                             "`pip install -e .[xformers]`, or use model.attention=sdpa")
        unet.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())


def sample_schema(unet_config: dict, resolution: int, vae_scale_factor: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes every shard sample must carry for this UNet."""
    if resolution % vae_scale_factor:
        raise ValueError(f"data.resolution {resolution} is not a multiple of model.vae_scale_factor {vae_scale_factor}")
    side = resolution // vae_scale_factor
    latents = (int(unet_config["in_channels"]), side, side)
    pooled = int(unet_config["projection_class_embeddings_input_dim"]) - 6 * int(unet_config["addition_time_embed_dim"])
    return {
        "latents_w": latents,
        "latents_l": latents,
        "prompt_embeds": (TEXT_SEQ_LEN, int(unet_config["cross_attention_dim"])),
        "pooled_prompt_embeds": (pooled,),
        "time_ids_w": (6,),
        "time_ids_l": (6,),
    }


def predict(unet, noisy_2B: torch.Tensor, timesteps_2B: torch.Tensor, batch: dict) -> torch.Tensor:
    """Run the denoiser on winners and losers at once: [2B x C x H x W] -> same."""
    prompt_embeds = batch["prompt_embeds"].repeat(2, 1, 1)
    added = {
        "text_embeds": batch["pooled_prompt_embeds"].repeat(2, 1),
        "time_ids": torch.cat([batch["time_ids_w"], batch["time_ids_l"]]),
    }
    dtype = noisy_2B.dtype
    return unet(
        noisy_2B,
        timesteps_2B,
        encoder_hidden_states=prompt_embeds.to(dtype),
        added_cond_kwargs={k: v.to(dtype) for k, v in added.items()},
        return_dict=False,
    )[0]


def export(state_dict: dict[str, torch.Tensor], unet_config: dict, out_dir: str, dtype: torch.dtype) -> None:
    """Write trained weights as a diffusers UNet folder (safetensors), loadable with from_pretrained."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(unet_config)
    unet.load_state_dict(state_dict, strict=True)
    if dtype != torch.float32:
        unet = unet.to(dtype)
    unet.save_pretrained(out_dir, safe_serialization=True)
