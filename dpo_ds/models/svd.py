"""Stable Video Diffusion (image-to-video): diffusers' UNetSpatioTemporalConditionModel, trained with the EDM
objective in SVD's preconditioning.

Legend: B = pairs in the batch; the denoiser runs on 2B samples, winners then losers. Latents are CFHW:
[C, F, H', W'] (SVD's AutoencoderKLTemporalDecoder's encoder on each frame, times its scaling_factor: C = 4,
H' = H / 8, W' = W / 8), batched as the UNet's [2B, F, C, H', W']. Conditioning per pair, shared by winner
and loser (DPO compares two clips of one image): image_latents [C, H', W'] (the conditioning image,
noise-augmented in pixels, through the VAE's encoder, unscaled, as StableVideoDiffusionPipeline), repeated
over frames and concatenated on channels (in_channels = 2C); image_embeds [1, D] (CLIP's image_embeds,
D = 1024), the UNet's encoder_hidden_states; added_time_ids [3] (fps − 1, motion bucket id, noise
augmentation strength).

EDM (Karras et al. 2022) at the pair's σ, in SVD's parametrisation (generative-models' sgm
VScalingWithEDMcNoise, and diffusers' EulerDiscreteScheduler with prediction_type v_prediction and
continuous timesteps, which SVD ships), σ_d = SIGMA_DATA:

    x_σ = x0 + σ·ε                       c_skip = σ_d² / (σ² + σ_d²)     c_in = 1 / √(σ² + σ_d²)
    D   = c_skip·x_σ + c_out·F(c_in·x_σ)  c_out = −σ·σ_d / √(σ² + σ_d²)    c_noise = ¼·ln σ (the timestep)
    error = λ(σ)·mean((D − x0)²)          λ(σ)  = (σ² + σ_d²) / (σ·σ_d)²

c_out's sign is SVD's: its UNet was trained to output the negated EDM F (a v prediction), so the paper's
+σ·σ_d would turn a pretrained SVD's predictions inside out. λ makes the error F's own error,
(c_out·ΔF)²·λ = ΔF², so winners and losers at the pair's shared σ are compared like with like. The law of
σ: ln σ ~ N(model.edm_p_mean, model.edm_p_std²), drawn in float64 from the pair's generator before its noise.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from dpo_ds.losses import per_sample_error
from dpo_ds.models.family import Family, to_uint8
from dpo_ds.models.unet2d import DDPMUNet2D

# SVD's latents (the VAE's output times its scaling_factor, 0.18215) have roughly unit variance, and its
# preconditioning (sgm VScalingWithEDMcNoise) hard-codes σ_data = 1.
SIGMA_DATA = 1.0
FPS = 7               # StableVideoDiffusionPipeline's default fps; SVD is conditioned on fps − 1
MOTION_BUCKET_ID = 127  # StableVideoDiffusionPipeline's default
COND_AUG = 0.02       # the conditioning image's noise augmentation, StableVideoDiffusionPipeline's default


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out, c_in, c_noise) at σ (any shape, float64 advised), SVD's sign of c_out (module docstring)."""
    total = sigma ** 2 + sigma_data ** 2
    return sigma_data ** 2 / total, -sigma * sigma_data / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4


