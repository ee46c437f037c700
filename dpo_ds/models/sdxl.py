"""SDXL: UNet2DConditionModel with SDXL's two text encoders and micro-conditioning.

Legend: B = pairs in the batch; the denoiser runs on 2B samples, winners then losers. Latents are
CHW. Conditioning per pair: prompt_embeds [77, D] (the two text encoders' penultimate states,
concatenated; D = 2048 for SDXL), pooled_prompt_embeds [P] (P = 1280), and one time_ids [6] per
image (original size, crop top-left, target size).
"""

from __future__ import annotations

import os

import torch

from dpo_ds.encode import Geometry
from dpo_ds.models.unet2d import DDPMUNet2D

TEXT_SEQ_LEN = 77


class SDXL(DDPMUNet2D):
    NAME = "sdxl"
    PROMPT_TENSORS = ("prompt_embeds", "pooled_prompt_embeds")
    BASE_PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    LORA_SAVER = ("StableDiffusionXLPipeline", "unet_lora_layers")

    # A UNet with SDXL's conditioning interface (text_time added embedding, two
    # text-embedding streams), small enough to train on a laptop CPU. Tests and
    # the demo build it from this config; nothing is downloaded.
    TINY_DENOISER_CONFIG = {
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
    SCHEDULER_CONFIG = {
        "_class_name": "EulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 1,
    }

    @staticmethod
    def pipeline(base: str, unet: torch.nn.Module, scheduler, dtype: torch.dtype):
        from diffusers import AutoencoderKL, StableDiffusionXLPipeline
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        pipe = StableDiffusionXLPipeline(
            vae=AutoencoderKL.from_pretrained(os.path.join(base, "vae"), torch_dtype=dtype),
            text_encoder=CLIPTextModel.from_pretrained(os.path.join(base, "text_encoder"), torch_dtype=dtype),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(os.path.join(base, "text_encoder_2"),
                                                                       torch_dtype=dtype),
            tokenizer=CLIPTokenizer.from_pretrained(os.path.join(base, "tokenizer")),
            tokenizer_2=CLIPTokenizer.from_pretrained(os.path.join(base, "tokenizer_2")),
            unet=unet, scheduler=scheduler, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample_schema(self, unet_config: dict) -> dict[str, tuple[int, ...]]:
        latents = None if self.latent_side is None else (int(unet_config["in_channels"]), self.latent_side,
                                                         self.latent_side)
        pooled = int(unet_config["projection_class_embeddings_input_dim"]) - 6 * int(unet_config["addition_time_embed_dim"])
        return {
            "latents_w": latents,
            "latents_l": latents,
            "prompt_embeds": (TEXT_SEQ_LEN, int(unet_config["cross_attention_dim"])),
            "pooled_prompt_embeds": (pooled,),
            "time_ids_w": (6,),
            "time_ids_l": (6,),
        }

    @staticmethod
    def image_conditioning(geometry_w: Geometry, geometry_l: Geometry) -> dict[str, torch.Tensor]:
        """time_ids_w, time_ids_l [6] float32: (original height, width, crop top, left, target height, width),
        SDXL's micro-conditioning, the crop measured after the resize as SDXL was trained."""
        return {f"time_ids_{side}": torch.tensor([g.original_height, g.original_width, g.crop_top, g.crop_left,
                                                  g.height, g.width], dtype=torch.float32)
                for side, g in (("w", geometry_w), ("l", geometry_l))}

    def sampling_kwargs(self, sample: dict[str, torch.Tensor], n: int, dtype: torch.dtype) -> dict:
        return {"encoder_hidden_states": sample["prompt_embeds"].expand(n, -1, -1).to(dtype),
                "added_cond_kwargs": {"text_embeds": sample["pooled_prompt_embeds"].expand(n, -1).to(dtype),
                                      "time_ids": sample["time_ids_w"].expand(n, -1).to(dtype)}}

    def unet_kwargs(self, batch: dict, dtype: torch.dtype) -> dict:
        # Winner and loser share the prompt; each image has its own size and crop (time_ids).
        return {
            "encoder_hidden_states": batch["prompt_embeds"].repeat(2, 1, 1).to(dtype),
            "added_cond_kwargs": {
                "text_embeds": batch["pooled_prompt_embeds"].repeat(2, 1).to(dtype),
                "time_ids": torch.cat([batch["time_ids_w"], batch["time_ids_l"]]).to(dtype),
            },
        }
