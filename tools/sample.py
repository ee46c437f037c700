"""Sample the reference and the policy side by side: same prompts, same seeds, deterministic sampler.

The model family's diffusers pipeline (`--family`: sdxl's StableDiffusionXLPipeline, sd15's
StableDiffusionPipeline, wan's WanPipeline, unet3d's TextToVideoSDPipeline, motion's AnimateDiffPipeline,
svd's StableVideoDiffusionPipeline) is
assembled from the components of a local base model
folder (sdxl: vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/; sd15: vae/,
text_encoder/, tokenizer/, scheduler/; wan: vae/ (AutoencoderKLWan), text_encoder/ (UMT5), tokenizer/,
scheduler/; unet3d and motion: sd15's; svd: vae/ (AutoencoderKLTemporalDecoder), image_encoder/,
feature_extractor/, scheduler/; no model_index.json needed) and run twice over the prompt file (one prompt
per line, blank lines skipped): once with the reference denoiser (default BASE/unet, or BASE/transformer for wan) and
once with the policy's (a folder from tools/export.py or a run's export/unet or export/transformer).
Prompt i starts from the noise of seed SEED + i in both runs, drawn on the CPU, and the sampler (the
family's --sampler: DDIM with eta 0 or Euler without churn for the image families; UniPC or Euler on
flow sigmas for wan; unet3d and motion as the image families; svd: the base's Euler) adds no noise of its
own, so the two columns differ only by the denoiser, and a rerun gives the same samples.

svd is image-to-video: each line of --prompts is the path of a conditioning image, not a text, and
--guidance-scale is the top of SVD's per-frame guidance ramp (from 1 on the first frame).

Writes, for an image family:
  OUT/reference/NNNNN.png, OUT/policy/NNNNN.png   one image per prompt (NNNNN = prompt index)
  OUT/grid.png       reference (left column) vs policy (right), one row per prompt, the first --grid-rows
for a video family (wan, unet3d, motion, svd; --num-frames F):
  OUT/reference/NNNNN.png, OUT/policy/NNNNN.png   each clip as a strip: its F frames left to right
  OUT/reference/NNNNN.mp4, OUT/policy/NNNNN.mp4   each clip as H.264 at --fps (only when PyAV is
                                                  installed: pip install -e '.[video]')
  OUT/grid.png       per prompt two rows, its reference clip above its policy clip, each --grid-frames
                     evenly spaced frames (the same frames in both rows), the first --grid-rows prompts
and for both:
  OUT/samples.json   {"family", "base", "reference_unet" | "reference_transformer", "policy_unet" |
                      "policy_transformer", "sampler", "steps", "guidance_scale", "height", "width",
                      "num_frames" (null for images), "fps" (null for images), "dtype",
                      "columns": ["reference", "policy"],
                      "samples": [{"index", "prompt", "seed", "reference": file, "policy": file,
                                   ["reference_video": file, "policy_video": file]}]}
                     files relative to OUT (the png, a video's strip); tools/score.py reads it and
                     scores images only

  python tools/sample.py [--family sdxl|sd15] --base BASE_FOLDER --unet RUN/export/unet --prompts prompts.txt \
      --out samples/ [--reference-unet DIR] [--steps 30] [--guidance-scale 5.0] [--resolution 1024] [--sampler euler|ddim]
  python tools/sample.py --family wan --base Wan2.1-T2V-1.3B-Diffusers --transformer RUN/export/transformer \
      --prompts prompts.txt --out samples/ --height 480 --width 832 --num-frames 81 [--steps 50] [--sampler unipc|euler]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dpo_ds import models
from dpo_ds.dtypes import DTYPES
from dpo_ds.models.family import Family

SIDES = ("reference", "policy")
HAS_AV = importlib.util.find_spec("av") is not None  # PyAV, the project's `video` extra: writes the .mp4 files


def read_prompts(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise ValueError(f"--prompts: {path} does not exist")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts: {path} holds no prompts; write one prompt per line")
    return prompts


def _check_denoiser(folder: str, flag: str, family: type[Family]) -> None:
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{flag}: {folder} has no config.json; pass a diffusers {family.DENOISER_SUBFOLDER} folder "
                         f"(tools/export.py's output, a run's export/{family.DENOISER_SUBFOLDER}, or "
                         f"BASE/{family.DENOISER_SUBFOLDER})")


def load_scheduler(base: str, family: type[Family], sampler: str):
    """The family's deterministic sampler on the base model's scheduler config."""
    missing = [part for part in family.BASE_PARTS if not os.path.isdir(os.path.join(base, part))]
    if missing:
        raise ValueError(f"--base: {base} lacks {missing}; pass a {family.NAME} diffusers folder "
                         f"(with {', '.join(family.BASE_PARTS)}, {family.DENOISER_SUBFOLDER})")
    if sampler not in family.SAMPLERS:
        raise ValueError(f"--sampler {sampler}: the {family.NAME} family samples with one of {list(family.SAMPLERS)}")
    with open(os.path.join(base, "scheduler", "scheduler_config.json")) as f:
        return family.sampling_scheduler(json.load(f), sampler)


def generate(family: type[Family], scheduler, denoiser_dir: str, prompts: list[str], seeds: list[int],
             args: argparse.Namespace, side: str) -> Iterator[np.ndarray]:
    """The family's samples [N, F, H, W, 3] uint8 with this denoiser, one per prompt, yielded batch by batch."""
    denoiser = family.denoiser_from_folder(denoiser_dir, DTYPES[args.dtype]).eval()
    pipe = family.pipeline(args.base, denoiser, scheduler, DTYPES[args.dtype]).to(args.device)
    starts = range(0, len(prompts), args.batch_size)
    for start in tqdm(starts, desc=side, unit="batch", disable=args.no_progress):
        batch = slice(start, start + args.batch_size)
        # One CPU generator per prompt: its starting noise does not depend on the batch it lands in
        # nor on the device.
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[batch]]
        with torch.no_grad():
            yield family.sample(pipe, prompts[batch], generators, steps=args.steps, guidance_scale=args.guidance_scale,
                                height=args.height, width=args.width, num_frames=args.num_frames)


