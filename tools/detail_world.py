"""A world where the preference is about a detail: two images of a pair share their global structure and
differ only in a small local feature, as real image preferences mostly do.

Latents are the toy world's 4x8x8 (tools/toy_world.py: the same tiny UNet, schedule, conditioning and
sampler). Every latent is one of NUM_SCENES fixed sign patterns (the global structure, amplitude 0.8) plus
Gaussian noise (0.3), except on a 2x2 patch of all 4 channels (16 of the 256 latent values), which holds
one of two features, A or B (a fixed sign pattern and its negative, amplitude 0.8, plus the same noise).
A pair's two images are one draw of scene and noise outside the patch, identical there; only the patch
differs, one feature each. The oracle reads which feature the patch is closer to; a sample counts as on
the data's manifold only when both its scene part and its patch lie near some centre: a patch faded
toward zero (neither feature) is off it, however much the rest looks like data.

  python tools/detail_world.py data --out DIR [--num-pairs N] [--prefer A|B] [--agreement P] [--seed S]
      the toy world's outputs: DIR/shards/ and DIR/model/
  python tools/detail_world.py eval --reference MODEL_DIR --policy UNET_DIR [--num-samples N] [--json OUT]
      as tools/toy_world.py eval, with this world's oracle and manifold
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from toy_world import (AMPLITUDE, LATENT_SHAPE, ON_MANIFOLD_RMS, SPREAD, compare, diversity, flipped,  # noqa: F401
                       generate, write_pairs)

PATTERN_SEED = 20260317
NUM_SCENES = 4
PATCH = (slice(None), slice(3, 5), slice(3, 5))  # all channels, rows 3-4, columns 3-4 of [C x H x W]


def _patch_mask() -> torch.Tensor:
    mask = torch.zeros(LATENT_SHAPE, dtype=torch.bool)
    mask[PATCH] = True
    return mask


def centres() -> tuple[torch.Tensor, torch.Tensor]:
    """(scenes [NUM_SCENES x 4 x 8 x 8], zero on the patch; feature A [4 x 8 x 8], zero off the patch).
    Feature B is -A. Fixed forever."""
    g = torch.Generator().manual_seed(PATTERN_SEED)
    inside = _patch_mask()
    scenes = AMPLITUDE * torch.randn(NUM_SCENES, *LATENT_SHAPE, generator=g).sign() * ~inside
    feature = AMPLITUDE * torch.randn(LATENT_SHAPE, generator=g).sign() * inside
    return scenes, feature


def _parts(latents_NCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N] mean squared distances: of the scene part to the nearest scene, of the patch to feature A and to B."""
    scenes, feature = centres()
    inside = _patch_mask()
    x = latents_NCHW.float()
    outside = x[:, ~inside]  # [N x 240]
    to_scene = (outside[:, None] - scenes[:, ~inside][None]).pow(2).mean(2).min(1).values
    patch, f = x[:, inside], feature[inside]
    return to_scene, (patch - f).pow(2).mean(1), (patch + f).pow(2).mean(1)


def is_mode_a(latents_NCHW: torch.Tensor) -> torch.Tensor:
    """The oracle: [N] bool, True where the patch is closer to feature A than to B."""
    _, to_a, to_b = _parts(latents_NCHW)
    return to_a < to_b


def on_manifold(latents_NCHW: torch.Tensor) -> torch.Tensor:
    """[N] bool: the scene part near a scene and the patch near a feature (RMS below ON_MANIFOLD_RMS each;
    the data's is the noise, 0.3; a zero patch is 0.8 from both features)."""
    to_scene, to_a, to_b = _parts(latents_NCHW)
    return (to_scene.sqrt() < ON_MANIFOLD_RMS) & (torch.minimum(to_a, to_b).sqrt() < ON_MANIFOLD_RMS)


def is_preferred(latents_NCHW: torch.Tensor, prefer: str) -> torch.Tensor:
    """[N] bool: the preferred feature on a sample that lies on the data's manifold."""
    mode_a = is_mode_a(latents_NCHW)
    return on_manifold(latents_NCHW) & (mode_a if prefer == "A" else ~mode_a)


