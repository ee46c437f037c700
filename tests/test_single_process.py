"""One process, no launcher: ZeRO-2 with Adafactor, a scaled lr and a cosine schedule, the frozen reference, non-finite
losses, SDXL pairs of two aspect ratios trained bucket by bucket."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, env, free_port, write_run_config

pytestmark = pytest.mark.slow

PROBE = r"""
import json, sys
import deepspeed, torch
from dpo_ds import engine, models
from dpo_ds.config import load_config, resolve_ds_config
from dpo_ds.data import list_shards
from dpo_ds.trainer import Trainer

cfg = load_config(sys.argv[1])
engine.init_distributed()
trainer = Trainer(cfg, resolve_ds_config(sys.argv[2], cfg, 1, "fp32"), "fp32", models.build(cfg),
                  list_shards(cfg.data.shards))

def reference_weights():
    out = {}
    for name, p in trainer.reference.engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().clone()
    return out

ref_before, policy_before = reference_weights(), trainer.policy.full_state_dict()
lrs = []
step = trainer.policy.step
trainer.policy.step = lambda: (step(), lrs.append(trainer.policy.lr()))
trainer.fit()
ref_after, policy_after = reference_weights(), trainer.policy.full_state_dict()
print("RESULT " + json.dumps({
    "reference_requires_grad": any(p.requires_grad for p in trainer.reference.engine.module.parameters()),
    "reference_training": trainer.reference.engine.module.training,
    "reference_changed": [n for n in ref_before if not torch.equal(ref_before[n], ref_after[n])],
    "policy_unmoved": [n for n in policy_before if torch.equal(policy_before[n], policy_after[n])],
    "optimizer": type(trainer.policy.optimizer.optimizer if hasattr(trainer.policy.optimizer, "optimizer")
                      else trainer.policy.optimizer).__name__,
    "lrs": lrs,
}))
"""


def test_zero2_adafactor_cosine_and_frozen_reference(tiny, tmp_path):
    cfg = write_run_config(tmp_path / "run.yaml", tiny, tmp_path / "run",
                           train={"max_steps": 4}, optim={"name": "adafactor", "lr": 5e-4, "scale_lr": True, "warmup_steps": 1,
                                                          "schedule": "cosine", "min_lr_ratio": 0.1},
                           checkpoint={"every_steps": 100, "export": False})
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    e = env() | {"MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, str(script), str(cfg), str(REPO / "ds_configs" / "zero2.json")],
                          cwd=REPO, env=e, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["reference_changed"] == [] and not result["reference_requires_grad"]
    assert not result["reference_training"]
    assert result["policy_unmoved"] == []
    assert "Adafactor" in result["optimizer"]
    # optim.scale_lr: 5e-4 x 2 pairs per step (micro-batch 2, one process) = 1e-3.
    # Warmup to 1e-3 at step 0, then cosine towards 1e-4 at step 4 (lr read after each step's update).
    lrs = result["lrs"]
    assert len(lrs) == 4 and lrs[0] == pytest.approx(1e-3) and lrs[0] > lrs[1] > lrs[2] > lrs[3] >= 1e-4 - 1e-12


def test_nonfinite_losses_stop_the_run_and_keep_the_checkpoint(tiny, tmp_path):
    """An absurd learning rate makes the loss non-finite; the run skips, counts, then stops cleanly."""
    cfg = write_run_config(tmp_path / "run.yaml", tiny, tmp_path / "run",
                           train={"max_steps": 30, "max_nonfinite_in_row": 2, "grad_clip": 0.0},
                           optim={"lr": 1e30}, checkpoint={"every_steps": 1, "keep_last": 1, "export": False})
    e = env() | {"MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "launch/train.py", "--deepspeed", "ds_configs/zero3.json",
                           "--config", str(cfg)], cwd=REPO, env=e, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-5000:]
    assert "non-finite loss on some rank; micro-batch skipped (1 in a row" in proc.stderr
    assert "stopped: 2 micro-batches in a row had a non-finite loss" in proc.stderr
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    assert (tmp_path / "run" / "checkpoints" / latest / "COMPLETE").is_file()


BUCKETS_PROBE = r"""
import json, sys
import torch
from dpo_ds import engine, models
from dpo_ds.config import load_config, resolve_ds_config
from dpo_ds.data import list_shards
from dpo_ds.trainer import Trainer

cfg = load_config(sys.argv[1])
engine.init_distributed()
trainer = Trainer(cfg, resolve_ds_config(sys.argv[2], cfg, 1, "fp32"), "fp32", models.build(cfg),
                  list_shards(cfg.data.shards))
before = trainer.policy.full_state_dict()
steps = []
forward_loss = trainer.forward_loss

def recording(batch, reference=None):
    loss, diag = forward_loss(batch, reference)
    steps.append({"shape_w": list(batch["latents_w"].shape), "shape_l": list(batch["latents_l"].shape),
                  "time_ids_w": batch["time_ids_w"].tolist(), "time_ids_l": batch["time_ids_l"].tolist(),
                  "loss": loss.item()})
    return loss, diag

trainer.forward_loss = recording
trainer.fit()
after = trainer.policy.full_state_dict()
print("RESULT " + json.dumps({"steps": steps, "unmoved": [n for n in before if torch.equal(before[n], after[n])]}))
"""


def test_sdxl_pairs_of_two_aspect_ratios_train_one_shape_per_step(tmp_path):
    """tools/make_synthetic.py --buckets 64x64 48x96 writes SDXL pairs of two aspect ratios into one shard set;
    with data.resolution null the real Trainer (ZeRO-3, live reference) trains them: every micro-batch holds
    one latent shape and the time ids of that size, both shapes are trained, the loss stays finite, and every
    weight moves."""
    data = tmp_path / "data"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_synthetic.py"), "--out", str(data), "--num-pairs", "16",
                    "--pairs-per-shard", "4", "--buckets", "64x64", "48x96", "--seed", "0"],
                   check=True, env=env(), capture_output=True)
    cfg = write_run_config(tmp_path / "run.yaml", data, tmp_path / "run", data={"resolution": None},
                           train={"max_steps": 6, "micro_batch_size": 2},
                           checkpoint={"every_steps": 100, "export": False})
    script = tmp_path / "probe.py"
    script.write_text(BUCKETS_PROBE)
    e = env() | {"MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, str(script), str(cfg), str(REPO / "ds_configs" / "zero3.json")],
                          cwd=REPO, env=e, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    steps = result["steps"]
    assert len(steps) == 6
    for step in steps:
        assert step["shape_w"] == step["shape_l"] and step["shape_w"][:2] == [2, 4]
        height, width = 8 * step["shape_w"][2], 8 * step["shape_w"][3]
        for side in ("time_ids_w", "time_ids_l"):  # SDXL's micro-conditioning is this bucket's size, uncropped
            assert step[side] == [[height, width, 0, 0, height, width]] * 2
        assert math.isfinite(step["loss"])
    assert {tuple(step["shape_w"][2:]) for step in steps} == {(8, 8), (6, 12)}
    assert result["unmoved"] == []

