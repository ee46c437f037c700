"""Sample the reference and the policy side by side: same prompts, same seeds, deterministic sampler.

The model family's diffusers pipeline (`--family`: sdxl's StableDiffusionXLPipeline, sd15's
StableDiffusionPipeline) is assembled from the components of a local base model folder (sdxl: vae/,
text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/; sd15: vae/, text_encoder/,
tokenizer/, scheduler/; no model_index.json needed) and run twice over the prompt file (one prompt per line, blank lines skipped): once with the
reference UNet (default BASE/unet) and once with the policy UNet (a folder from tools/export.py or a
run's export/unet). Prompt i starts from the noise of seed SEED + i in both runs, drawn on the CPU,
and the sampler (DDIM with eta 0, or Euler without churn) adds no noise of its own, so the two
columns differ only by the UNet, and a rerun gives the same images.

Writes:
  OUT/reference/NNNNN.png, OUT/policy/NNNNN.png   one image per prompt (NNNNN = prompt index)
  OUT/grid.png       reference (left column) vs policy (right), one row per prompt, the first --grid-rows
  OUT/samples.json   {"family", "base", "reference_unet", "policy_unet", "sampler", "steps", "guidance_scale",
                      "resolution", "dtype", "columns": ["reference", "policy"],
                      "samples": [{"index", "prompt", "seed", "reference": file, "policy": file}]}
                     files relative to OUT; tools/score.py reads it

  python tools/sample.py [--family sdxl|sd15] --base BASE_FOLDER --unet RUN/export/unet --prompts prompts.txt \
      --out samples/ [--reference-unet DIR] [--steps 30] [--guidance-scale 5.0] [--resolution 1024] [--sampler euler|ddim]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator

import torch
from PIL import Image
from tqdm import tqdm

from dpo_ds import models
from dpo_ds.dtypes import DTYPES
from dpo_ds.models.family import Family

SIDES = ("reference", "policy")


def read_prompts(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise ValueError(f"--prompts: {path} does not exist")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts: {path} holds no prompts; write one prompt per line")
    return prompts


def _check_unet(folder: str, flag: str) -> None:
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{flag}: {folder} has no config.json; pass a diffusers UNet folder "
                         "(tools/export.py's output, a run's export/unet, or BASE/unet)")


def load_scheduler(base: str, family: type[Family], sampler: str):
    """The sampler, with the base model's betas, prediction type and timestep spacing."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    missing = [part for part in family.BASE_PARTS if not os.path.isdir(os.path.join(base, part))]
    if missing:
        raise ValueError(f"--base: {base} lacks {missing}; pass a {family.NAME} diffusers folder "
                         f"(with {', '.join(family.BASE_PARTS)}, unet)")
    with open(os.path.join(base, "scheduler", "scheduler_config.json")) as f:
        scheduler_config = json.load(f)
    # Both keep the base model's betas, prediction type and timestep spacing; neither adds noise
    # during sampling (DDIM's eta and Euler's churn default to 0), so the seed fixes the image.
    # DDIM's default clip_sample=True would clamp predicted latents to [-1, 1], where they do not live.
    if sampler == "ddim":
        return DDIMScheduler.from_config(scheduler_config, clip_sample=False)
    return EulerDiscreteScheduler.from_config(scheduler_config)


def generate(family: type[Family], scheduler, unet_dir: str, prompts: list[str], seeds: list[int],
             args: argparse.Namespace, side: str) -> Iterator[list[Image.Image]]:
    """The images of the family's pipeline with this UNet, one prompt each, yielded batch by batch."""
    unet = family.denoiser_from_folder(unet_dir, DTYPES[args.dtype]).eval()
    pipe = family.pipeline(args.base, unet, scheduler, DTYPES[args.dtype]).to(args.device)
    starts = range(0, len(prompts), args.batch_size)
    for start in tqdm(starts, desc=side, unit="batch", disable=args.no_progress):
        batch = slice(start, start + args.batch_size)
        # One CPU generator per prompt: its starting noise does not depend on the batch it lands in
        # nor on the device.
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[batch]]
        with torch.no_grad():
            out = pipe(prompt=prompts[batch], generator=generators, num_inference_steps=args.steps,
                       guidance_scale=args.guidance_scale, height=args.resolution, width=args.resolution,
                       output_type="pil")
        yield out.images


