"""Wan 2.1 text-to-video: a diffusers WanTransformer3DModel trained by flow matching on CFHW latents.

Legend: B = pairs in the batch; the denoiser runs on 2B samples, winners then losers. Latents are
CFHW: [C, F', H', W'] (Wan's causal VAE: C = 16, F' = 1 + (F - 1) / 4, H' = H / 8, W' = W / 8),
normalised per channel (dpo_ds/encode.py WanEncoder). Conditioning per pair: prompt_embeds [L, D]
(UMT5's last hidden states, zero past the prompt; L = 512, D = the transformer's text_dim, 4096 for
Wan 2.1), shared by winner and loser. T = the scheduler's num_train_timesteps (1000).

The forward process (rectified flow, as diffusers' flow-matching training scripts and WanPipeline's
schedulers define it), at the pair's continuous σ in [0, 1]:

    x_σ = (1 − σ)·x0 + σ·ε        target v = ε − x0        the transformer sees timestep σ·T

The transformer's output is the velocity prediction itself (no preconditioning). The law of σ:
u from `model.sigma_density` (uniform on [0, 1), or logit-normal: u = sigmoid(n), n ~
N(model.logit_mean, model.logit_std²)), then the scheduler's shift s (`model.flow_shift`, default the
scheduler config's): σ = s·u / (1 + (s − 1)·u). Drawn in float64 from the pair's generator
(dpo_ds/noise.py), before the pair's noise; σ is continuous, not one of T discrete levels.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from dpo_ds.models.family import Family, require_xformers, to_uint8

TEXT_SEQ_LEN = 512  # WanPipeline's max_sequence_length, and tools/encode_pairs.py's default for wan

# Wan 2.1's transformer at toy width (two blocks, 2 heads of 12, text_dim 32, 4 latent channels), for
# tests and toy runs; nothing is downloaded. Patch (1, 2, 2) as Wan 2.1: H' and W' must be even.
TINY_TRANSFORMER_CONFIG = {
    "_class_name": "WanTransformer3DModel",
    "patch_size": [1, 2, 2],
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 32,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 32,
}

# The scheduler Wan 2.1 T2V's diffusers folders ship (diffusers' scripts/convert_wan_to_diffusers.py):
# UniPC on flow sigmas, shift 3.0 (5.0 for TI2V and Animate, 16.0 for FLF2V). Training reads T and
# the shift from it; sampling (pipeline) runs it as is.
WAN_SCHEDULER_CONFIG = {
    "_class_name": "UniPCMultistepScheduler",
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
}

SIGMA_DENSITIES = ("uniform", "logit_normal")


def scheduler_shift(config: dict) -> float:
    """The shift s of a flow-matching scheduler config: FlowMatchEulerDiscreteScheduler's `shift`, or
    `flow_shift` of a multistep scheduler on flow sigmas (use_flow_sigmas, as Wan's UniPC). Raises
    ValueError for a scheduler that is not flow matching, or whose shift depends on the resolution."""
    name = config.get("_class_name", "(no _class_name)")
    if config.get("use_flow_sigmas"):
        if config.get("prediction_type", "flow_prediction") != "flow_prediction":
            raise ValueError(f"scheduler config {name} has use_flow_sigmas with prediction_type "
                             f"{config.get('prediction_type')!r}; model.family=wan trains flow_prediction")
        key = "flow_shift"
    elif name.startswith("FlowMatch"):
        key = "shift"
    else:
        raise ValueError(f"scheduler config {name} is not a flow-matching scheduler; model.family=wan needs "
                         "FlowMatchEulerDiscreteScheduler or a multistep scheduler with use_flow_sigmas "
                         "(Wan 2.1's UniPCMultistepScheduler); set model.scheduler_config")
    if config.get("use_dynamic_shifting"):
        raise ValueError(f"scheduler config {name} has use_dynamic_shifting (a shift that depends on the "
                         "resolution); set model.flow_shift to train with a fixed shift")
    return float(config.get(key, 1.0))


def shift_sigma(u, s: float):
    """σ = s·u / (1 + (s − 1)·u): diffusers' flow-matching shift (s > 1 moves σ toward pure noise)."""
    return s * u / (1 + (s - 1) * u)


class Wan(Family):
    NAME = "wan"
    LATENT_LAYOUT = "CFHW"
    DENOISER_SUBFOLDER = "transformer"
    PROMPT_TENSORS = ("prompt_embeds",)
    DRAWS_SIGMA = True  # reads model.flow_shift, sigma_density, logit_mean, logit_std (dpo_ds.config)
    BASE_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")
    LORA_SAVER = ("WanPipeline", "transformer_lora_layers")
    # The toy model (Family's contract).
    TINY_DENOISER_CONFIG = TINY_TRANSFORMER_CONFIG
    SCHEDULER_CONFIG = WAN_SCHEDULER_CONFIG

    def __init__(self, scheduler_config: dict, flow_shift: float | None = None, sigma_density: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0):
        self.scheduler_config = dict(scheduler_config)
        if flow_shift is None:
            self.shift = scheduler_shift(scheduler_config)
        else:  # the scheduler must still be a flow-matching one; its own shift is overridden
            scheduler_shift({**scheduler_config, "use_dynamic_shifting": False})
            self.shift = float(flow_shift)
        if not (self.shift > 0 and math.isfinite(self.shift)):
            raise ValueError(f"the flow shift must be a positive number, got {self.shift} "
                             "(model.flow_shift or the scheduler config's)")
        if sigma_density not in SIGMA_DENSITIES:
            raise ValueError(f"model.sigma_density {sigma_density!r} is not one of {SIGMA_DENSITIES}")
        if not logit_std > 0:
            raise ValueError(f"model.logit_std must be > 0, got {logit_std}")
        self.sigma_density, self.logit_mean, self.logit_std = sigma_density, float(logit_mean), float(logit_std)
        self.num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))

    @classmethod
    def from_settings(cls, model, data, scheduler_config: dict) -> "Wan":
        if model.prediction_type is not None:
            raise ValueError(f"model.prediction_type={model.prediction_type} is for the DDPM families; "
                             "model.family=wan predicts the velocity ε − x0: leave it unset")
        if data.timestep_range is not None:
            raise ValueError("data.timestep_range draws DDPM timesteps; model.family=wan draws σ from "
                             "model.sigma_density: leave it unset")
        return cls(scheduler_config, model.flow_shift, model.sigma_density, model.logit_mean, model.logit_std)

    @classmethod
    def tiny(cls, resolution: int = 0, scheduler_config: dict | None = None) -> "Wan":
        """The family of TINY_TRANSFORMER_CONFIG's transformer (any latent shape, so `resolution` is unused)."""
        return cls(scheduler_config or WAN_SCHEDULER_CONFIG)

    # ------------------------------------------------------------ the denoiser

    @staticmethod
    def denoiser_from_config(config: dict) -> torch.nn.Module:
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel.from_config(config)

    @staticmethod
    def denoiser_from_folder(folder: str, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype)

    @staticmethod
    def set_attention(transformer: torch.nn.Module, kind: str) -> None:
        """sdpa: Wan's own attention processor, on diffusers' default backend (torch SDPA unless the
        DIFFUSERS_ATTN_BACKEND variable says otherwise); xformers: diffusers' xformers backend (installed)."""
        if kind == "xformers":
            require_xformers()
            transformer.set_attention_backend("xformers")
        else:
            from diffusers.models.transformers.transformer_wan import WanAttnProcessor

            transformer.set_attn_processor(WanAttnProcessor())

    @staticmethod
    def blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """The transformer's blocks (self-attention, cross-attention, feed-forward), all of one shape."""
        return list(transformer.blocks)

    @staticmethod
    def export(state_dict: dict[str, torch.Tensor], transformer_config: dict, out_dir: str, dtype: torch.dtype) -> None:
        from diffusers import WanTransformer3DModel

        transformer = WanTransformer3DModel.from_config(transformer_config)
        # The rotary embedding's tables are non-persistent buffers, computed from the config: a state dict of
        # every named buffer (dpo_ds.engine.Policy.full_state_dict) carries them, the transformer's does not.
        persistent = transformer.state_dict().keys()
        computed = {name for name, _ in transformer.named_buffers()} - persistent
        transformer.load_state_dict({k: v for k, v in state_dict.items() if k not in computed}, strict=True)
        if dtype != torch.float32:
            transformer = transformer.to(dtype)
        transformer.save_pretrained(out_dir, safe_serialization=True)

    # ------------------------------------------------------------ sampling

    @staticmethod
    def pipeline(base: str, transformer: torch.nn.Module, scheduler, dtype: torch.dtype):
        from diffusers import AutoencoderKLWan, WanPipeline
        from transformers import AutoTokenizer, UMT5EncoderModel

        # The VAE stays in float32, as diffusers recommends for Wan's decoding quality.
        pipe = WanPipeline(
            tokenizer=AutoTokenizer.from_pretrained(os.path.join(base, "tokenizer")),
            text_encoder=UMT5EncoderModel.from_pretrained(os.path.join(base, "text_encoder"), torch_dtype=dtype),
            vae=AutoencoderKLWan.from_pretrained(os.path.join(base, "vae"), torch_dtype=torch.float32),
            transformer=transformer, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    SAMPLERS = ("unipc", "euler")
    FPS = 16  # Wan 2.1's frame rate: its training clips', and its pipeline's output's

    @staticmethod
    def sampling_scheduler(scheduler_config: dict, sampler: str):
        """unipc: UniPC on flow sigmas, the solver Wan 2.1 ships; euler: the flow-matching Euler method.
        Both at the base scheduler's shift, and both deterministic (neither draws noise after the start)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

        assert sampler in Wan.SAMPLERS, sampler
        shift = scheduler_shift(scheduler_config)
        num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
        if sampler == "euler":
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
        return UniPCMultistepScheduler(num_train_timesteps=num_train_timesteps, prediction_type="flow_prediction",
                                       use_flow_sigmas=True, flow_shift=shift)

    @staticmethod
    def sample(pipe, prompts: list[str], generators: list[torch.Generator], *, steps: int, guidance_scale: float,
               height: int, width: int, num_frames: int | None) -> np.ndarray:
        # WanPipeline would round a size it cannot sample and only log a warning; refuse it instead, so
        # that the frames written are the frames asked for.
        temporal = pipe.vae_scale_factor_temporal
        if num_frames is None or num_frames < 1 or (num_frames - 1) % temporal:
            raise ValueError(f"num_frames {num_frames}: Wan's VAE needs 1 + {temporal}·k frames "
                             f"(81 for Wan 2.1, 5 for a toy run)")
        multiple = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]
        if height % multiple or width % multiple:
            raise ValueError(f"height {height} and width {width} must be multiples of {multiple} "
                             "(the VAE's spatial factor times the transformer's patch size)")
        frames = pipe(prompt=prompts, generator=generators, num_inference_steps=steps, guidance_scale=guidance_scale,
                      height=height, width=width, num_frames=num_frames, output_type="np").frames
        return to_uint8(frames)

    def sampling_kwargs(self, sample: dict[str, torch.Tensor], n: int, dtype: torch.dtype) -> dict:
        """The transformer's conditioning for n samples conditioned as `sample`'s winner."""
        return {"encoder_hidden_states": sample["prompt_embeds"][None].expand(n, -1, -1).to(dtype)}

    # ------------------------------------------------------------ data

    def sample_schema(self, transformer_config: dict) -> dict[str, tuple[int, ...] | None]:
        """latents_w/l: any shape (None). A clip's frame count and height and width are encoding choices
        (tools/encode_pairs.py --num-frames, --height, --width) that no run setting records, so the
        schema cannot pin them; the loader still requires one shape per worker per epoch, and a clip
        with another channel count, or odd H' or W', fails in the transformer's first layer, loudly.
        prompt_embeds: [512, text_dim], pinned: WanPipeline conditions on 512 tokens when it samples,
        so a shard encoded with another --max-sequence-length is refused pair by pair."""
        return {"latents_w": None, "latents_l": None,
                "prompt_embeds": (TEXT_SEQ_LEN, int(transformer_config["text_dim"]))}

    # ------------------------------------------------------------ the draw and the forward process

    def draw_t(self, g: torch.Generator) -> float:
        if self.sigma_density == "uniform":
            u = torch.rand((), generator=g, dtype=torch.float64)
        else:
            u = torch.sigmoid(torch.randn((), generator=g, dtype=torch.float64) * self.logit_std + self.logit_mean)
        return float(shift_sigma(u, self.shift))

    def draw_law(self) -> dict:
        return {"t": "flow-matching sigma", "sigma_density": self.sigma_density,
                "logit_mean": self.logit_mean if self.sigma_density == "logit_normal" else None,
                "logit_std": self.logit_std if self.sigma_density == "logit_normal" else None,
                "shift": self.shift, "num_train_timesteps": self.num_train_timesteps,
                "prediction": "velocity (noise - x0)", "scheduler": self.scheduler_config}

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        return t.double()

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = t.double().view(-1, *([1] * (x0.ndim - 1))).to(x0.device)
        x_t = ((1 - sigma) * x0.double() + sigma * noise.double()).to(x0.dtype)
        return x_t, noise - x0

    def predict(self, transformer, x_t: torch.Tensor, t: torch.Tensor, batch: dict, dtype: torch.dtype) -> torch.Tensor:
        # As WanPipeline: the timestep is σ·T in float32, and the output is the velocity prediction.
        timestep = (t.double() * self.num_train_timesteps).float()
        prompt = batch["prompt_embeds"].repeat(2, 1, 1).to(dtype)
        return transformer(x_t.to(dtype), timestep, encoder_hidden_states=prompt, return_dict=False)[0]
