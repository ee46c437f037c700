"""End to end through the real `deepspeed` launcher: 2 CPU processes, ZeRO-3, tiny SDXL-shaped UNet."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import deepspeed_train, fork_train, read_scalars, write_run_config
from samples import FAMILY, make_sample

pytestmark = pytest.mark.slow

SCALARS = ["train/loss", "train/implicit_acc", "train/reward_margin", "train/model_err_w", "train/model_err_l",
           "train/ref_err_w", "train/ref_err_l", "train/gap_w", "train/gap_l", "train/saturation",
           "train/grad_norm", "train/lr", "perf/pairs_per_s", "perf/step_time_s", "perf/data_wait_frac",
           "perf/tflops"]
MAX_STEPS = 6  # 32 pairs / (2 ranks x 2 pairs) = 8 micro-batches per epoch


def _unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def _ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory) -> Path:
    """One uninterrupted run of MAX_STEPS steps, checkpoints every 2, keep 2."""
    out = tmp_path_factory.mktemp("straight")
    cfg = write_run_config(out / "run.yaml", tiny, out / "run", train={"max_steps": MAX_STEPS})
    proc = deepspeed_train(cfg)
    _ok(proc)
    (out / "train.log").write_text(proc.stderr)
    return out / "run"


def test_logged_parameter_count_is_the_models(straight, tiny):
    """ZeRO-3 partitions the parameters inside deepspeed.initialize, leaving each rank empty placeholders:
    the count logged is the model's, not what is left on a rank."""
    from diffusers import UNet2DConditionModel

    num_params = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(str(tiny / "model" / "unet")).parameters())
    assert f"policy: {num_params:,} trainable parameters, ZeRO stage 3" in (straight.parent / "train.log").read_text()


def test_every_scalar_logged_and_finite(straight):
    scalars = read_scalars(straight / "tensorboard")
    for name in SCALARS:
        assert name in scalars, f"{name} missing from TensorBoard"
        steps = [s for s, _ in scalars[name]]
        assert steps == list(range(1, MAX_STEPS + 1)), (name, steps)
        assert all(math.isfinite(v) for _, v in scalars[name]), name
    assert all(v > 0 for _, v in scalars["perf/tflops"])
    assert "perf/mfu" not in scalars  # CPU, no logging.peak_tflops: no peak to divide by
    # At step 1 the policy is the reference: z = 0 exactly, loss = log 2.
    assert scalars["train/loss"][0][1] == pytest.approx(math.log(2), abs=1e-6)
    assert scalars["train/gap_w"][0][1] == pytest.approx(0.0, abs=1e-7)
    assert scalars["train/loss"][-1][1] != pytest.approx(math.log(2), abs=1e-4)


def test_every_trained_parameter_moved(straight, tiny):
    initial = _unet_weights(tiny / "model" / "unet")
    trained = _unet_weights(straight / "export" / "unet")
    assert initial.keys() == trained.keys()
    unmoved = [name for name in initial if torch.equal(initial[name], trained[name])]
    assert not unmoved, f"{len(unmoved)} parameters did not move: {unmoved[:5]}"


def test_checkpoints_complete_and_pruned(straight):
    ckpt = straight / "checkpoints"
    assert (ckpt / "latest").read_text() == f"step_{MAX_STEPS:08d}"
    tags = sorted(p.name for p in ckpt.iterdir() if p.is_dir())
    assert tags == [f"step_{MAX_STEPS - 2:08d}", f"step_{MAX_STEPS:08d}"]  # keep_last = 2
    assert (ckpt / tags[-1] / "COMPLETE").is_file()
    assert (straight / "config.yaml").is_file()


def test_export_loads_and_equals_trained_weights(straight):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from diffusers import UNet2DConditionModel

    trained = get_fp32_state_dict_from_zero_checkpoint(str(straight / "checkpoints"), tag=f"step_{MAX_STEPS:08d}")
    unet = UNet2DConditionModel.from_pretrained(str(straight / "export" / "unet"))
    exported = unet.state_dict()
    for name, value in trained.items():
        assert torch.equal(exported[name], value.float()), name

    reference = UNet2DConditionModel.from_config(unet.config)
    reference.load_state_dict(trained)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    cond = FAMILY.sampling_kwargs(make_sample(0)[2], 2, torch.float32)
    with torch.no_grad():
        assert torch.equal(unet(x, t, **cond).sample, reference(x, t, **cond).sample)


