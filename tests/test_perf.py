"""perf/tflops and perf/mfu: the model FLOPs counted at start (dpo_ds.perf) and the scalars made of them.
The launcher run that logs perf/tflops is tests/test_e2e.py's."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dpo_ds import models, perf
from dpo_ds.config import load_config
from dpo_ds.metrics import perf_scalars
from dpo_ds.models.sdxl import SDXL

SHAPE = (4, 8, 8)  # the tiny SDXL UNet's latents (64 pixels)


def _pair_flops(trainable=None) -> int:
    return perf.pair_flops(SDXL.tiny(64), dict(SDXL.TINY_DENOISER_CONFIG), trainable, SHAPE, torch.float32)


def test_weight_gradient_of_one_conv_counted_as_by_hand():
    """Training conv_out's weight on top of its bias adds exactly that conv's weight gradient: per pair
    2 samples x 2 FLOPs x C_out x C_in x 3 x 3 x H x W; nothing upstream needs a gradient in either run."""
    cfg = SDXL.TINY_DENOISER_CONFIG
    c_in, (h, w) = cfg["block_out_channels"][0], SHAPE[1:]
    by_hand = 2 * 2 * cfg["out_channels"] * c_in * 3 * 3 * h * w
    assert _pair_flops(["conv_out.weight"]) - _pair_flops(["conv_out.bias"]) == by_hand


def test_forward_and_backward_is_about_three_forwards():
    """Against the real model's forward on CPU, counted apart: backward costs about twice the forward
    (a little less: the input layer needs no input gradient)."""
    family = SDXL.tiny(64)
    torch.manual_seed(0)
    unet = family.denoiser_from_config(dict(SDXL.TINY_DENOISER_CONFIG))
    g = torch.Generator().manual_seed(0)
    batch = {k: v[None] for k, v in family.synthetic_conditioning(unet.config, 64, g, torch.float32).items()}
    batch.update(latents_w=torch.randn(1, *SHAPE), latents_l=torch.randn(1, *SHAPE), noise=torch.randn(1, *SHAPE),
                 t=torch.tensor([500.0]))
    x_t, _, t = family.noisy_pair(batch)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        family.predict(unet, x_t, t, batch, torch.float32)
    forward = counter.get_total_flops()
    assert 2.7 * forward < _pair_flops() < 3.05 * forward


@pytest.mark.parametrize("name", sorted(models.FAMILIES))
def test_every_familys_pair_is_counted_on_the_meta_device(name):
    """Each family's tiny denoiser, as the trainer counts it at start (svd's mix factors were built on the
    CPU inside the meta device and stopped its first run)."""
    cls = models.family_class(name)
    shape = (4, 2, 8, 8) if cls.LATENT_LAYOUT == "CFHW" else (4, 8, 8)
    flops = perf.pair_flops(cls.tiny(64), cls.TINY_DENOISER_CONFIG, cls.DEFAULT_TRAINABLE, shape, torch.float32)
    assert flops > 1e6


def test_frozen_weights_cost_no_weight_gradient():
    assert _pair_flops(["conv_out.*"]) < 0.6 * _pair_flops()


@pytest.mark.parametrize("setting, device, expected", [
    (None, None, None),                       # CPU, nothing configured: no perf/mfu
    (None, "NVIDIA H100 80GB HBM3", 989.0),   # detected from torch.cuda.get_device_name()
    (None, "NVIDIA A100-SXM4-80GB", 312.0),
    (None, "NVIDIA GeForce RTX 4090", None),  # not in the table
    ("b200", None, 2250.0),
    (123.5, "NVIDIA H100 80GB HBM3", 123.5),  # a number wins over the device
])
def test_peak(setting, device, expected):
    assert perf.peak_tflops(setting, device) == expected


def test_mfu_only_with_a_peak():
    assert perf_scalars(6e12, 2.0, None) == {"perf/tflops": 3.0}
    assert perf_scalars(6e12, 2.0, 300.0) == {"perf/tflops": 3.0, "perf/mfu": pytest.approx(0.01)}


def test_peak_setting_validated():
    base = ["--output_dir=o", "--model.pretrained_path=m", "--data.shards=s", "--train.max_steps=1"]
    assert load_config(None, base + ["--logging.peak_tflops=312"]).logging.peak_tflops == 312
    assert load_config(None, base + ["--logging.peak_tflops=H200"]).logging.peak_tflops == "H200"
    with pytest.raises(ValueError, match=r"logging\.peak_tflops: unknown device 'V100'"):
        load_config(None, base + ["--logging.peak_tflops=V100"])
