"""The `wan` family (dpo_ds/models/wan.py): flow matching against its formulas and diffusers' scheduler,
the law of σ and its seeded draw, settings, a tiny WanTransformer3DModel trained through the family,
export, the reference cache against the live reference, and WanPipeline from tiny parts.
Nothing is downloaded: every model is built from a config."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch
import yaml

from conftest import REPO
from dpo_ds import models, noise
from dpo_ds.config import load_config
from dpo_ds.models.wan import TEXT_SEQ_LEN, TINY_TRANSFORMER_CONFIG, WAN_SCHEDULER_CONFIG, Wan, shift_sigma

LATENT = (4, 3, 4, 6)  # C, F', H', W': TINY_TRANSFORMER_CONFIG's channels, even H' and W' for its (1, 2, 2) patches
TEXT_DIM = TINY_TRANSFORMER_CONFIG["text_dim"]
FLOW_MATCH_EULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 5.0}


def _unshift(sigma, s: float):
    """u from σ = s·u / (1 + (s − 1)·u)."""
    return sigma / (s - (s - 1) * sigma)


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    model = Wan.denoiser_from_config(TINY_TRANSFORMER_CONFIG)
    Wan.set_attention(model, "sdpa")
    return model


def _batch(b: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"latents_w": torch.randn(b, *LATENT, generator=g), "latents_l": torch.randn(b, *LATENT, generator=g),
            "noise": torch.randn(b, *LATENT, generator=g), "prompt_embeds": torch.randn(b, TEXT_SEQ_LEN, TEXT_DIM, generator=g),
            "t": torch.tensor([0.137, 0.861][:b], dtype=torch.float64)}


def test_flow_noising_endpoints_formula_and_velocity_target():
    """x_σ = (1 − σ)·x0 + σ·ε: x0 at σ = 0, ε at σ = 1; the target is ε − x0 whatever σ; noise level σ."""
    family = Wan(WAN_SCHEDULER_CONFIG)
    x0, eps = torch.randn(3, *LATENT), torch.randn(3, *LATENT)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    x_t, target = family.noisy(x0, eps, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], eps[2])
    assert torch.allclose(x_t[1], 0.7 * x0[1] + 0.3 * eps[1], atol=1e-6)
    assert torch.equal(target, eps - x0) and x_t.dtype == target.dtype == torch.float32
    assert family.noise_level(t).tolist() == [0.0, 0.3, 1.0]


def test_shift_is_diffusers_flow_shift_and_comes_from_the_scheduler():
    """σ' = s·σ / (1 + (s − 1)·σ): the formula, and the sigmas FlowMatchEulerDiscreteScheduler builds with it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    for s in (1.0, 3.0, 5.0):
        assert torch.allclose(shift_sigma(u, s), s * u / (1 + (s - 1) * u))
    assert torch.equal(shift_sigma(u, 1.0), u) and shift_sigma(1.0, 3.0) == 1.0 and shift_sigma(0.0, 3.0) == 0.0
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    unshifted = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    assert torch.allclose(shift_sigma(unshifted, 5.0).float(), sched.sigmas, atol=1e-6)
    assert torch.allclose(sched.timesteps, sched.sigmas * 1000)  # the transformer's timestep is σ·T

    assert Wan(WAN_SCHEDULER_CONFIG).shift == 3.0  # Wan 2.1 T2V's UniPC flow_shift
    assert Wan(FLOW_MATCH_EULER).shift == 5.0
    assert Wan(FLOW_MATCH_EULER, flow_shift=2.0).shift == 2.0  # model.flow_shift overrides
    with pytest.raises(ValueError, match="not a flow-matching scheduler"):
        Wan({"_class_name": "EulerDiscreteScheduler", "prediction_type": "epsilon"}, flow_shift=3.0)
    dynamic = {**FLOW_MATCH_EULER, "use_dynamic_shifting": True}
    with pytest.raises(ValueError, match="set model.flow_shift"):
        Wan(dynamic)
    assert Wan(dynamic, flow_shift=3.0).shift == 3.0


