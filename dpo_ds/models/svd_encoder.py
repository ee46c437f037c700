"""The svd family's encoder: pairs of videos to its shard samples (tools/encode_pairs.py --family svd), from a
Stable Video Diffusion folder (vae/, image_encoder/, feature_extractor/).

Legend: B = pairs in a batch, F = frames of a clip. Per pair, in the store dtype:
  latents_w, latents_l [4 x F x H/8 x W/8]   AutoencoderKLTemporalDecoder's encoder on each frame (the posterior
                                             mean), times its scaling_factor
  image_latents [4 x H/8 x W/8]              the conditioning image + cond_aug·ε, through the same encoder,
                                             unscaled (as StableVideoDiffusionPipeline)
  image_embeds [1 x D]                       CLIPVisionModelWithProjection's image_embeds of the conditioning image
  added_time_ids [3]                         (fps − 1, 127, cond_aug), float32

The conditioning image is the first frame of the WINNER, for both clips: DPO compares the errors of two clips
made from one image, so both must be conditioned on the same one, and an image-to-video model's clips start
at their source image (the winner's first frame stands for it). Its noise augmentation ε is drawn from the
pair's own generator (the encoding seed and the pair's key), so re-encoding writes the same bytes.
"""

from __future__ import annotations

import os

import torch

from dpo_ds.encode import PreparedVideoPair, subfolder
from dpo_ds.models.svd import COND_AUG, MOTION_BUCKET_ID, SVD, time_ids
from dpo_ds.noise import draw_seed

LAYOUT = "a Stable Video Diffusion diffusers folder (vae/, image_encoder/, feature_extractor/)"
CLIP_SIDE = 224  # StableVideoDiffusionPipeline resizes the conditioning image to 224 x 224 for CLIP


class SVDEncoder:
    """SVD's temporal-decoder VAE (its encoder half) and CLIP image encoder, from a local folder, frozen."""

    IS_VIDEO = True
    BATCH_SIZE = 1  # a clip is already a batch of frames through the VAE
    FAMILY = SVD

    def __init__(self, model_path: str, vae_path: str | None, device: torch.device, dtype: torch.dtype,
                 max_sequence_length: int, cond_aug: float = COND_AUG, seed: int = 0):
        # max_sequence_length (--max-sequence-length) is Wan's: svd conditions on no text.
        from diffusers import AutoencoderKLTemporalDecoder
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        vae_path = vae_path or subfolder(model_path, "vae", LAYOUT)
        if not os.path.isfile(os.path.join(vae_path, "config.json")):
            raise ValueError(f"--vae {vae_path} has no config.json; point it at an AutoencoderKLTemporalDecoder folder")
        if not cond_aug >= 0:
            raise ValueError(f"--cond-aug {cond_aug} must be >= 0")
        self.device, self.dtype, self.cond_aug, self.seed = device, dtype, float(cond_aug), int(seed)
        self.vae = AutoencoderKLTemporalDecoder.from_pretrained(vae_path, torch_dtype=dtype).to(device)
        self.vae.eval().requires_grad_(False)
        self.image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            subfolder(model_path, "image_encoder", LAYOUT), torch_dtype=dtype).to(device).eval().requires_grad_(False)
        self.feature_extractor = CLIPImageProcessor.from_pretrained(subfolder(model_path, "feature_extractor", LAYOUT))
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.spatial_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.temporal_scale_factor = 1  # frames are encoded one by one: any frame count

    def _encode(self, pixels_N3HW: torch.Tensor) -> torch.Tensor:
        """float [N x 3 x H x W] in [-1, 1] -> the posterior mean [N x 4 x H/8 x W/8], float32, unscaled."""
        return self.vae.encode(pixels_N3HW.to(self.device, self.dtype)).latent_dist.mode().float()

    @torch.no_grad()
    def encode_videos(self, pixels_N3FHW: torch.Tensor) -> torch.Tensor:
        """uint8 [N x 3 x F x H x W] -> scaled latents [N x 4 x F x H/8 x W/8], float32, on the CPU."""
        frames = [self._encode(clip.permute(1, 0, 2, 3).float() / 127.5 - 1) * self.scaling_factor
                  for clip in pixels_N3FHW]
        return torch.stack([f.permute(1, 0, 2, 3).cpu() for f in frames])

    @torch.no_grad()
    def condition(self, image_3HW: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [3 x H x W] conditioning image -> (image_latents [4 x H/8 x W/8], image_embeds [1 x D]), float32,
        as StableVideoDiffusionPipeline computes them; the augmentation noise from the pair's generator."""
        from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

        image = image_3HW[None].float() / 127.5 - 1
        g = torch.Generator().manual_seed(draw_seed(self.seed, f"{key}\x00cond_aug", 0))
        noisy = image + self.cond_aug * torch.randn(image.shape, generator=g)
        latents = self._encode(noisy)[0].cpu()
        clip_input = (_resize_with_antialiasing(image, (CLIP_SIDE, CLIP_SIDE)) + 1) / 2
        pixel_values = self.feature_extractor(images=clip_input, do_normalize=True, do_center_crop=False,
                                              do_resize=False, do_rescale=False, return_tensors="pt").pixel_values
        embeds = self.image_encoder(pixel_values.to(self.device, self.dtype)).image_embeds.float().cpu()
        return latents, embeds

    @torch.no_grad()
    def empty_prompt(self) -> dict[str, torch.Tensor]:
        """The unconditional image embedding, zeros (StableVideoDiffusionPipeline's negative branch), for
        data.empty_prompt_prob."""
        return {"image_embeds": torch.zeros(1, int(self.image_encoder.config.projection_dim))}

    def samples(self, batch: list[PreparedVideoPair], store_dtype: torch.dtype, source: dict):
        """(tensors, meta) of each pair of the batch, as the svd family's shards hold them."""
        latents_w, latents_l = self.encode_videos(torch.stack([p.pixels_w for p in batch] +
                                                              [p.pixels_l for p in batch])).chunk(2)
        ids = time_ids(source["fps"], MOTION_BUCKET_ID, self.cond_aug)
        for i, pair in enumerate(batch):
            image_latents, image_embeds = self.condition(pair.pixels_w[:, 0], pair.key)
            tensors = {"latents_w": latents_w[i].to(store_dtype), "latents_l": latents_l[i].to(store_dtype),
                       "image_latents": image_latents.to(store_dtype), "image_embeds": image_embeds.to(store_dtype),
                       "added_time_ids": ids}
            meta = {"caption": pair.caption, "family": SVD.NAME, "latent_layout": SVD.LATENT_LAYOUT,
                    "scaling_factor": self.scaling_factor, "shift_factor": None, "label": 1.0,
                    "source": {"tool": "encode_pairs", **source, "cond_aug": self.cond_aug,
                               "conditioning_image": "first frame of the winner", **pair.source}}
            yield tensors, meta
