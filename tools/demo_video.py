"""`make demo-video`: does Diffusion-DPO move sampled clips toward the preferred motion?

The video world of tools/video_world.py, end to end through the real launcher, with tools/demo.py's
stage runner (its Console, launcher command, cache and DPO stages):

  1. data        2048 pairs: a clip moving `--prefer` (right) against the same clip reversed in time,
                 and a fresh small Wan transformer (CFHW latents [4, 2, 2, 4], one token a frame,
                 flow matching, shift 3)
  2. reference   that transformer trained on both clips of every pair (loss.type=sft, ZeRO-2, lr 1e-2
                 with cosine decay to 0): it samples both directions
  3. cache       tools/precompute_ref.py: the reference's errors for every pair and draw, once
  4. policy      Diffusion-DPO from the reference on ZeRO-3, reference.mode=cache, objective dpo+sft
  5. evaluation  flow-matching Euler samples of reference and policy from the same initial noise, scored
                 by the oracle; OUTPUT_DIR/report/{report.md, report.json, curves.png, rates.png, strip.png}

`--reference DIR` reuses a reference folder made by an earlier run and skips the training of step 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import demo  # noqa: E402  (a sibling script: the stage runner)
import video_world  # noqa: E402
from toy_world import bootstrap_difference  # noqa: E402
from demo import DPO_SCALARS, GAP_W_WARNING, Console, _duration, _plots, _scalars, _shown  # noqa: E402

# This world's own settings, passed explicitly to every stage: tools/demo.py's defaults and the run
# config's (β, learning rates, objective, batch) may change for the image demo without changing this one.
NUM_PAIRS = 2048
MICRO_BATCH = 16  # pairs per rank per step: 64 clips a step on 2 ranks
DENOISER = "transformer"
# The objectives this demo can train: name -> (what it is, overrides of the DPO run). Every DPO setting the
# result depends on is pinned here, not taken from the config's defaults.
PINNED_DPO = ["--loss.type=dpo", "--loss.loser_weight=1", "--loss.winner_hinge=0", "--optim.warmup_steps=10",
              "--optim.schedule=cosine", "--optim.min_lr_ratio=0", "--optim.weight_decay=0", "--train.grad_clip=1"]
OBJECTIVES = {
    "dpo": ("Diffusion-DPO, the paper's loss", PINNED_DPO + ["--loss.sft_weight=0"]),
    "dpo+sft": ("plus an SFT term on winners, weight 1", PINNED_DPO + ["--loss.sft_weight=1"]),
}


class VideoDemo(demo.Demo):
    """tools/demo.py's Demo on the video world: its data, its reference folder layout, its sampler."""

    def __init__(self, args, overrides: list[str], console: Console):
        super().__init__(args, overrides, console)
        base = yaml.safe_load((self.out / "base.yaml").read_text())
        base["data"]["shards"] = str(self.data / "shards")
        base["model"]["family"] = "wan"  # its σ law and shift: the scheduler's (video_world.VIDEO_SCHEDULER_CONFIG)
        base["model"]["sigma_density"] = "uniform"
        base["train"]["micro_batch_size"] = MICRO_BATCH
        (self.out / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))

    def world_and_data(self):
        return video_world, self.out / f"video_prefer_{self.args.prefer}"

    def write_data(self) -> str:
        stamp = self.data / "world.json"
        # Rewritten when cut off mid-write or written by another version of the world (its clips, starts,
        # scheduler or transformer): a run on stale data would train and score a different world.
        if not stamp.is_file() or json.loads(stamp.read_text()) != video_world.world():
            shutil.rmtree(self.data, ignore_errors=True)
            video_world.write_data(str(self.data), num_pairs=NUM_PAIRS, prefer=self.args.prefer, seed=0)
        num_shards = len(list((self.data / "shards").glob("*.tar")))
        return (f"{NUM_PAIRS} pairs in {num_shards} shards and a fresh small Wan transformer in "
                f"{_shown(self.data)}")

    def train_reference(self) -> None:
        out, steps, a = self.out, self.args.sft_steps, self.args
        self.console.run(self.launch("zero2.json") + [f"--output_dir={out / 'sft'}",
                                                      f"--model.pretrained_path={self.data / 'model'}",
                                                      "--loss.type=sft", f"--train.max_steps={steps}",
                                                      f"--optim.lr={a.sft_lr}", "--optim.warmup_steps=20",
                                                      # decayed to 0 at the end: the samples' distance to
                                                      # the motions falls most in the last, slow steps
                                                      "--optim.schedule=cosine", "--optim.min_lr_ratio=0",
                                                      "--optim.weight_decay=0", "--train.grad_clip=1",
                                                      f"--checkpoint.every_steps={steps}"],
                         self.env, out / "logs" / "sft.log", bar="train")
        shutil.rmtree(self.reference, ignore_errors=True)
        shutil.copytree(out / "sft" / "export" / DENOISER, self.reference / DENOISER)
        shutil.copytree(self.data / "model" / "scheduler", self.reference / "scheduler")

    def num_draws(self) -> int:
        """Enough cached draws that no pair is trained twice on one draw."""
        return -(-self.args.dpo_steps * MICRO_BATCH * self.nproc // NUM_PAIRS)

    def sample(self, models: list, desc: str) -> list:
        a = self.args
        per_model = video_world.NUM_SAMPLING_STEPS * -(-a.num_samples // video_world.SAMPLING_BATCH)
        with self.console.progress(per_model * len(models), desc, "step") as bar:
            return [video_world.generate(m, num_samples=a.num_samples, progress=bar) for m in models]


def _rate(samples, prefer: str) -> float:
    return video_world.is_preferred(samples, prefer).float().mean().item()


def _frame_image(x_CHW):
    """A latent frame [C, H, W] as an RGB image 16 times its size: channels 0-2, the pattern's +-0.8
    mapped to 0.25-0.75."""
    img = (x_CHW[:3].permute(1, 2, 0).float() / (4 * video_world.AMPLITUDE) + 0.5).clamp(0, 1)
    return img.repeat_interleave(16, 0).repeat_interleave(16, 1).numpy()


def _verdict(x) -> str:
    x = x[None]
    if not bool(video_world.on_manifold(x)[0]):
        return "-"
    return "right" if bool(video_world.moves_right(x)[0]) else "left"


def strip(path: Path, ref, pol, prefer: str, num_clips: int = 4) -> None:
    """Frames left to right of a few clips, reference above policy from the same initial noise,
    each clip titled with the oracle's verdict (green: the preferred direction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    F = video_world.F
    fig, axes = plt.subplots(2, num_clips * F, figsize=(max(7.0, 0.9 * num_clips * F), 2.6))
    for row, (name, samples) in enumerate((("reference", ref), ("policy", pol))):
        for k in range(num_clips):
            verdict = _verdict(samples[k])
            for f in range(F):
                ax = axes[row, k * F + f]
                ax.imshow(_frame_image(samples[k][:, f]))
                for side in ax.spines.values():
                    side.set_color("tab:green" if verdict == prefer else "tab:red")
                    side.set_linewidth(2)
                if f == 0:
                    ax.set_title(f"{verdict}", fontsize=8, loc="left")
        axes[row, 0].set_ylabel(name, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"sampled clips, frames left to right, same initial noise per column\n"
                 f"(green: moves {prefer}; '-': near no motion)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/demo-video")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--prefer", default="right", choices=video_world.DIRECTIONS)
    p.add_argument("--sft-steps", type=int, default=400)
    p.add_argument("--sft-lr", type=float, default=1e-2)
    p.add_argument("--dpo-steps", type=int, default=400)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--beta", type=float, default=5.0)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--objective", default="dpo+sft", choices=list(OBJECTIVES))
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", help="a reference folder from an earlier run (skips the SFT step)")
    p.add_argument("overrides", nargs="*")
    args, extra = p.parse_known_args(argv)
    args.live_steps = 0
    overrides = OBJECTIVES[args.objective][1] + args.overrides + extra
    out = Path(args.output_dir).resolve()
    for sub in ("sft", "dpo", "report", "logs"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for old in out.glob("cache*"):
        shutil.rmtree(old, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    console = Console(out / "logs", 5)
    try:
        return _stages(args, overrides, console)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        console.say(f"demo: interrupted; the logs so far are in {_shown(out / 'logs')}/")
        return 130
    except BaseException as e:
        import traceback

        traceback.print_exc()
        console.fail(f"{type(e).__name__}: {e}", out / "logs" / "demo.log")


def _stages(args, overrides: list[str], console: Console) -> int:
    from dpo_ds.engine import consolidated_state_dict
    from dpo_ds.models import family_class

    t_start = time.time()
    d = VideoDemo(args, overrides, console)
    out = d.out
    console.say(f"dpo_ds video demo: does Diffusion-DPO move sampled clips toward motion to the {args.prefer}? "
                f"{d.nproc} processes, ZeRO-3. Logs: {_shown(out / 'logs')}/")
    console.stage(f"data: the video world's preference pairs (moving {args.prefer} against the same clip reversed)")
    console.result(d.write_data())

    if not args.reference:
        console.stage(f"reference: {args.sft_steps} steps of plain flow-matching training on both directions "
                      "(loss.type=sft, ZeRO-2)")
        d.train_reference()
    else:
        console.stage(f"reference: {_shown(d.reference)} (from an earlier run)")
    ref_model = video_world.load_transformer(str(d.reference / DENOISER))
    ref_samples = d.sample([ref_model], "sampling")[0]
    ref_rate = _rate(ref_samples, args.prefer)
    ref_near = video_world.on_manifold(ref_samples).float().mean().item()
    console.result(f"reference samples motion {args.prefer} at rate {ref_rate:.3f} ({ref_near:.0%} of its "
                   f"{args.num_samples} samples near a motion)")

    draws = f"{d.num_draws()} draw{'s' if d.num_draws() > 1 else ''}"
    console.stage(f"cache: the reference's errors for every pair, {draws} (tools/precompute_ref.py)")
    cache = d.cache(args.seed)
    console.result(f"{NUM_PAIRS} pairs x {draws} in {_shown(cache)}")

    console.stage(f"policy: {args.dpo_steps} steps of {args.objective} ({OBJECTIVES[args.objective][0]}) from the "
                  "reference, reference.mode=cache")
    log = d.train_dpo(out / "dpo", args.seed, overrides, args.checkpoint_every)
    curves = _scalars(out / "dpo" / "tensorboard")
    loss = curves["train/loss"]
    console.result(f"train/loss {loss[0][1]:.4f} -> {loss[-1][1]:.4f}, implicit accuracy "
                   f"{curves['train/implicit_acc'][-1][1]:.3f}, gap_w {curves['train/gap_w'][-1][1]:+.2e}")

    console.stage(f"evaluation: {args.num_samples} samples of each policy checkpoint, scored by the oracle")
    report = out / "report"
    report.mkdir()
    cls = family_class("wan")
    steps = [int(tag.name.split("_")[1]) for tag in sorted((out / "dpo" / "checkpoints").glob("step_*"))]
    steps = [step for step in steps if step != args.dpo_steps]
    models = []
    for step in steps:
        m = cls.denoiser_from_config(dict(ref_model.config))
        state = consolidated_state_dict(str(out / "dpo" / "checkpoints"), f"step_{step:08d}")
        persistent = m.state_dict().keys()
        m.load_state_dict({k: v for k, v in state.items() if k in persistent})
        models.append(m.eval())
    models.append(video_world.load_transformer(str(out / "dpo" / "export" / DENOISER)))
    *ckpt_samples, pol_samples = d.sample(models, "sampling")
    rate_curve = [(0, ref_rate, ref_rate)] + [(step, _rate(x, args.prefer), ref_rate)
                                              for step, x in zip(steps + [args.dpo_steps], [*ckpt_samples, pol_samples])]
    ref_pref = video_world.is_preferred(ref_samples, args.prefer)
    pol_pref = video_world.is_preferred(pol_samples, args.prefer)
    diff, lo, hi = bootstrap_difference(pol_pref, ref_pref)
    pol_near = video_world.on_manifold(pol_samples).float().mean().item()
    last = {k: curves[k][-1][1] for k in DPO_SCALARS}
    result = {"world": "video", "prefer": args.prefer, "reference_rate": ref_rate, "policy_rate": ref_rate + diff,
              "difference": diff, "ci95": [lo, hi], "on_manifold": {"reference": ref_near, "policy": pol_near},
              "num_samples": args.num_samples, "sft_steps": args.sft_steps, "dpo_steps": args.dpo_steps,
              "beta": args.beta, "lr": args.lr, "seed": args.seed, "objective": args.objective,
              "overrides": overrides, "final": last, "gap_w_warning": GAP_W_WARNING in log.read_text(),
              "rate_curve": rate_curve}
    _plots(report, curves, result, rate_curve)
    strip(report / "strip.png", ref_samples, pol_samples, args.prefer)
    console.result(f"policy samples motion {args.prefer} at rate {ref_rate + diff:.3f} ({pol_near:.0%} near a motion)")
    result["seconds"] = round(time.time() - t_start, 1)
    (report / "report.json").write_text(json.dumps(result, indent=2))
    (report / "report.md").write_text(
        f"# dpo_ds video demo: motion to the {args.prefer} preferred\n\n"
        f"| | rate of motion to the {args.prefer} |\n|---|---|\n"
        f"| reference (flow-matching SFT on both directions) | {ref_rate:.3f} |\n"
        f"| policy after {args.dpo_steps} DPO steps | {ref_rate + diff:.3f} |\n"
        f"| difference (bootstrap 95% interval) | {diff:+.3f} [{lo:+.3f}, {hi:+.3f}] |\n\n"
        f"{args.num_samples} flow-matching Euler samples ({video_world.NUM_SAMPLING_STEPS} steps) each, same initial "
        f"noise; a clip counts for its direction only when it lies near a motion template (RMS distance below "
        f"{video_world.ON_MANIFOLD_RMS}): {ref_near:.1%} of the reference's samples do, {pol_near:.1%} of the "
        f"policy's. beta = {args.beta}, lr = {args.lr}, seed {args.seed}, objective {args.objective} "
        f"(overrides: {' '.join(overrides) or 'none'}).\n\n"
        f"Final train/loss {last['train/loss']:.4f}, implicit accuracy {last['train/implicit_acc']:.3f}, "
        f"gap_w {last['train/gap_w']:+.2e}, gap_l {last['train/gap_l']:+.2e}; gap_w warning: "
        f"{'yes' if result['gap_w_warning'] else 'no'}.\n\n"
        "![rates](rates.png)\n\n![curves](curves.png)\n\n![strip of sampled frames](strip.png)\n")
    console.say(f"\ndemo: done in {_duration(result['seconds'])}. Motion to the {args.prefer}: reference "
                f"{ref_rate:.3f} -> policy {ref_rate + diff:.3f} ({diff:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}]).")
    console.say(f"  the report       {_shown(report / 'report.md')}")
    console.say(f"  the pictures     {_shown(report / 'rates.png')}, curves.png, strip.png (same folder)")
    console.say(f"  the curves       tensorboard --logdir {_shown(out / 'dpo' / 'tensorboard')}")
    console.say(f"  the logs         {_shown(out / 'logs')}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
