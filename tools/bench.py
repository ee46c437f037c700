"""The project's benchmark figures, each a ratio of two things measured side by side in one run, with
its target (docs/BENCHMARKS.md holds the figures measured so far).

  data_sdxl        pairs/s per rank that dpo_ds's PairLoader delivers (2 loader workers, the seeded
                   draw of t and noise included) from local shards of SDXL-size pairs (latents
                   4x128x128, prompt_embeds [77, 2048], pooled [1280], time ids, fp16), over 10 pairs/s,
                   one H100's appetite: target >= 10 (100 pairs/s)
  data_wan         the same for Wan 2.1-size clips (latents 16x21x60x104, prompt_embeds [512, 4096]),
                   against the same 10 pairs/s: target >= 10
  reference        a step with the reference cache over one with the live (ZeRO-3, CPU-offloaded)
                   reference, gradient checkpointing off (tools/bench_reference.py): target <= 0.80
  zero3_memory     parameter + gradient + optimizer-state bytes per rank with 2 processes over 1,
                   ZeRO-3 through the real `deepspeed` launcher: target <= 0.55
  trainer_overhead dpo_ds's training step (Trainer.train_step, ds_configs/zero3.json, one process, cached
                   reference) over a bare PyTorch loop of the same model, micro-batches and AdamW, on an
                   SDXL-layout UNet of 25M parameters whose step takes over half a second here: target <= 1.15
  precompute       the bare no_grad forward loop's time over tools/precompute_ref.py's (its compute_shard:
                   shard decode, draws, forward, errors) on the same model and pairs: target >= 0.90

Prints one JSON line per figure ({"figure", "ratio", "target", "pass", ...what was measured}), then a
table (about 5 minutes on a 2-core CPU). --quick runs the figures on toy sizes (a smoke test, not a
measurement).

  python tools/bench.py [--out DIR] [--quick] [--figures data_sdxl,data_wan,reference,zero3_memory,...]
  python tools/bench.py --gpu [--tiny] [--out DIR]     the GPU run (tools/bench_gpu.py): one JSON file
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

from dpo_ds.data import PairLoader, list_shards  # noqa: E402
from dpo_ds.models import family_class  # noqa: E402

APPETITE = 10.0  # pairs/s one H100 trains at the target throughput

# Real SDXL / Wan 2.1 14B denoiser config entries that the families' schemas read.
SDXL_UNET = {"in_channels": 4, "cross_attention_dim": 2048, "projection_class_embeddings_input_dim": 2816,
             "addition_time_embed_dim": 256}
WAN_TRANSFORMER = {"in_channels": 16, "text_dim": 4096}


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the loader's workers): what a pair costs
    whatever else the machine runs, unlike pairs/s on a shared machine."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _data_figure(name: str, family: str, denoiser_config: dict, latent_shape: tuple[int, ...], num_pairs: int,
                 pairs_per_shard: int, batch_size: int, out: str) -> dict:
    """pairs/s of one rank's PairLoader with 2 workers over an epoch of freshly written shards."""
    spec = family_class(family).tiny(None)
    schema = spec.sample_schema(denoiser_config)
    folder = os.path.join(out, name)
    shutil.rmtree(folder, ignore_errors=True)
    import bench_steps  # imports deepspeed, which prints to stdout: only where it is needed

    t0 = time.perf_counter()
    bench_steps.write_pairs(folder, family, denoiser_config, latent_shape, num_pairs, pairs_per_shard)
    write_s = time.perf_counter() - t0
    shards = list_shards(folder)
    loader = PairLoader(shards, batch_size=batch_size, rank=0, world_size=1, seed=0, num_workers=2,
                        shuffle_buffer=16, schema=schema, draw_t=spec.draw_t)
    # From the first batch on: the workers' start-up is paid once per run, not per pair.
    cpu0 = _cpu_seconds()
    batches = loader.epoch(0)
    next(batches)
    t0 = time.perf_counter()
    pairs = sum(len(b["keys"]) for b in batches)
    seconds = time.perf_counter() - t0
    del batches  # the workers are joined, so their CPU time is counted
    cpu_ms = (_cpu_seconds() - cpu0) / (pairs + batch_size) * 1000
    shard_mb = sum(os.path.getsize(s.url) for s in shards) / 2**20
    shutil.rmtree(folder, ignore_errors=True)
    rate = pairs / seconds
    return {"figure": name, "ratio": rate / APPETITE, "target": ">= 10", "pass": rate / APPETITE >= 10,
            "pairs_per_s": rate, "appetite_pairs_per_s": APPETITE, "pairs_timed": pairs, "batch_size": batch_size,
            "latents": list(latent_shape), "shard_mb": round(shard_mb, 1), "write_s": round(write_s, 2),
            "loader_workers": 2, "cpu_ms_per_pair": round(cpu_ms, 2)}