def test_uniform_draw_is_shifted_uniform_and_a_float():
    family = Wan(WAN_SCHEDULER_CONFIG)  # shift 3
    ts = torch.tensor([noise.draw(0, f"k{i}", 0, (1,), family.draw_t)[0] for i in range(2000)], dtype=torch.float64)
    assert bool(((ts > 0) & (ts < 1)).all()) and all(t != int(t) for t in ts.tolist())
    u = _unshift(ts, 3.0)
    assert abs(u.mean().item() - 0.5) < 0.02  # U[0, 1): standard error 0.0065
    assert abs(u.var().item() - 1 / 12) < 0.008
    assert ts.mean().item() > 0.6  # a shift of 3 moves σ toward noise: E[σ] = 0.70


def test_logit_normal_draw_has_the_configured_moments_before_the_shift():
    family = Wan(WAN_SCHEDULER_CONFIG, sigma_density="logit_normal", logit_mean=0.5, logit_std=0.8)
    ts = []
    for i in range(4000):
        g = torch.Generator().manual_seed(i)
        ts.append(family.draw_t(g))
    u = _unshift(torch.tensor(ts, dtype=torch.float64), 3.0)
    n = torch.log(u / (1 - u))
    assert abs(n.mean().item() - 0.5) < 0.05  # standard error 0.013
    assert abs(n.std().item() - 0.8) < 0.04
    law = family.draw_law()
    assert law["sigma_density"] == "logit_normal" and law["logit_mean"] == 0.5 and law["shift"] == 3.0
    json.dumps(law)
    assert law != Wan(WAN_SCHEDULER_CONFIG).draw_law() != Wan(WAN_SCHEDULER_CONFIG, flow_shift=5.0).draw_law()


def test_the_draw_is_a_pure_function_of_seed_key_and_draw_index():
    """noise.draw (the loader's and the precompute's) gives the same σ and noise for the same (seed, key, index)."""
    family = Wan(WAN_SCHEDULER_CONFIG, sigma_density="logit_normal")
    t1, n1 = noise.draw(7, "pair0001", 3, LATENT, family.draw_t)
    t2, n2 = noise.draw(7, "pair0001", 3, LATENT, Wan(WAN_SCHEDULER_CONFIG, sigma_density="logit_normal").draw_t)
    assert t1 == t2 and torch.equal(n1, n2) and isinstance(t1, float) and t1 != int(t1)
    for other in [(8, "pair0001", 3), (7, "pair0002", 3), (7, "pair0001", 4)]:
        assert noise.draw(*other, LATENT, family.draw_t)[0] != t1


def test_settings_build_the_family_and_refuse_what_does_not_apply(tmp_path):
    denoiser, scheduler = tmp_path / "transformer.json", tmp_path / "scheduler.json"
    denoiser.write_text(json.dumps(TINY_TRANSFORMER_CONFIG))
    scheduler.write_text(json.dumps(WAN_SCHEDULER_CONFIG))
    base = [f"--model.denoiser_config={denoiser}", f"--model.scheduler_config={scheduler}",
            "--data.shards=x", "--train.max_steps=1", "--output_dir=o"]
    cfg = load_config(None, base + ["--model.family=wan", "--model.sigma_density=logit_normal",
                                    "--model.logit_std=1.5", "--model.flow_shift=5.0"])
    family = models.build(cfg)
    assert isinstance(family, Wan) and (family.shift, family.sigma_density, family.logit_std) == (5.0, "logit_normal", 1.5)
    assert models.build(load_config(None, base + ["--model.family=wan"])).shift == 3.0
    with pytest.raises(ValueError, match="model.flow_shift is a flow-matching setting"):
        load_config(None, base + ["--model.family=sd15", "--model.flow_shift=3.0"])
    # A run's saved config.yaml lists every setting, the flow ones at their defaults: it loads back (export).
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(load_config(None, base + ["--model.family=sd15"]).model_dump(mode="json")))
    assert load_config(str(saved)).model.flow_shift is None
    with pytest.raises(ValueError, match="velocity"):
        models.build(load_config(None, base + ["--model.family=wan", "--model.prediction_type=epsilon"]))
    with pytest.raises(ValueError, match="timestep_range"):
        models.build(load_config(None, base + ["--model.family=wan", "--data.timestep_range=[0, 500]"]))
    with pytest.raises(ValueError, match="has no transformer/config.json"):
        Wan.load_denoiser(str(tmp_path), None)
    assert family.sample_schema(TINY_TRANSFORMER_CONFIG) == {
        "latents_w": None, "latents_l": None, "prompt_embeds": (TEXT_SEQ_LEN, TEXT_DIM)}


