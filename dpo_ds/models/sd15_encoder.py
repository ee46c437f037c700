"""The sd15 family's encoder: captions and pixels to the sd15 family's shard samples (tools/encode_pairs.py).

Legend: B = pairs in a batch, N = images, R = resolution. Per pair: prompt_embeds [77 x D] in the store dtype.
"""

from __future__ import annotations

import torch

from dpo_ds.encode import ImageVAE, PreparedPair, subfolder
from dpo_ds.models.sd15 import SD15

LAYOUT = "an SD 1.5-layout diffusers folder (vae/, text_encoder/, tokenizer/)"


class SD15Encoder(ImageVAE):
    """SD 1.5 / 2.x: the VAE and one CLIP text encoder from a local diffusers folder, frozen, in eval mode."""

    def __init__(self, model_path: str, vae_path: str | None, device: torch.device, dtype: torch.dtype):
        from transformers import CLIPTextModel, CLIPTokenizer

        super().__init__(vae_path or subfolder(model_path, "vae", LAYOUT), device, dtype)
        self.tokenizer = CLIPTokenizer.from_pretrained(subfolder(model_path, "tokenizer", LAYOUT))
        self.text_encoder = CLIPTextModel.from_pretrained(subfolder(model_path, "text_encoder", LAYOUT),
                                                          torch_dtype=dtype).to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> torch.Tensor:
        """captions [B] -> prompt_embeds [B x 77 x D], the text encoder's last hidden states (as
        StableDiffusionPipeline conditions the UNet), float32."""
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids).last_hidden_state.float()

    def empty_prompt(self) -> dict[str, torch.Tensor]:
        """The conditioning of the prompt "" (data.empty_prompt_prob trains on it)."""
        return {"prompt_embeds": self.encode_prompts([""])[0]}

    def samples(self, batch: list[PreparedPair], store_dtype: torch.dtype, resolution: int):
        """(tensors, meta) of each pair of the batch, as the sd15 family's shards hold them."""
        latents_w, latents_l = self.encode_images(torch.stack([p.pixels_w for p in batch] +
                                                              [p.pixels_l for p in batch])).chunk(2)
        prompt_embeds = self.encode_prompts([p.caption for p in batch])
        for i, pair in enumerate(batch):
            tensors = {"latents_w": latents_w[i].to(store_dtype), "latents_l": latents_l[i].to(store_dtype),
                       "prompt_embeds": prompt_embeds[i].to(store_dtype)}
            yield tensors, self._meta(SD15.NAME, pair, resolution)
