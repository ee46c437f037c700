"""Write shards of random latent pairs and a tiny model of a family (`--family`, default sdxl), for demos and tests.

Writes (docs/design.md §4 format):
  OUT/shards/shard-NNNNNN.tar, OUT/shards/index.json   random latent pairs + the family's conditioning
  OUT/shards/empty_prompt.safetensors                  random stand-ins for the conditioning of the prompt ""
  OUT/model/unet/{config.json, diffusion_pytorch_model.safetensors}   the family's tiny denoiser
  OUT/model/scheduler/scheduler_config.json                          the family's training scheduler

Deterministic: the same arguments give byte-identical shards and weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import safetensors.torch
import torch

from dpo_ds.data import EMPTY_PROMPT_NAME, ShardWriter
from dpo_ds.models import FAMILIES, family_class


def write_model(out_dir: str, seed: int, family: str = "sdxl", scheduler_config: dict | None = None,
                denoiser_config: dict | None = None) -> str:
    """A diffusers folder: a denoiser freshly initialised from `seed` (the family's tiny one unless
    `denoiser_config` is given) and a scheduler config (the family's training scheduler unless given)."""
    cls = family_class(family)
    torch.manual_seed(seed)
    denoiser = cls.denoiser_from_config(denoiser_config or cls.TINY_DENOISER_CONFIG)
    denoiser.save_pretrained(os.path.join(out_dir, cls.DENOISER_SUBFOLDER), safe_serialization=True)
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    with open(os.path.join(out_dir, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler_config or cls.SCHEDULER_CONFIG, f, indent=2)
    return out_dir


def write_shards(out_dir: str, *, num_pairs: int, pairs_per_shard: int, resolution: int, seed: int,
                 signal: float = 0.0, family: str = "sdxl", latent_frames: int = 2) -> str:
    """Random pairs whose tensors match what the family's tiny denoiser expects; a video family's
    clips (whose schema leaves the latent shape open) are [C, latent_frames, R/8, R/8].

    signal > 0 gives the pairs a learnable preference: latent channel 0 is
    shifted by +signal in winners and by -signal in losers.
    """
    spec = family_class(family).tiny(resolution)
    schema = spec.sample_schema(spec.TINY_DENOISER_CONFIG)
    for name in ("latents_w", "latents_l"):
        if schema[name] is None:
            side = resolution // 8
            schema[name] = ((int(spec.TINY_DENOISER_CONFIG["in_channels"]), latent_frames, side, side)
                            if spec.LATENT_LAYOUT == "CFHW" else None)
        if schema[name] is None:
            raise ValueError(f"family {family}: its schema gives {name} no shape to draw")
    g = torch.Generator().manual_seed(seed)
    with ShardWriter(out_dir, max_pairs=pairs_per_shard) as writer:
        for i in range(num_pairs):
            tensors = {name: torch.randn(schema[name], generator=g).to(torch.float16)
                       for name in ("latents_w", "latents_l")}
            tensors["latents_w"][0] += signal
            tensors["latents_l"][0] -= signal
            tensors.update(spec.synthetic_conditioning(spec.TINY_DENOISER_CONFIG, resolution, g, torch.float16))
            meta = {"caption": f"synthetic pair {i}", "family": family, "latent_layout": spec.LATENT_LAYOUT,
                    "scaling_factor": 0.13025, "shift_factor": None, "label": 1.0,
                    "source": {"tool": "make_synthetic", "seed": seed, "index": i}}
            writer.write(f"pair{i:08d}", meta, tensors)
    # A stand-in for the text encoders' conditioning of "", for data.empty_prompt_prob.
    empty = {name: torch.randn(schema[name], generator=g).to(torch.float16) for name in spec.PROMPT_TENSORS}
    safetensors.torch.save_file(empty, os.path.join(out_dir, EMPTY_PROMPT_NAME))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (gets shards/ and model/)")
    p.add_argument("--num-pairs", type=int, default=64)
    p.add_argument("--pairs-per-shard", type=int, default=16)
    p.add_argument("--resolution", type=int, default=64, help="pixel resolution; latents are resolution/8 per side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", choices=sorted(FAMILIES), default="sdxl", help="model family of the model and shards")
    p.add_argument("--latent-frames", type=int, default=2, help="latent frames of each clip (video families)")
    p.add_argument("--signal", type=float, default=0.0,
                   help="shift of latent channel 0, + in winners and - in losers (0: no learnable preference)")
    args = p.parse_args(argv)
    write_model(os.path.join(args.out, "model"), args.seed, family=args.family)
    write_shards(os.path.join(args.out, "shards"), num_pairs=args.num_pairs, pairs_per_shard=args.pairs_per_shard,
                 resolution=args.resolution, seed=args.seed, signal=args.signal, family=args.family,
                 latent_frames=args.latent_frames)
    print(f"wrote {args.num_pairs} pairs to {args.out}/shards and a tiny model to {args.out}/model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
