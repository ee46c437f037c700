"""tools/bench.py --gpu: training throughput, TFLOP/s and MFU of the fast paths on one GPU, at full size.

Models, built from their published configs with random weights (the configs below; nothing downloaded):
  sdxl       SDXL base's UNet (2.57B parameters) at a 128x128 latent (1024 px), one pair per micro-batch
  wan-1.3b   Wan 2.1 T2V 1.3B's transformer (1.42B) at 81 frames of 480x832 (latents 16x21x60x104, 32,760
             tokens a sample), one pair per micro-batch
For each model, each variant of VARIANTS (config overrides on the run below: one line adds a fast path)
trains with the cached reference, and the first variant that ran once more with the live reference
(ZeRO-3, offloaded to CPU): dpo_ds's own Trainer.train_step on ds_configs/zero3.json in this one process,
the same two micro-batches cycled (the loader is not timed), median step time after warm-up steps.
perf.pair_flops counts each step's model FLOPs (the trainer counts them at start, as in every run), so
  pairs/s = micro-batch / step time,  TFLOP/s = FLOPs per pair x pairs/s,  MFU = TFLOP/s / the device's peak
  (dpo_ds.perf.PEAK_TFLOPS: dense bf16).
A case that runs out of memory is recorded with its error and the run goes on; cases not started by
--budget-s seconds are recorded as skipped. Writes one JSON file (--out/bench_gpu.json):
  {"device", "peak_tflops", "dtype", "tiny", "date", "wall_s", "versions",
   "cases": [{"model", "variant", "reference", "overrides", "pairs_per_s", "step_s", "pair_flops", "tflops",
              "mfu", "max_allocated_gb", "steps", "warmup"} or {..., "error"}],
   "cached_over_live": {model: that variant's cached step time over its live one}}
--tiny runs the same code on the CPU with the families' toy models (fp32, seconds): a test of the run.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import bench_steps  # noqa: E402

from dpo_ds import engine, perf  # noqa: E402
from dpo_ds.models import family_class  # noqa: E402

# The fast paths measured: (name, config overrides on top of the run's). Adding a switch is one line here.
VARIANTS = [
    ("checkpointing=off", ["--model.gradient_checkpointing=false"]),
    ("checkpointing=on", ["--model.gradient_checkpointing=true"]),
    ("checkpointing=selective", ["--model.gradient_checkpointing=selective"]),
]

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (diffusers' defaults left out).
SDXL_BASE_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json (tools/memory_estimate.py's 1.3B: dim 1536,
# 30 layers, ffn 8960, 12 heads).
WAN_1_3B = {
    "_class_name": "WanTransformer3DModel",
    "patch_size": [1, 2, 2],
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-06,
    "rope_max_seq_len": 1024,
}

# name: (family, config, latents, measured steps, warm-up steps) at full size, and the --tiny latents.
MODELS = {
    "sdxl": ("sdxl", SDXL_BASE_UNET, (4, 128, 128), 10, 3, (4, 8, 8)),
    "wan-1.3b": ("wan", WAN_1_3B, (16, 21, 60, 104), 3, 1, (4, 3, 8, 8)),
}


def _case(name: str, variant: str, reference: str, overrides: list[str], latents: tuple[int, ...],
          num_steps: int, num_warmup: int, peak: float | None) -> dict:
    """One (model, variant, reference) case: build the trainer, time its steps; an error is recorded."""
    row = {"model": name, "variant": variant, "reference": reference, "overrides": overrides}
    trainer = None
    try:
        if engine.has_gpu():
            torch.cuda.reset_peak_memory_stats()
        trainer = bench_steps.build_trainer(overrides)
        cycle = itertools.cycle(bench_steps.fixed_batches(trainer, 2))
        seconds = bench_steps.interleaved({"step": lambda: trainer.train_step(cycle)}, num_steps, num_warmup)["step"]
        pair_flops = trainer.pair_flops[tuple(latents)]
        pairs_per_s = trainer.cfg.train.micro_batch_size / seconds
        tflops = pair_flops * pairs_per_s / 1e12
        row.update(pairs_per_s=round(pairs_per_s, 4), step_s=round(seconds, 4), pair_flops=pair_flops,
                   tflops=float(f"{tflops:.4g}"), mfu=round(tflops / peak, 4) if peak else None,
                   max_allocated_gb=round(engine.max_memory_allocated_gb(), 2) if engine.has_gpu() else None,
                   steps=num_steps, warmup=num_warmup)
    except (torch.OutOfMemoryError, RuntimeError) as e:  # noqa: B014 - OOM is a RuntimeError on some builds
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    finally:
        if trainer is not None:  # ZeRO-3's hooks and buffers, released before the next case builds its own
            for ds_engine in (trainer.policy.engine, getattr(trainer.reference, "engine", None)):
                if ds_engine is not None:
                    ds_engine.destroy()
        del trainer
        gc.collect()
        if engine.has_gpu():
            torch.cuda.empty_cache()
    return row


def run(out: str, tiny: bool, budget_s: float, models: list[str]) -> dict:
    """Every case of `models`; writes and returns the JSON (module docstring)."""
    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    dtype = "fp32" if tiny else "bf16"
    plans = {}
    for name in models:  # data, configs and reference caches first: precompute_ref.py runs in a process of its own
        family, config, latents, num_steps, num_warmup, tiny_latents = MODELS[name]
        if tiny:
            config, latents, num_steps, num_warmup = family_class(family).TINY_DENOISER_CONFIG, tiny_latents, 2, 1
        overrides = bench_steps.setup(os.path.join(out, name), family, config, latents, num_pairs=2,
                                      micro_batch_size=1, extra=[f"--model.dtype={dtype}"])
        bench_steps.precompute_cache(overrides, batch_size=1)
        plans[name] = (overrides, latents, num_steps, num_warmup)

    engine.init_distributed()
    peak = perf.peak_tflops(None, engine.device_name())
    cases = []
    for name, (overrides, latents, num_steps, num_warmup) in plans.items():
        todo = [(variant, "cache", overrides + extra) for variant, extra in VARIANTS]
        # Then the live reference, with the first variant that ran (Wan at 81 frames may not fit without
        # checkpointing); "live" joins the list once that is known.
        todo.append((None, "live", None))
        for variant, reference, case_overrides in todo:
            if reference == "live":
                ran = next((c for c in cases if c["model"] == name and "error" not in c), None)
                if ran is None:
                    continue
                variant, case_overrides = ran["variant"], ran["overrides"] + ["--reference.mode=live"]
            if time.perf_counter() - start > budget_s:
                cases.append({"model": name, "variant": variant, "reference": reference, "overrides": case_overrides,
                              "error": f"skipped: the run's budget of {budget_s:.0f} s was spent"})
                continue
            cases.append(_case(name, variant, reference, case_overrides, latents, num_steps, num_warmup, peak))
            print(json.dumps({k: v for k, v in cases[-1].items() if k != "overrides"}), flush=True)
    cached_over_live = {}
    for name in plans:
        live = next((c for c in cases if c["model"] == name and c["reference"] == "live" and "step_s" in c), None)
        if live is not None:
            cached = next(c for c in cases if c["model"] == name and c["reference"] == "cache"
                          and c["variant"] == live["variant"])
            cached_over_live[name] = round(cached["step_s"] / live["step_s"], 4)
    import deepspeed

    result = {"device": engine.device_name() or "cpu", "peak_tflops": peak, "dtype": dtype, "tiny": tiny,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "wall_s": round(time.perf_counter() - start, 1),
              "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__},
              "cases": cases, "cached_over_live": cached_over_live}
    with open(os.path.join(out, "bench_gpu.json"), "w") as f:
        json.dump(result, f, indent=1)
    engine.destroy()
    return result
