"""The `svd` family (dpo_ds/models/svd.py): EDM's preconditioning and loss weight against their formulas, the
log-normal law of σ and its seeded draw, settings, a tiny UNetSpatioTemporalConditionModel trained through the
family, export, the encoder (dpo_ds/models/svd_encoder.py) and StableVideoDiffusionPipeline from tiny parts.
Nothing is downloaded: every model is built from a config."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dpo_ds import models, noise
from dpo_ds.config import load_config
from dpo_ds.models.svd import SVD, edm_coefficients, edm_weight

CONFIG = SVD.TINY_DENOISER_CONFIG
LATENT = (4, 2, 4, 4)  # C, F, H', W'
SIDE = 32  # pixels: H' = 4 with the tiny VAE's factor 8


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = SVD.denoiser_from_config(CONFIG)
    SVD.set_attention(model, "sdpa")
    return model


def _batch(b: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    family = SVD.tiny()
    cond = [family.synthetic_conditioning(CONFIG, LATENT[-1] * 8, g, torch.float32) for _ in range(b)]
    batch = {name: torch.stack([c[name] for c in cond]) for name in cond[0]}
    batch |= {"latents_w": torch.randn(b, *LATENT, generator=g), "latents_l": torch.randn(b, *LATENT, generator=g),
              "noise": torch.randn(b, *LATENT, generator=g),
              "t": torch.tensor([family.draw_t(g) for _ in range(b)], dtype=torch.float64)}
    return batch


@pytest.mark.parametrize("sigma", [0.002, 1.0, 80.0])
def test_edm_preconditioning_and_weight_follow_their_formulas(sigma):
    """σ_d = 1: c_skip = 1/(σ²+1), c_out = −σ/√(σ²+1) (SVD's sign), c_in = 1/√(σ²+1), c_noise = ln σ / 4,
    λ = (σ²+1)/σ²; and λ·c_out² = 1, so the weighted error is the network output's own error."""
    c_skip, c_out, c_in, c_noise = (float(c) for c in edm_coefficients(torch.tensor(sigma, dtype=torch.float64)))
    assert c_skip == pytest.approx(1 / (sigma ** 2 + 1), rel=1e-12)
    assert c_out == pytest.approx(-sigma / math.sqrt(sigma ** 2 + 1), rel=1e-12)
    assert c_in == pytest.approx(1 / math.sqrt(sigma ** 2 + 1), rel=1e-12)
    assert c_noise == pytest.approx(math.log(sigma) / 4, rel=1e-12)
    weight = float(edm_weight(torch.tensor(sigma, dtype=torch.float64)))
    assert weight == pytest.approx((sigma ** 2 + 1) / sigma ** 2, rel=1e-12)
    assert weight * c_out ** 2 == pytest.approx(1.0, rel=1e-12)
    # σ_d other than 1: the general formulas
    s_d = 0.5
    c_skip, c_out, c_in, _ = (float(c) for c in edm_coefficients(torch.tensor(sigma, dtype=torch.float64), s_d))
    assert c_skip == pytest.approx(s_d ** 2 / (sigma ** 2 + s_d ** 2), rel=1e-12)
    assert c_out == pytest.approx(-sigma * s_d / math.sqrt(sigma ** 2 + s_d ** 2), rel=1e-12)
    assert c_in == pytest.approx(1 / math.sqrt(sigma ** 2 + s_d ** 2), rel=1e-12)


def test_noisy_is_x0_plus_sigma_noise_with_target_x0():
    b = _batch()
    x0, eps, t = b["latents_w"], b["noise"], b["t"]
    x_t, target = SVD.tiny().noisy(x0, eps, t)
    torch.testing.assert_close(x_t, x0 + t.float().view(-1, 1, 1, 1, 1) * eps)
    assert torch.equal(target, x0)


def test_log_normal_draw_has_the_configured_moments_and_is_a_float():
    for p_mean, p_std in [(0.7, 1.6), (-1.2, 1.2)]:
        family = SVD(p_mean, p_std)
        sigmas = torch.tensor([family.draw_t(torch.Generator().manual_seed(i)) for i in range(4000)],
                              dtype=torch.float64)
        ln = sigmas.log()
        assert abs(ln.mean().item() - p_mean) < 4 * p_std / math.sqrt(4000)
        assert abs(ln.std().item() - p_std) < 0.05 * p_std
    t1, n1 = noise.draw(7, "pair0001", 3, LATENT, SVD().draw_t)
    t2, n2 = noise.draw(7, "pair0001", 3, LATENT, SVD().draw_t)
    assert t1 == t2 and torch.equal(n1, n2) and isinstance(t1, float) and t1 > 0
    law = SVD().draw_law()
    json.dumps(law)
    assert (law["p_mean"], law["p_std"], law["sigma_data"]) == (0.7, 1.6, 1.0)
    assert law != SVD(0.0, 1.6).draw_law() != SVD(0.7, 1.0).draw_law()


def test_a_perfect_x0_prediction_has_zero_error_and_an_output_off_by_d_costs_d_squared(unet):
    """predict through a stub UNet whose output makes D = x0 exactly: zero error. Its output off by δ everywhere:
    error λ·(c_out·δ)² = δ² at every σ (EDM's weight compares like with like)."""
    family = SVD.tiny()
    batch = _batch()
    x_t, target, t = family.noisy_pair(batch)
    c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1, 1) for c in edm_coefficients(t))
    seen = {}

    def perfect(sample, timestep, encoder_hidden_states, added_time_ids, return_dict):
        seen.update(sample=sample, timestep=timestep)
        f = (target.double() - c_skip * x_t.double()) / c_out  # the F that makes D = x0, [2B, C, F, H, W]
        return (f.permute(0, 2, 1, 3, 4).float() + seen.get("delta", 0.0),)

    pred = family.predict(perfect, x_t, t, batch, torch.float32)
    torch.testing.assert_close(family.error(pred, target, t), torch.zeros(4), atol=1e-9, rtol=0)
    # what the UNet saw: [2B, F, 2C, H', W'], the scaled noisy latents then the image latents; c_noise as timestep
    assert seen["sample"].shape == (4, LATENT[1], 2 * LATENT[0], *LATENT[2:])
    torch.testing.assert_close(seen["sample"][:, :, :4], (c_in * x_t.double()).permute(0, 2, 1, 3, 4).float())
    image = batch["image_latents"].repeat(2, 1, 1, 1)
    assert all(torch.equal(seen["sample"][:, f, 4:], image) for f in range(LATENT[1]))
    torch.testing.assert_close(seen["timestep"], (t.log() / 4).float())
    seen["delta"] = 0.3
    errors = family.error(family.predict(perfect, x_t, t, batch, torch.float32), target, t)
    torch.testing.assert_close(errors, torch.full((4,), 0.09), rtol=1e-4, atol=0)


