"""Score reference vs policy samples with a CLIP-style preference model; the policy's win rate.

Reads SAMPLES/samples.json and its images (tools/sample.py's output for an image family; video clips
are refused) and a local transformers CLIPModel folder with its tokenizer and image processor
(PickScore, or HPS converted to transformers' CLIP format; --processor when they live in another
folder, as PickScore's do).
Each image's score for its prompt is logit_scale * cos(image embedding, text embedding), the
PickScore formula. Per prompt the policy wins (1), ties (1/2: identical scores) or loses (0) against
the reference; the win rate is the mean over prompts, with a percentile bootstrap 95% interval over
prompts (fixed --bootstrap-seed, so the same inputs give the same file).

Writes OUT (default SAMPLES/scores.json):
  {"scorer", "samples", "num_prompts", "logit_scale",
   "mean_score": {"reference", "policy"},
   "win_rate", "win_rate_ci95": [lo, hi], "mean_score_diff", "mean_score_diff_ci95": [lo, hi],
   "wins", "ties", "losses", "bootstrap": {"num_resamples", "seed"},
   "per_prompt": [{"index", "prompt", "seed", "reference", "policy", "outcome"}]}
and prints the summary as a table.

  python tools/score.py --samples samples/ --model PickScore_v1 --processor CLIP-ViT-H-14 [--out scores.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dpo_ds.dtypes import DTYPES

SIDES = ("reference", "policy")


def read_samples(samples_dir: str) -> list[dict]:
    path = os.path.join(samples_dir, "samples.json")
    if not os.path.isfile(path):
        raise ValueError(f"--samples: {path} does not exist; pass the --out folder of tools/sample.py")
    with open(path) as f:
        summary = json.load(f)
    if summary.get("num_frames") is not None:
        # A CLIP-style image scorer judges one picture against the prompt; a clip's motion, the part a
        # video preference model is for, would not enter its score, so the win rate would mislead.
        raise ValueError(f"{path} holds video clips ({summary['num_frames']} frames, family {summary['family']}); "
                         "score.py scores images only: compare the clips in grid.png and the .mp4 files, or "
                         "score them with a video preference model")
    records = summary["samples"]
    if not records:
        raise ValueError(f"{path} lists no samples; rerun tools/sample.py with a non-empty prompt file")
    for record in records:
        for side in SIDES:
            if not os.path.isfile(os.path.join(samples_dir, record[side])):
                raise ValueError(f"{path}: prompt {record['index']}'s {side} image {record[side]} is missing; "
                                 "rerun tools/sample.py")
    return records


def load_scorer(model_dir: str, processor_dir: str, dtype: torch.dtype, device: str):
    from transformers import CLIPModel, CLIPProcessor

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"--model: {model_dir} has no config.json; pass a transformers CLIPModel folder")
    if not os.path.isfile(os.path.join(processor_dir, "preprocessor_config.json")):
        raise ValueError(f"--processor: {processor_dir} has no preprocessor_config.json; pass the folder holding the "
                         "model's tokenizer and image processor (for PickScore: CLIP-ViT-H-14-laion2B-s32B-b79K)")
    model = CLIPModel.from_pretrained(model_dir, torch_dtype=dtype).to(device).eval()
    return model, CLIPProcessor.from_pretrained(processor_dir)


@torch.no_grad()
def text_embeddings(model, processor, prompts: list[str], device: str) -> torch.Tensor:
    """Unit-norm text embeddings [N x D], float32."""
    max_length = model.config.text_config.max_position_embeddings
    tokens = processor.tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    # text_model + text_projection rather than get_text_features, whose return type changed in transformers 5.
    pooled = model.text_model(input_ids=tokens.input_ids.to(device),
                              attention_mask=tokens.attention_mask.to(device)).pooler_output
    return torch.nn.functional.normalize(model.text_projection(pooled).float(), dim=-1)


def _open_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


@torch.no_grad()
def image_embeddings(model, processor, paths: list[str], batch_size: int, device: str,
                     show_progress: bool) -> list[torch.Tensor]:
    """Unit-norm embeddings [D] per path, float32.

    Images with identical pixels are embedded once and share the result, so a policy image equal
    to its reference scores exactly the same and counts as a tie.
    """
    digests: list[str] = []
    first_path: dict[str, str] = {}
    for path in paths:  # images are opened again batch by batch below: memory stays bounded
        image = _open_rgb(path)
        digests.append(hashlib.sha256(repr(image.size).encode() + image.tobytes()).hexdigest())
        first_path.setdefault(digests[-1], path)
    unique = list(first_path)
    by_digest: dict[str, torch.Tensor] = {}
    starts = range(0, len(unique), batch_size)
    for start in tqdm(starts, desc="images", unit="batch", disable=not show_progress):
        batch = unique[start:start + batch_size]
        images = [_open_rgb(first_path[d]) for d in batch]
        pixels = processor.image_processor(images=images, return_tensors="pt").pixel_values
        pooled = model.vision_model(pixel_values=pixels.to(device, model.dtype)).pooler_output
        embedded = torch.nn.functional.normalize(model.visual_projection(pooled).float(), dim=-1)
        by_digest.update(zip(batch, embedded.cpu()))
    return [by_digest[d] for d in digests]


def bootstrap_ci(values: np.ndarray, num_resamples: int, seed: int) -> tuple[float, float]:
    """Percentile 95% interval of the mean of `values`, resampling them with replacement."""
    rng = np.random.default_rng(seed)
    means = np.empty(num_resamples)
    chunk = max(1, 2_000_000 // len(values))  # bounded memory for many prompts
    for start in range(0, num_resamples, chunk):
        n = min(chunk, num_resamples - start)
        means[start:start + n] = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def score(args: argparse.Namespace) -> dict:
    records = read_samples(args.samples)
    model, processor = load_scorer(args.model, args.processor or args.model, DTYPES[args.dtype], args.device)
    logit_scale = float(model.logit_scale.detach().exp())
    text = text_embeddings(model, processor, [r["prompt"] for r in records], args.device).cpu()
    paths = [os.path.join(args.samples, r[side]) for side in SIDES for r in records]
    images = image_embeddings(model, processor, paths, args.batch_size, args.device, not args.no_progress)
    num = len(records)
    scores = {side: [logit_scale * float(images[s * num + i] @ text[i]) for i in range(num)]
              for s, side in enumerate(SIDES)}

    outcomes = np.array([1.0 if p > r else 0.5 if p == r else 0.0
                         for r, p in zip(scores["reference"], scores["policy"])])
    diffs = np.array(scores["policy"]) - np.array(scores["reference"])
    per_prompt = [{"index": rec["index"], "prompt": rec["prompt"], "seed": rec["seed"],
                   "reference": scores["reference"][i], "policy": scores["policy"][i], "outcome": float(outcomes[i])}
                  for i, rec in enumerate(records)]
    return {
        "scorer": os.path.abspath(args.model), "samples": os.path.abspath(args.samples), "num_prompts": num,
        "logit_scale": logit_scale,
        "mean_score": {side: float(np.mean(scores[side])) for side in SIDES},
        "win_rate": float(outcomes.mean()),
        "win_rate_ci95": list(bootstrap_ci(outcomes, args.num_resamples, args.bootstrap_seed)),
        "mean_score_diff": float(diffs.mean()),
        "mean_score_diff_ci95": list(bootstrap_ci(diffs, args.num_resamples, args.bootstrap_seed)),
        "wins": int((outcomes == 1.0).sum()), "ties": int((outcomes == 0.5).sum()),
        "losses": int((outcomes == 0.0).sum()),
        "bootstrap": {"num_resamples": args.num_resamples, "seed": args.bootstrap_seed},
        "per_prompt": per_prompt,
    }


def print_table(result: dict) -> None:
    lo, hi = result["win_rate_ci95"]
    dlo, dhi = result["mean_score_diff_ci95"]
    rows = [
        ("scorer", f"{result['scorer']} (logit_scale {result['logit_scale']:.2f})"),
        ("prompts", str(result["num_prompts"])),
        ("mean score, reference", f"{result['mean_score']['reference']:.4f}"),
        ("mean score, policy", f"{result['mean_score']['policy']:.4f}"),
        ("policy - reference", f"{result['mean_score_diff']:+.4f}  [{dlo:+.4f}, {dhi:+.4f}] 95% bootstrap"),
        ("policy wins / ties / losses", f"{result['wins']} / {result['ties']} / {result['losses']}"),
        ("policy win rate", f"{result['win_rate']:.3f}  [{lo:.3f}, {hi:.3f}] 95% bootstrap"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, help="tools/sample.py's output folder (holds samples.json)")
    p.add_argument("--model", required=True, help="transformers CLIPModel folder (PickScore, HPS, CLIP)")
    p.add_argument("--processor", help="folder with its tokenizer and image processor; default --model")
    p.add_argument("--out", help="output JSON; default SAMPLES/scores.json")
    p.add_argument("--num-resamples", type=int, default=10_000, help="bootstrap resamples")
    p.add_argument("--bootstrap-seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="images per forward")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.num_resamples < 1 or args.batch_size < 1:
        p.error("--num-resamples and --batch-size must be >= 1")
    try:
        result = score(args)
    except ValueError as e:
        print(f"score: error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.samples, "scores.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print_table(result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
