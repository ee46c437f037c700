"""Reference cache: the fingerprint, tools/precompute_ref.py, and training with reference.mode=cache."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import BIN, REPO, env, fork_train, free_port, read_scalars, write_run_config
from dpo_ds import noise
from dpo_ds.models import ddpm


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """Like conftest's `tiny` (same tool, model and resolution), with 8 pairs in 4 shards, so runs reach epoch 1 fast."""
    out = tmp_path_factory.mktemp("small")
    subprocess.run([sys.executable, str(REPO / "tools" / "make_synthetic.py"), "--out", str(out),
                    "--num-pairs", str(NUM_PAIRS), "--pairs-per-shard", "2", "--resolution", "64", "--seed", "0"],
                   check=True, env=env(), capture_output=True)
    return out

NUM_DRAWS = 2
NUM_PAIRS = 8
LAW = functools.partial(ddpm.uniform_timestep, lo=0, hi=1000)  # the tiny SDXL family's law of t
# 8 pairs / (2 ranks x 2 pairs) = 2 micro-batches per epoch: steps 3-4 train at draw index 1.
MAX_STEPS = 4


def _precompute(config: Path, cache_dir: Path, *extra: str, nproc: int = 1) -> subprocess.CompletedProcess:
    tool = [str(REPO / "tools" / "precompute_ref.py"), "--config", str(config), "--cache-dir", str(cache_dir),
            "--num-draws", str(NUM_DRAWS), "--batch-size", "3", "--no-progress", *extra]
    if nproc == 1:
        cmd, e = [sys.executable, *tool], env() | {"MASTER_PORT": str(free_port())}
    else:
        cmd, e = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), *tool], env()
    return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=300)


def _ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"


