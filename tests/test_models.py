"""Model families: the contract's draw, noising, target and error against direct formulas; schemas;
conditioning; loading errors."""

import importlib.util
import math

import pytest
import torch

from dpo_ds import models, noise
from dpo_ds.models import sd15, sdxl
from dpo_ds.models.family import Family

FAMILIES = {"sdxl": sdxl.SDXL, "sd15": sd15.SD15}


def _family(name: str, prediction_type=None, timestep_range=None) -> Family:
    cls = FAMILIES[name]
    return cls(cls.SCHEDULER_CONFIG, prediction_type, 64, 8, timestep_range)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_and_unet(request):
    cls = FAMILIES[request.param]
    torch.manual_seed(0)
    return _family(request.param), cls.denoiser_from_config(cls.TINY_DENOISER_CONFIG).eval()


def _batch(schema, b=3):
    g = torch.Generator().manual_seed(1)
    batch = {name: torch.randn(b, *shape, generator=g) for name, shape in schema.items()}
    batch["noise"] = torch.randn(b, *schema["latents_w"], generator=g)
    batch["t"] = torch.tensor([5.0, 400.0, 990.0], dtype=torch.float64)
    return batch


def test_every_family_is_registered_under_its_name():
    assert {name: cls.NAME for name, cls in models.FAMILIES.items()} == {n: n for n in models.FAMILIES}
    with pytest.raises(ValueError, match="is not one of"):
        models.family_class("sd3")


