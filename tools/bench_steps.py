"""In-process timing of dpo_ds's steps against bare PyTorch loops of the same model: the pieces of
tools/bench.py's step figures and of its GPU run (tools/bench_gpu.py).

Each figure runs in a process of its own (a process group of one), started by tools/bench.py:

  python tools/bench_steps.py overhead DIR     trainer_overhead: Trainer.train_step against a bare loop
  python tools/bench_steps.py precompute DIR   precompute: precompute_ref.compute_shard against a bare
                                               no_grad forward loop
DIR holds setup.json (written by `setup`); the process prints one JSON line.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

from dpo_ds import models  # noqa: E402
from dpo_ds.config import load_config, resolve_ds_config, training_dtype  # noqa: E402
from dpo_ds.data import ShardWriter, list_shards  # noqa: E402
from dpo_ds.dtypes import DTYPES  # noqa: E402
from dpo_ds.losses import preference_loss  # noqa: E402
from dpo_ds.models import family_class  # noqa: E402

ZERO3 = os.path.join(REPO, "ds_configs", "zero3.json")


def write_pairs(folder: str, family: str, denoiser_config: dict, latent_shape: tuple[int, ...], num_pairs: int,
                pairs_per_shard: int, seed: int = 0) -> None:
    """Synthetic pairs of `family` at latents `latent_shape`, fp16, with the conditioning the config asks for."""
    spec = family_class(family).tiny(None)
    g = torch.Generator().manual_seed(seed)
    with ShardWriter(folder, prefix="bench", max_pairs=pairs_per_shard) as writer:
        for i in range(num_pairs):
            tensors = {name: torch.randn(latent_shape, generator=g).half() for name in ("latents_w", "latents_l")}
            tensors.update(spec.synthetic_conditioning(denoiser_config, latent_shape[-1] * 8, g, torch.float16))
            writer.write(f"pair{i:08d}", {"caption": f"bench pair {i}", "family": family,
                                          "latent_layout": spec.LATENT_LAYOUT, "label": 1.0}, tensors)


def setup(out: str, family: str, denoiser_config: dict, latent_shape: tuple[int, ...], num_pairs: int,
          micro_batch_size: int, extra: list[str] = ()) -> list[str]:
    """A model config, synthetic shards and the run's overrides (reference.mode=cache into out/cache) in
    `out`; the overrides are also written to out/setup.json for the probes."""
    os.makedirs(out, exist_ok=True)
    spec = family_class(family)
    paths = {name: os.path.join(out, f"{name}.json") for name in ("denoiser", "scheduler")}
    for name, value in (("denoiser", denoiser_config), ("scheduler", spec.SCHEDULER_CONFIG)):
        with open(paths[name], "w") as f:
            json.dump(value, f)
    shards = os.path.join(out, "shards")
    if not os.path.isfile(os.path.join(shards, "index.json")):
        write_pairs(shards, family, denoiser_config, latent_shape, num_pairs, num_pairs)
    overrides = [f"--output_dir={os.path.join(out, 'run')}", f"--model.family={family}",
                 f"--model.denoiser_config={paths['denoiser']}", f"--model.scheduler_config={paths['scheduler']}",
                 f"--data.shards={shards}", f"--data.resolution={latent_shape[-1] * 8}", "--data.num_workers=0",
                 f"--train.micro_batch_size={micro_batch_size}", "--train.max_steps=1000000",
                 "--model.gradient_checkpointing=false", "--reference.mode=cache",
                 f"--reference.cache_dir={os.path.join(out, 'cache')}", "--logging.progress=false", *extra]
    with open(os.path.join(out, "setup.json"), "w") as f:
        json.dump(overrides, f)
    return overrides


def precompute_cache(overrides: list[str], batch_size: int) -> None:
    """tools/precompute_ref.py for the run (one draw), in a process of its own."""
    cache = next(o.split("=", 1)[1] for o in overrides if o.startswith("--reference.cache_dir="))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "precompute_ref.py"), "--num-draws", "1",
                           "--cache-dir", cache, "--batch-size", str(batch_size), "--no-progress", *overrides],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"precompute_ref.py exited {proc.returncode}:\n{proc.stderr[-4000:]}")


def build_trainer(overrides: list[str], ds_json: str = ZERO3):
    """A Trainer as dpo_ds.train builds it (process group already started), ready to step."""
    from dpo_ds import engine  # deepspeed, which prints on import: only in the processes that step

    from dpo_ds.trainer import Trainer

    cfg = load_config(None, overrides)
    dtype = training_dtype(cfg, engine.has_gpu(), engine.gpu_has_bf16())
    trainer = Trainer(cfg, resolve_ds_config(ds_json, cfg, engine.world_size(), dtype), dtype, models.build(cfg),
                      list_shards(cfg.data.shards))
    trainer.data_wait, trainer.nonfinite_in_row = 0.0, 0
    trainer.policy.train()
    return trainer


def fixed_batches(trainer, num: int) -> list[dict]:
    """The first `num` micro-batches of epoch 0 on the trainer's device: the step is timed, not the loader."""
    return [{k: v.to(trainer.device) if torch.is_tensor(v) else v for k, v in b.items()}
            for b in itertools.islice(trainer.loader.epoch(0), num)]