def write_grid(columns: list[list[Image.Image]], path: str) -> None:
    """Images side by side: one column per list, one row per prompt."""
    width, height = columns[0][0].size
    grid = Image.new("RGB", (width * len(columns), height * len(columns[0])))
    for c, column in enumerate(columns):
        for r, image in enumerate(column):
            grid.paste(image, (c * width, r * height))
    grid.save(path)


def sample(args: argparse.Namespace) -> dict:
    prompts = read_prompts(args.prompts)
    reference_unet = args.reference_unet or os.path.join(args.base, "unet")
    _check_unet(reference_unet, "--reference-unet" if args.reference_unet else "--base (its unet/)")
    _check_unet(args.unet, "--unet")
    if args.resolution % 8:
        raise ValueError(f"--resolution {args.resolution} is not a multiple of 8 (the VAE's scale factor)")
    seeds = [args.seed + i for i in range(len(prompts))]
    family = models.family_class(args.family)
    scheduler = load_scheduler(args.base, family, args.sampler)

    records = [{"index": i, "prompt": p, "seed": s} for i, (p, s) in enumerate(zip(prompts, seeds))]
    columns = []
    for side, unet_dir in zip(SIDES, (reference_unet, args.unet)):
        os.makedirs(os.path.join(args.out, side), exist_ok=True)
        # Images go to disk as they come: only the grid's rows are held, whatever the prompt count.
        column: list[Image.Image] = []
        pending = iter(records)
        for images in generate(family, scheduler, unet_dir, prompts, seeds, args, side):
            for image, record in zip(images, pending):  # images first: zip must not draw a record too many
                record[side] = f"{side}/{record['index']:05d}.png"
                image.save(os.path.join(args.out, record[side]))
                if len(column) < args.grid_rows:
                    column.append(image)
        columns.append(column)
    write_grid(columns, os.path.join(args.out, "grid.png"))
    summary = {"family": args.family, "base": os.path.abspath(args.base), "reference_unet": os.path.abspath(reference_unet),
               "policy_unet": os.path.abspath(args.unet), "sampler": args.sampler, "steps": args.steps,
               "guidance_scale": args.guidance_scale, "resolution": args.resolution, "dtype": args.dtype,
               "columns": list(SIDES), "samples": records}
    with open(os.path.join(args.out, "samples.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(models.FAMILIES), default="sdxl", help="the model family (model.family)")
    p.add_argument("--base", required=True, help="base diffusers folder of the family (vae, text encoder(s), "
                                                 "tokenizer(s), scheduler; its unet/ is the default reference)")
    p.add_argument("--unet", required=True, help="the policy: an exported diffusers UNet folder")
    p.add_argument("--reference-unet", help="the reference UNet folder; default BASE/unet")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=30, help="sampler steps")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--resolution", type=int, default=1024, help="image height and width in pixels")
    p.add_argument("--sampler", choices=("euler", "ddim"), default="euler",
                   help="deterministic sampler, on the base model's scheduler config")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed SEED + i, for reference and policy")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per pipeline call")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grid-rows", type=int, default=16, help="prompts shown in grid.png (the first ones)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if min(args.steps, args.batch_size, args.grid_rows, args.resolution) < 1:
        p.error("--steps, --batch-size, --grid-rows and --resolution must be >= 1")
    try:
        summary = sample(args)
    except ValueError as e:
        print(f"sample: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(summary['samples'])} prompts x {len(SIDES)} images, grid.png and samples.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
