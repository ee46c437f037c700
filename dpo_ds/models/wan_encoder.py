"""Wan's encoder: captions and videos to the shard samples of a Wan-style video family (tools/encode_pairs.py
--family wan). The encoder comes before its family: Wan shards can be encoded, not yet trained on.

Legend: B = pairs in a batch, N = clips, F = frames of a clip. Per pair: latents [C x (1 + (F-1)/4) x H/8 x W/8],
prompt_embeds [L x D] in the store dtype.
"""

from __future__ import annotations

import html
import json
import os
import re

import torch

from dpo_ds.encode import PreparedVideoPair, subfolder, text_to_video_samples

LAYOUT = "a Wan-layout diffusers folder (vae/, text_encoder/, tokenizer/)"


class WanEncoder:
    """Wan's causal 3D VAE (AutoencoderKLWan) and UMT5 text encoder from a local diffusers folder, frozen.

    Latents are normalised per channel as WanPipeline un-normalises them before decoding:
    stored = (z - latents_mean) / latents_std, both from the VAE's config.
    """

    IS_VIDEO = True
    BATCH_SIZE = 1  # a clip is already dozens of frames through the VAE

    def __init__(self, model_path: str, vae_path: str | None, device: torch.device, dtype: torch.dtype,
                 max_sequence_length: int):
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        vae_path = vae_path or os.path.join(model_path, "vae")
        config_path = os.path.join(vae_path, "config.json")
        if not os.path.isfile(config_path):
            raise ValueError(f"{vae_path} has no config.json; point --model at {LAYOUT} "
                             "or --vae at an AutoencoderKLWan folder")
        with open(config_path) as f:
            vae_class = json.load(f).get("_class_name")
        if vae_class != "AutoencoderKLWan":
            raise ValueError(f"{config_path} is a {vae_class}; --family wan needs an AutoencoderKLWan")
        self.device, self.dtype, self.max_sequence_length = device, dtype, max_sequence_length
        self.vae = AutoencoderKLWan.from_pretrained(vae_path, torch_dtype=dtype).to(device).eval().requires_grad_(False)
        config = self.vae.config
        self.latents_mean = [float(x) for x in config.latents_mean]
        self.latents_std = [float(x) for x in config.latents_std]
        self.spatial_scale_factor = int(config.scale_factor_spatial)
        self.temporal_scale_factor = int(config.scale_factor_temporal)
        self.tokenizer = AutoTokenizer.from_pretrained(subfolder(model_path, "tokenizer", LAYOUT))
        text_encoder_path = subfolder(model_path, "text_encoder", LAYOUT)
        self.text_encoder = UMT5EncoderModel.from_pretrained(text_encoder_path, torch_dtype=dtype)
        self.text_encoder.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def encode_videos(self, pixels_N3FHW: torch.Tensor) -> torch.Tensor:
        """uint8 [N x 3 x F x H x W] -> normalised latents [N x C x (1 + (F-1)/4) x H/8 x W/8], float32.

        One clip per VAE call: a clip is already a large batch of frames, and the causal VAE
        keeps a feature cache per call. The posterior mean, not a sample.
        """
        mean = torch.tensor(self.latents_mean).view(-1, 1, 1, 1)
        std = torch.tensor(self.latents_std).view(-1, 1, 1, 1)
        latents = []
        for clip in pixels_N3FHW:
            x = clip[None].to(self.device, torch.float32).div(127.5).sub(1.0).to(self.dtype)
            z = self.vae.encode(x).latent_dist.mode()[0].float().cpu()
            latents.append((z - mean) / std)
        return torch.stack(latents)

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> torch.Tensor:
        """captions [B] -> prompt_embeds [B x L x D], float32, L = max_sequence_length.

        As WanPipeline: cleaned text, UMT5's last hidden states, zeros past each prompt's tokens.
        (The pipeline also runs ftfy when it is installed; this does not.)
        """
        captions = [re.sub(r"\s+", " ", html.unescape(html.unescape(c)).strip()).strip() for c in captions]
        tokens = self.tokenizer(captions, padding="max_length", max_length=self.max_sequence_length,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        states = self.text_encoder(tokens.input_ids.to(self.device), mask).last_hidden_state.float()
        return states * mask[..., None].gt(0)

    def empty_prompt(self) -> dict[str, torch.Tensor]:
        """The conditioning of the prompt "" (data.empty_prompt_prob trains on it)."""
        return {"prompt_embeds": self.encode_prompts([""])[0]}

    def samples(self, batch: list[PreparedVideoPair], store_dtype: torch.dtype, source: dict):
        """(tensors, meta) of each pair of the batch, as the wan family's shards hold them."""
        # The normalisation is per channel, so scaling_factor is 1 and mean/std travel beside it.
        return text_to_video_samples(self, batch, store_dtype, source, {
            "family": "wan", "latent_layout": "CFHW", "scaling_factor": 1.0, "shift_factor": None,
            "latents_mean": self.latents_mean, "latents_std": self.latents_std})
