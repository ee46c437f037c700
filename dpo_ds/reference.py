"""Where the reference errors r_w, r_l come from: a live frozen model, or the reference cache.

`live`: a frozen copy of the initial denoiser in its own DeepSpeed engine
(ZeRO-3, parameters offloaded to CPU between uses), run under no_grad on the
very noisy inputs the policy sees. When model.trainable freezes part of the
policy, the frozen part is not held twice: the reference is the policy's own
module with the trainable parameters' initial values swapped in for its
forward (SharedReference; this rank's share of them only, under ZeRO-3).

`cache`: the errors tools/precompute_ref.py computed once per (pair, draw), at
the same draw training makes (docs/design.md §2, §5); the reference model is never
built. Reading and writing the cache both live here, so the format has one home.

Cache format (a contract; `CACHE_FORMAT`, nothing in it is decoded with pickle):
  CACHE_DIR/manifest.json   written last, by rank 0, once every shard file exists:
    {"format": "dpo_ds.refcache/2",
     "fingerprint": {"tool_version": int, "reference_weights": "sha256:<hex>", "family": str,
                     "shards": [{"name", "num_pairs", "size_bytes"}, ...],   sorted by name
                     "draw_law": {the family's law of t and forward process: scheduler config,
                                  prediction type, range, ... (Family.draw_law)},
                     "prompt_dropout": null | {"prob": data.empty_prompt_prob, "empty_prompt": "sha256:<hex>"},
                     "seed": int, "num_draws": K, "dtype": "fp32"|"bf16"|"fp16"},
     "fingerprint_sha256": "<hex of the canonical JSON of fingerprint>",
     "files": [{"shard": name, "file": name + ".ref.safetensors", "num_pairs": int, "num_bad": int}, ...],
     "has_eps": bool}
  CACHE_DIR/<shard name>.ref.safetensors   one per shard (N = good pairs in the shard, in tar order):
    tensors   t [N, K] float64 (the draw's value, exactly as the family drew it),
              ref_err_w [N, K] float32, ref_err_l [N, K] float32,
              content_hash [N] int64 (SHA-256 of the pair's KEY.safetensors bytes, 8 bytes; dpo_ds.data.decode_sample),
              with --store-eps also eps_w, eps_l [N, K, ...latent] bfloat16 (the reference's predictions)
    metadata  {"format": CACHE_FORMAT, "fingerprint_sha256": ..., "shard": name, "keys": JSON list of N keys,
               "num_bad": pairs skipped as bad samples, "has_eps": "true" | "false"}   (all strings)
Row i, column d holds pair keys[i] at draw index d. A key is in one row of one file only: the tool
refuses a repeated key before computing, and loading refuses a cache that has one. The reference
weights hash is SHA-256 over the denoiser's state dict in name order: per tensor its name, shape and
float32 bytes (floats cast, so fp16 and fp32 copies of one model agree).

The invariant: no cached error is used on contents it was not computed from. The fingerprint is
checked when the cache is opened (weights, shard names/counts/sizes, scheduler, seed, draws, dtype);
every lookup checks the pair's content hash (its stored tensors, byte for byte) and the draw's
timestep, and refuses a mismatch naming the pair. Format 1 caches have no content hash: refused.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass

import safetensors
import safetensors.torch
import torch

from dpo_ds import engine, lora
from dpo_ds.config import RunConfig
from dpo_ds.data import PromptDropout, ShardInfo, prompt_dropout
from dpo_ds.dtypes import DTYPES
from dpo_ds.models.family import Family

log = logging.getLogger("dpo_ds")

CACHE_FORMAT = "dpo_ds.refcache/2"
TOOL_VERSION = 2
MANIFEST_NAME = "manifest.json"
FILE_SUFFIX = ".ref.safetensors"


@dataclass
class References:
    """Where a training run's reference errors come from: its training pairs', its held-out pairs' (None
    without validation), and a live reference beside a cache for the drift check (None without one)."""
    train: "LiveReference | CachedReference | AdaptersOffReference | None"
    val: "LiveReference | CachedReference | AdaptersOffReference | None"
    drift: "LiveReference | None"

    def bind(self, policy: engine.Policy) -> None:
        """Give a SharedReference its policy, built after the references and before any step or resume."""
        for ref in {id(r): r for r in (self.train, self.val, self.drift) if isinstance(r, SharedReference)}.values():
            ref.bind(policy)


def for_training(cfg: RunConfig, family: Family, shards: list[ShardInfo], val_shards: list[ShardInfo] | None,
                 initial_policy: torch.nn.Module, policy_ds_config: dict, dtype: str) -> References:
    """The one place a run's references are decided: none for the plain diffusion objective; the policy with
    its adapters off for reference.mode=adapters_off (bound to the policy by the trainer); with
    reference.mode=cache, the verified caches of data.shards and data.val_shards (the reference model
    built only for a drift check); else the live frozen reference, for both."""
    torch_dtype = DTYPES[dtype]
    if cfg.loss.type == "sft":
        return References(None, None, None)
    if cfg.reference.mode == "adapters_off":
        base = AdaptersOffReference(family, torch_dtype)
        return References(base, base if val_shards is not None else None, None)
    if cfg.reference.mode == "live":
        live = live_reference(cfg, family, initial_policy, policy_ds_config, torch_dtype)
        return References(live, live if val_shards is not None else None, None)
    # The reference model is never built from a cache; only its weights are hashed, to check the cache.
    ref_hash = weights_hash_of_reference(cfg, family, initial_policy)

    schema = family.sample_schema(dict(initial_policy.config))

    def open_cache(cache_dir: str, cache_shards: list[ShardInfo]) -> CachedReference:
        cache_cfg = cfg.model_copy(update={"reference": cfg.reference.model_copy(update={"cache_dir": cache_dir})})
        dropout = prompt_dropout(cfg.data.empty_prompt_prob, cache_shards, family.PROMPT_TENSORS, schema)
        # num_draws=0: K is the cache's to say.
        return CachedReference.load(cache_cfg, fingerprint(cache_cfg, family, cache_shards, ref_hash, 0, dtype,
                                                           dropout))

    train = open_cache(cfg.reference.cache_dir, shards)
    val = open_cache(cfg.reference.val_cache_dir, val_shards) if val_shards is not None else None
    drift = None
    if cfg.reference.drift_check_every:
        drift = live_reference(cfg, family, initial_policy, policy_ds_config, torch_dtype)
    elif engine.rank() == 0:
        log.info("reference: the reference model is not built (reference.mode=cache, no drift check)")
    return References(train, val, drift)


def frozen_model(cfg: RunConfig, family: Family) -> tuple[torch.nn.Module, str]:
    """The reference model as training defines it, built alone (the precompute tool), and its weights hash:
    reference.pretrained_path if set, else the policy's initial weights, built as the trainer builds them."""
    if cfg.reference.pretrained_path is not None:
        model = family.load_denoiser(cfg.reference.pretrained_path, None)
    else:
        torch.manual_seed(cfg.seed)  # the trainer's init of a from-config policy, hence of its reference
        model = family.load_denoiser(cfg.model.pretrained_path, cfg.model.denoiser_config)
    family.set_attention(model, cfg.model.attention)
    return model.requires_grad_(False).eval(), weights_hash_of_reference(cfg, family, model)