def test_pair_errors_train_every_parameter_with_block_checkpointing(transformer):
    """One forward of 2B samples at timestep σ·T, the output compared with ε − x0; under per-block gradient
    checkpointing every parameter gets a gradient."""
    family = Wan(WAN_SCHEDULER_CONFIG)
    batch = _batch()
    x_t, target, t = family.noisy_pair(batch)
    assert x_t.shape == (4, *LATENT) and torch.equal(target[:2], batch["noise"] - batch["latents_w"])
    transformer.train()
    transformer.enable_gradient_checkpointing()
    checkpointed = []
    inner = transformer._gradient_checkpointing_func
    transformer._gradient_checkpointing_func = lambda block, *args: checkpointed.append(block) or inner(block, *args)
    try:
        transformer.zero_grad()
        e_w, e_l = family.pair_errors(transformer, batch, x_t, target, t, torch.float32)
        (e_w - e_l).sum().backward()
    finally:
        transformer._gradient_checkpointing_func = inner
        transformer.disable_gradient_checkpointing()
        transformer.eval()
    assert checkpointed == list(transformer.blocks)
    no_grad = [n for n, p in transformer.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad
    with torch.no_grad():
        pred = transformer(x_t[1:2], torch.tensor([1000 * 0.861]), encoder_hidden_states=batch["prompt_embeds"][1:2],
                           return_dict=False)[0]
    assert e_w.shape == e_l.shape == (2,)
    assert math.isclose(e_w[1].item(), (pred - target[1:2]).pow(2).mean().item(), rel_tol=1e-4)


def test_synthetic_conditioning_fills_the_prompt_and_samples_as_training_conditions_a_winner(transformer):
    family = Wan.tiny(64)
    g = torch.Generator().manual_seed(0)
    sample = family.synthetic_conditioning(TINY_TRANSFORMER_CONFIG, 64, g, torch.float16)
    assert {n: tuple(t.shape) for n, t in sample.items()} == {"prompt_embeds": (TEXT_SEQ_LEN, TEXT_DIM)}
    sample |= {"latents_w": torch.randn(LATENT, generator=g).half(), "latents_l": torch.randn(LATENT, generator=g).half()}
    x, t = torch.randn(2, *LATENT, generator=g), torch.tensor([0.4, 0.4], dtype=torch.float64)
    with torch.no_grad():
        pair = family.predict(transformer, x, t, {n: v[None].float() for n, v in sample.items()}, torch.float32)
        sampled = transformer(x[:1], t[:1].float() * 1000, **family.sampling_kwargs(sample, 1, torch.float32)).sample
    assert torch.allclose(sampled[0], pair[0], atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed here")
def test_xformers_asked_for_but_missing_is_a_clear_error(transformer):
    with pytest.raises(ValueError, match="xformers is not installed"):
        Wan.set_attention(transformer, "xformers")


def test_export_loads_with_from_pretrained_and_keeps_the_weights(transformer, tmp_path):
    from diffusers import WanTransformer3DModel

    state = {n: p.detach().clone() for n, p in transformer.state_dict().items()}
    # As the trainer exports: every parameter and every named buffer, the rope's computed tables included.
    gathered = {**dict(transformer.named_parameters()), **dict(transformer.named_buffers())}
    assert {"rope.freqs_cos", "rope.freqs_sin"} <= gathered.keys() - state.keys()
    Wan.export({n: t.detach().clone() for n, t in gathered.items()}, dict(transformer.config),
               str(tmp_path / "transformer"), torch.float32)
    loaded = WanTransformer3DModel.from_pretrained(str(tmp_path / "transformer"))
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(loaded.state_dict()[n], state[n]) for n in state)
    assert dict(loaded.config)["text_dim"] == TEXT_DIM
    again = Wan.load_denoiser(str(tmp_path), None)  # a pretrained_path holding transformer/
    assert all(torch.equal(again.state_dict()[n], state[n]) for n in state)


def test_the_cached_reference_equals_the_live_one_on_the_loaders_draws(transformer, tmp_path):
    """tools/precompute_ref.py's compute_shard fills a cache; training's PairLoader draws each pair again (CFHW
    latents, float σ), and the cache returns exactly those σ with the errors the live reference gives."""
    sys.path.insert(0, str(REPO / "tools"))
    from precompute_ref import compute_shard
    from tqdm import tqdm

    from dpo_ds.data import PairLoader, ShardWriter, list_shards
    from dpo_ds.reference import CachedReference, write_shard_cache

    family = Wan(WAN_SCHEDULER_CONFIG, sigma_density="logit_normal")
    schema = family.sample_schema(TINY_TRANSFORMER_CONFIG)
    g = torch.Generator().manual_seed(0)
    with ShardWriter(str(tmp_path / "shards"), max_pairs=3) as writer:
        for i in range(6):
            tensors = {"latents_w": torch.randn(LATENT, generator=g).half(), "latents_l": torch.randn(LATENT, generator=g).half(),
                       "prompt_embeds": torch.randn(TEXT_SEQ_LEN, TEXT_DIM, generator=g).half()}
            writer.write(f"clip{i:04d}", {"caption": f"clip {i}", "family": "wan", "latent_layout": "CFHW",
                                          "scaling_factor": 1.0, "shift_factor": None, "label": 1.0, "source": {}}, tensors)
    shards = list_shards(str(tmp_path / "shards"))
    seed, num_draws, cache = 5, 2, tmp_path / "cache"
    cache.mkdir()
    cfg = type("Cfg", (), {"seed": seed})()
    files = []
    for shard in shards:
        keys, tensors, num_bad = compute_shard(shard, transformer, cfg, family, schema, None, num_draws, 2,
                                               torch.float32, False, tqdm(disable=True))
        name = shard.url.rsplit("/", 1)[1]
        write_shard_cache(str(cache / f"{name}.ref.safetensors"), name, keys, tensors, "fp", {"num_bad": str(num_bad)})
        files.append({"shard": name, "file": f"{name}.ref.safetensors", "num_pairs": len(keys), "num_bad": num_bad})
    cached = CachedReference(str(cache), {"fingerprint": {"num_draws": num_draws, "seed": seed},
                                          "fingerprint_sha256": "fp", "files": files})

    loader = PairLoader(shards, batch_size=3, rank=0, world_size=1, seed=seed, num_workers=0, shuffle_buffer=4,
                        schema=schema, draw_t=family.draw_t, num_draws=num_draws)
    seen = 0
    for epoch in range(num_draws):
        for batch in loader.epoch(epoch):
            assert batch["latents_w"].shape[1:] == LATENT and batch["t"].dtype == torch.float64
            assert all(0 < t < 1 and t != int(t) for t in batch["t"].tolist())
            x_t, target, t = family.noisy_pair(batch)
            with torch.no_grad():
                live_w, live_l = family.pair_errors(transformer, batch, x_t, target, t, torch.float32)
            cache_w, cache_l = cached.errors(batch, x_t, target, t)  # refuses a σ other than the cached one
            assert torch.allclose(cache_w, live_w, rtol=1e-5) and torch.allclose(cache_l, live_l, rtol=1e-5)
            seen += len(batch["keys"])
    assert seen == 6 * num_draws


def test_wan_pipeline_samples_from_tiny_parts(transformer, tmp_path):
    """pipeline(): WanPipeline from a base folder's vae/, text_encoder/, tokenizer/, with the family's transformer."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                     latents_std=[1.0] * 4).save_pretrained(str(tmp_path / "vae"))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(tmp_path / "tokenizer"))
    UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
                     ).save_pretrained(str(tmp_path / "text_encoder"))
    pipe = Wan.pipeline(str(tmp_path), transformer, UniPCMultistepScheduler.from_config(WAN_SCHEDULER_CONFIG),
                        torch.float32)
    frames = pipe("a cat", height=16, width=16, num_frames=5, num_inference_steps=2, guidance_scale=1.0,
                  output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 5, 3, 16, 16) and bool(torch.isfinite(frames).all())
