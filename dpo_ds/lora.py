"""LoRA adapters on a denoiser (model.lora): added, switched off for the reference, extracted, saved, merged.

The adapters are peft's LoRA layers, injected with peft's `inject_adapter_in_model`, the call diffusers'
`ModelMixin.add_adapter` makes: two of the six denoiser classes (UNet3DConditionModel and
UNetSpatioTemporalConditionModel) lack diffusers' adapter mixin, and one path serves all. Switching them
off is what diffusers' `disable_adapters` does: every peft layer's `enable_adapters(False)`, after which
a layer returns its base layer's output untouched (no dropout drawn), so with B = 0 the policy and the
reference agree bit for bit.

Names: a targeted module `M` becomes `M.base_layer` (its frozen weights) plus `M.lora_A.default` and
`M.lora_B.default`; the exported file (diffusers' LoRA format) names them `<prefix>.M.lora_A.weight`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os

import torch

from dpo_ds.config import LoraConfig

ADAPTER = "default"  # peft's adapter name; the only one a run has
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes, load_lora_weights reads
ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)  # module types peft's LoRA wraps here


def target_modules(denoiser: torch.nn.Module, patterns: list[str] | tuple[str, ...]) -> list[str]:
    """The names of the Linear and Conv2d modules that match `patterns` (fnmatch); raises ValueError naming
    model.lora.targets for a pattern that matches none."""
    names = [name for name, m in denoiser.named_modules() if isinstance(m, ADAPTABLE)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched or not patterns:
        raise ValueError(f"model.lora.targets: {unmatched or patterns} match no Linear or Conv2d module of the "
                         f"denoiser; patterns are fnmatch-style on module names such as {names[0]!r}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def peft_config(settings: LoraConfig, targets: list[str]):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=settings.rank, lora_alpha=settings.alpha or settings.rank, lora_dropout=settings.dropout,
                          target_modules=targets, init_lora_weights=True if settings.init == "default" else "gaussian")


def add_adapters(denoiser: torch.nn.Module, settings: LoraConfig, default_targets: tuple[str, ...]) -> int:
    """Freeze every weight of `denoiser` and add trainable LoRA adapters (A drawn from torch's global
    generator, B = 0) to the modules model.lora.targets (else `default_targets`) names; returns their count."""
    from peft import inject_adapter_in_model

    targets = target_modules(denoiser, settings.targets if settings.targets is not None else default_targets)
    denoiser.requires_grad_(False)
    inject_adapter_in_model(peft_config(settings, targets), denoiser, adapter_name=ADAPTER)
    assert all(is_adapter(n) == p.requires_grad for n, p in denoiser.named_parameters())
    return len(targets)


def is_adapter(name: str) -> bool:
    """Whether a parameter name (of a denoiser with adapters) is an adapter's."""
    return ".lora_A." in name or ".lora_B." in name


@contextlib.contextmanager
def adapters_off(denoiser: torch.nn.Module):
    """The base model: every adapter of `denoiser` switched off inside the block, on again after."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]
    assert layers, "adapters_off on a denoiser without adapters"
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)  # peft's set_adapter: the adapter's requires_grad back on


def adapter_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters of a denoiser's state dict, named as peft's get_peft_model_state_dict names them
    (`M.lora_A.weight`: the adapter name dropped), which diffusers' save_lora_weights takes."""
    suffix = f".{ADAPTER}."
    return {name.replace(suffix, "."): t for name, t in state_dict.items() if is_adapter(name)}


def save(family, adapters: dict[str, torch.Tensor], settings: LoraConfig, out_dir: str) -> str:
    """Write `adapters` (adapter_weights) in diffusers' LoRA format with the family's pipeline class, so that
    `pipeline.load_lora_weights(out_dir)` loads them; returns the file written."""
    import diffusers

    pipeline_name, layers_kwarg = family.LORA_SAVER
    targets = sorted({name.rsplit(".lora_", 1)[0] for name in adapters})
    metadata = peft_config(settings, targets).to_dict()
    getattr(diffusers, pipeline_name).save_lora_weights(
        out_dir, **{layers_kwarg: {k: v.contiguous() for k, v in adapters.items()},
                    layers_kwarg.replace("_layers", "_adapter_metadata"): metadata})
    return os.path.join(out_dir, WEIGHT_NAME)


def load(denoiser: torch.nn.Module, path: str, prefix: str) -> torch.nn.Module:
    """Add to a bare `denoiser` the adapters of a diffusers LoRA file (save's output), keys `prefix.*`:
    how a family whose pipeline has no load_lora_weights (svd) loads them."""
    import json

    import safetensors
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    with safetensors.safe_open(path, framework="pt") as f:
        state = {k.removeprefix(prefix + "."): f.get_tensor(k) for k in f.keys() if k.startswith(prefix + ".")}
        # diffusers flattens each component's LoraConfig into "<prefix>.<field>" keys
        metadata = {k.removeprefix(prefix + "."): v for k, v in
                    json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}")).items()}
    assert metadata, f"{path} holds no lora_adapter_metadata (written by dpo_ds.lora.save)"
    config = PeftLoraConfig(**{k: v for k, v in metadata.items() if k in ("r", "lora_alpha", "target_modules",
                                                                           "lora_dropout")})
    inject_adapter_in_model(config, denoiser, adapter_name=ADAPTER)
    result = set_peft_model_state_dict(denoiser, state, adapter_name=ADAPTER)
    assert not [k for k in result.unexpected_keys if "lora" in k], result.unexpected_keys
    return denoiser


def merged(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of `denoiser` with its adapters merged into the base weights, under the base model's
    names: what a full model folder of the fine-tuned denoiser holds."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]:
        layer.merge(safe_merge=True)
    return {name.replace(".base_layer.", "."): t for name, t in denoiser.state_dict().items()
            if not is_adapter(name)}