def weights_hash_of_reference(cfg: RunConfig, family: Family, initial_policy: torch.nn.Module) -> str:
    """The hash a cache's fingerprint holds: of reference.pretrained_path's weights if set (read from the folder,
    so fp16 and fp32 copies agree), else of the policy's initial weights."""
    if cfg.reference.pretrained_path is not None:
        return folder_weights_hash(family, cfg.reference.pretrained_path)
    return weights_hash(initial_policy.state_dict())


def live_reference(cfg: RunConfig, family: Family, initial_policy: torch.nn.Module, policy_ds_config: dict,
                   dtype: torch.dtype) -> "LiveReference":
    """The policy's own module with its initial trainable values when model.trainable freezes part of it (and
    the reference is the policy's initial weights), else a full frozen copy in its own engine."""
    if cfg.reference.pretrained_path is None and not all(p.requires_grad for p in initial_policy.parameters()):
        if engine.rank() == 0:
            log.info("reference: the policy's module with its initial trainable parameters (model.trainable); "
                     "the frozen part is shared, not copied")
        return SharedReference(family, dtype)
    return LiveReference.build(cfg, family, initial_policy, policy_ds_config, dtype)


class LiveReference:
    def __init__(self, family: Family, ref_engine, dtype: torch.dtype):
        self.family, self.engine, self.dtype = family, ref_engine, dtype

    @classmethod
    def build(cls, cfg: RunConfig, family: Family, initial_policy: torch.nn.Module, policy_ds_config: dict,
              dtype: torch.dtype) -> "LiveReference":
        """Reference = reference.pretrained_path if set, else a copy of the policy before training."""
        if cfg.reference.pretrained_path is not None:
            model = family.load_denoiser(cfg.reference.pretrained_path, None)
        else:
            model = copy.deepcopy(initial_policy)
        family.set_attention(model, cfg.model.attention)
        return cls(family, engine.build_reference(model, policy_ds_config, cfg.reference.offload), dtype)

    @torch.no_grad()
    def errors(self, batch: dict, x_t: torch.Tensor, target: torch.Tensor, t: torch.Tensor):
        """r_w, r_l: [B] float32 reference errors at the pair's shared draw."""
        return self.family.pair_errors(self.engine, batch, x_t, target, t, self.dtype)

    @torch.no_grad()
    def drift(self, batch: dict, x_t: torch.Tensor, target: torch.Tensor, t: torch.Tensor, cached_w: torch.Tensor,
              cached_l: torch.Tensor, fraction: float, g: torch.Generator) -> torch.Tensor:
        """[ ] largest |cached − live| error over a random `fraction` of the batch's pairs (at least one), on
        this rank; x_t, target, t hold the 2B samples (winners, then losers), cached_w/l the [B] cached errors."""
        num_pairs = len(batch["keys"])
        idx = torch.randperm(num_pairs, generator=g)[:max(1, round(fraction * num_pairs))].to(x_t.device)
        sub = {k: v[idx] if torch.is_tensor(v) and v.ndim and len(v) == num_pairs else v for k, v in batch.items()}
        both = torch.cat([idx, idx + num_pairs])
        live_w, live_l = self.errors(sub, x_t[both], target[both], t[both])
        return torch.maximum((live_w - cached_w[idx]).abs().max(), (live_l - cached_l[idx]).abs().max())