def test_settings_build_the_family_and_refuse_what_does_not_apply(tmp_path):
    denoiser, scheduler = tmp_path / "unet.json", tmp_path / "scheduler.json"
    denoiser.write_text(json.dumps(CONFIG))
    scheduler.write_text(json.dumps(SVD.SCHEDULER_CONFIG))
    base = [f"--model.denoiser_config={denoiser}", f"--model.scheduler_config={scheduler}",
            "--data.shards=x", "--train.max_steps=1", "--output_dir=o"]
    family = models.build(load_config(None, base + ["--model.family=svd", "--model.edm_p_mean=-1.2",
                                                    "--model.edm_p_std=1.2"]))
    assert isinstance(family, SVD) and (family.p_mean, family.p_std) == (-1.2, 1.2)
    assert (models.build(load_config(None, base + ["--model.family=svd"])).p_mean, family.p_std) == (0.7, 1.2)
    with pytest.raises(ValueError, match="model.edm_p_mean is an EDM setting"):
        load_config(None, base + ["--model.family=sd15", "--model.edm_p_mean=0.0"])
    with pytest.raises(ValueError, match="model.flow_shift is a flow-matching setting"):
        load_config(None, base + ["--model.family=svd", "--model.flow_shift=3.0"])
    with pytest.raises(ValueError, match="prediction_type"):
        models.build(load_config(None, base + ["--model.family=svd", "--model.prediction_type=epsilon"]))
    with pytest.raises(ValueError, match="timestep_range"):
        models.build(load_config(None, base + ["--model.family=svd", "--data.timestep_range=[0, 500]"]))
    assert family.sample_schema(CONFIG) == {"latents_w": None, "latents_l": None, "image_latents": None,
                                            "image_embeds": (1, CONFIG["cross_attention_dim"]), "added_time_ids": (3,)}


