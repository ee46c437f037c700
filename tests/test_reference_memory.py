"""A live reference for a trainable subset (model.trainable) that does not hold the frozen part twice: the
policy's own module with the trainable parameters' initial values swapped in (dpo_ds.reference.SharedReference).
One process, no launcher: after a few steps (policy != reference) its errors equal a full frozen copy's bitwise,
on the very batches training draws, and every tensor of the policy is bitwise what it was after each reference
forward, under ZeRO-2 and under ZeRO-3 (partitions, persistent parameters). And the reference's memory against
a full copy's (tools/reference_memory.py): the trainable share of it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, env, free_port, write_run_config

pytestmark = pytest.mark.slow

TRAINABLE = ["up_blocks.1.*", "conv_out.*"]  # tests/test_trainable.py's subset of the tiny SDXL UNet

PROBE = r"""
import json, sys
import torch
from dpo_ds import engine, models, reference
from dpo_ds.config import load_config, resolve_ds_config
from dpo_ds.data import list_shards
from dpo_ds.trainer import Trainer

cfg = load_config(sys.argv[1])
engine.init_distributed()
ds_config = resolve_ds_config(sys.argv[2], cfg, 1, "fp32")
family = models.build(cfg)

def train(output_dir, observe):
    # A run of cfg whose reference errors pass through observe(trainer, ...); its policy's weights at the end.
    trainer = Trainer(cfg.model_copy(update={"output_dir": output_dir}), ds_config, "fp32", family,
                      list_shards(cfg.data.shards))
    ref = trainer.reference
    trainer.reference = type("Observed", (), {"errors": staticmethod(lambda *a: observe(trainer, ref, *a))})()
    trainer.fit()
    return type(ref).__name__, trainer.policy.full_state_dict()

def policy_tensors(policy):
    # What a forward or backward reads weights from, with the storage it points at: the parameters, under ZeRO-3
    # their partitions and the persistent ones gathered (the others are gathered from the partitions when used).
    out = {}
    for name, p in policy.module.named_parameters():
        if not policy.is_zero3 or p.ds_persist:
            out[name] = (p.data.clone(), p.data.data_ptr(), str(getattr(p, "ds_status", None)))
        if policy.is_zero3:
            out[name + ".ds_tensor"] = (p.ds_tensor.clone(), p.ds_tensor.data_ptr(), None)
    return out

checks, shared_errors = [], []
initial = family.load_denoiser(cfg.model.pretrained_path, None)
models.select_trainable(initial, cfg.model.trainable)
full = reference.LiveReference.build(cfg, family, initial, ds_config, torch.float32)  # the full frozen copy

def observe_shared(trainer, ref, batch, x_t, target, t):
    policy = trainer.policy
    before = policy_tensors(policy)
    err_w, err_l = ref.errors(batch, x_t, target, t)
    after = policy_tensors(policy)
    # The policy's own errors, hidden from ZeRO-3's trace as the reference's are: its current values swapped in.
    with torch.no_grad(), policy.values_swapped_in(policy.trainable_values()) as module:
        policy_w, _ = family.pair_errors(module, batch, x_t, target, t, torch.float32)
    checks.append({
        "changed": [n for n in before
                    if not (torch.equal(before[n][0], after[n][0]) and before[n][1:] == after[n][1:])],
        # whether ZeRO-3 follows the policy's recorded trace (and prefetches along it)
        "is_trace_complete": policy.is_zero3 and
                             policy.engine.optimizer.parameter_offload.get_param_coordinator().is_complete_trace(),
        "policy_gap": float((policy_w - err_w).abs().max()),
        "num_persistent_trainable": [sum(bool(getattr(p, "ds_persist", False)) == persist for p in
                                         policy.module.parameters() if p.requires_grad) for persist in (True, False)]})
    full_w, full_l = full.errors(batch, x_t, target, t)
    checks[-1]["error_diff"] = max(float((err_w - full_w).abs().max()), float((err_l - full_l).abs().max()))
    shared_errors.append((err_w, err_l))
    return err_w, err_l

replayed = []

def replay(trainer, ref, batch, x_t, target, t):
    replayed.append(batch["keys"])
    return shared_errors[len(replayed) - 1]

kind, shared_policy = train(sys.argv[3] + "/shared", observe_shared)
# The same run with no reference forward at all, its reference errors replayed: the policy's own trajectory.
_, untouched_policy = train(sys.argv[3] + "/replayed", replay)
print("RESULT " + json.dumps({
    "kind": kind, "checks": checks, "num_replayed": len(replayed),
    "policies_equal": shared_policy.keys() == untouched_policy.keys() and
                      all(torch.equal(shared_policy[n], untouched_policy[n]) for n in shared_policy),
}))
"""


@pytest.mark.parametrize("stage", [2, 3])
def test_shared_reference_equals_a_full_copy_and_leaves_the_policy_bitwise(tiny, tmp_path, stage):
    ds = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
    if stage == 3:  # some trainable parameters persistent (kept gathered), the larger ones partitioned
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 2000
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = write_run_config(tmp_path / "run.yaml", tiny, tmp_path / "run", model={"trainable": TRAINABLE},
                           train={"max_steps": 4}, optim={"lr": 1e-3},
                           checkpoint={"every_steps": 100, "export": False})
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc = subprocess.run([sys.executable, str(script), str(cfg), str(tmp_path / "ds.json"), str(tmp_path)], cwd=REPO,
                          env=env() | {"MASTER_PORT": str(free_port())}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["kind"] == "SharedReference"
    checks = result["checks"]
    assert len(checks) == 4 and result["num_replayed"] == 4
    if stage == 3:  # trainable parameters both kept gathered (persistent) and partitioned
        assert all(n > 0 for n in checks[0]["num_persistent_trainable"])
    assert all(c["changed"] == [] for c in checks), [c["changed"][:5] for c in checks]
    # From the second step on the policy has moved, so the reference's errors are not the policy's ...
    assert checks[0]["policy_gap"] == 0 and all(c["policy_gap"] > 0 for c in checks[1:])
    # ... and they are the full frozen copy's, to the bit.
    assert [c["error_diff"] for c in checks] == [0.0] * 4
    # The swap never reached the policy's backward: the run trained to the weights of the same run without any
    # reference forward (its errors replayed).
    assert result["policies_equal"]
    # ZeRO-3 records the policy's trace in its first step and follows it from then on: the reference's forward
    # in the middle of the policy's forward and backward does not break it.
    assert [c["is_trace_complete"] for c in checks] == [False] + [stage == 3] * 3


def test_the_shared_reference_holds_the_trainable_share_of_a_full_copy():
    """tools/reference_memory.py, the README's figure: for `motion`'s motion modules under ZeRO-3 (one rank),
    the shared reference holds the trainable parameters' share of what the full copy holds, and no more."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "reference_memory.py")], cwd=REPO,
                          env=env() | {"MASTER_PORT": str(free_port())}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["family"] == "motion" and 0.2 < result["trainable_share"] < 0.5
    assert result["full_copy_bytes"] == 4 * result["num_params"]  # fp32, one rank: the whole model once
    assert result["ratio"] == pytest.approx(result["trainable_share"], rel=0.01)
