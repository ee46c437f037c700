"""The unet3d and motion families' encoder: captions and videos to their shard samples (tools/encode_pairs.py
--family unet3d or motion), for ModelScope / Zeroscope and AnimateDiff (SD 1.5) folders.

Legend: B = pairs in a batch, N = clips, F = frames of a clip. Per pair: latents [4 x F x H/8 x W/8] (SD's
AutoencoderKL applied to each frame, times its scaling_factor: one latent frame per frame), prompt_embeds
[77 x D] in the store dtype.
"""

from __future__ import annotations

import torch

from dpo_ds.encode import PreparedVideoPair, text_to_video_samples
from dpo_ds.models.motion import Motion
from dpo_ds.models.sd15_encoder import SD15Encoder
from dpo_ds.models.unet3d import UNet3D


class UNet3DEncoder(SD15Encoder):
    """SD's image VAE, frame by frame, and one CLIP text encoder (as TextToVideoSDPipeline conditions its UNet),
    from a local diffusers folder (vae/, text_encoder/, tokenizer/), frozen, in eval mode."""

    IS_VIDEO = True
    BATCH_SIZE = 1  # a clip is already a batch of frames through the VAE
    FAMILY = UNet3D  # the family whose shards it writes

    def __init__(self, model_path: str, vae_path: str | None, device: torch.device, dtype: torch.dtype,
                 max_sequence_length: int):
        # max_sequence_length (--max-sequence-length) is Wan's: CLIP conditions on its tokenizer's 77 tokens.
        super().__init__(model_path, vae_path, device, dtype)
        self.spatial_scale_factor = self.vae_scale_factor
        self.temporal_scale_factor = 1  # an image VAE: any frame count

    @torch.no_grad()
    def encode_videos(self, pixels_N3FHW: torch.Tensor) -> torch.Tensor:
        """uint8 [N x 3 x F x H x W] -> scaled latents [N x C x F x H/8 x W/8], float32: each clip's frames
        through the image VAE in one batch (the posterior mean), as TextToVideoSDPipeline decodes them."""
        latents = []
        for clip in pixels_N3FHW:
            frames = self.encode_images(clip.permute(1, 0, 2, 3))  # [F x C x h x w]
            latents.append(frames.permute(1, 0, 2, 3).cpu())
        return torch.stack(latents)

    def samples(self, batch: list[PreparedVideoPair], store_dtype: torch.dtype, source: dict):
        """(tensors, meta) of each pair of the batch, as the FAMILY's shards hold them."""
        return text_to_video_samples(self, batch, store_dtype, source, {
            "family": self.FAMILY.NAME, "latent_layout": self.FAMILY.LATENT_LAYOUT,
            "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor})


class MotionEncoder(UNet3DEncoder):
    """AnimateDiff (the motion family) conditions and decodes as TextToVideoSDPipeline: the same encoder."""

    FAMILY = Motion