def data_sdxl(args) -> dict:
    side = 8 if args.quick else 128
    return _data_figure("data_sdxl", "sdxl", SDXL_UNET, (4, side, side), 16 if args.quick else 320,
                        8 if args.quick else 40, 4, args.out)


def data_wan(args) -> dict:
    """Also against a Wan 1.3B clip's own appetite: an H100 at MFU 0.4 over its FLOPs per pair (scaling.py)."""
    from scaling import FLOPS_PER_PAIR

    shape = (16, 3, 8, 8) if args.quick else (16, 21, 60, 104)
    row = _data_figure("data_wan", "wan", WAN_TRANSFORMER, shape, 8 if args.quick else 48,
                       2 if args.quick else 6, 1, args.out)
    own = 0.4 * 989e12 / FLOPS_PER_PAIR["Wan2.1-T2V-1.3B"]
    return {**row, "wan_1.3b_appetite_pairs_per_s": round(own, 4), "ratio_vs_wan_1.3b_appetite": row["pairs_per_s"] / own}


def reference(args) -> dict:
    """tools/bench_reference.py in a process of its own (it starts a process group of one)."""
    cmd = [sys.executable, os.path.join(REPO, "tools", "bench_reference.py"), "--out", os.path.join(args.out, "ref")]
    cmd += ["--resolution", "64", "--steps", "2", "--warmup", "1", "--micro-batch-size", "2"] if args.quick else \
        ["--resolution", "128", "--steps", "10"]
    proc = _run(cmd)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"figure": "reference", "ratio": result["ratio"], "target": "<= 0.80", "pass": result["ratio"] <= 0.80,
            **{k: v for k, v in result.items() if k != "ratio"}}


def _zero3_setup(out: str, quick: bool) -> list[str]:
    """A synthetic data set and an SDXL-layout UNet of widths 160, 320 (about 25M parameters, nearly all in
    tensors above ZeRO-3's persistence threshold, as in SDXL; the toy UNet's would stay whole on every
    rank); returns the run's overrides."""
    from make_synthetic import write_shards

    from dpo_ds.models.sdxl import SDXL

    os.makedirs(out, exist_ok=True)
    config = dict(SDXL.TINY_DENOISER_CONFIG)
    if not quick:
        config.update(block_out_channels=[160, 320], attention_head_dim=[5, 10])
    paths = {name: os.path.join(out, f"{name}.json") for name in ("unet", "scheduler")}
    for name, value in (("unet", config), ("scheduler", SDXL.SCHEDULER_CONFIG)):
        with open(paths[name], "w") as f:
            json.dump(value, f)
    write_shards(os.path.join(out, "shards"), num_pairs=8, pairs_per_shard=4, resolution=64, seed=0)
    return [f"--output_dir={os.path.join(out, 'run')}", f"--model.denoiser_config={paths['unet']}",
            f"--model.scheduler_config={paths['scheduler']}", f"--data.shards={os.path.join(out, 'shards')}",
            "--data.resolution=64", "--data.num_workers=0", "--train.micro_batch_size=2", "--train.max_steps=1",
            "--loss.type=sft", "--logging.progress=false"]


