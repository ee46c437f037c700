"""Benchmark: one training step with the live offloaded reference vs with the reference cache.

Builds synthetic data and a tiny SDXL-shaped model (tools/make_synthetic.py), precomputes the
cache (tools/precompute_ref.py), then builds two trainers in this one process, same model, data
and micro-batches: reference.mode=live (ZeRO-3, parameters offloaded to CPU) and
reference.mode=cache. Their steps are interleaved (order alternating every round), so machine
load hits both alike. Prints one JSON line:
  {"live_step_s": median, "cache_step_s": median, "ratio": cache / live,
   "live_mem_gb", "cache_mem_gb", "mem_kind", ...settings}
Peak memory is measured apart, in one child process per mode that builds only that trainer and
runs the warm-up steps (two trainers in one process would share one peak): mem_kind
"gpu_max_allocated" is the peak GPU memory allocated; "cpu_peak_rss" the process's peak resident
memory (on the CPU everything, the offloaded reference included, is resident).

With the policy's activation checkpointing off, a live step is policy forward + backward (about
3 forwards) plus a reference forward, a cached step the first three: theory gives 0.75.

  python tools/bench_reference.py --out runs/bench [--resolution 256] [--micro-batch-size 4] [--steps 20]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from make_synthetic import write_model, write_shards  # noqa: E402

from dpo_ds import engine, models  # noqa: E402
from dpo_ds.config import load_config, resolve_ds_config, training_dtype  # noqa: E402
from dpo_ds.data import list_shards  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _peak_rss_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20


def build(mode: str, overrides: list[str], args: argparse.Namespace):
    """A trainer in `mode` with a fixed cycle of micro-batches, after its warm-up steps."""
    from dpo_ds.trainer import Trainer

    cfg = load_config(None, overrides + [f"--reference.mode={mode}"])
    dtype = training_dtype(cfg, engine.has_gpu(), engine.gpu_has_bf16())
    trainer = Trainer(cfg, resolve_ds_config(args.deepspeed, cfg, engine.world_size(), dtype), dtype,
                      models.build(cfg), list_shards(cfg.data.shards))
    trainer.data_wait, trainer.nonfinite_in_row = 0.0, 0
    trainer.policy.train()
    # Same micro-batches for both modes, fetched up front: the step is measured, not the loader.
    trainer.bench_batches = itertools.cycle(list(itertools.islice(trainer.loader.epoch(0), 4)))
    for _ in range(args.warmup):
        trainer.train_step(trainer.bench_batches)
    return trainer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="work folder: data, model, cache")
    p.add_argument("--resolution", type=int, default=256, help="pixels; latents are resolution/8 per side")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="measured steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps per mode first")
    p.add_argument("--gradient-checkpointing", action="store_true", help="policy activation checkpointing on")
    p.add_argument("--deepspeed", default=os.path.join(REPO, "ds_configs", "zero3.json"))
    p.add_argument("--memory-probe", choices=("live", "cache"), help=argparse.SUPPRESS)  # the child's job
    args = p.parse_args(argv)

    num_pairs = 4 * args.micro_batch_size
    data, model, cache = (os.path.join(args.out, d) for d in ("shards", "model", "cache"))
    if not os.path.isfile(os.path.join(data, "index.json")):
        write_model(model, seed=0)
        write_shards(data, num_pairs=num_pairs, pairs_per_shard=num_pairs, resolution=args.resolution, seed=0)
    overrides = [f"--output_dir={os.path.join(args.out, 'run')}", f"--model.pretrained_path={model}",
                 f"--model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
                 f"--data.shards={data}", f"--data.resolution={args.resolution}", "--data.num_workers=0",
                 f"--train.micro_batch_size={args.micro_batch_size}", "--train.max_steps=1000000",
                 f"--reference.cache_dir={cache}", "--logging.progress=false"]
    if args.memory_probe:
        engine.init_distributed()
        build(args.memory_probe, overrides, args)
        peak = engine.max_memory_allocated_gb() if engine.has_gpu() else _peak_rss_gb()
        print(json.dumps({"peak_gb": peak}), flush=True)
        engine.destroy()
        return 0

    subprocess.run([sys.executable, os.path.join(REPO, "tools", "precompute_ref.py"), "--num-draws", "1",
                    "--cache-dir", cache, "--no-progress", *overrides],
                   check=True, capture_output=True, text=True)
    mem = {}
    for mode in ("live", "cache"):
        probe = subprocess.run([sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
                                "--memory-probe", mode], check=True, capture_output=True, text=True)
        mem[mode] = json.loads(probe.stdout.strip().splitlines()[-1])["peak_gb"]

    engine.init_distributed()
    trainers = {mode: build(mode, overrides, args) for mode in ("live", "cache")}

    times: dict[str, list[float]] = {"live": [], "cache": []}
    for i in range(args.steps):
        for mode in (("live", "cache") if i % 2 == 0 else ("cache", "live")):
            if engine.has_gpu():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            trainers[mode].train_step(trainers[mode].bench_batches)
            if engine.has_gpu():
                torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - t0)

    live, cached = statistics.median(times["live"]), statistics.median(times["cache"])
    result = {
        "live_step_s": round(live, 4), "cache_step_s": round(cached, 4), "ratio": round(cached / live, 4),
        "live_mem_gb": round(mem["live"], 4), "cache_mem_gb": round(mem["cache"], 4),
        "mem_kind": "gpu_max_allocated" if engine.has_gpu() else "cpu_peak_rss",
        "device": str(engine.device()), "world_size": engine.world_size(), "resolution": args.resolution,
        "micro_batch_size": args.micro_batch_size, "steps": args.steps,
        "gradient_checkpointing": args.gradient_checkpointing, "torch_threads": torch.get_num_threads(),
    }
    if engine.rank() == 0:
        print(json.dumps(result), flush=True)
    engine.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
