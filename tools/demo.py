"""The embedded default job (`make demo`): synthetic pairs -> Diffusion-DPO on a tiny SDXL-shaped UNet.

Runs the real path end to end: tools/make_synthetic.py writes shards and a
tiny model folder, the `deepspeed` launcher starts NPROC processes (GPUs when
present, else the CPU with gloo), the policy trains under ZeRO-3 against a live
reference offloaded to CPU, checkpoints, and exports a diffusers UNet.

Writes OUTPUT_DIR/{data/, run.yaml, run/} and prints a summary of the run.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--nproc", type=int, default=2, help="processes (GPUs if present, else CPU processes)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--ds-config", default=str(REPO / "ds_configs" / "zero3.json"))
    args = p.parse_args(argv)

    import torch

    nproc = args.nproc
    if torch.cuda.is_available():
        nproc = min(nproc, torch.cuda.device_count())
    out = Path(args.output_dir).resolve()
    data, run_dir = out / "data", out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a demo starts fresh; real runs resume instead

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    if not (data / "shards" / "index.json").is_file():
        subprocess.run([sys.executable, str(REPO / "tools" / "make_synthetic.py"), "--out", str(data),
                        "--num-pairs", "256", "--pairs-per-shard", "32", "--resolution", "64", "--signal", "1.0"], check=True, env=env)

    cfg = {
        "output_dir": str(run_dir),
        "seed": 0,
        "model": {"pretrained_path": str(data / "model")},
        "data": {"shards": str(data / "shards"), "resolution": 64, "num_workers": 1},
        "dpo": {"beta": 500.0},
        "train": {"micro_batch_size": 4, "max_steps": args.steps},
        "optim": {"lr": 1e-4, "warmup_steps": 2},
        "reference": {"mode": "live", "offload": "cpu"},
        "checkpoint": {"every_steps": 10, "keep_last": 2},
    }
    (out / "run.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [str(bin_dir / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(_free_port()),
           str(REPO / "launch" / "train.py"), "--deepspeed", args.ds_config, "--config", str(out / "run.yaml")]
    print("+", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, env=env, cwd=REPO).returncode
    if rc != 0:
        print(f"demo: training failed with exit code {rc}", file=sys.stderr)
        return rc

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    last = {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}
    first_loss = acc.Scalars("train/loss")[0].value
    print(f"\ndemo: {args.steps} steps on {nproc} {'GPU' if torch.cuda.is_available() else 'CPU'} processes")
    print(f"  train/loss          {first_loss:.4f} -> {last['train/loss']:.4f}  (log 2 = {math.log(2):.4f} at the start)")
    for tag in ("train/implicit_acc", "train/gap_w", "train/gap_l", "perf/pairs_per_s"):
        print(f"  {tag:<19} {last[tag]:.4g}")
    print(f"  checkpoints         {run_dir / 'checkpoints'} (latest: {(run_dir / 'checkpoints' / 'latest').read_text()})")
    print(f"  exported UNet       {run_dir / 'export' / 'unet'}")
    print(f"  tensorboard         tensorboard --logdir {run_dir / 'tensorboard'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
