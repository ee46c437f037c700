"""Forward-process mathematics against diffusers' scheduler, and the seeded draw."""

import functools
import subprocess
import sys

import pytest
import torch

from dpo_ds.models.ddpm import DDPMProcess, uniform_timestep
from dpo_ds.noise import draw

SDXL = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon"}
LAW = functools.partial(uniform_timestep, lo=0, hi=1000)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_match_diffusers(schedule, zero_snr):
    from diffusers import DDPMScheduler

    cfg = {**SDXL, "beta_schedule": schedule, "rescale_betas_zero_snr": zero_snr}
    ours = DDPMProcess.from_config(cfg)
    theirs = DDPMScheduler.from_config(cfg)
    assert torch.allclose(ours.alphas_cumprod, theirs.alphas_cumprod, atol=1e-6)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    # sqrt(1 - ᾱ) near t=0 amplifies float32 rounding of ᾱ, hence 1e-4 here.
    assert torch.allclose(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), atol=1e-4)
    # The draw's value is a float64 holding an integer: the same coefficients.
    assert torch.equal(ours.add_noise(x0, noise, t.double()), ours.add_noise(x0, noise, t))


def test_targets_per_prediction_type():
    from diffusers import DDPMScheduler

    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    assert torch.equal(DDPMProcess.from_config(SDXL).target(x0, noise, t), noise)
    v_ours = DDPMProcess.from_config(SDXL, "v_prediction").target(x0, noise, t)
    v_theirs = DDPMScheduler.from_config({**SDXL, "prediction_type": "v_prediction"}).get_velocity(x0, noise, t)
    assert torch.allclose(v_ours, v_theirs, atol=1e-5)


def test_unknown_prediction_type_and_schedule_raise():
    with pytest.raises(ValueError, match="prediction_type"):
        DDPMProcess.from_config({**SDXL, "prediction_type": "sample"})
    with pytest.raises(ValueError, match="flow family"):
        DDPMProcess.from_config(SDXL, "flow")
    with pytest.raises(ValueError, match="beta_schedule"):
        DDPMProcess.from_config({**SDXL, "beta_schedule": "sigmoid"})


def test_draw_is_a_pure_function():
    t1, n1 = draw(7, "pair00001", 0, (4, 8, 8), LAW)
    t2, n2 = draw(7, "pair00001", 0, (4, 8, 8), LAW)
    assert t1 == t2 and torch.equal(n1, n2)
    assert isinstance(t1, float) and t1 == int(t1)
    assert n1.dtype == torch.float32 and n1.shape == (4, 8, 8)
    # Global RNG state must not leak in or out.
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    draw(7, "pair00001", 0, (4, 8, 8), LAW)
    assert torch.equal(torch.rand(1), before)


def test_draw_is_the_integer_timestep_then_the_noise_from_one_generator():
    """The law takes the generator first: a cache made before t became a float holds the same draws."""
    from dpo_ds.noise import draw_seed

    g = torch.Generator().manual_seed(draw_seed(7, "k", 3))
    t = int(torch.randint(0, 1000, (1,), generator=g).item())
    eps = torch.randn((4, 8, 8), generator=g)
    t2, eps2 = draw(7, "k", 3, (4, 8, 8), LAW)
    assert t2 == float(t) and torch.equal(eps2, eps)


def test_draws_differ_by_seed_key_and_index():
    base = draw(7, "a", 0, (16,), LAW)[1]
    for args in [(8, "a", 0), (7, "b", 0), (7, "a", 1)]:
        assert not torch.equal(draw(*args, (16,), LAW)[1], base), args


def test_draw_identical_across_processes():
    code = ("import functools; from dpo_ds.noise import draw; from dpo_ds.models.ddpm import uniform_timestep; "
            "t, n = draw(3, 'k', 2, (4, 4), functools.partial(uniform_timestep, lo=0, hi=1000)); "
            "print(t, n.sum().item().hex(), n[0, 0].item().hex())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    t, n = draw(3, "k", 2, (4, 4), LAW)
    assert outs == {f"{t} {n.sum().item().hex()} {n[0, 0].item().hex()}\n"}


def test_timestep_range_is_respected():
    law = functools.partial(uniform_timestep, lo=100, hi=200)
    ts = [draw(0, f"k{i}", 0, (1,), law)[0] for i in range(200)]
    assert min(ts) >= 100 and max(ts) < 200 and len(set(ts)) > 50


def test_prompt_dropout_is_part_of_the_seeded_draw():
    """Which pairs train on the empty prompt: a pure function of (seed, key, draw index) at the given rate,
    from a generator of its own, so t and the noise are those of a run without dropout."""
    from dpo_ds.noise import is_prompt_dropped

    keys = [f"k{i}" for i in range(2000)]
    dropped = [is_prompt_dropped(7, k, 0, 0.2) for k in keys]
    assert dropped == [is_prompt_dropped(7, k, 0, 0.2) for k in keys]
    assert abs(sum(dropped) / len(keys) - 0.2) < 0.03  # binomial standard error 0.009
    assert dropped != [is_prompt_dropped(7, k, 1, 0.2) for k in keys]  # another epoch, another choice
    assert not any(is_prompt_dropped(7, k, 0, 0.0) for k in keys)
    t, eps = draw(7, "k1", 0, (4, 8, 8), LAW)
    is_prompt_dropped(7, "k1", 0, 0.5)
    assert draw(7, "k1", 0, (4, 8, 8), LAW)[0] == t and torch.equal(draw(7, "k1", 0, (4, 8, 8), LAW)[1], eps)
