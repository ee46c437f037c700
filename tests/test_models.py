"""SDXL model spec: conditioning call, schema, attention choice, loading errors."""

import importlib.util

import pytest
import torch

from dpo_ds.models import noisy_pair, pair_errors, sdxl
from dpo_ds.noise import NoiseSchedule


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(sdxl.TINY_UNET_CONFIG).eval()


def _batch(schema, b=3):
    g = torch.Generator().manual_seed(1)
    batch = {name: torch.randn(b, *shape, generator=g) for name, shape in schema.items()}
    batch["noise"] = torch.randn(b, *schema["latents_w"], generator=g)
    batch["timesteps"] = torch.tensor([5, 400, 990])
    return batch


def test_schema_follows_the_unet_config():
    schema = sdxl.sample_schema(sdxl.TINY_UNET_CONFIG, resolution=64, vae_scale_factor=8)
    assert schema["latents_w"] == (4, 8, 8) and schema["prompt_embeds"] == (77, 64)
    assert schema["pooled_prompt_embeds"] == (32,) and schema["time_ids_l"] == (6,)
    with pytest.raises(ValueError, match="multiple"):
        sdxl.sample_schema(sdxl.TINY_UNET_CONFIG, resolution=60, vae_scale_factor=8)


def test_pair_errors_use_each_images_time_ids(unet):
    schema = sdxl.sample_schema(sdxl.TINY_UNET_CONFIG, 64, 8)
    batch = _batch(schema)
    batch["latents_l"] = batch["latents_w"].clone()
    schedule = NoiseSchedule.from_config(sdxl.SDXL_SCHEDULER_CONFIG)
    x_t, target, t = noisy_pair(batch, schedule)
    assert x_t.shape == (6, 4, 8, 8) and torch.equal(t, batch["timesteps"].repeat(2))
    with torch.no_grad():
        e_w, e_l = pair_errors(sdxl, unet, batch, x_t, target, t, torch.float32)
        assert e_w.shape == (3,) and torch.allclose(e_w, e_l) is False  # time_ids_w != time_ids_l
        batch["time_ids_l"] = batch["time_ids_w"].clone()
        e_w2, e_l2 = pair_errors(sdxl, unet, batch, x_t, target, t, torch.float32)
    assert torch.allclose(e_w2, e_l2, atol=1e-6)  # identical latents and conditioning


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed here")
def test_xformers_asked_for_but_missing_is_a_clear_error(unet):
    with pytest.raises(ValueError, match="xformers is not installed"):
        sdxl.set_attention(unet, "xformers")


def test_missing_unet_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="has no unet/config.json"):
        sdxl.load_denoiser(str(tmp_path), None)
