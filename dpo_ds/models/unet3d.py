"""Text-to-video UNets of the ModelScope / Zeroscope layout: diffusers' UNet3DConditionModel conditioned on
one CLIP text encoder's hidden states, trained with the DDPM forward process (dpo_ds/models/ddpm.py).

Legend: B = pairs in the batch; the denoiser runs on 2B samples, winners then losers. Latents are
CFHW: [C, F, H', W'] (SD's AutoencoderKL applied to each frame: C = 4, one latent frame per frame,
H' = H / 8, W' = W / 8, times the VAE's scaling_factor), batched as the UNet's [2B, C, F, H', W'].
Conditioning per pair: prompt_embeds [77, D] (CLIP's last hidden states, D = 1024 for ModelScope and
Zeroscope), shared by winner and loser. ε prediction (ModelScope, Zeroscope) or v prediction, from
the scheduler config or model.prediction_type.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from dpo_ds.models.family import checkpoint_block, to_uint8
from dpo_ds.models.sd15 import TEXT_SEQ_LEN
from dpo_ds.models.unet2d import DDPMUNet2D


def sample_clips(pipe, prompts: list[str], generators: list[torch.Generator], *, steps: int,
                 guidance_scale: float, height: int, width: int, num_frames: int | None) -> np.ndarray:
    """Family.sample for the video UNets (TextToVideoSDPipeline, AnimateDiffPipeline): their VAE encodes
    each frame alone, so any frame count samples; sides must be multiples of 8 (the VAE's factor)."""
    if num_frames is None or num_frames < 1:
        raise ValueError(f"num_frames {num_frames}: a video family samples clips of at least one frame")
    if height % pipe.vae_scale_factor or width % pipe.vae_scale_factor:
        raise ValueError(f"height {height} and width {width} must be multiples of {pipe.vae_scale_factor} "
                         "(the VAE's spatial factor)")
    frames = pipe(prompt=prompts, generator=generators, num_inference_steps=steps, guidance_scale=guidance_scale,
                  height=height, width=width, num_frames=num_frames, output_type="np").frames
    return to_uint8(np.asarray(frames))


def clip_video_pipeline(pipeline_class, base: str, unet: torch.nn.Module, scheduler, dtype: torch.dtype,
                        **parts):
    """A video UNet's diffusers pipeline on SD's image VAE and one CLIP text encoder from the folder `base`
    (vae/, text_encoder/, tokenizer/), with `unet`, `scheduler` and any further `parts`, progress bar off."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = pipeline_class(
        vae=AutoencoderKL.from_pretrained(os.path.join(base, "vae"), torch_dtype=dtype),
        text_encoder=CLIPTextModel.from_pretrained(os.path.join(base, "text_encoder"), torch_dtype=dtype),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(base, "tokenizer")),
        unet=unet, scheduler=scheduler, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def without_dropout(unet: torch.nn.Module) -> torch.nn.Module:
    """The UNet with its dropout off. diffusers' 3D blocks fix a dropout of 0.1 in every temporal convolution
    (no config key): in the policy alone (the reference runs in eval mode) it would make the policy's error
    differ from the reference's at step 1 and from one forward to the next, which DPO's comparison and the
    reference cache's reproducibility cannot have. The weights are unchanged."""
    for module in unet.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return unet


class UNet3D(DDPMUNet2D):
    NAME = "unet3d"
    LATENT_LAYOUT = "CFHW"
    UNET_CLASS = "UNet3DConditionModel"
    PROMPT_TENSORS = ("prompt_embeds",)
    BASE_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")
    LORA_SAVER = ("TextToVideoSDPipeline", "unet_lora_layers")

    # ModelScope's block layout (cross-attention down and up blocks, temporal convolutions and attention
    # in every block) at toy width, for tests and toy runs; nothing is downloaded.
    TINY_DENOISER_CONFIG = {
        "_class_name": "UNet3DConditionModel",
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
        "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "cross_attention_dim": 32,
        "norm_num_groups": 32,
    }

    # The scheduler ModelScope's text-to-video-ms-1.7b ships (Zeroscope v2's differs only in the sampler).
    SCHEDULER_CONFIG = {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }

    @classmethod
    def denoiser_from_config(cls, config: dict) -> torch.nn.Module:
        return without_dropout(super().denoiser_from_config(config))

    @classmethod
    def denoiser_from_folder(cls, folder: str, dtype: torch.dtype) -> torch.nn.Module:
        return without_dropout(super().denoiser_from_folder(folder, dtype))

    @staticmethod
    def enable_gradient_checkpointing(unet: torch.nn.Module) -> None:
        """Recompute each down, mid and up block in the backward pass. diffusers' UNet3DConditionModel
        refuses enable_gradient_checkpointing (its 3D blocks ignore the flag), so each block's forward is
        wrapped in torch's non-reentrant checkpoint, which takes the blocks' keyword arguments."""
        for block in UNet3D.blocks(unet):
            checkpoint_block(block)

    FPS = 8  # ModelScope's and Zeroscope's clips are played at 8 fps
    sample = staticmethod(sample_clips)

    @staticmethod
    def pipeline(base: str, unet: torch.nn.Module, scheduler, dtype: torch.dtype):
        from diffusers import TextToVideoSDPipeline

        return clip_video_pipeline(TextToVideoSDPipeline, base, unet, scheduler, dtype)

    def sample_schema(self, unet_config: dict) -> dict[str, tuple[int, ...] | None]:
        """latents_w/l: any shape (None): the frame count is an encoding choice (tools/encode_pairs.py
        --num-frames) that no run setting records; the loader still batches one shape at a time.
        prompt_embeds: [77, cross_attention_dim], as TextToVideoSDPipeline conditions the UNet."""
        return {"latents_w": None, "latents_l": None,
                "prompt_embeds": (TEXT_SEQ_LEN, int(unet_config["cross_attention_dim"]))}

    def sampling_kwargs(self, sample: dict[str, torch.Tensor], n: int, dtype: torch.dtype) -> dict:
        return {"encoder_hidden_states": sample["prompt_embeds"].expand(n, -1, -1).to(dtype)}

    def unet_kwargs(self, batch: dict, dtype: torch.dtype) -> dict:
        return {"encoder_hidden_states": batch["prompt_embeds"].repeat(2, 1, 1).to(dtype)}