class SharedReference(LiveReference):
    """The reference as the policy's own module, its trainable parameters holding their initial values for the
    reference's forward: the frozen part is the policy's (it never changes), so only the trainable parameters'
    initial values are held, this rank's share of them under ZeRO-3 (engine.Policy.trainable_values).
    Built before the policy; References.bind hands it the policy before the first step."""

    def __init__(self, family: Family, dtype: torch.dtype):
        self.family, self.dtype = family, dtype
        self.policy: engine.Policy | None = None
        self.initial: list[torch.Tensor] = []

    def bind(self, policy: engine.Policy) -> None:
        assert self.policy is None, "a SharedReference takes its initial values once, before the first step"
        self.policy, self.initial = policy, policy.trainable_values()

    def held_bytes(self) -> int:
        """This rank's bytes of what the reference holds beside the policy: the initial trainable values."""
        return engine.held_bytes(self.initial)

    @torch.no_grad()
    def errors(self, batch: dict, x_t: torch.Tensor, target: torch.Tensor, t: torch.Tensor):
        """r_w, r_l: [B] float32 reference errors at the pair's shared draw, from the policy's module in eval
        mode (as the full copy runs) with the initial values swapped in; the policy is left as it was."""
        assert self.policy is not None, "References.bind(policy) must come before the first reference forward"
        with self.policy.values_swapped_in(self.initial) as module:
            modes = [m.training for m in module.modules()]
            module.eval()
            try:
                return self.family.pair_errors(module, batch, x_t, target, t, self.dtype)
            finally:
                for m, mode in zip(module.modules(), modes):
                    m.training = mode


