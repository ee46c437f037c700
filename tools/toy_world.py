"""A toy world where alignment can be measured: two modes, an oracle, a sampler.

Latents are 4x8x8 (a 64-pixel image, SDXL's latent layout). Every latent is one
of two fixed sign patterns, A or B (amplitude 0.8), plus Gaussian noise (0.3).
The oracle reads which pattern a latent is closer to; a sample near neither
(`on_manifold`) counts as no mode at all. A preference pair holds
one latent of each mode with the same conditioning; `--prefer A` makes A the
winner. A model trained on both images of every pair (loss.type=sft) samples A
about half the time; Diffusion-DPO on the pairs should move that rate toward
the preferred mode, and the evaluation here measures whether it does.
`--agreement p` orders only a share p of the pairs by the oracle and flips the
rest, as annotators of real preference data disagree; the images are the same
as at p = 1 (so is a reference trained on them), only which one won changes.
Within-mode diversity (`diversity`) tells a policy that gained the rate by
collapsing onto a point of the mode from one that kept the mode's variation.

  python tools/toy_world.py data --out DIR [--num-pairs N] [--prefer A|B] [--agreement P] [--seed S]
      writes DIR/shards/ (docs/design.md §4 format) and DIR/model/ (the sdxl family's tiny UNet, fresh, and a
      DDPM scheduler)
  python tools/toy_world.py eval --reference MODEL_DIR --policy UNET_DIR [--num-samples N] [--json OUT]
      samples both (DDIM, fixed seeds, same initial noise) and reports the rate of the preferred mode
      (samples near neither mode never count) with a bootstrap 95% interval of the difference
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from dpo_ds.data import ShardWriter
from dpo_ds.encode import Geometry
from dpo_ds.models import family_class
from dpo_ds.models.family import Family
from make_synthetic import write_model  # a sibling script: the one writer of tiny models

FAMILY = "sdxl"  # the toy's model is the sdxl family's tiny UNet

PATTERN_SEED = 20240601
AMPLITUDE, SPREAD = 0.8, 0.3
LATENT_SHAPE = (4, 8, 8)
RESOLUTION = 64
# SDXL's noise schedule (scaled_linear, 0.00085..0.012), with v-prediction: the toy's latents are
# unit-scale, like a VAE's scaled latents. At the noisiest timesteps x0 = (x_t - sigma*eps)/alpha
# amplifies an epsilon model's error by 1/alpha (15x here, 150x with DDPM's linear schedule); the
# tiny reference's epsilon samples then left the data (3% within ON_MANIFOLD_RMS of a mode after
# 300 steps, 23% after 1000), its v-prediction samples did not (100% after 300 steps).
TOY_SCHEDULER_CONFIG = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000,
                        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                        "prediction_type": "v_prediction", "clip_sample": False}
# A sample counts as on the data's manifold when its RMS distance to the nearest mode's centre is
# below this (the data's is the noise, 0.3; the two centres are 1.07 apart in RMS).
ON_MANIFOLD_RMS = 0.6


def patterns() -> tuple[torch.Tensor, torch.Tensor]:
    """The two modes' centres, [4 x 8 x 8] each; fixed forever."""
    g = torch.Generator().manual_seed(PATTERN_SEED)
    return (AMPLITUDE * torch.randn(LATENT_SHAPE, generator=g).sign(),
            AMPLITUDE * torch.randn(LATENT_SHAPE, generator=g).sign())