def zero3_probe(out: str) -> None:
    """In each rank of the launcher: build the trainer, take one step, write this rank's state bytes."""
    from dpo_ds import engine, models
    from dpo_ds.config import load_config, resolve_ds_config, training_dtype
    from dpo_ds.trainer import Trainer

    engine.init_distributed()
    with open(os.path.join(out, "overrides.json")) as f:
        cfg = load_config(None, json.load(f))
    dtype = training_dtype(cfg, engine.has_gpu(), engine.gpu_has_bf16())
    trainer = Trainer(cfg, resolve_ds_config(os.path.join(REPO, "ds_configs", "zero3.json"), cfg, engine.world_size(),
                                             dtype), dtype, models.build(cfg), list_shards(cfg.data.shards))
    trainer.data_wait, trainer.nonfinite_in_row = 0.0, 0
    trainer.policy.train()
    trainer.train_step(trainer.loader.batches())
    result = {**trainer.policy.state_bytes(), "num_params": sum(p.ds_numel for p in trainer.policy.module.parameters())}
    with open(os.path.join(out, f"state_rank{engine.rank()}_of{engine.world_size()}.json"), "w") as f:
        json.dump(result, f)
    engine.destroy()


def zero3_memory(args) -> dict:
    """zero3_probe through the real `deepspeed` launcher at 1 and at 2 CPU processes; the larger rank."""
    out = os.path.join(args.out, "zero3")
    shutil.rmtree(out, ignore_errors=True)
    overrides = _zero3_setup(out, args.quick)
    with open(os.path.join(out, "overrides.json"), "w") as f:
        json.dump(overrides, f)
    totals = {}
    for nproc in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(nproc),
                        "--master_port", str(port), os.path.abspath(__file__), "--zero3-probe", out], check=True, capture_output=True, text=True,
                       env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"})
        ranks = [json.load(open(os.path.join(out, f"state_rank{r}_of{nproc}.json"))) for r in range(nproc)]
        totals[nproc] = max(ranks, key=lambda r: r["params"] + r["grads"] + r["optimizer"])
    one, two = (sum(totals[n][k] for k in ("params", "grads", "optimizer")) for n in (1, 2))
    return {"figure": "zero3_memory", "ratio": two / one, "target": "<= 0.55", "pass": two / one <= 0.55,
            "bytes_1_proc": totals[1], "bytes_2_procs_max_rank": totals[2], "num_params": totals[1]["num_params"],
            "ds_config": "ds_configs/zero3.json"}


def _steps_setup(args) -> str:
    """The step figures' model and data (once per run): an SDXL-layout UNet of widths 160, 320 (24.6M
    parameters; the toy one in --quick) at 128 px, 8 pairs, micro-batch 2, and its reference cache."""
    import bench_steps

    from dpo_ds.models.sdxl import SDXL

    out = os.path.join(args.out, "steps")
    if not os.path.isfile(os.path.join(out, "cache", "manifest.json")):
        config = dict(SDXL.TINY_DENOISER_CONFIG)
        if not args.quick:
            config.update(block_out_channels=[160, 320], attention_head_dim=[5, 10])
        side = 8 if args.quick else 16
        overrides = bench_steps.setup(out, "sdxl", config, (4, side, side), num_pairs=8, micro_batch_size=2)
        bench_steps.precompute_cache(overrides, batch_size=4)
    return out


def trainer_overhead(args) -> dict:
    out = _steps_setup(args)
    numbers = ["2", "1"] if args.quick else ["7", "2"]  # measured steps, warm-up steps
    result = json.loads(_run([sys.executable, os.path.join(REPO, "tools", "bench_steps.py"), "overhead", out,
                              *numbers]).stdout.strip().splitlines()[-1])
    return {"figure": "trainer_overhead", "target": "<= 1.15", "pass": result["ratio"] <= 1.15, **result}


