"""Where the reference errors r_w, r_l come from.

`live`: a frozen copy of the initial denoiser in its own DeepSpeed engine
(ZeRO-3, parameters offloaded to CPU between uses), run under no_grad on the
very noisy inputs the policy sees.
"""

from __future__ import annotations

import copy
from types import ModuleType

import torch

from dpo_ds import engine
from dpo_ds.config import RunConfig
from dpo_ds.models import pair_errors


class LiveReference:
    def __init__(self, spec: ModuleType, ref_engine, dtype: torch.dtype):
        self.spec, self.engine, self.dtype = spec, ref_engine, dtype

    @classmethod
    def build(cls, cfg: RunConfig, spec: ModuleType, initial_policy: torch.nn.Module, policy_ds_config: dict,
              dtype: torch.dtype) -> "LiveReference":
        """Reference = reference.pretrained_path if set, else a copy of the policy before training."""
        if cfg.reference.pretrained_path is not None:
            model = spec.load_denoiser(cfg.reference.pretrained_path, None)
        else:
            model = copy.deepcopy(initial_policy)
        spec.set_attention(model, cfg.model.attention)
        return cls(spec, engine.build_reference(model, policy_ds_config, cfg.reference.offload), dtype)

    @torch.no_grad()
    def errors(self, batch: dict, x_t: torch.Tensor, target: torch.Tensor, t: torch.Tensor):
        """r_w, r_l: [B] float32 reference errors at the pair's shared draw."""
        return pair_errors(self.spec, self.engine, batch, x_t, target, t, self.dtype)
