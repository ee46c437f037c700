"""Export a DeepSpeed checkpoint of a training run as a diffusers model folder.

Reads OUTPUT_DIR/config.yaml (the run's resolved configuration: model family, and the denoiser's
config from model.pretrained_path/unet or model.unet_config) and OUTPUT_DIR/checkpoints/<tag>
(ZeRO-2 or ZeRO-3 shards written by any number of ranks; `latest` is the newest complete one),
merges the shards into full fp32 weights in this one process, and writes:

  OUT/config.json                            the denoiser's diffusers config
  OUT/diffusion_pytorch_model.safetensors    its weights, in --dtype (fp32, or the bf16 cast of fp32)

OUT defaults to OUTPUT_DIR/export/<tag>/unet, so that it never overwrites the run's own export/unet.
Load it with `UNet2DConditionModel.from_pretrained(OUT)`, or pass it to tools/sample.py --unet.

  python tools/export.py --run OUTPUT_DIR [--tag latest|step_00001000] [--dtype fp32|bf16] [--out DIR]
      [--section.key=value ...]   (overrides of the run's config, e.g. --model.pretrained_path=/new/place)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from dpo_ds import engine, models
from dpo_ds.config import RunConfig, load_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_tag(ckpt_dir: str, tag: str) -> str:
    """The checkpoint tag to export: `latest` -> the tag it names; refuse a checkpoint cut off mid-write."""
    if tag == engine.LATEST:
        latest = os.path.join(ckpt_dir, engine.LATEST)
        if not os.path.isfile(latest):
            raise ValueError(f"{latest} does not exist: the run has saved no complete checkpoint yet; "
                             "pass --tag with one of the folders of checkpoints/")
        with open(latest) as f:
            tag = f.read().strip()
    folder = os.path.join(ckpt_dir, tag)
    complete = sorted(d for d in os.listdir(ckpt_dir) if os.path.isfile(os.path.join(ckpt_dir, d, engine.COMPLETE))) \
        if os.path.isdir(ckpt_dir) else []
    if not os.path.isdir(folder):
        raise ValueError(f"--tag: checkpoint {folder} does not exist; complete checkpoints: {complete or 'none'}")
    # The trainer writes COMPLETE only after every rank's shards are on disk (dpo_ds.engine.save_checkpoint).
    if not os.path.isfile(os.path.join(folder, engine.COMPLETE)):
        raise ValueError(f"--tag: checkpoint {folder} is incomplete (no {engine.COMPLETE} marker: cut off while "
                         f"being written); pass --tag with a complete one: {complete or 'none'}")
    return tag


def denoiser_config(cfg: RunConfig, config_path: str) -> dict:
    """The denoiser's diffusers config, from where the run built its model."""
    spec = models.family_class(cfg.model.family)
    try:
        spec.check_source(cfg.model.pretrained_path, cfg.model.unet_config)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}; if the model moved, pass --model.pretrained_path=NEW_PATH "
                         "(or --model.unet_config=NEW_PATH)") from None
    path = cfg.model.unet_config or os.path.join(cfg.model.pretrained_path, spec.DENOISER_SUBFOLDER, "config.json")
    with open(path) as f:
        return json.load(f)


def export(run_dir: str, tag: str, out: str | None, dtype: str, config_path: str | None = None,
           overrides: list[str] | None = None) -> str:
    """Write checkpoint `tag` of the run in `run_dir` as a diffusers folder; returns the folder."""
    config_path = config_path or os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise ValueError(f"{config_path} does not exist: --run must be a training run's output_dir "
                         "(or pass --config with the run's config.yaml)")
    cfg = load_config(config_path, overrides)
    spec = models.family_class(cfg.model.family)
    unet_config = denoiser_config(cfg, config_path)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    tag = resolve_tag(ckpt_dir, tag)
    out = out or os.path.join(run_dir, "export", tag, spec.DENOISER_SUBFOLDER)

    state_dict = engine.consolidated_state_dict(ckpt_dir, tag)
    try:
        spec.export(state_dict, unet_config, out, DTYPES[dtype])
    except RuntimeError as e:  # load_state_dict(strict=True): the checkpoint is of another model
        raise ValueError(f"checkpoint {ckpt_dir}/{tag} does not fit the denoiser described by {config_path} "
                         f"(model.pretrained_path / model.unet_config); pass the config of the run that wrote "
                         f"it with --config.\n{e}") from None
    num_params = sum(t.numel() for t in state_dict.values())
    print(f"exported {ckpt_dir}/{tag} -> {out} ({len(state_dict)} tensors, {num_params:,} values, {dtype})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the training run's output_dir (holds config.yaml and checkpoints/)")
    p.add_argument("--tag", default=engine.LATEST, help="checkpoint folder under checkpoints/; default: latest")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="precision of the written weights")
    p.add_argument("--out", help="output folder; default OUTPUT_DIR/export/<tag>/unet")
    p.add_argument("--config", help="the run's config; default OUTPUT_DIR/config.yaml")
    args, overrides = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        export(args.run, args.tag, args.out, args.dtype, args.config, overrides)
    except ValueError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
