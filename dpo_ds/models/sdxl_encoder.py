"""The sdxl family's encoder: captions and pixels to the sdxl family's shard samples (tools/encode_pairs.py).

Legend: B = pairs in a batch, N = images, R = resolution. Per pair: prompt_embeds [77 x (D1 + D2)] and
pooled_prompt_embeds [P] in the store dtype, time_ids_w, time_ids_l [6] float32 (SDXL.image_conditioning).
"""

from __future__ import annotations

import torch

from dpo_ds.encode import ImageVAE, PreparedPair, subfolder
from dpo_ds.models.sdxl import SDXL

LAYOUT = "an SDXL-layout diffusers folder (vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/)"


class SDXLEncoder(ImageVAE):
    """The SDXL VAE and two CLIP text encoders from a local diffusers folder, frozen, in eval mode."""

    def __init__(self, model_path: str, vae_path: str | None, device: torch.device, dtype: torch.dtype):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        super().__init__(vae_path or subfolder(model_path, "vae", LAYOUT), device, dtype)
        self.tokenizers = [CLIPTokenizer.from_pretrained(subfolder(model_path, n, LAYOUT))
                           for n in ("tokenizer", "tokenizer_2")]
        self.text_encoders = [
            cls.from_pretrained(subfolder(model_path, n, LAYOUT), torch_dtype=dtype)
            .to(device).eval().requires_grad_(False)
            for cls, n in ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2"))]

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions [B] -> prompt_embeds [B x 77 x (D1 + D2)] (penultimate states), pooled [B x P], float32."""
        states = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2].float())
        return torch.cat(states, dim=-1), out.text_embeds.float()  # pooled: text_encoder_2's projection

    def empty_prompt(self) -> dict[str, torch.Tensor]:
        """The conditioning of the prompt "" (data.empty_prompt_prob trains on it)."""
        prompt_embeds, pooled = self.encode_prompts([""])
        return {"prompt_embeds": prompt_embeds[0], "pooled_prompt_embeds": pooled[0]}

    def samples(self, batch: list[PreparedPair], store_dtype: torch.dtype, resolution: int):
        """(tensors, meta) of each pair of the batch, as the sdxl family's shards hold them."""
        latents_w, latents_l = self.encode_images(torch.stack([p.pixels_w for p in batch] +
                                                              [p.pixels_l for p in batch])).chunk(2)
        prompt_embeds, pooled = self.encode_prompts([p.caption for p in batch])
        for i, pair in enumerate(batch):
            tensors = {"latents_w": latents_w[i].to(store_dtype), "latents_l": latents_l[i].to(store_dtype),
                       "prompt_embeds": prompt_embeds[i].to(store_dtype),
                       "pooled_prompt_embeds": pooled[i].to(store_dtype),
                       **SDXL.image_conditioning(pair.geometry_w, pair.geometry_l)}
            yield tensors, self._meta(SDXL.NAME, pair, resolution)
