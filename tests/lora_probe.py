"""One process, no launcher: a LoRA run with reference.mode=adapters_off (tests/test_lora.py). Prints RESULT
and a JSON of what the run did: the first micro-step's loss and implicit accuracy, which base weights and which
adapters changed, the optimizer's parameter count."""

import json
import sys

import torch

from dpo_ds import engine, lora, models
from dpo_ds.config import load_config, resolve_ds_config
from dpo_ds.data import list_shards
from dpo_ds.trainer import Trainer

cfg = load_config(sys.argv[1], sys.argv[3:])
engine.init_distributed()
trainer = Trainer(cfg, resolve_ds_config(sys.argv[2], cfg, 1, "fp32"), "fp32", models.build(cfg),
                  list_shards(cfg.data.shards))
first = []
forward_loss = trainer.forward_loss
trainer.forward_loss = lambda batch, reference=None: (lambda out: (first.append(
    {k: float(out[1][k]) for k in ("loss", "implicit_acc")}) if not first else None, out)[1])(
    forward_loss(batch, reference))
before = trainer.policy.full_state_dict()
trainer.fit()
after = trainer.policy.full_state_dict()
optimized = sum(p.numel() for group in trainer.policy.optimizer.param_groups for p in group["params"])
print("RESULT " + json.dumps({
    "first": first[0],
    "base_changed": [n for n in before if not lora.is_adapter(n) and not torch.equal(before[n], after[n])],
    "adapters_unmoved": [n for n in before if ".lora_B." in n and torch.equal(before[n], after[n])],
    "num_adapter_params": sum(t.numel() for n, t in before.items() if lora.is_adapter(n)),
    "num_optimized": optimized,
}))
