"""Shard samples for tests, built from the tiny sdxl family's schema and synthetic conditioning
(dpo_ds/models), so that no test spells out a family's conditioning by hand."""

from __future__ import annotations

import torch

from dpo_ds.models import family_class

RESOLUTION = 64
FAMILY = family_class("sdxl").tiny(RESOLUTION)
SCHEMA = FAMILY.sample_schema(FAMILY.TINY_DENOISER_CONFIG)  # what the trainer's reader checks


def make_sample(index: int, *, shift: float = 0.0, latent_shape: tuple[int, ...] | None = None,
                caption: str | None = None) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(key, meta, tensors) of synthetic pair `index`, drawn from a generator seeded with it: latents
    [C x h x w] (or latent_shape) N(0, 1) + shift in the winner and − shift in the loser, then the
    family's synthetic conditioning; float16, except what the family stores in float32."""
    g = torch.Generator().manual_seed(index)
    shape = latent_shape or SCHEMA["latents_w"]
    tensors = {"latents_w": (torch.randn(shape, generator=g) + shift).half(),
               "latents_l": (torch.randn(shape, generator=g) - shift).half(),
               **FAMILY.synthetic_conditioning(FAMILY.TINY_DENOISER_CONFIG, RESOLUTION, g, torch.float16)}
    meta = {"caption": f"caption {index}" if caption is None else caption, "family": FAMILY.NAME,
            "latent_layout": FAMILY.LATENT_LAYOUT, "scaling_factor": 0.13025, "shift_factor": None, "label": 1.0,
            "source": {"row": index}}
    return f"pair{index:04d}", meta, tensors