def test_pair_errors_train_every_parameter_with_gradient_checkpointing_and_export_loads(unet, tmp_path):
    family = SVD.tiny()
    batch = _batch()
    unet.zero_grad()
    SVD.enable_gradient_checkpointing(unet)
    assert unet.is_gradient_checkpointing
    unet.train()
    e_w, e_l = family.pair_errors(unet, batch, *family.noisy_pair(batch), torch.float32)
    assert e_w.shape == e_l.shape == (2,) and bool(torch.isfinite(torch.cat([e_w, e_l])).all())
    (e_w.sum() - e_l.sum()).backward()
    missing = [n for n, p in unet.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing[:5]
    unet.eval()
    SVD.export(unet.state_dict(), dict(unet.config), str(tmp_path / "unet"), torch.float32)
    loaded = SVD.denoiser_from_folder(str(tmp_path / "unet"), torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), unet.state_dict().values()))


def build_tiny_svd(root):
    """vae/ (AutoencoderKLTemporalDecoder, factor 8), image_encoder/ (CLIPVisionModelWithProjection, 32-wide
    projection = the tiny UNet's cross_attention_dim), feature_extractor/, scheduler/."""
    from diffusers import AutoencoderKLTemporalDecoder
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * 4, block_out_channels=(32,) * 4,
                                 latent_channels=4, sample_size=SIDE).save_pretrained(str(root / "vae"))
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=224, patch_size=56,
                                                   projection_dim=CONFIG["cross_attention_dim"])
                                  ).save_pretrained(str(root / "image_encoder"))
    CLIPImageProcessor().save_pretrained(str(root / "feature_extractor"))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SVD.SCHEDULER_CONFIG))
    return root