def mode_distances(latents_NCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N] mean squared distances of each latent to the centres of mode A and of mode B."""
    a, b = patterns()
    x = latents_NCHW.float()
    return (x - a).pow(2).flatten(1).mean(1), (x - b).pow(2).flatten(1).mean(1)


def is_mode_a(latents_NCHW: torch.Tensor) -> torch.Tensor:
    """The oracle: [N] bool, True where a latent is closer to pattern A than to B."""
    to_a, to_b = mode_distances(latents_NCHW)
    return to_a < to_b


def on_manifold(latents_NCHW: torch.Tensor) -> torch.Tensor:
    """[N] bool: True where a latent lies near one of the modes, as the data does. The oracle's
    verdict on a sample far from both (a diverged sampler) says nothing about preference."""
    return torch.minimum(*mode_distances(latents_NCHW)).sqrt() < ON_MANIFOLD_RMS


def is_preferred(latents_NCHW: torch.Tensor, prefer: str) -> torch.Tensor:
    """[N] bool: a sample of the preferred mode (and on the data's manifold: garbage never counts)."""
    mode_a = is_mode_a(latents_NCHW)
    return on_manifold(latents_NCHW) & (mode_a if prefer == "A" else ~mode_a)


def mode_label(latents_NCHW: torch.Tensor) -> list[str]:
    """The oracle's verdict per sample, for pictures: "A", "B", or "-" (near neither mode)."""
    near, mode_a = on_manifold(latents_NCHW), is_mode_a(latents_NCHW)
    return [("A" if a else "B") if n else "-" for n, a in zip(near.tolist(), mode_a.tolist())]


def data_samples(num_samples: int, mode: str, seed: int = 0) -> torch.Tensor:
    """[N x 4 x 8 x 8] fresh draws of one mode from the data's distribution (the diversity the data has)."""
    a, b = patterns()
    g = torch.Generator().manual_seed(seed)
    return (a if mode == "A" else b) + SPREAD * torch.randn(num_samples, *LATENT_SHAPE, generator=g)


def diversity(latents_NCHW: torch.Tensor, mask: torch.Tensor, max_samples: int = 512) -> float:
    """Within-mode diversity: the mean pairwise RMS distance between the latents where `mask` [N] holds
    (at most `max_samples` of them, the first), nan for fewer than two. The data's is sqrt(2) x 0.3 = 0.42
    in the toy world; a policy collapsed onto one point of the mode reads near zero."""
    x = latents_NCHW[mask][:max_samples].flatten(1).float()
    if len(x) < 2:
        return float("nan")
    d = torch.cdist(x, x).pow(2) / x.shape[1]
    return (d.sqrt().sum() / (len(x) * (len(x) - 1))).item()


def flipped(num_pairs: int, agreement: float, seed: int) -> torch.Tensor:
    """[num_pairs] bool: the pairs whose labels disagree with the oracle, exactly round((1 - agreement) x
    num_pairs) of them, chosen by the data seed (from a generator of their own: the images do not change)."""
    if not 0.0 <= agreement <= 1.0:
        raise ValueError(f"--agreement must lie in [0, 1], got {agreement}")
    out = torch.zeros(num_pairs, dtype=torch.bool)
    g = torch.Generator().manual_seed(seed + 7919)
    out[torch.randperm(num_pairs, generator=g)[:round((1.0 - agreement) * num_pairs)]] = True
    return out


def toy_family() -> Family:
    """The toy's model family: the tiny denoiser at RESOLUTION, trained with TOY_SCHEDULER_CONFIG."""
    return family_class(FAMILY).tiny(RESOLUTION, TOY_SCHEDULER_CONFIG)


def conditioning(family: Family) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One fixed conditioning for every pair, float32 (the toy's preference is about the image alone):
    (the prompt's tensors, the images' tensors). The prompt's token states [L x D] are small noise, a
    pooled prompt vector [D] zero; both images are uncropped."""
    schema = family.sample_schema(family.TINY_DENOISER_CONFIG)
    g = torch.Generator().manual_seed(PATTERN_SEED + 1)
    prompt = {}
    for name in family.PROMPT_TENSORS:
        shape = schema[name]
        prompt[name] = 0.1 * torch.randn(shape, generator=g) if len(shape) == 2 else torch.zeros(shape)
    geometry = Geometry.uncropped(RESOLUTION, RESOLUTION)
    return prompt, family.image_conditioning(geometry, geometry)


def write_data(out: str, *, num_pairs: int, prefer: str, seed: int, pairs_per_shard: int = 64,
               agreement: float = 1.0) -> None:
    """Preference shards (winner from the preferred mode, except in the 1 - agreement share of pairs whose
    label is flipped) and a fresh tiny model to start from."""
    if prefer not in ("A", "B"):
        raise ValueError(f"--prefer must be A or B, got {prefer!r}")
    a, b = patterns()
    win, lose = (a, b) if prefer == "A" else (b, a)
    is_flipped = flipped(num_pairs, agreement, seed)
    g = torch.Generator().manual_seed(seed)
    pairs = ((win + SPREAD * torch.randn(LATENT_SHAPE, generator=g),
              lose + SPREAD * torch.randn(LATENT_SHAPE, generator=g)) for _ in range(num_pairs))
    write_pairs(out, pairs, is_flipped, tool="toy_world", prefer=prefer, seed=seed, pairs_per_shard=pairs_per_shard)


def write_pairs(out: str, pairs, is_flipped: torch.Tensor, *, tool: str, prefer: str, seed: int,
                pairs_per_shard: int) -> None:
    """Shards of (preferred, rejected) latent pairs [4 x 8 x 8] each, swapped where `is_flipped`, under the
    toy's one conditioning, and the fresh model in out/model (also tools/detail_world.py's writer)."""
    prompt, images = conditioning(toy_family())
    stored = {**{name: t.half() for name, t in prompt.items()}, **images}  # as an encoder stores them
    with ShardWriter(os.path.join(out, "shards"), max_pairs=pairs_per_shard) as writer:
        for i, ((good, bad), is_flip) in enumerate(zip(pairs, is_flipped.tolist())):
            w, l = (bad, good) if is_flip else (good, bad)
            tensors = {"latents_w": w.half(), "latents_l": l.half(), **stored}
            meta = {"caption": "toy", "family": FAMILY, "latent_layout": "CHW", "scaling_factor": 1.0,
                    "shift_factor": None, "label": 1.0, "source": {"tool": tool, "prefer": prefer, "seed": seed,
                                                                    "index": i, "agrees_with_oracle": not is_flip}}
            writer.write(f"{tool.split('_')[0]}{seed}_{i:07d}", meta, tensors)
    write_model(os.path.join(out, "model"), seed, FAMILY, TOY_SCHEDULER_CONFIG)


NUM_SAMPLING_STEPS, SAMPLING_BATCH = 25, 256


@torch.no_grad()
def generate(unet, *, num_samples: int, num_steps: int = NUM_SAMPLING_STEPS, seed: int = 0,
             batch_size: int = SAMPLING_BATCH, progress=None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) samples [N x 4 x 8 x 8] from fixed initial noise.
    `progress` (a tqdm) advances by one per denoising step of each batch."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config({**TOY_SCHEDULER_CONFIG, "set_alpha_to_one": False, "steps_offset": 1})
    family = toy_family()
    prompt, images = conditioning(family)
    g = torch.Generator().manual_seed(seed)
    x_all = torch.randn(num_samples, *LATENT_SHAPE, generator=g)
    out = []
    for x in x_all.split(batch_size):
        n = len(x)
        kwargs = family.sampling_kwargs({**prompt, **images}, n, torch.float32)
        scheduler.set_timesteps(num_steps)
        for t in scheduler.timesteps:
            eps = unet(x, t.expand(n), **kwargs).sample
            x = scheduler.step(eps, t, x).prev_sample
            if progress is not None:
                progress.update(1)
        out.append(x)
    return torch.cat(out)


def bootstrap_difference(policy: torch.Tensor, reference: torch.Tensor, *, num_boot: int = 2000,
                         seed: int = 0) -> tuple[float, float, float]:
    """Rate difference (policy − reference) of two [N] bool tensors and its bootstrap 95% interval.

    The two share their initial noise sample by sample, so samples are resampled as pairs.
    """
    diff = policy.float() - reference.float()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(diff), (num_boot, len(diff)), generator=g)
    boots = diff[idx].mean(1).sort().values
    return diff.mean().item(), boots[int(0.025 * num_boot)].item(), boots[int(0.975 * num_boot) - 1].item()


def evaluate(reference_unet_dir: str, policy_unet_dir: str, *, prefer: str = "A", num_samples: int = 512,
             seed: int = 0) -> dict:
    from diffusers import UNet2DConditionModel

    samples = {name: generate(UNet2DConditionModel.from_pretrained(folder).eval(), num_samples=num_samples, seed=seed)
               for name, folder in (("reference", reference_unet_dir), ("policy", policy_unet_dir))}
    return compare(samples, prefer, is_preferred, on_manifold)


def compare(samples: dict[str, torch.Tensor], prefer: str, is_preferred, on_manifold) -> dict:
    """The evaluation's summary of the reference's and the policy's samples (same initial noise): each one's
    preferred rate, fraction on the manifold and diversity within the preferred mode, and the paired bootstrap
    of the difference."""
    pref = {name: is_preferred(x, prefer) for name, x in samples.items()}
    diff, lo, hi = bootstrap_difference(pref["policy"], pref["reference"])
    return {"num_samples": len(samples["policy"]), "prefer": prefer,
            **{f"{name}_rate": pref[name].float().mean().item() for name in samples},
            **{f"{name}_on_manifold": on_manifold(x).float().mean().item() for name, x in samples.items()},
            **{f"{name}_diversity": diversity(x, pref[name]) for name, x in samples.items()},
            "difference": diff, "ci95": [lo, hi]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", required=True)
    d.add_argument("--num-pairs", type=int, default=2048)
    d.add_argument("--pairs-per-shard", type=int, default=64)
    d.add_argument("--prefer", default="A")
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
        print(f"wrote {args.num_pairs} pairs preferring mode {args.prefer} ({args.agreement:.0%} of them) to "
              f"{args.out}/shards")
        return 0
    result = evaluate(args.reference, args.policy, prefer=args.prefer, num_samples=args.num_samples,
                      seed=args.seed)
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