class AdaptersOffReference:
    """reference.mode=adapters_off: the policy itself with its LoRA adapters switched off, under no_grad, in
    the same micro-step: one more forward of the same engine (through ZeRO-3's gathering hooks, as any
    forward), no second model. The trainer binds `policy` once its engine exists."""

    def __init__(self, family: Family, dtype: torch.dtype):
        self.family, self.dtype, self.policy = family, dtype, None

    @torch.no_grad()
    def errors(self, batch: dict, x_t: torch.Tensor, target: torch.Tensor, t: torch.Tensor):
        """r_w, r_l: [B] float32 errors of the base model at the pair's shared draw."""
        with lora.adapters_off(self.policy.module):
            return self.family.pair_errors(self.policy, batch, x_t, target, t, self.dtype)


# ---------------------------------------------------------------- fingerprint

def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """"sha256:<hex>" of a state dict: names in sorted order, shapes, float32 bytes (see the module docstring)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu")
        t = (t.float() if t.is_floating_point() else t).contiguous()
        h.update(f"{name}\x00{tuple(t.shape)}\x00{t.dtype}\x00".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def folder_weights_hash(family: Family, pretrained_path: str) -> str:
    """weights_hash of a diffusers folder's denoiser, read tensor by tensor: no model is built."""
    folder = os.path.join(pretrained_path, family.DENOISER_SUBFOLDER)
    single = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    index = single + ".index.json"
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(single):
        files = [os.path.basename(single)]
    else:
        raise ValueError(f"reference.pretrained_path: {folder} has no diffusion_pytorch_model.safetensors "
                         "(or its .index.json); the reference must be stored as safetensors")
    state = {}
    for name in files:
        state.update(safetensors.torch.load_file(os.path.join(folder, name)))
    return weights_hash(state)


def fingerprint(cfg: RunConfig, family: Family, shards: list[ShardInfo], reference_weights: str, num_draws: int,
                dtype: str, dropout: PromptDropout | None = None) -> dict:
    """Everything the cached values depend on (docs/design.md §5), as plain JSON; the shards' contents are
    checked per pair instead, by content hash at every lookup (CachedReference.errors)."""
    return {
        "tool_version": TOOL_VERSION,
        "reference_weights": reference_weights,
        "family": family.NAME,
        "shards": sorted(({"name": os.path.basename(s.url), "num_pairs": s.num_pairs, "size_bytes": s.size_bytes}
                          for s in shards), key=lambda e: e["name"]),
        "draw_law": family.draw_law(),
        "prompt_dropout": None if dropout is None else {"prob": dropout.prob, "empty_prompt": weights_hash(dropout.empty)},
        "seed": cfg.seed,
        "num_draws": num_draws,
        "dtype": dtype,
    }