def _cache_contents(cache_dir: Path) -> dict:
    from safetensors import safe_open

    out = {"manifest": json.loads((cache_dir / "manifest.json").read_text())}
    for path in sorted(cache_dir.glob("*.ref.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out[path.name] = {"metadata": f.metadata(), **{k: f.get_tensor(k) for k in f.keys()}}
    return out


# ---------------------------------------------------------------- pure: the fingerprint

def test_weights_hash_is_order_and_storage_dtype_independent():
    from dpo_ds.reference import weights_hash

    a = {"x": torch.arange(6, dtype=torch.float32).view(2, 3), "y": torch.ones(4)}
    assert weights_hash(a) == weights_hash({"y": a["y"].half(), "x": a["x"]})
    assert weights_hash(a) != weights_hash({**a, "y": torch.ones(4) * 2})
    assert weights_hash(a) != weights_hash({"x": a["x"].view(3, 2), "y": a["y"]})


def test_fingerprint_mismatch_names_the_field():
    from dpo_ds.reference import check_fingerprint

    shards = [{"name": "a.tar", "num_pairs": 8, "size_bytes": 10}, {"name": "b.tar", "num_pairs": 8, "size_bytes": 10}]
    cached = {"reference_weights": "sha256:1", "shards": shards, "seed": 0, "num_draws": 4, "dtype": "fp32"}
    check_fingerprint("c", cached, {**cached, "num_draws": 9})  # K comes from the cache; no refusal
    for field, value, words in [("seed", 1, "field 'seed' differs: 0 in the cache, 1 in this run"),
                                ("reference_weights", "sha256:2", "field 'reference_weights'"),
                                ("dtype", "bf16", "field 'dtype'"),
                                ("shards", shards[:1], "shard b.tar is in the cache but not in this run"),
                                ("shards", [shards[0], {**shards[1], "size_bytes": 11}], "shard b.tar is")]:
        with pytest.raises(ValueError, match="tools/precompute_ref.py") as err:
            check_fingerprint("c", cached, {**cached, field: value})
        assert words in str(err.value), str(err.value)


def test_cache_settings_are_checked_on_load():
    from dpo_ds.config import load_config

    base = ["--output_dir=o", "--model.denoiser_config=u.json", "--model.scheduler_config=s.json",
            "--data.shards=d", "--train.max_steps=1"]
    with pytest.raises(ValueError, match="reference.mode=cache needs reference.cache_dir"):
        load_config(None, base + ["--reference.mode=cache"])
    with pytest.raises(ValueError, match="it needs reference.mode=cache"):
        load_config(None, base + ["--reference.drift_check_every=10"])
    cfg = load_config(None, base + ["--reference.mode=cache", "--reference.cache_dir=c"])
    assert (cfg.reference.mode, cfg.reference.cache_dir, cfg.reference.drift_check_every) == ("cache", "c", 0)


def test_precompute_config_needs_only_what_the_cache_depends_on(tmp_path):
    from dpo_ds.config import CACHE_SETTINGS, load_cache_config, load_config

    cache_only = ["--model.denoiser_config=u.json", "--model.scheduler_config=s.json", "--data.shards=d", "--seed=3"]
    with pytest.raises(ValueError, match="missing required key 'output_dir'"):
        load_config(None, cache_only)
    cfg = load_cache_config(None, cache_only)
    assert (cfg.seed, cfg.data.shards, cfg.model.denoiser_config) == (3, "d", "u.json")
    # A whole run config is read the same way, its run-only settings kept but unused.
    full = load_cache_config(None, cache_only + ["--output_dir=o", "--train.max_steps=7", "--dpo.beta=9"])
    assert (full.output_dir, full.train.max_steps, full.dpo.beta) == ("o", 7, 9.0)
    with pytest.raises(ValueError, match="unknown key 'train.max_stepz'"):
        load_cache_config(None, cache_only + ["--train.max_stepz=7"])
    with pytest.raises(ValueError, match="train: "):
        load_cache_config(None, cache_only + ["--train=3"])
    assert "seed" in CACHE_SETTINGS and "data.timestep_range" in CACHE_SETTINGS and "dpo.beta" not in CACHE_SETTINGS

    help_text = subprocess.run([sys.executable, str(REPO / "tools" / "precompute_ref.py"), "--help"], cwd=REPO,
                               env=env(), capture_output=True, text=True, timeout=120).stdout
    assert "data.timestep_range" in " ".join(help_text.split()), help_text


# ---------------------------------------------------------------- the tool and the cache

@pytest.fixture(scope="module")
def cached(small, tmp_path_factory) -> tuple[Path, Path]:
    """(run config, cache dir): the tiny run's reference cache, precomputed on one process from a
    config holding only what a cache depends on (no output_dir, no train section): the training
    runs below accept it with their full run configs."""
    import yaml

    out = tmp_path_factory.mktemp("cached")
    cfg = write_run_config(out / "run.yaml", small, out / "run", reference={"cache_dir": str(out / "cache")})
    run = yaml.safe_load(cfg.read_text())
    cache_only = out / "cache_only.yaml"
    cache_only.write_text(yaml.safe_dump({k: run[k] for k in ("seed", "model", "data", "reference")}))
    _ok(_precompute(cache_only, out / "cache"))
    return cfg, out / "cache"


@pytest.mark.slow
def test_precompute_matches_the_training_draw_and_one_vs_two_processes(cached, small, tmp_path):
    from dpo_ds.data import decode_sample, tar_samples

    cfg, cache_dir = cached
    one = _cache_contents(cache_dir)
    assert one["manifest"]["fingerprint"]["num_draws"] == NUM_DRAWS
    assert sum(f["num_pairs"] for f in one["manifest"]["files"]) == NUM_PAIRS
    first = one["shard-000000.tar.ref.safetensors"]
    keys = json.loads(first["metadata"]["keys"])
    for row, key in enumerate(keys):
        for d in range(NUM_DRAWS):
            assert first["t"][row, d].item() == noise.draw(0, key, d, (4, 8, 8), LAW)[0]
    assert first["t"].dtype == torch.float64
    assert torch.isfinite(first["ref_err_w"]).all() and (first["ref_err_w"] > 0).all()
    shard = str(small / "shards" / "shard-000000.tar")
    stored = [decode_sample(key, members, None)["content_hash"] for key, members in tar_samples(shard)]
    assert first["content_hash"].tolist() == stored and len(set(stored)) == len(stored)

    _ok(_precompute(cfg, tmp_path / "two", nproc=2))
    two = _cache_contents(tmp_path / "two")
    assert one.keys() == two.keys()
    assert one["manifest"] == two["manifest"]
    for name in one:
        if name != "manifest":
            for k in one[name]:
                a, b = one[name][k], two[name][k]
                assert (torch.equal(a, b) if torch.is_tensor(a) else a == b), f"{name}: {k} differs"

    mtimes = {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("*.ref.safetensors")}
    (cache_dir / "shard-000002.tar.ref.safetensors").unlink()  # as if the job died before this shard
    again = _precompute(cfg, cache_dir)
    _ok(again)
    assert "skips 3 complete shard(s)" in again.stderr
    assert "settings used (all others ignored): seed=0, model.family=sdxl" in again.stderr, again.stderr[-3000:]
    assert _cache_contents(cache_dir).keys() == one.keys()
    for name, mtime in mtimes.items():
        if name != "shard-000002.tar.ref.safetensors":
            assert (cache_dir / name).stat().st_mtime_ns == mtime, f"{name} was recomputed"


def _load(cfg_path: Path, *overrides: str):
    """The cache as the trainer opens it (dpo_ds.reference.for_training), without starting a run."""
    from dpo_ds import models, reference
    from dpo_ds.config import load_config
    from dpo_ds.data import list_shards

    cfg = load_config(str(cfg_path), ["--reference.mode=cache", *overrides])
    family = models.build(cfg)
    torch.manual_seed(cfg.seed)  # the trainer's fresh policy, as in Trainer.__init__
    policy = family.load_denoiser(cfg.model.pretrained_path, None)
    return reference.for_training(cfg, family, list_shards(cfg.data.shards), None, policy, {}, "fp32").train


@pytest.mark.slow
def test_cache_refused_for_other_weights_shards_seed(cached, small, tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    from make_synthetic import write_model

    cfg, _ = cached
    assert len(_load(cfg).row) == NUM_PAIRS
    other_model = write_model(str(tmp_path / "other"), seed=1)
    for overrides, words in [(["--seed=1"], "field 'seed' differs: 0 in the cache, 1 in this run"),
                             ([f"--reference.pretrained_path={other_model}"], "field 'reference_weights' differs"),
                             ([f"--data.shards=[{small}/shards/shard-000000.tar,{small}/shards/shard-000001.tar]"],
                              "shard shard-000002.tar is in the cache but not in this run"),
                             (["--data.timestep_range=[0,500]"], "field 'draw_law' differs"),
                             (["--data.empty_prompt_prob=0.2"], "field 'prompt_dropout' differs")]:
        with pytest.raises(ValueError, match="does not match this run") as err:
            _load(cfg, *overrides)
        assert words in str(err.value), str(err.value)
    # The same weights given as a folder are the same reference: accepted.
    assert len(_load(cfg, f"--reference.pretrained_path={small / 'model'}").row) == NUM_PAIRS


@pytest.mark.slow
def test_missing_key_is_an_error_and_cached_draws_are_found(cached, tmp_path):
    import shutil

    from dpo_ds.reference import read_shard_metadata, write_shard_cache
    from safetensors.torch import load_file

    cfg, cache_dir = cached
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    path = str(copy / "shard-000001.tar.ref.safetensors")
    meta, tensors = read_shard_metadata(path), load_file(path)
    keys = json.loads(meta["keys"])
    hashes = dict(zip(keys, tensors["content_hash"].tolist()))
    write_shard_cache(path, meta["shard"], keys[1:], {k: v[1:] for k, v in tensors.items()},
                      meta["fingerprint_sha256"], {"num_bad": "0", "has_eps": "false"})
    ref = _load(cfg, f"--reference.cache_dir={copy}")

    def batch(pair_keys, draw_index):
        draws = [noise.draw(0, k, draw_index, (4, 8, 8), LAW) for k in pair_keys]
        return {"keys": pair_keys, "draw_index": torch.full((len(pair_keys),), draw_index),
                "content_hash": torch.tensor([hashes[k] for k in pair_keys]),
                "t": torch.tensor([t for t, _ in draws], dtype=torch.float64),
                "noise": torch.stack([n for _, n in draws])}

    with pytest.raises(ValueError, match=f"no entry for pair '{keys[0]}'"):
        ref.errors(batch(keys[:2], 0), None, None, None)
    kept = keys[1:]
    late = batch(kept, 1)  # what the loader yields in epoch 3 of a 2-draw cache (tests/test_data.py)
    r_w, _ = ref.errors(late, None, None, None)
    assert torch.equal(r_w, tensors["ref_err_w"][1:, 1])
    with pytest.raises(ValueError, match="has t = "):
        ref.errors({**late, "t": late["t"] + 1}, None, None, None)


def _copy_shards(small: Path, out: Path) -> Path:
    import shutil

    shutil.copytree(small / "shards", out)
    return out


@pytest.mark.slow
def test_repeated_key_is_refused_by_the_tool_before_computing(small, tmp_path):
    """A shard copied under another name repeats every key of the original: the tool stops before computing
    anything, naming the key and both shards (rows are found by key, so the copy would take the original's)."""
    import shutil

    from dpo_ds.data import tar_samples

    shards = _copy_shards(small, tmp_path / "shards")
    shutil.copy(shards / "shard-000001.tar", shards / "shard-000009.tar")
    cfg = write_run_config(tmp_path / "run.yaml", small, tmp_path / "run", data={"shards": str(shards)})
    proc = _precompute(cfg, tmp_path / "cache")
    first_key = next(tar_samples(str(shards / "shard-000001.tar")))[0]
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert f"pair key {first_key!r} is in shard shard-000001.tar and again in shard shard-000009.tar" in proc.stderr
    assert not list((tmp_path / "cache").glob("*.ref.safetensors")), "the tool computed before refusing"


@pytest.mark.slow
def test_cache_with_a_repeated_key_is_refused_on_load(cached, tmp_path):
    """A cache file whose keys repeat another file's (as a tool without the check wrote them) is refused
    on load, naming the key and both shards, instead of serving a shifted row to every later key."""
    import shutil

    from dpo_ds.reference import read_shard_metadata, write_shard_cache
    from safetensors.torch import load_file

    cfg, cache_dir = cached
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    first_key = json.loads(read_shard_metadata(str(copy / "shard-000000.tar.ref.safetensors"))["keys"])[0]
    path = str(copy / "shard-000002.tar.ref.safetensors")
    meta, tensors = read_shard_metadata(path), load_file(path)
    keys = json.loads(meta["keys"])
    write_shard_cache(path, meta["shard"], [first_key, *keys[1:]], tensors, meta["fingerprint_sha256"],
                      {"num_bad": "0", "has_eps": "false"})
    with pytest.raises(ValueError, match=f"pair key '{first_key}' has rows in the files of shards shard-000000.tar "
                                         "and shard-000002.tar"):
        _load(cfg, f"--reference.cache_dir={copy}")


def _reencode(src: Path, dst: Path) -> None:
    """dst: src with every pair's latents_w changed (as another VAE or crop would), same names, keys, sizes."""
    import io
    import tarfile

    from safetensors.torch import load, save

    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tin.format) as tout:
        for member in tin:
            data = tin.extractfile(member).read()
            if member.name.endswith(".safetensors"):
                tensors = load(data)
                tensors["latents_w"] = (tensors["latents_w"].float() * 0.9 + 0.01).to(tensors["latents_w"].dtype)
                data = save(tensors)
                assert len(data) == member.size
            tout.addfile(member, io.BytesIO(data))


@pytest.mark.slow
def test_cache_on_other_contents_is_refused_at_lookup(cached, small, tmp_path):
    """Shards with the same names, sizes and keys but re-encoded latents match the fingerprint; the pair's
    content hash does not, and the lookup says the shard changed since the cache was computed."""
    from dpo_ds.data import collate_pairs, decode_sample, list_shards, tar_samples

    cfg, _ = cached
    shards = _copy_shards(small, tmp_path / "shards")
    _reencode(small / "shards" / "shard-000001.tar", shards / "shard-000001.tar")
    assert ([(os.path.basename(s.url), s.num_pairs, s.size_bytes) for s in list_shards(str(shards))]
            == [(os.path.basename(s.url), s.num_pairs, s.size_bytes) for s in list_shards(str(small / "shards"))])
    ref = _load(cfg, f"--data.shards={shards}")  # the fingerprint cannot tell: accepted

    def batch(shard: str) -> dict:
        samples = [decode_sample(k, m, None) for k, m in tar_samples(str(shards / shard))]
        return collate_pairs(samples, 0, 0, LAW)

    r_w, r_l = ref.errors(batch("shard-000000.tar"), None, None, None)  # untouched shard: served
    assert torch.isfinite(r_w).all() and torch.isfinite(r_l).all()
    changed = batch("shard-000001.tar")
    with pytest.raises(ValueError, match=f"pair '{changed['keys'][0]}' of shard shard-000001.tar is not the pair "
                                         "the cache was computed on") as err:
        ref.errors(changed, None, None, None)
    assert "the shard's contents changed since the cache was computed" in str(err.value)


@pytest.mark.slow
def test_cache_of_format_1_is_refused(cached, tmp_path):
    """Format 1 caches hold no content hashes: refused, with the way out."""
    import shutil

    cfg, cache_dir = cached
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format": "dpo_ds.refcache/1"}))
    with pytest.raises(ValueError, match="format 'dpo_ds.refcache/1' is not 'dpo_ds.refcache/2'.*recompute the cache"):
        _load(cfg, f"--reference.cache_dir={copy}")


# ---------------------------------------------------------------- training

@pytest.mark.slow
def test_live_and_cache_train_the_same(cached, small, tmp_path):
    """2 ranks, ZeRO-3, fp32: same losses and weights step for step, into the second draw.

    The cached errors equal the live ones to a float32 rounding (the tool runs a plain module at its
    own batch size, the live reference a ZeRO-3 engine at the training one). β is small because
    the loss magnifies a difference in r by β/4, and Adam's first steps move a parameter by about
    lr whatever the size of its gradient, so a rounding can flip the few that are near zero.
    """
    from safetensors.torch import load_file

    cfg, cache_dir = cached
    runs = {}
    for mode in ("live", "cache"):
        run_cfg = write_run_config(tmp_path / f"{mode}.yaml", small, tmp_path / mode, dpo={"beta": 10.0},
                                   train={"max_steps": MAX_STEPS}, checkpoint={"every_steps": 100},
                                   reference={"mode": mode, "cache_dir": str(cache_dir)})
        proc = fork_train(run_cfg)
        _ok(proc)
        runs[mode] = (read_scalars(tmp_path / mode / "tensorboard"),
                      load_file(str(tmp_path / mode / "export" / "unet" / "diffusion_pytorch_model.safetensors")))
        assert ("the reference model is not built" in proc.stderr) == (mode == "cache")

    (live, live_w), (cache, cache_w) = runs["live"], runs["cache"]
    for name in ("train/loss", "train/ref_err_w", "train/ref_err_l", "train/model_err_w"):
        assert [s for s, _ in cache[name]] == list(range(1, MAX_STEPS + 1))
        for (step, a), (_, b) in zip(live[name], cache[name]):
            assert math.isclose(a, b, rel_tol=1e-5), f"{name} at step {step}: live {a}, cache {b}"
    diff = sum((live_w[k] - cache_w[k]).pow(2).sum() for k in live_w).sqrt()
    norm = sum(live_w[k].pow(2).sum() for k in live_w).sqrt()
    assert diff / norm < 1e-5, f"trained weights differ by {diff / norm:.3g} relative"
    initial = load_file(str(small / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(not torch.equal(initial[k], cache_w[k]) for k in initial), "the cache run did not train"


@pytest.mark.slow
def test_trainer_refuses_other_seed_and_logs_drift(cached, small, tmp_path):
    cfg, cache_dir = cached
    run_cfg = write_run_config(tmp_path / "run.yaml", small, tmp_path / "run", train={"max_steps": 2},
                               checkpoint={"every_steps": 100, "export": False},
                               reference={"mode": "cache", "cache_dir": str(cache_dir)})
    refused = fork_train(run_cfg, "--seed=1", nproc=1)
    assert refused.returncode == 2, refused.stderr[-4000:]
    assert "field 'seed' differs: 0 in the cache, 1 in this run" in refused.stderr

    _ok(fork_train(run_cfg, "--reference.drift_check_every=1", "--reference.drift_check_fraction=0.5", nproc=1))
    drift = read_scalars(tmp_path / "run" / "tensorboard")["ref/cache_drift"]
    assert [s for s, _ in drift] == [1, 2]
    assert all(0 <= v < 1e-5 for _, v in drift), drift


@pytest.mark.slow
def test_a_key_repeated_inside_one_shard_is_a_bad_pair_not_a_refusal(small, tmp_path):
    """A key repeated inside one tar is the reader's bad pair (the first sample kept): the precompute skips it
    and counts it, as training does, instead of refusing the data set as if two shards held the key."""
    from conftest import write_raw_tar
    from dpo_ds.data import tar_samples

    shards = _copy_shards(small, tmp_path / "shards")
    samples = list(tar_samples(str(shards / "shard-000000.tar")))
    write_raw_tar(shards / "shard-000000.tar", samples + samples[:1])
    cfg = write_run_config(tmp_path / "run.yaml", small, tmp_path / "run", data={"shards": str(shards)})
    _ok(_precompute(cfg, tmp_path / "cache"))
    files = {f["shard"]: f for f in json.loads((tmp_path / "cache" / "manifest.json").read_text())["files"]}
    assert (files["shard-000000.tar"]["num_pairs"], files["shard-000000.tar"]["num_bad"]) == (len(samples), 1)