def test_encoder_conditions_both_clips_on_the_winners_first_frame_and_the_pipeline_samples(unet, tmp_path):
    from diffusers import AutoencoderKLTemporalDecoder
    from PIL import Image

    from dpo_ds.encode import PreparedVideoPair
    from dpo_ds.models import encoder_class

    model = build_tiny_svd(tmp_path / "model")
    encoder = encoder_class("svd")(str(model), None, torch.device("cpu"), torch.float32, 512, cond_aug=0.02, seed=3)
    pixels = torch.randint(0, 256, (2, 3, 3, SIDE, SIDE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pair = PreparedVideoPair("k", 0, "", pixels[0], pixels[1], {}, False, 0)
    tensors, meta = next(encoder.samples([pair], torch.float32, {"fps": 7.0}))
    again, _ = next(encoder.samples([pair], torch.float32, {"fps": 7.0}))
    assert all(torch.equal(tensors[n], again[n]) for n in tensors)  # the augmentation noise is the pair's own
    assert meta["family"] == "svd" and meta["latent_layout"] == "CFHW"
    assert tensors["latents_w"].shape == tensors["latents_l"].shape == (4, 3, SIDE // 8, SIDE // 8)
    assert tensors["image_latents"].shape == (4, SIDE // 8, SIDE // 8) and tensors["image_embeds"].shape == (1, 32)
    assert tensors["added_time_ids"].tolist() == pytest.approx([6.0, 127.0, 0.02])
    vae = AutoencoderKLTemporalDecoder.from_pretrained(str(model / "vae")).eval()
    with torch.no_grad():
        first_w = vae.encode(pixels[0][:, 0][None].float() / 127.5 - 1).latent_dist.mode()[0]
        first_l = vae.encode(pixels[1][:, 0][None].float() / 127.5 - 1).latent_dist.mode()[0]
        frames_w = vae.encode(pixels[0].permute(1, 0, 2, 3).float() / 127.5 - 1).latent_dist.mode()
    torch.testing.assert_close(tensors["latents_w"], frames_w.permute(1, 0, 2, 3) * vae.config.scaling_factor)
    # The winner's first frame, unscaled, up to its 0.02 noise augmentation; not the loser's.
    assert (tensors["image_latents"] - first_w).abs().max() < 0.1 < (tensors["image_latents"] - first_l).abs().max()
    assert torch.equal(encoder.condition(pixels[0][:, 0], "k")[1], tensors["image_embeds"])
    assert not torch.equal(encoder.condition(pixels[1][:, 0], "k")[1], tensors["image_embeds"])
    assert torch.equal(encoder.empty_prompt()["image_embeds"], torch.zeros(1, 32))

    # The family's schema holds the encoder's sample, and its UNet predicts on it.
    family = SVD.tiny()
    schema = family.sample_schema(CONFIG)
    assert all(schema[n] in (None, tuple(v.shape)) for n, v in tensors.items()) and schema.keys() == tensors.keys()
    batch = {n: v[None] for n, v in tensors.items()} | {"noise": torch.randn(1, 4, 3, 4, 4),
                                                         "t": torch.tensor([1.5], dtype=torch.float64)}
    with torch.no_grad():
        assert torch.isfinite(torch.cat(family.pair_errors(unet.eval(), batch, *family.noisy_pair(batch),
                                                           torch.float32))).all()

    # sample(): one image path per prompt line; the seed fixes the clip.
    Image.fromarray(pixels[0][:, 0].permute(1, 2, 0).numpy()).save(tmp_path / "first.png")
    pipe = SVD.pipeline(str(model), unet, SVD.sampling_scheduler(SVD.SCHEDULER_CONFIG, "euler"), torch.float32)
    clips = [SVD.sample(pipe, [str(tmp_path / "first.png")] * 2, [torch.Generator().manual_seed(0) for _ in "ab"],
                        steps=2, guidance_scale=2.0, height=SIDE, width=SIDE, num_frames=2) for _ in range(2)]
    assert clips[0].shape == (2, 2, SIDE, SIDE, 3) and clips[0].dtype == np.uint8
    assert np.array_equal(clips[0], clips[1]) and np.array_equal(clips[0][0], clips[0][1])
    with pytest.raises(ValueError, match="image path"):
        SVD.sample(pipe, ["a red square"], [torch.Generator()], steps=1, guidance_scale=1.0, height=SIDE,
                   width=SIDE, num_frames=2)


def test_encode_pairs_cli_conditions_each_pair_on_its_winners_first_frame(tmp_path):
    """tools/encode_pairs.py --family svd on two pairs of real mp4s, in one batch: pair 0's winner is video_1, so
    its conditioning is video_1's first frame (not the manifest's first column's); each pair's augmentation noise
    is its own; the time ids carry --fps − 1 and --cond-aug; the empty prompt is a zero image embedding."""
    av = pytest.importorskip("av", reason="PyAV is not installed: pip install -e '.[video]'")
    from safetensors.torch import load_file

    from test_encode import encode, ok, read_pairs
    from test_encode_video import write_video

    model = build_tiny_svd(tmp_path / "model")
    (tmp_path / "videos").mkdir()
    rows = []
    for i in range(2):
        for side in (0, 1):
            write_video(tmp_path / "videos" / f"{i}_{side}.mp4", seed=2 * i + side, fps=8, size=(SIDE, SIDE))
        rows.append({"caption": "", "video_0": f"{i}_0.mp4", "video_1": f"{i}_1.mp4",
                     "label_0": float(i), "label_1": float(1 - i)})
    (tmp_path / "videos" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = ok(encode("--family", "svd", "--manifest", str(tmp_path / "videos" / "pairs.jsonl"), "--model",
                        str(model), "--resolution", str(SIDE), "--num-frames", "3", "--fps", "8", "--cond-aug", "0.05",
                        "--batch-size", "2", "--num-workers", "1", "--out", str(tmp_path / "shards")))
    assert summary["pairs_written"] == 2
    pairs = {p["meta"]["source"]["row"]: (key, p) for key, p in read_pairs(tmp_path / "shards").items()}
    encoder = _encoder(model)
    encoder.cond_aug = 0.05  # and --seed 0, the CLI's default
    for row, winner, loser in ((0, "0_1.mp4", "0_0.mp4"), (1, "1_0.mp4", "1_1.mp4")):
        key, (meta, t) = pairs[row][0], (pairs[row][1]["meta"], pairs[row][1]["tensors"])
        assert meta["family"] == "svd" and meta["source"]["cond_aug"] == 0.05
        assert t["added_time_ids"].tolist() == pytest.approx([7.0, 127.0, 0.05])
        first = {}
        for name in (winner, loser):
            with av.open(str(tmp_path / "videos" / name)) as container:
                frame = next(container.decode(container.streams.video[0])).to_ndarray(format="rgb24")
            first[name] = encoder.condition(torch.from_numpy(frame).permute(2, 0, 1), key)
        torch.testing.assert_close(t["image_latents"].float(), first[winner][0], atol=2e-3, rtol=1e-2)
        torch.testing.assert_close(t["image_embeds"].float(), first[winner][1], atol=2e-3, rtol=1e-2)
        assert (t["image_latents"].float() - first[loser][0]).abs().max() > 0.05
        other_noise = encoder.condition(torch.from_numpy(frame).permute(2, 0, 1), key + "x")[0]
        assert not torch.equal(other_noise, first[loser][0])  # the augmentation noise is the pair's own
    empty = load_file(str(tmp_path / "shards" / "empty_prompt.safetensors"))
    assert set(empty) == {"image_embeds"} and not empty["image_embeds"].abs().any()


def _encoder(model):
    from dpo_ds.models import encoder_class

    return encoder_class("svd")(str(model), None, torch.device("cpu"), torch.float32, 512)


def test_sample_tool_conditions_on_the_image_paths_of_the_prompt_file(tmp_path, capsys):
    """tools/sample.py --family svd: each --prompts line is a conditioning image; reference and policy clips
    are written as strips, and a perturbed UNet samples other clips; a line that is not a file is refused."""
    from PIL import Image

    from test_tools_export_sample_score import load_tool
    from tiny_sdxl import _make_synthetic

    base = build_tiny_svd(tmp_path / "base")
    _make_synthetic().write_model(str(base), seed=0, family="svd")
    policy = SVD.denoiser_from_folder(str(base / "unet"), torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    policy.save_pretrained(str(tmp_path / "policy"))
    for i in range(2):
        colour = np.zeros((SIDE, SIDE, 3), np.uint8) + np.uint8(60 + 90 * i)
        Image.fromarray(colour).save(tmp_path / f"image{i}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{tmp_path / 'image0.png'}\n{tmp_path / 'image1.png'}\n")
    args = ["--family", "svd", "--base", str(base), "--unet", str(tmp_path / "policy"), "--prompts", str(prompts),
            "--steps", "2", "--guidance-scale", "2.0", "--height", str(SIDE), "--width", str(SIDE),
            "--num-frames", "2", "--no-progress"]
    sample = load_tool("sample")
    assert sample.main([*args, "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert summary["family"] == "svd" and summary["num_frames"] == 2 and len(summary["samples"]) == 2
    strips = {side: [np.asarray(Image.open(tmp_path / "out" / r[side]).convert("RGB")) for r in summary["samples"]]
              for side in ("reference", "policy")}
    assert all(s.shape == (SIDE, 2 * SIDE, 3) for side in strips.values() for s in side)
    assert any(not np.array_equal(a, b) for a, b in zip(strips["reference"], strips["policy"]))
    prompts.write_text("a red square\n")
    assert sample.main([*args, "--out", str(tmp_path / "bad")]) == 2
    assert "each line is an image path" in capsys.readouterr().err
