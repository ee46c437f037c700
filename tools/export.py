"""Export a DeepSpeed checkpoint of a training run as a diffusers model folder.

Reads OUTPUT_DIR/config.yaml (the run's resolved configuration: model family, and the denoiser's
config from model.pretrained_path/unet or model.denoiser_config) and OUTPUT_DIR/checkpoints/<tag>
(ZeRO-2 or ZeRO-3 shards written by any number of ranks; `latest` is the newest complete one),
merges the shards into full fp32 weights in this one process, and writes:

  OUT/config.json                            the denoiser's diffusers config
  OUT/diffusion_pytorch_model.safetensors    its weights, in --dtype (fp32, or the bf16 cast of fp32)

OUT defaults to OUTPUT_DIR/export/<tag>/unet, so that it never overwrites the run's own export/unet.
Load it with `UNet2DConditionModel.from_pretrained(OUT)`, or pass it to tools/sample.py --unet.

A LoRA run (model.lora) checkpoints its adapters only: they are written in diffusers' LoRA format,
OUT/pytorch_lora_weights.safetensors (OUT defaults to OUTPUT_DIR/export/<tag>/lora), which the family's
pipeline loads with `pipe.load_lora_weights(OUT)`; with --merge, the base model is rebuilt from
model.pretrained_path (or model.denoiser_config and seed), the adapters merged in, and the full folder
above written.

  python tools/export.py --run OUTPUT_DIR [--tag latest|step_00001000] [--dtype fp32|bf16] [--out DIR]
      [--merge] [--section.key=value ...]   (overrides of the run's config, e.g. --model.pretrained_path=/new/place)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from dpo_ds import engine, lora, models
from dpo_ds.config import RunConfig, load_config
from dpo_ds.dtypes import DTYPES

EXPORT_DTYPES = ("fp32", "bf16")  # what a diffusers folder is usually shipped in


def denoiser_config(cfg: RunConfig, config_path: str) -> dict:
    """The denoiser's diffusers config, from where the run built its model."""
    spec = models.family_class(cfg.model.family)
    try:
        spec.check_source(cfg.model.pretrained_path, cfg.model.denoiser_config)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}; if the model moved, pass --model.pretrained_path=NEW_PATH "
                         "(or --model.denoiser_config=NEW_PATH)") from None
    path = cfg.model.denoiser_config or os.path.join(cfg.model.pretrained_path, spec.DENOISER_SUBFOLDER, "config.json")
    with open(path) as f:
        return json.load(f)


def export_lora(cfg: RunConfig, spec, config: dict, state_dict: dict, out: str, dtype: str, merge: bool) -> str:
    """A LoRA run's checkpoint (its adapters: the base is not in it): the adapters in diffusers' LoRA format,
    or with `merge` the base model (rebuilt as the run built it) with the adapters merged in, a full folder."""
    adapters = {name: t.to(DTYPES[dtype]) for name, t in lora.adapter_weights(state_dict).items()}
    if not merge:
        path = lora.save(spec, adapters, cfg.model.lora, out)
        print(f"exported the LoRA adapters of {len(adapters) // 2} modules ({dtype}) -> {path}")
        return out
    torch.manual_seed(cfg.seed)  # a from-config base is drawn as the trainer drew it
    denoiser = spec.load_denoiser(cfg.model.pretrained_path, cfg.model.denoiser_config)
    lora.add_adapters(denoiser, cfg.model.lora, spec.LORA_TARGETS)
    result = denoiser.load_state_dict({n: t for n, t in state_dict.items() if lora.is_adapter(n)}, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    spec.export(lora.merged(denoiser), config, out, DTYPES[dtype])
    print(f"exported the base model with the LoRA adapters merged ({dtype}) -> {out}")
    return out


def export(run_dir: str, tag: str, out: str | None, dtype: str, config_path: str | None = None,
           overrides: list[str] | None = None, merge: bool = False) -> str:
    """Write checkpoint `tag` of the run in `run_dir` as a diffusers folder; returns the folder."""
    config_path = config_path or os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise ValueError(f"{config_path} does not exist: --run must be a training run's output_dir "
                         "(or pass --config with the run's config.yaml)")
    cfg = load_config(config_path, overrides)
    spec = models.family_class(cfg.model.family)
    config = denoiser_config(cfg, config_path)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    try:
        tag = engine.complete_tag(ckpt_dir, tag)
    except ValueError as e:
        raise ValueError(f"--tag: {e}") from None
    state_dict = engine.consolidated_state_dict(ckpt_dir, tag)
    if cfg.model.lora is not None:
        return export_lora(cfg, spec, config, state_dict, out or os.path.join(run_dir, "export", tag, "lora"),
                           dtype, merge)
    out = out or os.path.join(run_dir, "export", tag, spec.DENOISER_SUBFOLDER)
    try:
        spec.export(state_dict, config, out, DTYPES[dtype])
    except RuntimeError as e:  # load_state_dict(strict=True): the checkpoint is of another model
        raise ValueError(f"checkpoint {ckpt_dir}/{tag} does not fit the denoiser described by {config_path} "
                         f"(model.pretrained_path / model.denoiser_config); pass the config of the run that wrote "
                         f"it with --config.\n{e}") from None
    num_params = sum(t.numel() for t in state_dict.values())
    print(f"exported {ckpt_dir}/{tag} -> {out} ({len(state_dict)} tensors, {num_params:,} values, {dtype})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the training run's output_dir (holds config.yaml and checkpoints/)")
    p.add_argument("--tag", default=engine.LATEST, help="checkpoint folder under checkpoints/; default: latest")
    p.add_argument("--dtype", choices=EXPORT_DTYPES, default="fp32", help="precision of the written weights")
    p.add_argument("--out", help="output folder; default OUTPUT_DIR/export/<tag>/unet")
    p.add_argument("--config", help="the run's config; default OUTPUT_DIR/config.yaml")
    p.add_argument("--merge", action="store_true", help="a LoRA run: merge the adapters into the base model and "
                   "write a full model folder (default: the adapters alone, in diffusers' LoRA format)")
    args, overrides = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        export(args.run, args.tag, args.out, args.dtype, args.config, overrides, args.merge)
    except ValueError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