def mode_label(latents_NCHW: torch.Tensor) -> list[str]:
    """The oracle's verdict per sample, for pictures: "A", "B", or "-" (off the manifold)."""
    near, mode_a = on_manifold(latents_NCHW), is_mode_a(latents_NCHW)
    return [("A" if a else "B") if n else "-" for n, a in zip(near.tolist(), mode_a.tolist())]


def patterns() -> tuple[torch.Tensor, torch.Tensor]:
    """Scene 0 with feature A and with feature B: the two modes as pictures show them."""
    scenes, feature = centres()
    return scenes[0] + feature, scenes[0] - feature


def _draw(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n images' scene parts with noise, zero on the patch; n patches' noise, zero off it)."""
    scenes, _ = centres()
    inside = _patch_mask()
    k = torch.randint(0, NUM_SCENES, (n,), generator=g)
    noise = SPREAD * torch.randn(n, *LATENT_SHAPE, generator=g)
    return scenes[k] + noise * ~inside, SPREAD * torch.randn(n, *LATENT_SHAPE, generator=g) * inside


def data_samples(num_samples: int, mode: str, seed: int = 0) -> torch.Tensor:
    """[N x 4 x 8 x 8] fresh draws with one feature from the data's distribution."""
    _, feature = centres()
    scene, patch_noise = _draw(num_samples, torch.Generator().manual_seed(seed))
    return scene + patch_noise + (feature if mode == "A" else -feature)


def write_data(out: str, *, num_pairs: int, prefer: str, seed: int, pairs_per_shard: int = 64,
               agreement: float = 1.0) -> None:
    """Pairs sharing scene and noise outside the patch, the preferred feature's image the winner except in
    the flipped 1 - agreement share; and the toy world's fresh model."""
    if prefer not in ("A", "B"):
        raise ValueError(f"--prefer must be A or B, got {prefer!r}")
    _, feature = centres()
    good, bad = (feature, -feature) if prefer == "A" else (-feature, feature)
    g = torch.Generator().manual_seed(seed)

    def pairs():
        for _ in range(num_pairs):
            scene, noise_w = _draw(1, g)
            noise_l = SPREAD * torch.randn(LATENT_SHAPE, generator=g) * _patch_mask()
            yield scene[0] + noise_w[0] + good, scene[0] + noise_l + bad

    write_pairs(out, pairs(), flipped(num_pairs, agreement, seed), tool="detail_world", prefer=prefer, seed=seed,
                pairs_per_shard=pairs_per_shard)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", required=True)
    d.add_argument("--num-pairs", type=int, default=2048)
    d.add_argument("--pairs-per-shard", type=int, default=64)
    d.add_argument("--prefer", default="A", choices=("A", "B"))
    d.add_argument("--agreement", type=float, default=1.0,
                   help="share of pairs ordered by the oracle; the rest flipped")
    d.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("eval")
    e.add_argument("--reference", required=True, help="the reference's unet folder")
    e.add_argument("--policy", required=True, help="the policy's unet folder (e.g. OUTPUT_DIR/export/unet)")
    e.add_argument("--prefer", default="A", choices=("A", "B"))
    e.add_argument("--num-samples", type=int, default=512)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    if args.command == "data":
        write_data(args.out, num_pairs=args.num_pairs, prefer=args.prefer, seed=args.seed,
                   pairs_per_shard=args.pairs_per_shard, agreement=args.agreement)
        print(f"wrote {args.num_pairs} pairs preferring feature {args.prefer} ({args.agreement:.0%} of them) to "
              f"{args.out}/shards")
        return 0
    from diffusers import UNet2DConditionModel

    samples = {name: generate(UNet2DConditionModel.from_pretrained(folder).eval(), num_samples=args.num_samples,
                              seed=args.seed)
               for name, folder in (("reference", args.reference), ("policy", args.policy))}
    result = compare(samples, args.prefer, is_preferred, on_manifold)
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