def edm_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """λ(σ) = (σ² + σ_d²) / (σ·σ_d)²: EDM's loss weight, 1 / c_out²."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def time_ids(fps: int = FPS, motion_bucket_id: int = MOTION_BUCKET_ID, cond_aug: float = COND_AUG) -> torch.Tensor:
    """[3] float32 added_time_ids as StableVideoDiffusionPipeline builds them (it passes fps − 1)."""
    return torch.tensor([fps - 1, motion_bucket_id, cond_aug], dtype=torch.float32)


class SVD(Family):
    NAME = "svd"
    LATENT_LAYOUT = "CFHW"
    HAS_CONV_LATENTS = True
    DENOISER_SUBFOLDER = "unet"
    # Dropping a pair's "prompt" zeroes its image embedding: what StableVideoDiffusionPipeline conditions its
    # unconditional branch on (encoder.empty_prompt()). The image latents keep their shape-dependent size,
    # so they stay.
    PROMPT_TENSORS = ("image_embeds",)
    DRAWS_EDM = True  # reads model.edm_p_mean, edm_p_std (dpo_ds.config)
    BASE_PARTS = ("vae", "image_encoder", "feature_extractor", "scheduler")
    # StableVideoDiffusionPipeline has no load_lora_weights: the adapters are written in SD's LoRA format
    # (keys `unet.*`) and loaded into the UNet with dpo_ds.lora.load.

    # SVD's block layout (spatio-temporal cross-attention down and up blocks) at toy width, for tests and toy
    # runs; nothing is downloaded. in_channels = 2 × 4: the noisy latents and the image latents.
    TINY_DENOISER_CONFIG = {
        "_class_name": "UNetSpatioTemporalConditionModel",
        "sample_size": 8,
        "in_channels": 8,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
        "up_block_types": ["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
        "block_out_channels": [32, 64],
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 24,
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "transformer_layers_per_block": 1,
        "num_attention_heads": [2, 4],
        "num_frames": 2,
    }

    # The scheduler stable-video-diffusion-img2vid(-xt) ships: Euler on Karras σ in [0.002, 700], v prediction,
    # timesteps ¼·ln σ. Training reads none of it (the law of σ is model.edm_*); sampling runs it as is.
    SCHEDULER_CONFIG = {
        "_class_name": "EulerDiscreteScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "sigma_max": 700.0,
        "sigma_min": 0.002,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "timestep_type": "continuous",
        "trained_betas": None,
        "use_karras_sigmas": True,
    }

    def __init__(self, p_mean: float = 0.7, p_std: float = 1.6):
        if not (math.isfinite(p_mean) and p_std > 0 and math.isfinite(p_std)):
            raise ValueError(f"model.edm_p_mean {p_mean} must be finite and model.edm_p_std {p_std} positive")
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    @classmethod
    def from_settings(cls, model, data, scheduler_config: dict) -> "SVD":
        if model.prediction_type is not None:
            raise ValueError(f"model.prediction_type={model.prediction_type} is for the DDPM families; "
                             "model.family=svd trains EDM's preconditioned x0 prediction: leave it unset")
        if data.timestep_range is not None:
            raise ValueError("data.timestep_range draws DDPM timesteps; model.family=svd draws σ log-normally "
                             "(model.edm_p_mean, model.edm_p_std): leave it unset")
        return cls(model.edm_p_mean, model.edm_p_std)

    @classmethod
    def tiny(cls, resolution: int = 0, scheduler_config: dict | None = None) -> "SVD":
        """The family of TINY_DENOISER_CONFIG's UNet (any latent shape, so `resolution` is unused)."""
        return cls()

    # ------------------------------------------------------------ the denoiser

    @staticmethod
    def denoiser_from_config(config: dict) -> torch.nn.Module:
        from diffusers import UNetSpatioTemporalConditionModel

        return UNetSpatioTemporalConditionModel.from_config(config)

    @staticmethod
    def denoiser_from_folder(folder: str, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import UNetSpatioTemporalConditionModel

        return UNetSpatioTemporalConditionModel.from_pretrained(folder, torch_dtype=dtype)

    set_attention = staticmethod(DDPMUNet2D.set_attention)  # its blocks use diffusers' Attention, as SD's UNets

    @staticmethod
    def export(state_dict: dict[str, torch.Tensor], unet_config: dict, out_dir: str, dtype: torch.dtype) -> None:
        from diffusers import UNetSpatioTemporalConditionModel

        unet = UNetSpatioTemporalConditionModel.from_config(unet_config)
        unet.load_state_dict(state_dict, strict=True)
        if dtype != torch.float32:
            unet = unet.to(dtype)
        unet.save_pretrained(out_dir, safe_serialization=True)

    # ------------------------------------------------------------ sampling

    @staticmethod
    def pipeline(base: str, unet: torch.nn.Module, scheduler, dtype: torch.dtype):
        from diffusers import AutoencoderKLTemporalDecoder, StableVideoDiffusionPipeline
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        pipe = StableVideoDiffusionPipeline(
            vae=AutoencoderKLTemporalDecoder.from_pretrained(os.path.join(base, "vae"), torch_dtype=dtype),
            image_encoder=CLIPVisionModelWithProjection.from_pretrained(os.path.join(base, "image_encoder"),
                                                                        torch_dtype=dtype),
            feature_extractor=CLIPImageProcessor.from_pretrained(os.path.join(base, "feature_extractor")),
            unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    SAMPLERS = ("euler",)
    FPS = FPS

    @staticmethod
    def sampling_scheduler(scheduler_config: dict, sampler: str):
        """The base's EulerDiscreteScheduler as SVD ships it; its churn s_churn defaults to 0, so it adds no
        noise after the start."""
        from diffusers import EulerDiscreteScheduler

        assert sampler in SVD.SAMPLERS, sampler
        return EulerDiscreteScheduler.from_config(scheduler_config)

    @staticmethod
    def sample(pipe, prompts: list[str], generators: list[torch.Generator], *, steps: int, guidance_scale: float,
               height: int, width: int, num_frames: int | None) -> np.ndarray:
        """Each prompt is the path of the conditioning image (one image path per line of tools/sample.py's
        --prompts). Guidance ramps over frames from 1 to `guidance_scale`, as StableVideoDiffusionPipeline's
        min/max guidance; fps, motion bucket and noise augmentation are the encoder's defaults."""
        from PIL import Image

        if num_frames is None or num_frames < 1:
            raise ValueError(f"num_frames {num_frames}: svd samples clips of at least one frame")
        if height % pipe.vae_scale_factor or width % pipe.vae_scale_factor:
            raise ValueError(f"height {height} and width {width} must be multiples of {pipe.vae_scale_factor}")
        missing = [p for p in prompts if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"--prompts: svd conditions on images: each line is an image path; {missing[0]} "
                             "is not a file")
        images = [Image.open(p).convert("RGB") for p in prompts]
        frames = pipe(image=images, generator=generators, num_inference_steps=steps, height=height, width=width,
                      num_frames=num_frames, min_guidance_scale=1.0, max_guidance_scale=guidance_scale,
                      fps=FPS, motion_bucket_id=MOTION_BUCKET_ID, noise_aug_strength=COND_AUG,
                      output_type="np").frames
        return to_uint8(np.asarray(frames))

    def sampling_kwargs(self, sample: dict[str, torch.Tensor], n: int, dtype: torch.dtype) -> dict:
        """The UNet's keyword conditioning for n samples conditioned as `sample`'s winner. The image latents
        are not a keyword: a direct sampler concatenates sample["image_latents"] on the channels itself."""
        return {"encoder_hidden_states": sample["image_embeds"].expand(n, -1, -1).to(dtype),
                "added_time_ids": sample["added_time_ids"].expand(n, -1).to(dtype)}

    # ------------------------------------------------------------ data

    def sample_schema(self, unet_config: dict) -> dict[str, tuple[int, ...] | None]:
        """latents_w/l and image_latents: any shape (None): frame count and size are encoding choices; a
        pair whose image latents do not match its clips' channels and size fails in the UNet's first layer.
        image_embeds: [1, cross_attention_dim]; added_time_ids: [3] (fps − 1, motion bucket id, cond_aug)."""
        return {"latents_w": None, "latents_l": None, "image_latents": None,
                "image_embeds": (1, int(unet_config["cross_attention_dim"])), "added_time_ids": (3,)}

    def synthetic_conditioning(self, unet_config: dict, resolution: int, g: torch.Generator,
                               dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Random image latents [C, R/8, R/8] and image embedding from `g`; the pipeline's default time ids."""
        channels = int(unet_config["out_channels"])
        return {"image_latents": torch.randn(channels, resolution // 8, resolution // 8, generator=g).to(dtype),
                "image_embeds": torch.randn(1, int(unet_config["cross_attention_dim"]), generator=g).to(dtype),
                "added_time_ids": time_ids().to(dtype)}

    # ------------------------------------------------------------ the draw and the forward process

    def draw_t(self, g: torch.Generator) -> float:
        return math.exp(float(torch.randn((), generator=g, dtype=torch.float64)) * self.p_std + self.p_mean)

    def draw_law(self) -> dict:
        return {"t": "EDM sigma, ln sigma ~ N(p_mean, p_std^2)", "p_mean": self.p_mean, "p_std": self.p_std,
                "sigma_data": SIGMA_DATA,
                "preconditioning": "SVD (c_out = -sigma*sigma_data/sqrt(sigma^2+sigma_data^2), c_noise = ln(sigma)/4)",
                "loss_weight": "(sigma^2+sigma_data^2)/(sigma*sigma_data)^2"}

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """σ / √(σ² + σ_d²): the noise's share of x_σ's standard deviation."""
        sigma = t.double()
        return sigma / (sigma ** 2 + SIGMA_DATA ** 2).sqrt()

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = t.double().view(-1, *([1] * (x0.ndim - 1))).to(x0.device)
        return (x0.double() + sigma * noise.double()).to(x0.dtype), x0

    def predict(self, unet, x_t: torch.Tensor, t: torch.Tensor, batch: dict, dtype: torch.dtype) -> torch.Tensor:
        """[2B, C, F, H', W'] float32 D(x_σ), from the UNet's [2B, F, 2C, H', W'] input."""
        sigma = t.double().to(x_t.device)
        c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1, 1) for c in edm_coefficients(sigma))
        scaled_BFCHW = (c_in * x_t.double()).permute(0, 2, 1, 3, 4)
        image_BCHW = batch["image_latents"].repeat(2, 1, 1, 1)
        image_BFCHW = image_BCHW[:, None].expand(-1, scaled_BFCHW.shape[1], -1, -1, -1)
        sample = torch.cat([scaled_BFCHW.to(dtype), image_BFCHW.to(dtype)], dim=2)
        embeds = batch["image_embeds"].repeat(2, 1, 1).to(dtype)
        out_BFCHW = unet(sample, c_noise.flatten().float(), encoder_hidden_states=embeds,
                         added_time_ids=batch["added_time_ids"].repeat(2, 1).to(dtype), return_dict=False)[0]
        out = out_BFCHW.permute(0, 2, 1, 3, 4).float()
        return (c_skip * x_t.double()).float() + c_out.float() * out

    def error(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """[2B] float32 λ(σ)·mean((D − x0)²)."""
        return per_sample_error(pred, target) * edm_weight(t.double().to(pred.device)).float()