def test_resume_restores_step_and_data_position(straight, tiny, tmp_path):
    """Stop after 3 steps (mid-epoch), resume to MAX_STEPS: same weights as the straight run."""
    cfg = write_run_config(tmp_path / "run.yaml", tiny, tmp_path / "run",
                           train={"max_steps": 3}, checkpoint={"every_steps": 3, "keep_last": 2})
    _ok(fork_train(cfg))
    resumed = fork_train(cfg, f"--train.max_steps={MAX_STEPS}", "--checkpoint.resume=auto")
    _ok(resumed)
    assert "resumed from" in resumed.stderr and "at step 3 (epoch 0, batch 3)" in resumed.stderr
    steps = [s for s, _ in read_scalars(tmp_path / "run" / "tensorboard")["train/loss"]]
    assert steps == list(range(1, MAX_STEPS + 1))
    a = _unet_weights(straight / "export" / "unet")
    b = _unet_weights(tmp_path / "run" / "export" / "unet")
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"


def test_gradient_accumulation_matches_a_larger_micro_batch(tiny, tmp_path):
    """2 micro-batches of 2 pairs accumulated = 1 micro-batch of 4 (same pairs: one loader worker per rank).

    Compared through the logged gradient norm and the next step's loss: Adam's
    normalisation amplifies rounding in near-zero gradients, so weights are not.
    """
    scalars = {}
    for name, micro, accum in (("big", 4, 1), ("accum", 2, 2)):
        cfg = write_run_config(tmp_path / f"{name}.yaml", tiny, tmp_path / name,
                               train={"max_steps": 2, "micro_batch_size": micro, "grad_accum": accum},
                               checkpoint={"every_steps": 100, "export": False})
        _ok(fork_train(cfg))
        scalars[name] = read_scalars(tmp_path / name / "tensorboard")
        assert [s for s, _ in scalars[name]["train/loss"]] == [1, 2]
    big, acc = scalars["big"], scalars["accum"]
    assert acc["train/grad_norm"][0][1] == pytest.approx(big["train/grad_norm"][0][1], rel=1e-4)
    assert acc["train/grad_norm"][0][1] > 0
    assert acc["train/loss"][1][1] == pytest.approx(big["train/loss"][1][1], rel=1e-3)
    assert acc["perf/pairs_per_s"][0][1] > 0


def test_optimizer_offload_matches_adam_on_the_device(straight, tiny, tmp_path):
    """ds_configs/zero3_offload.json (DeepSpeed's CPU Adam on host-resident optimizer state) trains
    the same as zero3.json (torch AdamW beside the shards, the straight run: same settings, a constant
    learning rate, so its first steps are those of a 3-step run): same first gradient, same losses after
    the first updates."""
    cfg = write_run_config(tmp_path / "offload.yaml", tiny, tmp_path / "offload", train={"max_steps": 3},
                           checkpoint={"every_steps": 100, "export": False})
    proc = fork_train(cfg, ds_config="ds_configs/zero3_offload.json", timeout=900)
    _ok(proc)
    assert "ZeRO stage 3, optimizer DeepSpeedCPUAdam, its state offloaded to cpu" in proc.stdout + proc.stderr
    assert "ZeRO stage 3, optimizer AdamW, peak lr" in (straight.parent / "train.log").read_text()
    plain, offload = read_scalars(straight / "tensorboard"), read_scalars(tmp_path / "offload" / "tensorboard")
    assert [s for s, _ in offload["train/loss"]] == [1, 2, 3]
    assert offload["train/grad_norm"][0][1] == pytest.approx(plain["train/grad_norm"][0][1], rel=1e-5)
    for (_, a), (_, b) in zip(plain["train/loss"][1:3], offload["train/loss"][1:]):
        assert b == pytest.approx(a, rel=1e-3)
    assert plain["train/loss"][2][1] != plain["train/loss"][0][1]  # the updates changed something
