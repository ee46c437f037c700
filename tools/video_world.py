"""A video world where alignment can be measured: motion to the left or to the right, an oracle, a sampler.

The video counterpart of tools/toy_world.py. Clips are latent [C, F, H, W] = [4, F, 2, 4] (Wan's CFHW
layout). One fixed sign pattern P [C, H, W] (amplitude 0.8, one sign per channel and column, the same
down the height) moves across the frames, circularly along the width, STEP = 1 pixel per frame, to the
right (frame f = P rolled by s + f) or to the left (P rolled by s − f), from any of the W starts, plus
Gaussian noise (0.2): 2·W motions. At every frame index the roll is uniform over the same W positions in
both directions, so no single frame tells the direction, only the temporal order does; and a clip moving
right read backwards is the clip moving left from s + F − 1, itself one of the world's.

The pattern moves by half a patch a frame: with Wan's 2x2 patches a frame is two tokens, and which
token content goes where between frames is what the transformer must relate (its self-attention with
Wan's 3-D RoPE).

The oracle compares a clip with the eight clean templates and reads the direction of the nearest; a clip
farther than RMS ON_MANIFOLD_RMS from every template (a diverged sampler, a blend of two motions, frames
that do not move as one pattern) counts as no direction at all. A preference pair holds a clip of the
preferred direction and the same clip reversed in time (own noise), with one fixed prompt: same content,
same frames, only the order differs.

  python tools/video_world.py data --out DIR [--num-pairs N] [--prefer right|left] [--seed S]
      writes DIR/shards/ (docs/design.md §4 format, family wan, latent_layout CFHW, with
      empty_prompt.safetensors) and DIR/model/ (VIDEO_TRANSFORMER_CONFIG's transformer, fresh, and
      VIDEO_SCHEDULER_CONFIG)
  python tools/video_world.py eval --reference TRANSFORMER_DIR --policy TRANSFORMER_DIR [--prefer right|left]
                                  [--num-samples N] [--json OUT]
      samples both (flow-matching Euler, σ from 1 to 0, fixed seed, same initial noise) and reports the
      rate of the preferred direction (clips near no template never count) with a bootstrap 95%
      interval of the difference
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import safetensors.torch
import torch

from dpo_ds.data import EMPTY_PROMPT_NAME, ShardWriter
from dpo_ds.models import family_class
from dpo_ds.models.family import Family
from dpo_ds.models.wan import TINY_TRANSFORMER_CONFIG, shift_sigma
from make_synthetic import write_model  # a sibling script: the one writer of tiny models
from toy_world import compare

FAMILY = "wan"
DIRECTIONS = ("right", "left")
PATTERN_SEED = 20240602
C, F, H, W = 4, 2, 2, 4
CLIP_SHAPE = (C, F, H, W)
AMPLITUDE, SPREAD = 0.8, 0.2
STEP = 1  # pixels per frame
# Every start: at every frame index the pattern's position is uniform over all W rolls in both directions.
STARTS = tuple(range(W))
# Flow matching with Wan's own shift, 3: the motion is chosen at high σ (the clip's 64 elements carry it
# together), and the shift puts more of training and of the sampler's steps there.
VIDEO_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                          "shift": 3.0}
# The wan family's tiny transformer made wider (4 heads of 16, not 2 of 12; ffn 128, not 32: 141,008
# parameters, not 20,600), with Wan's own patch (1, 2, 2): a frame is 2 tokens side by side, a clip 4.
# On this small world it puts 95-99% of its samples on the manifold after 200-300 steps (README);
# on the world before ([4, 3, 8, 8], 16 tokens a frame) it never passed 37%.
VIDEO_TRANSFORMER_CONFIG = {**TINY_TRANSFORMER_CONFIG, "num_attention_heads": 4, "attention_head_dim": 16,
                            "ffn_dim": 128}
# A clip counts as on the data's manifold when its RMS distance to the nearest template is below this.
# The data's is the noise, SPREAD = 0.2. The nearest templates of opposite directions share one frame
# and differ in the other by a roll of 2 (right from s: rolls s, s + 1; left from s: s, s − 1), where the
# pattern and its roll by 2 differ in 10 of 16 signs: RMS 2·0.8·sqrt(10/16 / 2) = 0.89 apart, so a blend
# of the two lies 0.45 from both and counts as neither; the pattern standing still (a frame repeated)
# lies 0.89 from every motion too (tests/test_video_world.py checks these).
ON_MANIFOLD_RMS = 0.3


def pattern() -> torch.Tensor:
    """The moving pattern P [C, H, W]; fixed forever."""
    g = torch.Generator().manual_seed(PATTERN_SEED)
    return (AMPLITUDE * torch.randn(C, 1, W, generator=g).sign()).expand(C, H, W).contiguous()


def clip(direction: str, start: int) -> torch.Tensor:
    """The clean clip [C, F, H, W]: P moving `direction` from the roll `start`."""
    sign = 1 if direction == "right" else -1
    p = pattern()
    return torch.stack([p.roll(start + sign * STEP * f, dims=-1) for f in range(F)], dim=1)


def templates() -> torch.Tensor:
    """[2, len(STARTS), C, F, H, W]: every clean clip, by direction (right, left) and start."""
    return torch.stack([torch.stack([clip(d, s) for s in STARTS]) for d in DIRECTIONS])


def template_distances(clips: torch.Tensor) -> torch.Tensor:
    """[N, 2, len(STARTS)] mean squared distance of each clip [N, C, F, H, W] to each template."""
    t = templates().flatten(2)  # [2, S, D]
    x = clips.float().flatten(1)  # [N, D]
    return (x.pow(2).sum(1)[:, None, None] - 2 * torch.einsum("nd,kwd->nkw", x, t)
            + t.pow(2).sum(-1)[None]).clamp_min(0) / x.shape[1]


def moves_right(clips: torch.Tensor) -> torch.Tensor:
    """The oracle: [N] bool, True where a clip's nearest template moves right."""
    d = template_distances(clips).amin(2)
    return d[:, 0] < d[:, 1]


