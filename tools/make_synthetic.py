"""Write shards of random latent pairs and a tiny model of a family (`--family`, default sdxl), for demos and tests.

Writes (docs/design.md §4 format):
  OUT/shards/shard-NNNNNN.tar, OUT/shards/index.json   random latent pairs + the family's conditioning
                                                       (with --buckets: shard-HxW-NNNNNN.tar, one size each)
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
from dpo_ds.encode import Geometry
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
                 signal: float = 0.0, family: str = "sdxl", latent_frames: int = 2,
                 buckets: list[tuple[int, int]] | None = None) -> str:
    """Random pairs whose tensors match what the family's tiny denoiser expects; a video family's
    clips (whose schema leaves the latent shape open) are [C, latent_frames, R/8, R/8].

    buckets: (height, width) pixel sizes in place of the square `resolution`, as tools/encode_pairs.py
    --buckets writes them: pair i is of size i mod len(buckets), each size in its own shards
    (shard-HxW-NNNNNN.tar) of one index.json, its time ids (SDXL) that size's; train on them with
    data.resolution: null.

    signal > 0 gives the pairs a learnable preference: latent channel 0 is
    shifted by +signal in winners and by -signal in losers.
    """
    spec = family_class(family).tiny(None if buckets else resolution)
    schema = spec.sample_schema(spec.TINY_DENOISER_CONFIG)
    # The latents' channels: the denoiser's output's (svd's input also holds the conditioning image's latents).
    channels = int(spec.TINY_DENOISER_CONFIG.get("out_channels", spec.TINY_DENOISER_CONFIG["in_channels"]))
    sizes = buckets or [(resolution, resolution)]
    g = torch.Generator().manual_seed(seed)
    for b, (height, width) in enumerate(sizes):
        latent = (height // 8, width // 8)
        latent_shape = (channels, latent_frames, *latent) if spec.LATENT_LAYOUT == "CFHW" else (channels, *latent)
        shapes = {name: schema[name] or latent_shape for name in ("latents_w", "latents_l")}
        geometry = Geometry.uncropped(height, width)
        prefix = f"shard-{height}x{width}" if buckets else "shard"
        with ShardWriter(out_dir, prefix=prefix, max_pairs=pairs_per_shard) as writer:
            for i in range(b, num_pairs, len(sizes)):
                tensors = {name: torch.randn(shapes[name], generator=g).to(torch.float16) for name in shapes}
                tensors["latents_w"][0] += signal
                tensors["latents_l"][0] -= signal
                tensors.update(spec.synthetic_conditioning(spec.TINY_DENOISER_CONFIG, resolution, g, torch.float16))
                tensors.update(spec.image_conditioning(geometry, geometry))  # this size's time ids, not the square's
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
    p.add_argument("--buckets", nargs="+", metavar="HxW",
                   help="pixel sizes in place of the square --resolution, e.g. 64x64 48x96: pair i is of size "
                        "i mod their number, each size in its own shards (train with data.resolution: null)")
    p.add_argument("--latent-frames", type=int, default=2, help="latent frames of each clip (video families)")
    p.add_argument("--signal", type=float, default=0.0,
                   help="shift of latent channel 0, + in winners and - in losers (0: no learnable preference)")
    args = p.parse_args(argv)
    buckets = None
    if args.buckets:
        try:
            buckets = [tuple(int(n) for n in size.split("x")) for size in args.buckets]
        except ValueError:
            buckets = []
        if not buckets or any(len(size) != 2 or min(size) < 8 or size[0] % 8 or size[1] % 8 for size in buckets):
            p.error(f"--buckets {' '.join(args.buckets)}: each size is HEIGHTxWIDTH in pixels, multiples of 8")
    write_model(os.path.join(args.out, "model"), args.seed, family=args.family)
    write_shards(os.path.join(args.out, "shards"), num_pairs=args.num_pairs, pairs_per_shard=args.pairs_per_shard,
                 resolution=args.resolution, seed=args.seed, signal=args.signal, family=args.family,
                 latent_frames=args.latent_frames, buckets=buckets)
    print(f"wrote {args.num_pairs} pairs to {args.out}/shards and a tiny model to {args.out}/model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