def test_schemas_follow_the_unet_config():
    schema = _family("sdxl").sample_schema(sdxl.SDXL.TINY_DENOISER_CONFIG)
    assert schema["latents_w"] == (4, 8, 8) and schema["prompt_embeds"] == (77, 64)
    assert schema["pooled_prompt_embeds"] == (32,) and schema["time_ids_l"] == (6,)
    assert _family("sd15").sample_schema(sd15.SD15.TINY_DENOISER_CONFIG) == {
        "latents_w": (4, 8, 8), "latents_l": (4, 8, 8), "prompt_embeds": (77, 32)}
    with pytest.raises(ValueError, match="multiple"):
        sdxl.SDXL(sdxl.SDXL.SCHEDULER_CONFIG, None, 60, 8)
    with pytest.raises(ValueError, match="use model.family=sdxl"):
        _family("sd15").sample_schema(sdxl.SDXL.TINY_DENOISER_CONFIG)


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_noising_and_target_against_the_formulas(name, prediction_type):
    """x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε; target ε, or v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x0."""
    family = _family(name, prediction_type)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0.0, 499.0, 999.0], dtype=torch.float64)
    x_t, target = family.noisy(x0, eps, t)
    a = alphas_cumprod[t.long()].sqrt().view(-1, 1, 1, 1)
    s = (1 - alphas_cumprod[t.long()]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(x_t.double(), a * x0.double() + s * eps.double(), atol=1e-5)
    expected = eps.double() if prediction_type == "epsilon" else a * eps.double() - s * x0.double()
    assert torch.allclose(target.double(), expected, atol=1e-5)
    assert family.noise_level(t).tolist() == [0.0, 0.499, 0.999]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_ddpm_draw_law(name):
    """t uniform over the integer timesteps of data.timestep_range, drawn before the noise; the law is fingerprinted."""
    family = _family(name, timestep_range=(100, 300))
    ts = [noise.draw(0, f"k{i}", 0, (4, 8, 8), family.draw_t)[0] for i in range(400)]
    assert all(t == int(t) and 100 <= t < 300 for t in ts)
    assert abs(sum(ts) / len(ts) - 199.5) < 6  # mean of U{100..299}; its standard error is 2.9
    law = family.draw_law()
    assert law["timestep_range"] == [100, 300] and law["prediction_type"] == "epsilon"
    assert law != _family(name).draw_law()
    with pytest.raises(ValueError, match="timestep_range"):
        _family(name, timestep_range=(500, 1200))


def test_a_perfect_prediction_has_zero_error_and_the_error_is_the_mean_square():
    family = _family("sd15")
    target = torch.randn(4, 4, 8, 8)
    t = torch.zeros(4, dtype=torch.float64)
    assert torch.equal(family.error(target.clone(), target, t), torch.zeros(4))
    assert torch.allclose(family.error(target + 2.0, target, t), torch.full((4,), 4.0))


def test_pair_errors_run_one_forward_on_winners_then_losers(family_and_unet):
    family, unet = family_and_unet
    schema = family.sample_schema(dict(unet.config))
    batch = _batch(schema)
    x_t, target, t = family.noisy_pair(batch)
    assert x_t.shape == (6, 4, 8, 8) and torch.equal(t, batch["t"].repeat(2))
    with torch.no_grad():
        e_w, e_l = family.pair_errors(unet, batch, x_t, target, t, torch.float32)
        # Winner i's error is the mean square of the network's output on it against its target.
        pred = unet(x_t[:1], t[:1].long(), encoder_hidden_states=batch["prompt_embeds"][:1],
                    added_cond_kwargs={"text_embeds": batch["pooled_prompt_embeds"][:1],
                                       "time_ids": batch["time_ids_w"][:1]} if family.NAME == "sdxl" else None,
                    return_dict=False)[0]
    assert e_w.shape == e_l.shape == (3,)
    assert math.isclose(e_w[0].item(), (pred - target[:1]).pow(2).mean().item(), rel_tol=1e-4)


def test_sdxl_uses_each_images_time_ids():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    family, unet = _family("sdxl"), UNet2DConditionModel.from_config(sdxl.SDXL.TINY_DENOISER_CONFIG).eval()
    batch = _batch(family.sample_schema(dict(unet.config)))
    batch["latents_l"] = batch["latents_w"].clone()
    x_t, target, t = family.noisy_pair(batch)
    with torch.no_grad():
        e_w, e_l = family.pair_errors(unet, batch, x_t, target, t, torch.float32)
        assert not torch.allclose(e_w, e_l)  # time_ids_w != time_ids_l
        batch["time_ids_l"] = batch["time_ids_w"].clone()
        e_w2, e_l2 = family.pair_errors(unet, batch, x_t, target, t, torch.float32)
    assert torch.allclose(e_w2, e_l2, atol=1e-6)  # identical latents and conditioning


def test_synthetic_samples_follow_the_schema_and_sample_as_training_conditions_a_winner(family_and_unet):
    """synthetic_conditioning completes a sample's schema; sampling_kwargs conditions the denoiser as the
    trainer conditions the pair's winner."""
    family, unet = family_and_unet
    schema = family.sample_schema(dict(unet.config))
    g = torch.Generator().manual_seed(0)
    sample = {name: torch.randn(schema[name], generator=g).half() for name in ("latents_w", "latents_l")}
    sample.update(family.synthetic_conditioning(dict(unet.config), 64, g, torch.float16))
    assert {name: tuple(t.shape) for name, t in sample.items()} == schema
    x, t = torch.randn(2, *schema["latents_w"], generator=g), torch.tensor([10, 10])
    with torch.no_grad():
        pair = unet(x, t, **family.unet_kwargs({n: v[None].float() for n, v in sample.items()}, torch.float32)).sample
        sampled = unet(x[:1], t[:1], **family.sampling_kwargs(sample, 1, torch.float32)).sample
    assert torch.allclose(sampled[0], pair[0], atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed here")
def test_xformers_asked_for_but_missing_is_a_clear_error(family_and_unet):
    family, unet = family_and_unet
    with pytest.raises(ValueError, match="xformers is not installed"):
        family.set_attention(unet, "xformers")


def test_missing_unet_folder_is_a_clear_error(tmp_path):
    for cls in models.FAMILIES.values():
        with pytest.raises(ValueError, match=f"has no {cls.DENOISER_SUBFOLDER}/config.json"):
            cls.load_denoiser(str(tmp_path), None)


# ------------------------------------------------------------ unet3d: ModelScope-layout text-to-video UNet, CFHW

def _unet3d(prediction_type=None, timestep_range=None) -> Family:
    from dpo_ds.models.unet3d import UNet3D

    return UNet3D(UNet3D.SCHEDULER_CONFIG, prediction_type, 64, 8, timestep_range)


def _video_batch(b=3, frames=3):
    g = torch.Generator().manual_seed(1)
    batch = {name: torch.randn(b, 4, frames, 8, 8, generator=g) for name in ("latents_w", "latents_l", "noise")}
    batch["prompt_embeds"] = torch.randn(b, 77, 32, generator=g)
    batch["t"] = torch.tensor([5.0, 400.0, 990.0], dtype=torch.float64)
    return batch


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_unet3d_noises_cfhw_clips_with_the_ddpm_formulas(prediction_type):
    """Every frame of a clip at the pair's one timestep: x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε; target ε or
    v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x0."""
    family = _unet3d(prediction_type)
    assert family.LATENT_LAYOUT == "CFHW" and family.draw_law()["prediction_type"] == prediction_type
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # ModelScope's scaled_linear
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    x0, eps = torch.randn(3, 4, 5, 8, 8), torch.randn(3, 4, 5, 8, 8)
    t = torch.tensor([0.0, 499.0, 999.0], dtype=torch.float64)
    x_t, target = family.noisy(x0, eps, t)
    a = alphas_cumprod[t.long()].sqrt().view(-1, 1, 1, 1, 1)
    s = (1 - alphas_cumprod[t.long()]).sqrt().view(-1, 1, 1, 1, 1)
    assert torch.allclose(x_t.double(), a * x0.double() + s * eps.double(), atol=1e-5)
    expected = eps.double() if prediction_type == "epsilon" else a * eps.double() - s * x0.double()
    assert torch.allclose(target.double(), expected, atol=1e-5)
    assert family.noise_level(t).tolist() == [0.0, 0.499, 0.999]


def test_unet3d_draw_law_and_schema():
    family = _unet3d(timestep_range=(100, 300))
    ts = [noise.draw(0, f"k{i}", 0, (4, 3, 8, 8), family.draw_t)[0] for i in range(400)]
    assert all(t == int(t) and 100 <= t < 300 for t in ts)
    assert abs(sum(ts) / len(ts) - 199.5) < 6
    assert family.draw_law()["timestep_range"] == [100, 300] and family.draw_law() != _unet3d().draw_law()
    # The clip's frame count is an encoding choice: the latents' shape is open, the prompt's pinned.
    assert family.sample_schema(family.TINY_DENOISER_CONFIG) == {
        "latents_w": None, "latents_l": None, "prompt_embeds": (77, 32)}
    assert models.family_class("unet3d") is type(family)


def test_unet3d_predicts_winners_then_losers_of_bcfhw_clips_and_samples_as_it_trains():
    from diffusers import UNet3DConditionModel

    family = _unet3d()
    torch.manual_seed(0)
    unet = family.denoiser_from_config(family.TINY_DENOISER_CONFIG)
    assert isinstance(unet, UNet3DConditionModel)
    unet.train()  # the policy's mode: dropout is off, so two forwards agree
    batch = _video_batch()
    x_t, target, t = family.noisy_pair(batch)
    assert x_t.shape == (6, 4, 3, 8, 8)
    with torch.no_grad():
        e_w, e_l = family.pair_errors(unet, batch, x_t, target, t, torch.float32)
        again = family.pair_errors(unet, batch, x_t, target, t, torch.float32)
        # Loser 1 (sample 4 of the 2B) is conditioned on pair 1's prompt, at pair 1's timestep.
        pred = unet(x_t[4:5], t[4:5].long(), encoder_hidden_states=batch["prompt_embeds"][1:2], return_dict=False)[0]
        sampled = unet(x_t[4:5], t[4:5].long(), **family.sampling_kwargs(
            {"prompt_embeds": batch["prompt_embeds"][1]}, 1, torch.float32), return_dict=False)[0]
    assert torch.equal(e_w, again[0]) and torch.equal(e_l, again[1])
    assert math.isclose(e_l[1].item(), (pred - target[4:5]).pow(2).mean().item(), rel_tol=1e-4)
    assert torch.allclose(sampled, pred, atol=1e-6)


def test_unet3d_gradient_checkpointing_recomputes_blocks_and_keeps_the_gradients():
    """diffusers' UNet3DConditionModel refuses enable_gradient_checkpointing; the family checkpoints its blocks."""
    family = _unet3d()
    torch.manual_seed(0)
    unet = family.denoiser_from_config(family.TINY_DENOISER_CONFIG).train()
    batch = _video_batch()
    x_t, target, t = family.noisy_pair(batch)

    def grads():
        e_w, e_l = family.pair_errors(unet, batch, x_t, target, t, torch.float32)
        return torch.autograd.grad((e_w - e_l).sum(), list(unet.parameters()))

    plain = grads()
    family.enable_gradient_checkpointing(unet)
    calls = []
    unet.down_blocks[0].resnets[0].register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    checkpointed = grads()
    assert len(calls) == 2  # once in the forward, once more when the backward recomputes the block
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(plain, checkpointed))


# ------------------------------------------------------------ motion: AnimateDiff's UNetMotionModel, CFHW

def test_motion_trains_its_motion_modules_by_default_and_conditions_every_frame_on_the_prompt(tmp_path):
    from diffusers import DDIMScheduler, UNetMotionModel

    from dpo_ds.models.motion import Motion
    from tiny_sdxl import build_tiny_sd15

    family = Motion(Motion.SCHEDULER_CONFIG, None, 64, 8)
    assert models.family_class("motion") is Motion and family.LATENT_LAYOUT == "CFHW"
    assert family.sample_schema(family.TINY_DENOISER_CONFIG) == {
        "latents_w": None, "latents_l": None, "prompt_embeds": (77, 32)}
    torch.manual_seed(0)
    unet = family.denoiser_from_config(family.TINY_DENOISER_CONFIG).eval()
    assert isinstance(unet, UNetMotionModel)
    models.select_trainable(unet, family.DEFAULT_TRAINABLE)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in unet.named_parameters() if "motion_modules." in n}
    assert any(n.startswith("mid_block.") for n in trainable) and any(n.startswith("up_blocks.") for n in trainable)

    batch = _video_batch()
    x_t, target, t = family.noisy_pair(batch)
    with torch.no_grad():
        e_w, e_l = family.pair_errors(unet, batch, x_t, target, t, torch.float32)
        # Loser 1 (sample 4 of the 2B): pair 1's prompt once per frame, as AnimateDiffPipeline passes it.
        prompt = batch["prompt_embeds"][1:2].repeat_interleave(3, dim=0)
        pred = unet(x_t[4:5], t[4:5].long(), encoder_hidden_states=prompt, return_dict=False)[0]
        sampled = unet(x_t[4:5], t[4:5].long(), return_dict=False, **family.sampling_kwargs(
            {"prompt_embeds": batch["prompt_embeds"][1], "latents_w": batch["latents_w"][1]}, 1, torch.float32))[0]
    assert math.isclose(e_l[1].item(), (pred - target[4:5]).pow(2).mean().item(), rel_tol=1e-4)
    assert torch.allclose(sampled, pred, atol=1e-6)

    base = build_tiny_sd15(tmp_path / "base")  # vae/, text_encoder/, tokenizer/ of SD 1.5's layout
    pipe = family.pipeline(str(base), unet, DDIMScheduler.from_config(family.SCHEDULER_CONFIG), torch.float32)
    frames = pipe("a red square", num_frames=3, height=64, width=64, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="pt").frames
    assert tuple(frames.shape) == (1, 3, 3, 64, 64)  # [B, F, 3, H, W]
