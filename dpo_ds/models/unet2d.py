"""What SDXL and SD 1.5/2.x share: a diffusers UNet2DConditionModel on CHW latents, trained with the
DDPM forward process (ε or v prediction) at an integer timestep drawn uniformly from the pair's
generator. A subclass adds its conditioning (sample_schema, unet_kwargs). The text-to-video UNet
(dpo_ds/models/unet3d.py) is the same DDPM family with another UNET_CLASS on CFHW latents.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import numpy as np
import torch

from dpo_ds.models.ddpm import DDPMProcess, uniform_timestep
from dpo_ds.models.family import Family, require_xformers, to_uint8


class DDPMUNet2D(Family):
    LATENT_LAYOUT = "CHW"
    DENOISER_SUBFOLDER = "unet"
    UNET_CLASS: ClassVar[str] = "UNet2DConditionModel"  # the diffusers class of the denoiser
    HAS_CONV_LATENTS = True

    def __init__(self, scheduler_config: dict, prediction_type: str | None, resolution: int, vae_scale_factor: int,
                 timestep_range: tuple[int, int] | None = None):
        self.scheduler_config = dict(scheduler_config)
        self.process = DDPMProcess.from_config(scheduler_config, prediction_type)
        num = self.process.num_train_timesteps
        self.timestep_range = tuple(timestep_range) if timestep_range else (0, num)
        lo, hi = self.timestep_range
        if not 0 <= lo < hi <= num:
            raise ValueError(f"data.timestep_range {[lo, hi]} must satisfy 0 <= lo < hi <= {num} "
                             "(the scheduler's num_train_timesteps)")
        if resolution is not None and resolution % vae_scale_factor:
            raise ValueError(f"data.resolution {resolution} is not a multiple of model.vae_scale_factor "
                             f"{vae_scale_factor}")
        # None (data.resolution null): the schema leaves the latents' shape open, for shape buckets.
        self.latent_side = None if resolution is None else resolution // vae_scale_factor

    @classmethod
    def from_settings(cls, model, data, scheduler_config: dict) -> "DDPMUNet2D":
        return cls(scheduler_config, model.prediction_type, data.resolution, model.vae_scale_factor,
                   data.timestep_range)

    @classmethod
    def tiny(cls, resolution: int, scheduler_config: dict | None = None) -> "DDPMUNet2D":
        return cls(scheduler_config or cls.SCHEDULER_CONFIG, None, resolution, 8)

    # ------------------------------------------------------------ the denoiser

    @classmethod
    def unet_class(cls) -> type:
        import diffusers

        return getattr(diffusers, cls.UNET_CLASS)

    @classmethod
    def denoiser_from_config(cls, config: dict) -> torch.nn.Module:
        return cls.unet_class().from_config(config)

    @classmethod
    def denoiser_from_folder(cls, folder: str, dtype: torch.dtype) -> torch.nn.Module:
        return cls.unet_class().from_pretrained(folder, torch_dtype=dtype)

    @staticmethod
    def set_attention(unet: torch.nn.Module, kind: str) -> None:
        """SDPA is diffusers' default processor; xformers must be installed to be asked for."""
        if kind == "xformers":
            require_xformers()
            unet.enable_xformers_memory_efficient_attention()
        else:
            from diffusers.models.attention_processor import AttnProcessor2_0

            unet.set_attn_processor(AttnProcessor2_0())

    @classmethod
    def export(cls, state_dict: dict[str, torch.Tensor], unet_config: dict, out_dir: str, dtype: torch.dtype) -> None:
        unet = cls.unet_class().from_config(unet_config)
        unet.load_state_dict(state_dict, strict=True)
        if dtype != torch.float32:
            unet = unet.to(dtype)
        unet.save_pretrained(out_dir, safe_serialization=True)

    # ------------------------------------------------------------ sampling

    SAMPLERS = ("euler", "ddim")

    @staticmethod
    def sampling_scheduler(scheduler_config: dict, sampler: str):
        from diffusers import DDIMScheduler, EulerDiscreteScheduler

        # Both keep the base model's betas, prediction type and timestep spacing; neither adds noise
        # during sampling (DDIM's eta and Euler's churn default to 0), so the seed fixes the image.
        # DDIM's default clip_sample=True would clamp predicted latents to [-1, 1], where they do not live.
        assert sampler in DDPMUNet2D.SAMPLERS, sampler
        if sampler == "ddim":
            return DDIMScheduler.from_config(scheduler_config, clip_sample=False)
        return EulerDiscreteScheduler.from_config(scheduler_config)

    @staticmethod
    def sample(pipe, prompts: list[str], generators: list[torch.Generator], *, steps: int, guidance_scale: float,
               height: int, width: int, num_frames: int | None) -> np.ndarray:
        assert num_frames is None, "an image family samples one frame"
        images = pipe(prompt=prompts, generator=generators, num_inference_steps=steps, guidance_scale=guidance_scale,
                      height=height, width=width, output_type="np").images
        return to_uint8(images)[:, None]

    # ------------------------------------------------------------ the draw and the forward process

    def draw_t(self, g: torch.Generator) -> float:
        return uniform_timestep(g, *self.timestep_range)

    def draw_law(self) -> dict:
        return {"t": "uniform integer timestep", "timestep_range": list(self.timestep_range),
                "scheduler": self.scheduler_config, "prediction_type": self.process.prediction_type}

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        return t.double() / self.process.num_train_timesteps

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.process.add_noise(x0, noise, t), self.process.target(x0, noise, t)

    def predict(self, unet, x_t: torch.Tensor, t: torch.Tensor, batch: dict, dtype: torch.dtype) -> torch.Tensor:
        # The network's output is the prediction (ε or v); it embeds the integer timestep, as in pre-training.
        return unet(x_t.to(dtype), t.long(), **self.unet_kwargs(batch, dtype), return_dict=False)[0]

    @abstractmethod
    def unet_kwargs(self, batch: dict, dtype: torch.dtype) -> dict:
        """The UNet's conditioning arguments for the 2B samples (winners, then losers), in `dtype`."""
