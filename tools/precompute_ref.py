"""Precompute the reference cache: the frozen reference's errors r_w, r_l for every pair and draw 0..K-1.

Reads the training run's config (same YAML, same --section.key=value overrides) and its shards, and
uses only the settings a cache depends on (dpo_ds.config.CACHE_SETTINGS, listed under --help and in its
log line): the rest of the file is ignored, and output_dir and train.max_steps need not be given. It
makes for every pair and draw index exactly the draw training makes (dpo_ds.data.collate_pairs with the
run's seed and the family's law of t), the same noising and target (Family.noisy_pair) and the same
prediction and error (Family.predict, Family.error), in the run's precision, under no_grad, at a batch
size of its own.

Writes (format: the docstring of dpo_ds/reference.py; docs/design.md §5):
  CACHE_DIR/<shard name>.ref.safetensors   one per shard: shard i (by name) is computed by rank i mod world size,
                                           written as .tmp and renamed, so no two ranks write one file
  CACHE_DIR/manifest.json                  by rank 0, last, once every shard file exists
A restarted job skips shard files that are complete and made for the same fingerprint, and
redoes the rest. A pair key found in two shards is refused (exit 2) before anything is computed:
cache rows are found by key.

  python tools/precompute_ref.py --config run.yaml --num-draws 4 [--cache-dir DIR] [--batch-size 16]
  deepspeed --num_gpus 8 tools/precompute_ref.py --config run.yaml --num-draws 4   (or srun / mpirun)
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys

import torch
from tqdm import tqdm

from dpo_ds import engine, launchenv, models
from dpo_ds.config import CACHE_SETTINGS, load_cache_config, training_dtype
from dpo_ds.data import (BadSample, PromptDropout, ShardInfo, check_family, collate_pairs, decode_sample, list_shards,
                         prompt_dropout, shard_keys, tar_samples)
from dpo_ds.dtypes import DTYPES
from dpo_ds.models.family import Family
from dpo_ds.reference import (CACHE_FORMAT, FILE_SUFFIX, MANIFEST_NAME, fingerprint, fingerprint_sha256, frozen_model,
                              read_shard_metadata, repeated_key, write_shard_cache)

log = logging.getLogger("dpo_ds.precompute_ref")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="settings read from --config and the overrides: " + ", ".join(CACHE_SETTINGS)
                                + "; the others are accepted and ignored")
    p.add_argument("--config", help="the training run's YAML (or one with just the settings below); "
                                    "--section.key=value overrides apply")
    p.add_argument("--num-draws", type=int, required=True, help="K: draws 0..K-1 per pair (training cycles past K)")
    p.add_argument("--cache-dir", help="output folder; default reference.cache_dir of the config")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per reference forward (2x samples)")
    p.add_argument("--store-eps", action="store_true", help="also store the reference's predictions (bf16)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args, overrides = p.parse_known_args(argv)
    if args.num_draws < 1 or args.batch_size < 1:
        p.error("--num-draws and --batch-size must be >= 1")
    return args, overrides


def build_reference(cfg, family: Family, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, str]:
    """The reference exactly as training defines it (dpo_ds.reference.frozen_model), on `device` in `dtype`."""
    model, ref_hash = frozen_model(cfg, family)
    model.to(device)
    if dtype != torch.float32:  # diffusers warns on any .to(dtype), even a no-op one
        model.to(dtype)
    return model, ref_hash


def _batch(samples: list[dict], draw_index: int, cfg, family: Family, dropout: PromptDropout | None,
           device: torch.device) -> dict:
    """Pairs at one draw index, batched exactly as training batches them (dpo_ds.data.collate_pairs)."""
    batch = collate_pairs(samples, draw_index, cfg.seed, family.draw_t, dropout)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def compute_shard(shard: ShardInfo, model: torch.nn.Module, cfg, family: Family, schema: dict,
                  dropout: PromptDropout | None,
                  num_draws: int, batch_size: int, dtype: torch.dtype, store_eps: bool,
                  progress: tqdm) -> tuple[list[str], dict[str, torch.Tensor], int]:
    """(keys, tensors of the shard's cache file, number of bad pairs skipped) for one shard."""
    samples, num_bad = [], 0
    for key, members in tar_samples(shard.url):
        try:
            samples.append(decode_sample(key, members, schema))
        except BadSample as e:  # training skips it too, so it needs no cache entry
            log.warning("bad pair %s in shard %s: %s; skipped", key, shard.url, e)
            num_bad += 1
    n, device = len(samples), next(model.parameters()).device
    out = {"t": torch.zeros(n, num_draws, dtype=torch.float64),
           "ref_err_w": torch.zeros(n, num_draws), "ref_err_l": torch.zeros(n, num_draws),
           "content_hash": torch.tensor([s["content_hash"] for s in samples], dtype=torch.int64)}
    if store_eps and n:
        shape = tuple(samples[0]["tensors"]["latents_w"].shape)
        out["eps_w"], out["eps_l"] = (torch.zeros(n, num_draws, *shape, dtype=torch.bfloat16) for _ in range(2))
    for draw_index in range(num_draws):
        for start in range(0, n, batch_size):
            batch = _batch(samples[start:start + batch_size], draw_index, cfg, family, dropout, device)
            x_t, target, t = family.noisy_pair(batch)
            # Family.pair_errors, split open to keep the prediction for --store-eps.
            pred = family.predict(model, x_t, t, batch, dtype)
            err_w, err_l = family.error(pred, target, t).chunk(2)
            rows = slice(start, start + len(batch["keys"]))
            out["t"][rows, draw_index] = batch["t"].cpu()
            out["ref_err_w"][rows, draw_index] = err_w.float().cpu()
            out["ref_err_l"][rows, draw_index] = err_l.float().cpu()
            if store_eps:
                eps_w, eps_l = pred.chunk(2)
                out["eps_w"][rows, draw_index] = eps_w.to("cpu", torch.bfloat16)
                out["eps_l"][rows, draw_index] = eps_l.to("cpu", torch.bfloat16)
            progress.update(len(batch["keys"]))
    return [s["key"] for s in samples], out, num_bad


def _all_keys(mine: list[ShardInfo], todo: list[ShardInfo], cache_dir: str) -> dict[str, list[str]]:
    """Every shard's pair keys, by shard name, on every rank: each rank reads its own shards' keys (the tar's
    headers, payloads seeked over, or a finished cache file's metadata), then all ranks exchange them."""
    keys = {}
    for shard in mine:
        name = os.path.basename(shard.url)
        if shard in todo:
            keys[name] = list(dict.fromkeys(shard_keys(shard.url)))  # a repeat inside one shard is a bad pair
        else:
            keys[name] = json.loads(read_shard_metadata(os.path.join(cache_dir, name + FILE_SUFFIX))["keys"])
    return {name: k for rank_keys in engine.all_gather_object(keys) for name, k in rank_keys.items()}


def _is_complete(path: str, digest: str, store_eps: bool) -> bool:
    """A shard file from an earlier run of this job: renamed into place, so whole, and made for this fingerprint."""
    meta = read_shard_metadata(path) or {}
    return meta.get("fingerprint_sha256") == digest and (not store_eps or meta.get("has_eps") == "true")


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    rank, _, _ = launchenv.rank_world_local()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_cache_config(args.config, overrides)
        cache_dir = args.cache_dir or cfg.reference.cache_dir
        if not cache_dir:
            raise ValueError("no output folder: pass --cache-dir or set reference.cache_dir in the config")
        family = models.build(cfg)
        shards = sorted(list_shards(cfg.data.shards), key=lambda s: os.path.basename(s.url))
        check_family(shards, family.NAME, family.LATENT_LAYOUT)
        names = [os.path.basename(s.url) for s in shards]
        if len(set(names)) != len(names):
            raise ValueError(f"data.shards: two shards share a file name ({names}); the cache is keyed by shard name")
    except ValueError as e:
        print(f"precompute_ref: error: {e}", file=sys.stderr)
        return 2

    engine.init_distributed()
    rank, world_size, device = engine.rank(), engine.world_size(), engine.device()
    dtype_name = training_dtype(cfg, engine.has_gpu(), engine.gpu_has_bf16())
    dtype = DTYPES[dtype_name]
    model, ref_hash = build_reference(cfg, family, device, dtype)
    schema = family.sample_schema(dict(model.config))
    try:
        dropout = prompt_dropout(cfg.data.empty_prompt_prob, shards, family.PROMPT_TENSORS, schema)
    except ValueError as e:
        print(f"precompute_ref: error: {e}", file=sys.stderr)
        engine.destroy()
        return 2
    fp = fingerprint(cfg, family, shards, ref_hash, args.num_draws, dtype_name, dropout)
    digest = fingerprint_sha256(fp)

    mine = [s for i, s in enumerate(shards) if i % world_size == rank]
    todo = [s for s in mine if not _is_complete(os.path.join(cache_dir, os.path.basename(s.url) + FILE_SUFFIX),
                                                digest, args.store_eps)]
    repeated = repeated_key(_all_keys(mine, todo, cache_dir))
    if repeated is not None:  # the same on every rank, so all stop here together
        key, first, second = repeated
        if rank == 0:
            print(f"precompute_ref: error: pair key {key!r} is in shard {first} and again in shard {second}; keys "
                  "must be unique across data.shards (a shard copied under another name?): remove the copy",
                  file=sys.stderr)
        engine.destroy()
        return 2

    os.makedirs(cache_dir, exist_ok=True)
    manifest_path = os.path.join(cache_dir, MANIFEST_NAME)
    if rank == 0 and os.path.isfile(manifest_path):
        os.remove(manifest_path)  # rewritten at the end; meanwhile training refuses a half-updated cache
    engine.barrier()

    if rank == 0:
        log.info("reference cache %s: %d shards, %d draws, %s, %d ranks; rank 0 skips %d complete shard(s)",
                 cache_dir, len(shards), args.num_draws, dtype_name, world_size, len(mine) - len(todo))
        log.info("settings used (all others ignored): %s",
                 ", ".join(f"{name}={functools.reduce(getattr, name.split('.'), cfg)}" for name in CACHE_SETTINGS))
    progress = tqdm(total=sum(s.num_pairs for s in todo) * args.num_draws, unit="pair-draw", dynamic_ncols=True,
                    disable=rank != 0 or args.no_progress, desc="reference (rank 0)")
    for shard in todo:
        name = os.path.basename(shard.url)
        keys, tensors, num_bad = compute_shard(shard, model, cfg, family, schema, dropout, args.num_draws,
                                               args.batch_size, dtype, args.store_eps, progress)
        write_shard_cache(os.path.join(cache_dir, name + FILE_SUFFIX), name, keys, tensors, digest,
                          extra={"num_bad": str(num_bad), "has_eps": json.dumps(args.store_eps)})
    progress.close()
    engine.barrier()

    if rank == 0:
        files = []
        for name in names:
            meta = read_shard_metadata(os.path.join(cache_dir, name + FILE_SUFFIX))
            assert meta is not None and meta["fingerprint_sha256"] == digest, f"{name}: rank did not finish"
            files.append({"shard": name, "file": name + FILE_SUFFIX, "num_pairs": len(json.loads(meta["keys"])),
                          "num_bad": int(meta["num_bad"])})
        manifest = {"format": CACHE_FORMAT, "fingerprint": fp, "fingerprint_sha256": digest, "files": files,
                    "has_eps": args.store_eps}
        with open(manifest_path + ".tmp", "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(manifest_path + ".tmp", manifest_path)
        log.info("wrote %s: %d pairs x %d draws", manifest_path, sum(e["num_pairs"] for e in files), args.num_draws)
    engine.barrier()
    engine.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