def on_manifold(clips: torch.Tensor) -> torch.Tensor:
    """[N] bool: True where a clip lies near one of the templates, as the data does. The oracle's
    verdict on a clip near none says nothing about preference."""
    return template_distances(clips).flatten(1).amin(1).sqrt() < ON_MANIFOLD_RMS


def is_preferred(clips: torch.Tensor, prefer: str) -> torch.Tensor:
    """[N] bool: a clip of the preferred direction, and on the data's manifold."""
    right = moves_right(clips)
    return on_manifold(clips) & (right if prefer == "right" else ~right)


def video_family() -> Family:
    return family_class(FAMILY).tiny(0, VIDEO_SCHEDULER_CONFIG)


def prompt_conditioning() -> dict[str, torch.Tensor]:
    """The one prompt of every pair, as a shard stores it (float16): the family's synthetic conditioning."""
    family = video_family()
    g = torch.Generator().manual_seed(PATTERN_SEED + 1)
    return family.synthetic_conditioning(family.TINY_DENOISER_CONFIG, 64, g, torch.float16)


def world() -> dict:
    """What a data folder was written for (DIR/world.json): a folder of another world is stale."""
    return {"clip_shape": list(CLIP_SHAPE), "step": STEP, "starts": list(STARTS), "amplitude": AMPLITUDE,
            "spread": SPREAD, "pattern_seed": PATTERN_SEED, "scheduler": VIDEO_SCHEDULER_CONFIG,
            "transformer": VIDEO_TRANSFORMER_CONFIG}


def write_data(out: str, *, num_pairs: int, prefer: str, seed: int, pairs_per_shard: int = 64) -> None:
    """Preference shards (winner: a clip of the preferred direction; loser: the same clip reversed in
    time, its own noise) and a fresh VIDEO_TRANSFORMER_CONFIG transformer to start from."""
    if prefer not in DIRECTIONS:
        raise ValueError(f"--prefer must be one of {DIRECTIONS}, got {prefer!r}")
    family = video_family()
    prompt = prompt_conditioning()
    clean = templates()[DIRECTIONS.index(prefer)]  # [S, C, F, H, W]
    g = torch.Generator().manual_seed(seed)
    shards = os.path.join(out, "shards")
    with ShardWriter(shards, max_pairs=pairs_per_shard) as writer:
        for i in range(num_pairs):
            k = int(torch.randint(0, len(STARTS), (), generator=g))
            start, win = STARTS[k], clean[k]
            tensors = {"latents_w": (win + SPREAD * torch.randn(CLIP_SHAPE, generator=g)).half(),
                       "latents_l": (win.flip(1) + SPREAD * torch.randn(CLIP_SHAPE, generator=g)).half(), **prompt}
            meta = {"caption": "a pattern moving", "family": FAMILY, "latent_layout": family.LATENT_LAYOUT,
                    "scaling_factor": 1.0, "shift_factor": None, "label": 1.0,
                    "source": {"tool": "video_world", "prefer": prefer, "seed": seed, "index": i, "start": start}}
            writer.write(f"video{seed}_{i:07d}", meta, tensors)
    # A stand-in for the conditioning of the prompt "", for data.empty_prompt_prob (as make_synthetic's).
    g_empty = torch.Generator().manual_seed(PATTERN_SEED + 2)
    empty = {name: torch.randn(t.shape, generator=g_empty).half() for name, t in prompt.items()
             if name in family.PROMPT_TENSORS}
    safetensors.torch.save_file(empty, os.path.join(shards, EMPTY_PROMPT_NAME))
    write_model(os.path.join(out, "model"), seed, FAMILY, VIDEO_SCHEDULER_CONFIG, VIDEO_TRANSFORMER_CONFIG)
    with open(os.path.join(out, "world.json"), "w") as f:  # written last: a folder cut off mid-write has none
        json.dump(world(), f, indent=2)