def fingerprint_sha256(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def _describe_shard_difference(cached: list[dict], run: list[dict]) -> str:
    cached_by_name, run_by_name = {e["name"]: e for e in cached}, {e["name"]: e for e in run}
    for name in sorted(set(cached_by_name) | set(run_by_name)):
        if name not in cached_by_name:
            return f"shard {name} is in this run's data.shards but not in the cache"
        if name not in run_by_name:
            return f"shard {name} is in the cache but not in this run's data.shards"
        if cached_by_name[name] != run_by_name[name]:
            return f"shard {name} is {cached_by_name[name]} in the cache, {run_by_name[name]} in this run"
    return "the shard lists differ"


def check_fingerprint(cache_dir: str, cached: dict, expected: dict) -> None:
    """Refuse a cache whose fingerprint differs from the run's in any field but num_draws, naming the field."""
    for field in expected:
        if field == "num_draws" or cached.get(field) == expected[field]:
            continue
        what = (_describe_shard_difference(cached.get(field) or [], expected[field]) if field == "shards"
                else f"{cached.get(field)!r} in the cache, {expected[field]!r} in this run")
        raise ValueError(f"reference cache {cache_dir}/{MANIFEST_NAME} does not match this run: field {field!r} "
                         f"differs: {what}. Recompute it with tools/precompute_ref.py using this run's config, "
                         f"or point reference.cache_dir at the cache made for it")


# ---------------------------------------------------------------- cache files

def write_shard_cache(path: str, shard: str, keys: list[str], tensors: dict[str, torch.Tensor],
                      fingerprint_digest: str, extra: dict[str, str]) -> None:
    """One shard's cache file, atomically: written as path.tmp, then renamed."""
    metadata = {**extra, "format": CACHE_FORMAT, "fingerprint_sha256": fingerprint_digest, "shard": shard,
                "keys": json.dumps(keys)}
    tmp = path + ".tmp"
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.chmod(tmp, 0o644)  # safetensors creates it private; a cache is meant to be shared
    os.replace(tmp, path)


def read_shard_metadata(path: str) -> dict[str, str] | None:
    """The file's metadata, or None when it is absent or unreadable (a partial write is never renamed)."""
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return f.metadata()
    except (OSError, safetensors.SafetensorError):
        return None


def read_manifest(cache_dir: str) -> dict:
    path = os.path.join(cache_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"reference.cache_dir: {path} does not exist; write the cache with tools/precompute_ref.py "
                         "(an interrupted run leaves no manifest: run it again to finish)")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {CACHE_FORMAT!r} (which checks each "
                         "pair's contents); recompute the cache with this version of tools/precompute_ref.py")
    return manifest


def repeated_key(keys_by_shard: dict[str, list[str]]) -> tuple[str, str, str] | None:
    """(key, first shard, second shard) of the first key found twice, shards in name order; None if all differ.

    A cache row is found by key, so a repeated key (a shard copied under another name) would give
    two pairs one row: the tool refuses it before computing, and loading refuses a cache holding one.
    """
    seen: dict[str, str] = {}
    for shard in sorted(keys_by_shard):
        for key in keys_by_shard[shard]:
            if key in seen:
                return key, seen[key], shard
            seen[key] = shard
    return None


class CachedReference:
    """Reference errors looked up by (pair key, draw index) in a verified cache; no model anywhere.

    Each pair's row is its file's offset plus its position in that file, and every lookup checks
    the pair's content hash and timestep against the row's (the module docstring's invariant).
    """

    def __init__(self, cache_dir: str, manifest: dict):
        self.cache_dir = cache_dir
        fp = manifest["fingerprint"]
        self.num_draws, self.seed = int(fp["num_draws"]), int(fp["seed"])
        parts: dict[str, list[torch.Tensor]] = {"t": [], "ref_err_w": [], "ref_err_l": [], "content_hash": []}
        keys_by_shard: dict[str, list[str]] = {}
        for entry in manifest["files"]:
            path = os.path.join(cache_dir, entry["file"])
            meta = read_shard_metadata(path)
            if meta is None or meta.get("fingerprint_sha256") != manifest["fingerprint_sha256"]:
                raise ValueError(f"reference cache file {path} is missing or belongs to another cache than "
                                 f"{MANIFEST_NAME}; run tools/precompute_ref.py again on this cache_dir")
            with safetensors.safe_open(path, framework="pt") as f:  # reads only the small tensors, not eps
                for name in parts:
                    parts[name].append(f.get_tensor(name))
            keys = json.loads(meta["keys"])
            if entry["shard"] in keys_by_shard:
                raise ValueError(f"reference cache {cache_dir}/{MANIFEST_NAME} lists shard {entry['shard']} twice; "
                                 "run tools/precompute_ref.py again on this cache_dir")
            if any(len(parts[name][-1]) != len(keys) for name in parts):
                raise ValueError(f"reference cache file {path} holds {len(keys)} keys but "
                                 f"{len(parts['t'][-1])} rows; run tools/precompute_ref.py again")
            keys_by_shard[entry["shard"]] = keys
        repeated = repeated_key(keys_by_shard)
        if repeated is not None:
            key, first, second = repeated
            raise ValueError(f"reference cache {cache_dir}: pair key {key!r} has rows in the files of shards {first} "
                             f"and {second}; keys must be unique across data.shards (a shard copied under another "
                             "name?): remove the copy, then run tools/precompute_ref.py again")
        self.row: dict[str, int] = {}
        self.shard_names: list[str] = []  # shard_names[i] holds rows shard_starts[i]..shard_starts[i+1]-1
        self.shard_starts: list[int] = []
        offset = 0
        for shard, keys in keys_by_shard.items():
            self.shard_names.append(shard)
            self.shard_starts.append(offset)
            self.row.update((key, offset + i) for i, key in enumerate(keys))
            offset += len(keys)
        self.t, self.err_w, self.err_l, self.content_hash = (torch.cat(parts[n]) for n in parts)

    @classmethod
    def load(cls, cfg: RunConfig, expected_fingerprint: dict) -> "CachedReference":
        """Open reference.cache_dir, refuse it unless it was made for this run, load every (key, draw)."""
        cache_dir = cfg.reference.cache_dir
        manifest = read_manifest(cache_dir)
        check_fingerprint(cache_dir, manifest["fingerprint"], expected_fingerprint)
        ref = cls(cache_dir, manifest)
        if engine.rank() == 0:
            log.info("reference: cache %s, %d pairs x %d draws", cache_dir, len(ref.row), ref.num_draws)
        return ref

    def errors(self, batch: dict, x_t: torch.Tensor, target: torch.Tensor, t: torch.Tensor):
        """r_w, r_l: [B] float32 cached errors at the batch's draws (x_t, target, t are not needed).

        The loader draws at epoch mod num_draws (PairLoader's num_draws), so past K
        visits a pair reuses its cached draws.
        """
        rows = []
        for key in batch["keys"]:
            if key not in self.row:
                raise ValueError(f"reference cache {self.cache_dir} has no entry for pair {key!r}; the cache was "
                                 "made from other shards or is incomplete: run tools/precompute_ref.py again")
            rows.append(self.row[key])
        rows_t = torch.tensor(rows, dtype=torch.long)
        changed = (self.content_hash[rows_t] != batch["content_hash"].cpu()).nonzero()
        if len(changed):
            i = int(changed[0])
            shard = self.shard_names[bisect.bisect_right(self.shard_starts, rows[i]) - 1]
            raise ValueError(f"reference cache {self.cache_dir}: pair {batch['keys'][i]!r} of shard {shard} is not "
                             "the pair the cache was computed on (its stored tensors hash differently): the shard's "
                             "contents changed since the cache was computed (re-encoded with another VAE, another "
                             "crop?); run tools/precompute_ref.py again on these shards")
        draws = batch["draw_index"].cpu()
        assert bool((draws < self.num_draws).all()), "the loader must draw at epoch mod num_draws"
        cached_t = self.t[rows_t, draws]
        mismatch = (cached_t != batch["t"].cpu()).nonzero()
        if len(mismatch):
            i = int(mismatch[0])
            raise ValueError(f"reference cache {self.cache_dir}: pair {batch['keys'][i]!r} draw {int(draws[i])} "
                             f"has t = {float(cached_t[i])!r} in the cache but {float(batch['t'][i])!r} in "
                             "training; the cache was made with another draw function or law of t")
        device = batch["t"].device
        return self.err_w[rows_t, draws].to(device), self.err_l[rows_t, draws].to(device)
