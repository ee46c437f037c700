"""LoRA runs with reference.mode=adapters_off, one after another in one job (tests/test_lora.py), started by the
real `deepspeed` launcher (any number of ranks) or alone. argv: pairs of a DeepSpeed JSON and a run config.
Rank 0 prints RESULT and, per run, a JSON of what it did: the first micro-step's loss and implicit accuracy,
which base weights changed and which adapters did not, the adapters' parameter count and tensors, the size of
Adam's state over all ranks, the trained adapters (sum of |B|), and which of them the export, loaded back
into the base model from its folder with dpo_ds.lora.load, does not hold exactly."""

import json
import sys

import torch
import torch.distributed as dist

from dpo_ds import engine, lora
from dpo_ds.train import record_settings, settings
from dpo_ds.trainer import Trainer

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
engine.init_distributed()
results = []
for ds_path, path in zip(args[::2], args[1::2]):
    cfg, dtype, ds_config, family, shards = settings(path, ds_path, [], engine.world_size())
    record_settings(cfg, ds_config)  # config.yaml, which tools/export.py reads
    trainer = Trainer(cfg, ds_config, dtype, family, shards)
    first = []
    forward_loss = trainer.forward_loss

    def recording(batch, reference=None):
        loss, diag = forward_loss(batch, reference)
        if not first:
            first.append({k: float(diag[k]) for k in ("loss", "implicit_acc")})
        return loss, diag

    trainer.forward_loss = recording
    before = trainer.policy.full_state_dict()
    trainer.fit()
    after = trainer.policy.full_state_dict()
    # Elements of Adam's first moment over all ranks: ZeRO's wrapped torch optimizer holds each rank's flat
    # partition of the trained parameters (padded to the world size).
    inner = getattr(trainer.policy.optimizer, "optimizer", trainer.policy.optimizer)
    optimized = torch.tensor(sum(state["exp_avg"].numel() for state in inner.state.values()))
    dist.all_reduce(optimized)
    if engine.rank() != 0:
        continue
    trained = lora.adapter_weights(after)
    exported = lora.load(family.load_denoiser(cfg.model.pretrained_path, cfg.model.denoiser_config),
                         str(trainer.out / "export" / "lora" / lora.WEIGHT_NAME), family.LORA_SAVER[1].split("_")[0])
    loaded = lora.adapter_weights(exported.state_dict())
    results.append({
        "family": cfg.model.family,
        "first": first[0],
        "world_size": engine.world_size(),
        "zero_stage": trainer.policy.engine.zero_optimization_stage(),
        "base_changed": [n for n in before if not lora.is_adapter(n) and not torch.equal(before[n], after[n])],
        "adapters_unmoved": [n for n in before if ".lora_B." in n and torch.equal(before[n], after[n])],
        "num_adapter_params": sum(t.numel() for n, t in before.items() if lora.is_adapter(n)),
        "num_adapter_tensors": sum(1 for n in before if lora.is_adapter(n)),
        "num_optimized": int(optimized),
        "sum_abs_b": sum(float(t.abs().sum()) for n, t in trained.items() if ".lora_B." in n),
        "export_mismatch": sorted(set(trained) ^ set(loaded)) + [n for n in trained if n in loaded
                                                                 and not torch.equal(trained[n], loaded[n])],
    })
if engine.rank() == 0:
    print("RESULT " + json.dumps(results), flush=True)
engine.destroy()