def write_mp4(frames_FHWC: np.ndarray, path: str, fps: int) -> None:
    import av

    # H.264 in yuv420p, what players expect; it needs even sides, which every video family's sizes are.
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames_FHWC.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames_FHWC:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def grid_frames(num_frames: int, num_shown: int) -> list[int]:
    """Indices of num_shown evenly spaced frames, the first and the last included (all if fewer)."""
    if num_frames <= num_shown:
        return list(range(num_frames))
    if num_shown == 1:
        return [0]
    return [round(i * (num_frames - 1) / (num_shown - 1)) for i in range(num_shown)]


def sample(args: argparse.Namespace) -> dict:
    prompts = read_prompts(args.prompts)
    family = models.family_class(args.family)
    is_video = family.LATENT_LAYOUT == "CFHW"
    if is_video and args.num_frames is None:
        raise ValueError(f"--family {args.family} samples videos: pass --num-frames (81 for Wan 2.1)")
    if not is_video and args.num_frames is not None:
        raise ValueError(f"--num-frames is for video families; --family {args.family} samples images")
    subfolder = family.DENOISER_SUBFOLDER
    reference = args.reference_denoiser or os.path.join(args.base, subfolder)
    _check_denoiser(reference, "--reference-unet/--reference-transformer" if args.reference_denoiser
                    else f"--base (its {subfolder}/)", family)
    _check_denoiser(args.denoiser, "--unet/--transformer", family)
    if args.height % 8 or args.width % 8:
        raise ValueError(f"--height {args.height} and --width {args.width} must be multiples of 8 "
                         "(the VAE's scale factor)")
    seeds = [args.seed + i for i in range(len(prompts))]
    scheduler = load_scheduler(args.base, family, args.sampler or family.SAMPLERS[0])
    fps = (args.fps or family.FPS) if is_video else None

    records = [{"index": i, "prompt": p, "seed": s} for i, (p, s) in enumerate(zip(prompts, seeds))]
    grid_rows: dict[str, list[np.ndarray]] = {}  # side -> per prompt its grid row [H, W', 3]
    for side, denoiser_dir in zip(SIDES, (reference, args.denoiser)):
        os.makedirs(os.path.join(args.out, side), exist_ok=True)
        # Samples go to disk as they come: only the grid's rows are held, whatever the prompt count.
        rows = grid_rows[side] = []
        pending = iter(records)
        for samples_NFHWC in generate(family, scheduler, denoiser_dir, prompts, seeds, args, side):
            for frames, record in zip(samples_NFHWC, pending):  # samples first: zip must not draw a record too many
                name = f"{side}/{record['index']:05d}"  # relative to OUT, as samples.json records it
                record[side] = name + ".png"
                Image.fromarray(np.concatenate(list(frames), axis=1)).save(os.path.join(args.out, record[side]))
                if is_video and HAS_AV:
                    record[f"{side}_video"] = name + ".mp4"
                    write_mp4(frames, os.path.join(args.out, name + ".mp4"), fps)
                if len(rows) < args.grid_rows:
                    rows.append(np.concatenate([frames[i] for i in grid_frames(len(frames), args.grid_frames)], axis=1))
    if is_video:  # per prompt, its reference clip's row above its policy clip's
        grid = [row for pair in zip(*(grid_rows[side] for side in SIDES)) for row in pair]
    else:  # per prompt one row, reference image left of the policy image
        grid = [np.concatenate(pair, axis=1) for pair in zip(*(grid_rows[side] for side in SIDES))]
    Image.fromarray(np.concatenate(grid, axis=0)).save(os.path.join(args.out, "grid.png"))
    summary = {"family": args.family, "base": os.path.abspath(args.base),
               f"reference_{subfolder}": os.path.abspath(reference),
               f"policy_{subfolder}": os.path.abspath(args.denoiser),
               "sampler": args.sampler or family.SAMPLERS[0], "steps": args.steps,
               "guidance_scale": args.guidance_scale, "height": args.height, "width": args.width,
               "num_frames": args.num_frames, "fps": fps, "dtype": args.dtype, "columns": list(SIDES),
               "samples": records}
    with open(os.path.join(args.out, "samples.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(models.FAMILIES), default="sdxl", help="the model family (model.family)")
    p.add_argument("--base", required=True, help="base diffusers folder of the family (vae, text encoder(s), "
                                                 "tokenizer(s), scheduler; its unet/ or transformer/ is the "
                                                 "default reference)")
    p.add_argument("--unet", "--transformer", dest="denoiser", required=True,
                   help="the policy: an exported diffusers UNet (or, for wan, transformer) folder")
    p.add_argument("--reference-unet", "--reference-transformer", dest="reference_denoiser",
                   help="the reference denoiser's folder; default BASE/unet (BASE/transformer for wan)")
    p.add_argument("--prompts", required=True,
                   help="text file, one prompt per line (svd: one conditioning image path per line)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=30, help="sampler steps")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--resolution", type=int, default=1024, help="height and width in pixels, unless given apart")
    p.add_argument("--height", type=int, help="height in pixels; default --resolution")
    p.add_argument("--width", type=int, help="width in pixels; default --resolution")
    p.add_argument("--num-frames", type=int, help="frames per clip (video families only; Wan: 1 + 4k, 81 for Wan 2.1)")
    p.add_argument("--fps", type=int, help="frame rate of the .mp4 files; default the family's (Wan: 16, unet3d and motion: 8)")
    p.add_argument("--sampler", help="deterministic sampler, on the base model's scheduler config: euler or ddim "
                                     "for sdxl, sd15, unet3d and motion (default euler), unipc or euler for wan (default unipc)")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed SEED + i, for reference and policy")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per pipeline call")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grid-rows", type=int, default=16, help="prompts shown in grid.png (the first ones)")
    p.add_argument("--grid-frames", type=int, default=8, help="frames of each clip shown in grid.png (video)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.height = args.resolution if args.height is None else args.height
    args.width = args.resolution if args.width is None else args.width
    sizes = (args.steps, args.batch_size, args.grid_rows, args.grid_frames, args.height, args.width)
    if min(sizes) < 1 or (args.fps is not None and args.fps < 1):
        p.error("--steps, --batch-size, --grid-rows, --grid-frames, --resolution, --height, --width and --fps "
                "must be >= 1")
    try:
        summary = sample(args)
    except ValueError as e:
        print(f"sample: error: {e}", file=sys.stderr)
        return 2
    kind = f"clips of {args.num_frames} frames" if args.num_frames else "images"
    print(f"wrote {len(summary['samples'])} prompts x {len(SIDES)} {kind}, grid.png and samples.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
