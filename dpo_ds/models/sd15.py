"""SD 1.5 and SD 2.x: UNet2DConditionModel conditioned on one CLIP text encoder's hidden states.

Legend: B = pairs in the batch; the denoiser runs on 2B samples, winners then losers. Latents are
CHW. Conditioning per pair: prompt_embeds [77, D] (D = 768 for SD 1.5, 1024 for SD 2.x), shared by
winner and loser. ε prediction (SD 1.5, SD 2 base) or v prediction (SD 2 at 768 px), from the
scheduler config or model.prediction_type.
"""

from __future__ import annotations

import os

import torch

from dpo_ds.models.unet2d import DDPMUNet2D

TEXT_SEQ_LEN = 77


class SD15(DDPMUNet2D):
    NAME = "sd15"
    PROMPT_TENSORS = ("prompt_embeds",)
    BASE_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")

    # SD 1.5's block layout at toy width, for tests and toy runs; nothing is downloaded.
    TINY_DENOISER_CONFIG = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "cross_attention_dim": 32,
        "norm_num_groups": 32,
    }

    # SD 1.5's training scheduler (scaled-linear betas, epsilon prediction).
    SCHEDULER_CONFIG = {
        "_class_name": "PNDMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
    }

    @staticmethod
    def pipeline(base: str, unet: torch.nn.Module, scheduler, dtype: torch.dtype):
        from diffusers import AutoencoderKL, StableDiffusionPipeline
        from transformers import CLIPTextModel, CLIPTokenizer

        # No safety checker: samples are for comparing policy and reference, not for publishing.
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL.from_pretrained(os.path.join(base, "vae"), torch_dtype=dtype),
            text_encoder=CLIPTextModel.from_pretrained(os.path.join(base, "text_encoder"), torch_dtype=dtype),
            tokenizer=CLIPTokenizer.from_pretrained(os.path.join(base, "tokenizer")),
            unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample_schema(self, unet_config: dict) -> dict[str, tuple[int, ...]]:
        if unet_config.get("addition_embed_type") is not None:
            raise ValueError(f"model.family=sd15, but the UNet has addition_embed_type="
                             f"{unet_config['addition_embed_type']!r} (an SDXL-style UNet): use model.family=sdxl")
        latents = None if self.latent_side is None else (int(unet_config["in_channels"]), self.latent_side,
                                                         self.latent_side)
        return {
            "latents_w": latents,
            "latents_l": latents,
            "prompt_embeds": (TEXT_SEQ_LEN, int(unet_config["cross_attention_dim"])),
        }

    def sampling_kwargs(self, sample: dict[str, torch.Tensor], n: int, dtype: torch.dtype) -> dict:
        return {"encoder_hidden_states": sample["prompt_embeds"].expand(n, -1, -1).to(dtype)}

    def unet_kwargs(self, batch: dict, dtype: torch.dtype) -> dict:
        return {"encoder_hidden_states": batch["prompt_embeds"].repeat(2, 1, 1).to(dtype)}
