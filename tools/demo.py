"""The embedded default job (`make demo`): does Diffusion-DPO move samples toward what was preferred?

The toy world of tools/toy_world.py, end to end through the real launcher:

  1. data        2048 pairs, mode A preferred over mode B (`--prefer`), and a fresh tiny UNet
  2. reference   that UNet trained on both images of every pair (loss.type=sft): it samples both modes
  3. cache       tools/precompute_ref.py: the reference's errors for every pair and draw, once
  4. policy      Diffusion-DPO from the reference, reference.mode=cache (no reference model in memory)
  5. evaluation  DDIM samples of reference and policy from the same initial noise, scored by the oracle
  6. report      OUTPUT_DIR/report/{report.md, report.json, curves.png, rates.png}

Steps 2-4 run as `deepspeed --num_gpus NPROC launch/train.py` (GPUs when present, else CPU processes).
`--reference DIR` reuses a reference folder made by an earlier run and skips step 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import toy_world  # noqa: E402  (a sibling script, not a package)

DPO_SCALARS = ("train/loss", "train/implicit_acc", "train/reward_margin", "train/gap_w", "train/gap_l")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict, log: Path) -> None:
    print("+", " ".join(cmd), f"> {log}", flush=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"demo: {cmd[0]} failed with exit code {rc}; the end of {log}:\n{tail}")


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _plots(report: Path, curves: dict, result: dict, rate_curve: list[tuple[int, float, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DPO_SCALARS), figsize=(4 * len(DPO_SCALARS), 3.2))
    for ax, name in zip(axes, DPO_SCALARS):
        steps, values = zip(*curves[name])
        ax.plot(steps, values)
        if name.startswith("train/gap"):
            ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_title(name)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(report / "curves.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    steps = [s for s, _, _ in rate_curve]
    ax.plot(steps, [p for _, p, _ in rate_curve], "o-", label="policy")
    ax.plot(steps, [r for _, _, r in rate_curve], "s--", label="reference")
    ax.set_ylim(0, 1)
    ax.set_xlabel("DPO step")
    ax.set_ylabel(f"rate of preferred mode {result['prefer']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(report / "rates.png", dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--nproc", type=int, default=2, help="processes (GPUs if present, else CPU processes)")
    p.add_argument("--prefer", default="A", choices=("A", "B"), help="the mode the pairs prefer")
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--dpo-steps", type=int, default=150)
    p.add_argument("--checkpoint-every", type=int, default=50, help="DPO checkpoints, each evaluated for the curve")
    p.add_argument("--beta", type=float, default=500.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="run seed: data order and every pair's draws")
    p.add_argument("--reference", help="a reference folder from an earlier demo run (skips the SFT step)")
    p.add_argument("overrides", nargs="*", help="extra --section.key=value for the DPO run, e.g. --loss.loser_weight=0")
    args, extra = p.parse_known_args(argv)
    overrides = args.overrides + extra

    import torch

    nproc = min(args.nproc, torch.cuda.device_count()) if torch.cuda.is_available() else args.nproc
    out = Path(args.output_dir).resolve()
    for sub in ("sft", "dpo", "cache", "report"):
        shutil.rmtree(out / sub, ignore_errors=True)  # a demo starts fresh; real runs resume instead
    (out / "logs").mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    t_start = time.time()

    data = out / f"toy_prefer_{args.prefer}"
    if not (data / "shards" / "index.json").is_file():
        toy_world.write_data(str(data), num_pairs=2048, prefer=args.prefer, seed=0)
    base = {"seed": args.seed, "data": {"shards": str(data / "shards"), "resolution": 64, "num_workers": 1},
            "model": {"gradient_checkpointing": False}, "train": {"micro_batch_size": 16},
            "checkpoint": {"keep_last": 100}, "logging": {"progress": False}}
    (out / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    launch = [str(bin_dir / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(_free_port()),
              str(REPO / "launch" / "train.py"), "--deepspeed", str(REPO / "ds_configs" / "zero2.json"),
              "--config", str(out / "base.yaml")]

    reference = Path(args.reference).resolve() if args.reference else out / "reference"
    if not args.reference:
        _run(launch + [f"--output_dir={out / 'sft'}", f"--model.pretrained_path={data / 'model'}",
                       "--loss.type=sft", f"--train.max_steps={args.sft_steps}", "--optim.lr=1e-3",
                       "--optim.warmup_steps=20", f"--checkpoint.every_steps={args.sft_steps}"],
             env, out / "logs" / "sft.log")
        shutil.rmtree(reference, ignore_errors=True)
        shutil.copytree(out / "sft" / "export" / "unet", reference / "unet")
        shutil.copytree(data / "model" / "scheduler", reference / "scheduler")

    dpo = [f"--output_dir={out / 'dpo'}", f"--model.pretrained_path={reference}", "--reference.mode=cache",
           f"--reference.cache_dir={out / 'cache'}", f"--train.max_steps={args.dpo_steps}",
           f"--dpo.beta={args.beta}", f"--optim.lr={args.lr}", f"--checkpoint.every_steps={args.checkpoint_every}",
           *overrides]
    # Enough cached draws that no pair is trained twice on one draw (2048 pairs, 16 per rank per step).
    num_draws = -(-args.dpo_steps * 16 * nproc // 2048)
    _run([sys.executable, str(REPO / "tools" / "precompute_ref.py"), "--config", str(out / "base.yaml"),
          "--num-draws", str(num_draws), "--batch-size", "128", "--no-progress", *dpo], env, out / "logs" / "precompute.log")
    _run(launch + dpo, env, out / "logs" / "dpo.log")

    # Evaluate every DPO checkpoint (the curve) and the final export (the headline).
    from diffusers import UNet2DConditionModel

    from dpo_ds.engine import consolidated_state_dict

    report = out / "report"
    report.mkdir()
    ref_unet = UNet2DConditionModel.from_pretrained(str(reference / "unet")).eval()
    ref_a = toy_world.is_mode_a(toy_world.generate(ref_unet, num_samples=args.num_samples))
    ref_rate = ref_a.float().mean().item() if args.prefer == "A" else 1 - ref_a.float().mean().item()
    rate_curve = [(0, ref_rate, ref_rate)]
    for tag in sorted((out / "dpo" / "checkpoints").glob("step_*")):
        state = consolidated_state_dict(str(out / "dpo" / "checkpoints"), tag.name)
        unet = UNet2DConditionModel.from_config(ref_unet.config)
        unet.load_state_dict(state)
        pol_a = toy_world.is_mode_a(toy_world.generate(unet.eval(), num_samples=args.num_samples))
        pol_rate = pol_a.float().mean().item() if args.prefer == "A" else 1 - pol_a.float().mean().item()
        rate_curve.append((int(tag.name.split("_")[1]), pol_rate, ref_rate))

    pol_a = toy_world.is_mode_a(toy_world.generate(
        UNet2DConditionModel.from_pretrained(str(out / "dpo" / "export" / "unet")).eval(), num_samples=args.num_samples))
    preferred = (lambda x: x) if args.prefer == "A" else (lambda x: ~x)
    diff, lo, hi = toy_world.bootstrap_difference(preferred(pol_a), preferred(ref_a))
    curves = _scalars(out / "dpo" / "tensorboard")
    last = {name: curves[name][-1][1] for name in DPO_SCALARS}
    result = {"prefer": args.prefer, "reference_rate": ref_rate, "policy_rate": ref_rate + diff,
              "difference": diff, "ci95": [lo, hi], "num_samples": args.num_samples, "dpo_steps": args.dpo_steps,
              "beta": args.beta, "lr": args.lr, "seed": args.seed, "overrides": overrides, "final": last,
              "gap_w_warning": "train/gap_w (e_w - r_w) has been above zero" in (out / "logs" / "dpo.log").read_text(),
              "rate_curve": rate_curve, "seconds": round(time.time() - t_start, 1)}
    (report / "report.json").write_text(json.dumps(result, indent=2))
    _plots(report, curves, result, rate_curve)
    (report / "report.md").write_text(
        f"# dpo_ds demo: toy world, mode {args.prefer} preferred\n\n"
        f"| | rate of mode {args.prefer} |\n|---|---|\n| reference (SFT on both modes) | {ref_rate:.3f} |\n"
        f"| policy after {args.dpo_steps} DPO steps | {ref_rate + diff:.3f} |\n"
        f"| difference (bootstrap 95% interval) | {diff:+.3f} [{lo:+.3f}, {hi:+.3f}] |\n\n"
        f"{args.num_samples} DDIM samples each, same initial noise. beta = {args.beta}, lr = {args.lr}, "
        f"overrides: {' '.join(overrides) or 'none'}.\n\n"
        f"Final train/loss {last['train/loss']:.4f}, implicit accuracy {last['train/implicit_acc']:.3f}, "
        f"gap_w {last['train/gap_w']:+.2e}, gap_l {last['train/gap_l']:+.2e}; gap_w warning: "
        f"{'yes' if result['gap_w_warning'] else 'no'}.\n\n"
        "![rates](rates.png)\n\n![curves](curves.png)\n")
    print(f"\ndemo: preferred mode {args.prefer}: reference {ref_rate:.3f} -> policy {ref_rate + diff:.3f} "
          f"({diff:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}]) in {result['seconds']:.0f} s")
    print(f"  report      {report / 'report.md'}")
    print(f"  tensorboard tensorboard --logdir {out / 'dpo' / 'tensorboard'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
