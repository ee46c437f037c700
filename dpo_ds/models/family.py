"""The model-family contract: everything that differs between SDXL, SD 1.5, video UNets and transformers.

Legend: B = pairs in a batch; the denoiser runs on 2B samples, winners then losers, at the pairs'
shared draws; `...` = the family's latent layout (CHW or CFHW).

The trainer, the reference (live or cached), the precompute tool and the data reader call only this
interface, so adding a family adds a module under dpo_ds/models/ and touches nothing else. A family
is built once per run from the run's model and data settings (dpo_ds.models.build) and owns:

  the denoiser     check_source, load_denoiser, set_attention, enable_gradient_checkpointing, export
  the schema       sample_schema: every tensor a shard sample must carry, and its shape;
                   PROMPT_TENSORS: those the prompt alone decides (replaced by the empty prompt's
                   when data.empty_prompt_prob drops a pair's prompt); image_conditioning: those
                   each image's size and crop decide (SDXL's time ids; none for most families)
  the draw's law   draw_t: the pair's value t (DDPM: an integer timestep as a float; flow and EDM:
                   σ) from the pair's seeded generator; draw_law: that law as JSON, for fingerprints;
                   noise_level: t mapped to [0, 1] (0 clean, 1 pure noise), for diagnostics
  noising          noisy: x0, noise, t -> the denoiser's input and its training target
  the prediction   predict: the network run on the 2B samples, its output turned into the prediction
                   of the target (preconditioning included); conditioning assembled for the 2B
                   batch from the batch's tensors
  the error        error: prediction vs target reduced to a per-sample error, the mean over
                   non-batch dimensions (times any loss weight the family defines)
  sampling         BASE_PARTS and pipeline: the diffusers pipeline that samples with a denoiser,
                   from the other components of a base model folder (tools/sample.py); SAMPLERS and
                   sampling_scheduler: its deterministic samplers on the base's scheduler config;
                   sample: the pipeline run on prompts and seeded generators, as uint8 frames;
                   sampling_kwargs: the conditioning arguments of a denoiser sampled directly
                   (tools/toy_world.py)
  a toy model      TINY_DENOISER_CONFIG, SCHEDULER_CONFIG, denoiser_from_config and tiny: a small
                   denoiser of the family's layout built from config, for tests, demos and
                   synthetic data (tools/make_synthetic.py); synthetic_conditioning: a random
                   sample's conditioning; nothing is downloaded

Subclasses set NAME, LATENT_LAYOUT, DENOISER_SUBFOLDER, TINY_DENOISER_CONFIG and SCHEDULER_CONFIG.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch
import torch.utils.checkpoint

from dpo_ds.encode import Geometry
from dpo_ds.losses import per_sample_error


class Family(ABC):
    NAME: ClassVar[str]
    LATENT_LAYOUT: ClassVar[str]        # "CHW" (images) or "CFHW" (videos)
    DENOISER_SUBFOLDER: ClassVar[str]   # the diffusers folder's "unet" or "transformer"
    TINY_DENOISER_CONFIG: ClassVar[dict]  # the family's denoiser at toy width (a diffusers config)
    SCHEDULER_CONFIG: ClassVar[dict]      # the family's training scheduler (a diffusers scheduler config)
    # model.trainable's default: parameter-name patterns (dpo_ds.models.select_trainable); None: all train
    DEFAULT_TRAINABLE: ClassVar[tuple[str, ...] | None] = None
    # model.lora.targets' default: module-name patterns (dpo_ds.lora.target_modules): the attention projections
    LORA_TARGETS: ClassVar[tuple[str, ...]] = ("*.to_q", "*.to_k", "*.to_v", "*.to_out.0")
    # The diffusers pipeline class whose save_lora_weights writes the adapters, and its layers argument
    LORA_SAVER: ClassVar[tuple[str, str]] = ("StableDiffusionPipeline", "unet_lora_layers")
    HAS_CONV_LATENTS: ClassVar[bool] = False  # the denoiser convolves its latents (UNets): model.channels_last applies

    @classmethod
    @abstractmethod
    def from_settings(cls, model, data, scheduler_config: dict) -> "Family":
        """The family for a run's model and data sections (dpo_ds.config) and its scheduler config."""

    @classmethod
    @abstractmethod
    def tiny(cls, resolution: int, scheduler_config: dict | None = None) -> "Family":
        """The family of a toy model: TINY_DENOISER_CONFIG's denoiser on images of side `resolution` (a VAE
        scale factor of 8), trained with `scheduler_config` (default SCHEDULER_CONFIG)."""

    # ------------------------------------------------------------ the denoiser

    @classmethod
    def check_source(cls, pretrained_path: str | None, config_path: str | None) -> None:
        """Raise ValueError naming the path when the denoiser cannot be found."""
        if config_path is not None:
            if not os.path.isfile(config_path):
                raise ValueError(f"model.denoiser_config: {config_path} does not exist")
        elif not os.path.isfile(os.path.join(pretrained_path, cls.DENOISER_SUBFOLDER, "config.json")):
            raise ValueError(f"model.pretrained_path: {pretrained_path} has no {cls.DENOISER_SUBFOLDER}/config.json; "
                             f"point it at a diffusers model folder (the one holding {cls.DENOISER_SUBFOLDER}/, "
                             "vae/, scheduler/)")

    @classmethod
    def load_denoiser(cls, pretrained_path: str | None, config_path: str | None) -> torch.nn.Module:
        """The denoiser from a local diffusers folder, or freshly built from a config.json (fp32)."""
        cls.check_source(pretrained_path, config_path)
        if config_path is not None:
            with open(config_path) as f:
                return cls.denoiser_from_config(json.load(f))
        return cls.denoiser_from_folder(os.path.join(pretrained_path, cls.DENOISER_SUBFOLDER), torch.float32)

    @staticmethod
    @abstractmethod
    def denoiser_from_config(config: dict) -> torch.nn.Module:
        """A freshly initialised denoiser (fp32) from its config, drawn from torch's global generator."""

    @staticmethod
    @abstractmethod
    def denoiser_from_folder(folder: str, dtype: torch.dtype) -> torch.nn.Module:
        """The denoiser saved in `folder` (a diffusers `unet/` or `transformer/` folder, e.g. export's output)."""

    @staticmethod
    @abstractmethod
    def set_attention(denoiser: torch.nn.Module, kind: str) -> None:
        """Use the attention kernel `kind` ("sdpa" or "xformers")."""

    @staticmethod
    def enable_gradient_checkpointing(denoiser: torch.nn.Module) -> None:
        """Recompute the denoiser's blocks in the backward pass (model.gradient_checkpointing): diffusers' own,
        where the denoiser class supports it."""
        denoiser.enable_gradient_checkpointing()

    @staticmethod
    def blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        """The denoiser's repeated blocks in forward order, each called once per forward: what model.compile
        compiles one by one and model.gradient_checkpointing=selective alternates over. UNets: the down blocks,
        the mid block, the up blocks."""
        return [*denoiser.down_blocks, denoiser.mid_block, *denoiser.up_blocks]

    @staticmethod
    @abstractmethod
    def export(state_dict: dict[str, torch.Tensor], denoiser_config: dict, out_dir: str, dtype: torch.dtype) -> None:
        """Write trained weights as a diffusers folder that the denoiser class's from_pretrained loads."""

    # ------------------------------------------------------------ sampling

    BASE_PARTS: ClassVar[tuple[str, ...]]  # the base model folder's components a sampling pipeline needs

    @staticmethod
    @abstractmethod
    def pipeline(base: str, denoiser: torch.nn.Module, scheduler, dtype: torch.dtype):
        """The family's diffusers pipeline: BASE_PARTS loaded from the folder `base`, with `denoiser` and
        `scheduler`, components in `dtype`, its progress bar off."""

    SAMPLERS: ClassVar[tuple[str, ...]]  # the deterministic samplers sampling_scheduler builds, the default first
    FPS: ClassVar[int]  # video families (LATENT_LAYOUT "CFHW") only: the frame rate their clips are played at

    @staticmethod
    @abstractmethod
    def sampling_scheduler(scheduler_config: dict, sampler: str):
        """The diffusers scheduler `sampler` (one of SAMPLERS) on the base model's scheduler config: one that
        adds no noise of its own while sampling, so the starting noise fixes the sample."""

    @staticmethod
    @abstractmethod
    def sample(pipe, prompts: list[str], generators: list[torch.Generator], *, steps: int, guidance_scale: float,
               height: int, width: int, num_frames: int | None) -> np.ndarray:
        """[N, F, height, width, 3] uint8: the pipeline's samples of the N prompts, prompt i started from the
        noise of generators[i]; F = 1 for an image family, `num_frames` for a video family (which then
        must not be None). Raises ValueError naming the size the family cannot sample."""

    @abstractmethod
    def sampling_kwargs(self, sample: dict[str, torch.Tensor], n: int, dtype: torch.dtype) -> dict:
        """The denoiser's conditioning arguments, in `dtype`, for n samples that are all conditioned as the
        winner of `sample` (one shard sample's tensors, unbatched)."""

    # ------------------------------------------------------------ data

    PROMPT_TENSORS: ClassVar[tuple[str, ...]]  # the sample's tensors that depend on the prompt alone

    @abstractmethod
    def sample_schema(self, denoiser_config: dict) -> dict[str, tuple[int, ...] | None]:
        """Tensor names -> shapes that every shard sample must carry (None: any shape)."""

    @staticmethod
    def image_conditioning(geometry_w: Geometry, geometry_l: Geometry) -> dict[str, torch.Tensor]:
        """The sample's tensors that the winner's and the loser's geometry decide, as a shard stores
        them; none unless the family conditions on an image's size and crop."""
        return {}

    def synthetic_conditioning(self, denoiser_config: dict, resolution: int, g: torch.Generator,
                               dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """A synthetic sample's conditioning as a shard stores it: each of PROMPT_TENSORS drawn N(0, 1) from
        `g` in `dtype`, then image_conditioning of an uncropped square image of side `resolution`."""
        schema = self.sample_schema(denoiser_config)
        prompt = {name: torch.randn(schema[name], generator=g).to(dtype) for name in self.PROMPT_TENSORS}
        geometry = Geometry.uncropped(resolution, resolution)
        return {**prompt, **self.image_conditioning(geometry, geometry)}

    # ------------------------------------------------------------ the draw and the forward process

    @abstractmethod
    def draw_t(self, g: torch.Generator) -> float:
        """The pair's t from its generator; called before the noise is drawn from the same generator."""

    @abstractmethod
    def draw_law(self) -> dict:
        """The law of t and the forward process, as plain JSON: what a cached draw depends on."""

    @abstractmethod
    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """[N] t -> [N] float64 in [0, 1]: how noisy x_t is (0 clean, 1 pure noise)."""

    @abstractmethod
    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, target), both [N x ...], for x0, noise [N x ...] and t [N]."""

    @abstractmethod
    def predict(self, model, x_t: torch.Tensor, t: torch.Tensor, batch: dict, dtype: torch.dtype) -> torch.Tensor:
        """[2B x ...] prediction of the target by `model` (a bare module or an engine) at x_t [2B x ...], t [2B],
        computed in `dtype`."""

    def error(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """[2B] float32 per-sample error: the mean squared error over non-batch dimensions. A family with a
        loss weight per noise level (EDM's λ(σ)) multiplies it here."""
        return per_sample_error(pred, target)

    # ------------------------------------------------------------ shared by every family

    def noisy_pair(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Winner and loser noised with the pair's shared draw: x_t, target [2B x ...] and t [2B]."""
        x0 = torch.cat([batch["latents_w"], batch["latents_l"]])
        noise = batch["noise"].repeat(2, *([1] * (batch["noise"].ndim - 1)))
        t = batch["t"].repeat(2)
        x_t, target = self.noisy(x0, noise, t)
        return x_t, target, t

    def pair_errors(self, model, batch: dict, x_t: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample errors [B], [B] of `model` on winners and losers (one forward of 2B samples)."""
        return self.error(self.predict(model, x_t, t, batch, dtype), target, t).chunk(2)


def require_xformers() -> None:
    """Raise ValueError naming model.attention unless xformers can run here: installed, and a CUDA GPU."""
    if importlib.util.find_spec("xformers") is None:
        raise ValueError("model.attention=xformers but xformers is not installed: "
                         "`pip install -e .[xformers]`, or use model.attention=sdpa")
    if not torch.cuda.is_available():
        raise ValueError("model.attention=xformers needs a CUDA GPU (its kernels run on nothing else); "
                         "use model.attention=sdpa")


def checkpoint_block(block: torch.nn.Module) -> None:
    """Recompute `block` in the backward pass: its forward wrapped in torch's non-reentrant checkpoint, which
    passes keyword arguments through (a family's own checkpointing, or model.gradient_checkpointing=selective)."""
    block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """A pipeline's float pixels in [0, 1] as uint8, rounded as diffusers' numpy_to_pil rounds them."""
    return (pixels * 255).round().astype(np.uint8)