def timed(fn: Callable[[], object]) -> float:
    """Seconds of fn(), the device synchronised on both sides."""
    from dpo_ds import engine

    if engine.has_gpu():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if engine.has_gpu():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def interleaved(steps: dict[str, Callable[[], object]], num_steps: int, num_warmup: int) -> dict[str, float]:
    """Median seconds of each step function, run in turn (order reversed every round, so machine load hits
    all alike) after num_warmup unmeasured rounds."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(num_warmup + num_steps):
        for name in (list(steps) if i % 2 == 0 else list(steps)[::-1]):
            seconds = timed(steps[name])
            if i >= num_warmup:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def bare_model(cfg, family):
    """The policy's denoiser as the Trainer builds it (same seed, so the same weights), without DeepSpeed."""
    from dpo_ds import engine

    torch.manual_seed(cfg.seed)
    model = family.load_denoiser(cfg.model.pretrained_path, cfg.model.denoiser_config)
    family.set_attention(model, cfg.model.attention)
    models.select_trainable(model, cfg.model.trainable if cfg.model.trainable is not None else family.DEFAULT_TRAINABLE)
    if cfg.model.gradient_checkpointing:
        family.enable_gradient_checkpointing(model)
    return model.to(engine.device())


def overhead_probe(out: str, num_steps: int, num_warmup: int) -> dict:
    """Trainer.train_step (ZeRO-3, one process, cached reference) against a bare loop of the same model,
    micro-batches and optimizer: noise, forward, the DPO loss on the cached errors, backward, gradient
    clipping, AdamW and its schedule, zero_grad."""
    from dpo_ds import engine

    with open(os.path.join(out, "setup.json")) as f:
        overrides = json.load(f)
    engine.init_distributed()
    trainers = {name: build_trainer(overrides, os.path.join(REPO, "ds_configs", f"{name}.json"))
                for name in ("zero3", "zero2")}
    trainer = trainers["zero3"]
    cfg, family, dtype = trainer.cfg, trainer.family, trainer.dtype
    batches = fixed_batches(trainer, 2)
    with torch.no_grad():  # the cached errors, looked up once: the bare loop is given them
        refs = [trainer.reference.errors(b, *family.noisy_pair(b)) for b in batches]
    model = bare_model(cfg, family)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.optim.peak_lr(cfg.train.micro_batch_size)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    clip = cfg.train.grad_clip
    cycle = itertools.cycle(range(len(batches)))

    def bare_step() -> None:
        i = next(cycle)
        batch, (ref_w, ref_l) = batches[i], refs[i]
        x_t, target, t = family.noisy_pair(batch)
        err_w, err_l = family.pair_errors(model, batch, x_t, target, t, dtype)
        loss, _ = preference_loss(err_w, err_l, ref_w, ref_l, kind=cfg.loss.type, beta=cfg.dpo.beta,
                                  loser_weight=cfg.loss.loser_weight, sft_weight=cfg.loss.sft_weight,
                                  winner_hinge=cfg.loss.winner_hinge, ipo_margin=cfg.loss.ipo_margin)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)

    cycles = {name: itertools.cycle(batches) for name in trainers}
    medians = interleaved({"zero3": lambda: trainers["zero3"].train_step(cycles["zero3"]),
                           "zero2": lambda: trainers["zero2"].train_step(cycles["zero2"]), "bare": bare_step},
                          num_steps, num_warmup)
    result = {"trainer_step_s": round(medians["zero3"], 4), "bare_step_s": round(medians["bare"], 4),
              "ratio": medians["zero3"] / medians["bare"], "zero2_step_s": round(medians["zero2"], 4),
              "zero2_ratio": medians["zero2"] / medians["bare"], "steps": num_steps, "warmup": num_warmup,
              "num_params": sum(p.numel() for p in model.parameters()), "gradient_clipping": clip,
              "micro_batch_size": cfg.train.micro_batch_size, "latents": list(batches[0]["latents_w"].shape[1:]),
              "ds_config": "ds_configs/zero3.json (zero2: ds_configs/zero2.json)", "device": str(engine.device()),
              "torch_threads": torch.get_num_threads()}
    engine.destroy()
    return result