NUM_SAMPLING_STEPS, SAMPLING_BATCH = 25, 256


def sigmas(num_steps: int = NUM_SAMPLING_STEPS) -> torch.Tensor:
    """[num_steps + 1] the sampler's σ from 1 to 0: uniform, then the scheduler's shift."""
    return shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64),
                       float(VIDEO_SCHEDULER_CONFIG["shift"])).float()


@torch.no_grad()
def generate(transformer, *, num_samples: int, num_steps: int = NUM_SAMPLING_STEPS, seed: int = 0,
             batch_size: int = SAMPLING_BATCH, progress=None) -> torch.Tensor:
    """Deterministic flow-matching Euler samples [N, C, F, H, W] from fixed initial noise (seed):
    x ← x + (σ_next − σ)·v(x, σ·T), as the family trains v = ε − x0 at timestep σ·T.
    `progress` (a tqdm) advances by one per step of each batch."""
    family = video_family()
    kwargs_one = {name: t.float() for name, t in prompt_conditioning().items()}
    g = torch.Generator().manual_seed(seed)
    x_all = torch.randn(num_samples, *CLIP_SHAPE, generator=g)
    s = sigmas(num_steps)
    out = []
    for x in x_all.split(batch_size):
        n = len(x)
        # the one prompt for the whole batch: attention broadcasts it (the same numbers as n copies, faster)
        kwargs = family.sampling_kwargs(kwargs_one, 1, torch.float32)
        for i in range(num_steps):
            timestep = (s[i] * family.num_train_timesteps).expand(n)
            v = transformer(x, timestep, **kwargs, return_dict=False)[0]
            x = x + (s[i + 1] - s[i]) * v
            if progress is not None:
                progress.update(1)
        out.append(x)
    return torch.cat(out)


def load_transformer(folder: str):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(folder).eval()


def evaluate(reference_dir: str, policy_dir: str, *, prefer: str = "right", num_samples: int = 512,
             seed: int = 0) -> dict:
    samples = {name: generate(load_transformer(folder), num_samples=num_samples, seed=seed)
               for name, folder in (("reference", reference_dir), ("policy", policy_dir))}
    return compare(samples, prefer, is_preferred, on_manifold)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", required=True)
    d.add_argument("--num-pairs", type=int, default=2048)
    d.add_argument("--pairs-per-shard", type=int, default=64)
    d.add_argument("--prefer", default="right", choices=DIRECTIONS)
    d.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("eval")
    e.add_argument("--reference", required=True, help="the reference's transformer folder")
    e.add_argument("--policy", required=True, help="the policy's transformer folder (e.g. OUTPUT_DIR/export/transformer)")
    e.add_argument("--prefer", default="right", choices=DIRECTIONS)
    e.add_argument("--num-samples", type=int, default=512)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    if args.command == "data":
        write_data(args.out, num_pairs=args.num_pairs, prefer=args.prefer, seed=args.seed,
                   pairs_per_shard=args.pairs_per_shard)
        print(f"wrote {args.num_pairs} pairs preferring motion to the {args.prefer} to {args.out}/shards")
        return 0
    result = evaluate(args.reference, args.policy, prefer=args.prefer, num_samples=args.num_samples, seed=args.seed)
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