def precompute(args) -> dict:
    out = _steps_setup(args)
    numbers = ["4", "1"] if args.quick else ["4", "5"]  # batch size (pairs), measured rounds
    result = json.loads(_run([sys.executable, os.path.join(REPO, "tools", "bench_steps.py"), "precompute", out,
                              *numbers]).stdout.strip().splitlines()[-1])
    return {"figure": "precompute", "target": ">= 0.90", "pass": result["ratio"] >= 0.90, **result}


FUNCTIONS = {"data_sdxl": data_sdxl, "data_wan": data_wan, "reference": reference, "zero3_memory": zero3_memory,
             "trainer_overhead": trainer_overhead, "precompute": precompute}


def gpu(args) -> int:
    import bench_gpu

    if not args.tiny and not torch.cuda.is_available():
        print("bench.py --gpu: no CUDA device; --tiny runs the same code on the CPU with toy models", file=sys.stderr)
        return 2
    out = args.out or os.path.join(REPO, "runs", "bench_gpu")
    result = bench_gpu.run(out, args.tiny, args.budget_s, args.models.split(","))
    print(f"\n{result['device']}, {result['dtype']}, peak {result['peak_tflops']} TFLOP/s, {result['wall_s']} s; "
          f"{os.path.join(out, 'bench_gpu.json')}")
    print(f"{'model':<10} {'variant':<20} {'reference':<9} {'pairs/s':>8} {'TFLOP/s':>8} {'MFU':>6} {'GB':>6}")
    for c in result["cases"]:
        if "error" in c:
            print(f"{c['model']:<10} {c['variant']:<20} {c['reference']:<9} {c['error']}")
            continue
        mfu, gb = (f"{c[k]:.3f}" if c[k] is not None else "-" for k in ("mfu", "max_allocated_gb"))
        print(f"{c['model']:<10} {c['variant']:<20} {c['reference']:<9} {c['pairs_per_s']:>8.3f} {c['tflops']:>8.4g} "
              f"{mfu:>6} {gb:>6}")
    for model, ratio in result["cached_over_live"].items():
        print(f"{model}: cached over live reference step time {ratio:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="work folder (default: a temporary one, removed after)")
    p.add_argument("--quick", action="store_true", help="toy sizes: checks the figures run, measures nothing")
    p.add_argument("--figures", default=",".join(FUNCTIONS), help=f"comma-separated, of {', '.join(FUNCTIONS)}")
    p.add_argument("--gpu", action="store_true", help="the GPU run instead (tools/bench_gpu.py); its JSON in --out "
                                                       "(default runs/bench_gpu)")
    p.add_argument("--tiny", action="store_true", help="with --gpu: the same code on the CPU with toy models")
    p.add_argument("--budget-s", type=float, default=420, help="with --gpu: start no case after this many seconds")
    p.add_argument("--models", default="sdxl,wan-1.3b", help="with --gpu: comma-separated, of sdxl, wan-1.3b")
    p.add_argument("--zero3-probe", metavar="DIR", help=argparse.SUPPRESS)  # a launcher rank's job (zero3_memory)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the launcher's; engine reads LOCAL_RANK
    args = p.parse_args(argv)
    if args.zero3_probe:
        zero3_probe(args.zero3_probe)
        return 0
    if args.gpu:
        return gpu(args)
    figures = args.figures.split(",")
    unknown = [f for f in figures if f not in FUNCTIONS]
    if unknown:
        p.error(f"unknown figures {unknown}; choose from {', '.join(FUNCTIONS)}")
    temporary = args.out is None
    args.out = args.out or tempfile.mkdtemp(prefix="dpo_ds_bench_")
    rows = []
    try:
        for name in figures:
            row = {**FUNCTIONS[name](args), "quick": args.quick}
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        if temporary:
            shutil.rmtree(args.out, ignore_errors=True)
    print(f"\n{'figure':<16} {'ratio':>8}  {'target':<8} {'pass':<5}")
    for row in rows:
        print(f"{row['figure']:<16} {row['ratio']:>8.3f}  {row['target']:<8} {'yes' if row['pass'] else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