def precompute_probe(out: str, batch_size: int, num_rounds: int) -> dict:
    """tools/precompute_ref.py's compute_shard (read and decode the shard, draw, noise, forward, errors)
    against a bare no_grad forward loop of the same model on the same noisy inputs, made up front."""
    import precompute_ref
    from tqdm import tqdm

    from dpo_ds import engine
    from dpo_ds.data import collate_pairs, decode_sample, tar_samples

    with open(os.path.join(out, "setup.json")) as f:
        overrides = json.load(f)
    cfg = load_config(None, overrides)
    family = models.build(cfg)
    device = engine.device()
    dtype_name = training_dtype(cfg, engine.has_gpu(), engine.gpu_has_bf16())
    dtype = DTYPES[dtype_name]
    model, _ = precompute_ref.build_reference(cfg, family, device, dtype)
    schema = family.sample_schema(dict(model.config))
    shards = list_shards(cfg.data.shards)
    num_pairs = sum(s.num_pairs for s in shards)
    progress = tqdm(disable=True)

    def ours() -> None:
        for shard in shards:
            precompute_ref.compute_shard(shard, model, cfg, family, schema, None, 1, batch_size, dtype, False, progress)

    inputs = []
    for shard in shards:
        samples = [decode_sample(k, m, schema) for k, m in tar_samples(shard.url)]
        for start in range(0, len(samples), batch_size):
            batch = collate_pairs(samples[start:start + batch_size], 0, cfg.seed, family.draw_t)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            x_t, _, t = family.noisy_pair(batch)
            inputs.append((x_t, t, batch))

    @torch.no_grad()
    def bare() -> None:
        for x_t, t, batch in inputs:
            family.predict(model, x_t, t, batch, dtype)

    medians = interleaved({"precompute": ours, "bare": bare}, num_rounds, 1)
    # Throughput (pairs/s) of ours over the bare loop's: the bare loop's time over ours.
    return {"precompute_pairs_per_s": round(num_pairs / medians["precompute"], 3),
            "bare_pairs_per_s": round(num_pairs / medians["bare"], 3), "ratio": medians["bare"] / medians["precompute"],
            "pairs": num_pairs, "batch_size": batch_size, "rounds": num_rounds, "dtype": dtype_name,
            "num_params": sum(p.numel() for p in model.parameters()), "device": str(device),
            "torch_threads": torch.get_num_threads()}


def main(argv: list[str]) -> int:
    kind, out, *rest = argv
    numbers = [int(x) for x in rest]
    result = overhead_probe(out, *numbers) if kind == "overhead" else precompute_probe(out, *numbers)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
