"""How fast does a small Wan transformer learn the video world? The experiment behind README's tables.

Trains a fresh transformer on the world of tools/video_world.py in one process (no launcher): the
family's own flow matching (σ uniform, then the scheduler's shift), both directions equally, fresh data
noise every step, AdamW with warm-up and cosine decay to 0, as `make demo-video`'s reference is trained
through the launcher. At each step of `--evals` it samples the model with video_world's sampler (25
Euler steps, the same initial noise every time) and prints, one JSON line per evaluation, the share of
samples on the data's manifold (the oracle's on_manifold, nothing clipped) and the share moving right.

  python tools/video_world_sweep.py [--frames F] [--patch T,H,W] [--heads N] [--head-dim D] [--layers L]
                                    [--ffn N] [--lr LR] [--steps N] [--evals 200,400] [--num-samples N]
                                    [--init TRANSFORMER_DIR] [--only right|left]

`--init DIR --only right` fine-tunes a trained reference on one direction's clips alone: how fast plain
training on the preferred data moves the sampled direction (README, "The video world").

The defaults are the world's and make demo-video's (video_world.VIDEO_TRANSFORMER_CONFIG, 64 clips a step,
lr 1e-2, 400 steps). `--frames` changes the world's frame count and `--patch` the transformer's patch, for the
comparisons in README; everything else is the world as the repository defines it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import video_world as vw  # noqa: E402


def set_frames(frames: int) -> None:
    """The world with `frames` frames a clip (video_world reads F and CLIP_SHAPE when it builds clips)."""
    vw.F = frames
    vw.CLIP_SHAPE = (vw.C, frames, vw.H, vw.W)


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 0 at `steps`: dpo_ds's optim.schedule=cosine."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=vw.F)
    p.add_argument("--patch", help="T,H,W (default: the world's transformer's)")
    cfg = vw.VIDEO_TRANSFORMER_CONFIG
    p.add_argument("--heads", type=int, default=cfg["num_attention_heads"])
    p.add_argument("--head-dim", type=int, default=cfg["attention_head_dim"])
    p.add_argument("--layers", type=int, default=cfg["num_layers"])
    p.add_argument("--ffn", type=int, default=cfg["ffn_dim"])
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64, help="clips a step")
    p.add_argument("--evals", default="", help="steps to evaluate at besides the last, e.g. 200,400")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", help="start from this transformer folder (e.g. a demo's DIR/reference/transformer), "
                                   "not a fresh one; its config wins over the model options")
    p.add_argument("--only", choices=vw.DIRECTIONS, help="train on clips of this direction alone (both by default)")
    a = p.parse_args(argv)

    set_frames(a.frames)
    patch = [int(x) for x in a.patch.split(",")] if a.patch else cfg["patch_size"]
    config = {**cfg, "patch_size": patch, "num_attention_heads": a.heads, "attention_head_dim": a.head_dim,
              "num_layers": a.layers, "ffn_dim": a.ffn}
    family = vw.video_family()
    torch.manual_seed(a.seed)
    if a.init:
        model = vw.load_transformer(a.init).train()
        config = dict(model.config)
    else:
        model = family.denoiser_from_config(config).train()
    # every motion, both directions (the SFT reference's data), or one direction's alone
    templates = vw.templates()[vw.DIRECTIONS.index(a.only)] if a.only else vw.templates().flatten(0, 1)
    # the one prompt, batch 1: attention broadcasts it over the batch (the same numbers as copies)
    prompt = family.sampling_kwargs({k: t.float() for k, t in vw.prompt_conditioning().items()}, 1, torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(a.seed + 1)
    evals = sorted({int(x) for x in a.evals.split(",") if x} | {a.steps})
    setting = {"frames": a.frames, "patch": config["patch_size"], "heads": config["num_attention_heads"],
               "head_dim": config["attention_head_dim"], "layers": config["num_layers"], "ffn": config["ffn_dim"], "lr": a.lr, "batch": a.batch, "steps": a.steps, "seed": a.seed,
               "init": a.init, "only": a.only,
               "params": sum(q.numel() for q in model.parameters())}
    print(json.dumps({"setting": setting}), flush=True)
    t0, smooth = time.time(), None
    for step in range(a.steps):
        for group in opt.param_groups:
            group["lr"] = a.lr * lr_factor(step, a.steps, a.warmup)
        x0 = templates[torch.randint(0, len(templates), (a.batch,), generator=g)]
        x0 = x0 + vw.SPREAD * torch.randn(x0.shape, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.tensor([family.draw_t(g) for _ in range(a.batch)])
        x_t, target = family.noisy(x0, noise, t)
        pred = model(x_t, (t * family.num_train_timesteps).float(), **prompt, return_dict=False)[0]
        loss = (pred - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step + 1 in evals:
            model.eval()
            x = vw.generate(model, num_samples=a.num_samples)
            model.train()
            near = vw.on_manifold(x)
            print(json.dumps({"step": step + 1, "loss": round(smooth, 4), "train_s": round(time.time() - t0),
                              "on_manifold": near.float().mean().item(),
                              "right": (near & vw.moves_right(x)).float().mean().item()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
