"""AnimateDiff: diffusers' UNetMotionModel (an SD 1.5 UNet with motion modules between its layers) conditioned
on one CLIP text encoder's hidden states, trained with the DDPM forward process (dpo_ds/models/ddpm.py).
By default only the motion modules train (model.trainable unset), as AnimateDiff trains them.

Legend: B = pairs in the batch; the denoiser runs on 2B samples, winners then losers. Latents are
CFHW: [C, F, H', W'] (SD's AutoencoderKL applied to each frame, times its scaling_factor, as the
unet3d family's), batched as the UNet's [2B, C, F, H', W']. Conditioning per pair: prompt_embeds
[77, D] (D = 768 for SD 1.5), shared by winner and loser; the UNet takes it once per frame
([2B·F, 77, D], clip by clip), as AnimateDiffPipeline passes it.

The unet/ folder holds a UNetMotionModel: an SD 1.5 UNet and a motion adapter merged, e.g.
UNetMotionModel.from_unet2d(UNet2DConditionModel.from_pretrained(...), MotionAdapter.from_pretrained(...)).
"""

from __future__ import annotations

import torch

from dpo_ds.models.sd15 import TEXT_SEQ_LEN
from dpo_ds.models.unet2d import DDPMUNet2D
from dpo_ds.models.unet3d import clip_video_pipeline, sample_clips


class Motion(DDPMUNet2D):
    NAME = "motion"
    LATENT_LAYOUT = "CFHW"
    UNET_CLASS = "UNetMotionModel"
    PROMPT_TENSORS = ("prompt_embeds",)
    BASE_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")
    DEFAULT_TRAINABLE = ("*motion_modules.*",)  # the motion modules of every down, mid and up block
    LORA_TARGETS = tuple(f"*motion_modules.*.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0"))
    LORA_SAVER = ("AnimateDiffPipeline", "unet_lora_layers")

    # AnimateDiff's layout (motion modules in every block and the mid block) at toy width, for tests and toy
    # runs; nothing is downloaded.
    TINY_DENOISER_CONFIG = {
        "_class_name": "UNetMotionModel",
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlockMotion", "DownBlockMotion"],
        "up_block_types": ["UpBlockMotion", "CrossAttnUpBlockMotion"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "num_attention_heads": 4,
        "cross_attention_dim": 32,
        "norm_num_groups": 32,
        "motion_max_seq_length": 32,
        "motion_num_attention_heads": 2,
    }

    # AnimateDiff's training scheduler: SD 1.5's betas on a linear schedule, epsilon prediction.
    SCHEDULER_CONFIG = {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "linspace",
    }

    FPS = 8  # AnimateDiff's clips are played at 8 fps
    sample = staticmethod(sample_clips)

    @staticmethod
    def pipeline(base: str, unet: torch.nn.Module, scheduler, dtype: torch.dtype):
        from diffusers import AnimateDiffPipeline

        # The motion adapter is already inside the UNetMotionModel.
        return clip_video_pipeline(AnimateDiffPipeline, base, unet, scheduler, dtype, motion_adapter=None)

    def sample_schema(self, unet_config: dict) -> dict[str, tuple[int, ...] | None]:
        """latents_w/l: any shape (the frame count is an encoding choice, as for unet3d); prompt_embeds [77, D]."""
        return {"latents_w": None, "latents_l": None,
                "prompt_embeds": (TEXT_SEQ_LEN, int(unet_config["cross_attention_dim"]))}

    def sampling_kwargs(self, sample: dict[str, torch.Tensor], n: int, dtype: torch.dtype) -> dict:
        num_frames = sample["latents_w"].shape[1]
        return {"encoder_hidden_states": sample["prompt_embeds"].expand(n * num_frames, -1, -1).to(dtype)}

    def unet_kwargs(self, batch: dict, dtype: torch.dtype) -> dict:
        num_frames = batch["latents_w"].shape[2]
        prompt = batch["prompt_embeds"].repeat(2, 1, 1).repeat_interleave(num_frames, dim=0)
        return {"encoder_hidden_states": prompt.to(dtype)}
