"""LoRA (model.lora) with the reference for free (reference.mode=adapters_off). In-process: the per-family
default targets, the settings' errors, adapters_off giving the base model exactly. One process per run list
(tests/lora_probe.py): every video family trains its adapters, the base bitwise unchanged, the first step's
loss ln 2, the export loads back. Through the real `deepspeed` launcher (2 CPU processes): SDXL on ZeRO-3 and
SD 1.5 on ZeRO-2, checkpoints of the adapters only, resume bitwise, the export loaded with the pipeline's
`load_lora_weights` changes what it samples, and tools/export.py --merge writes the full model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, deepspeed_train, env, free_port, read_scalars, write_run_config
from dpo_ds import lora
from dpo_ds.config import LoraConfig, load_config
from dpo_ds.models import FAMILIES

VIDEO_FAMILIES = ["wan", "unet3d", "motion", "svd"]
LORA = {"rank": 4, "alpha": 8.0}


def _tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cls = FAMILIES[family]
    return cls.denoiser_from_config(cls.TINY_DENOISER_CONFIG)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_default_targets_adapt_the_attention_and_only_adapters_train(family):
    denoiser = _tiny(family)
    num_params = sum(p.numel() for p in denoiser.parameters())
    num_adapted = lora.add_adapters(denoiser, LoraConfig(**LORA), FAMILIES[family].LORA_TARGETS)
    trainable = [n for n, p in denoiser.named_parameters() if p.requires_grad]
    assert num_adapted >= 4 and len(trainable) == 2 * num_adapted and all(lora.is_adapter(n) for n in trainable)
    assert all(n.split(".lora_")[0].rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for n in trainable)
    if family == "motion":  # the motion modules only: the SD 1.5 UNet around them is the base
        assert all("motion_modules" in n for n in trainable)
    # B starts at zero: the adapted model is the base model, with or without adapters_off
    assert all(p.abs().sum() == 0 for n, p in denoiser.named_parameters() if ".lora_B." in n)
    assert sum(p.numel() for n, p in denoiser.named_parameters() if not lora.is_adapter(n)) == num_params


def test_adapters_off_is_the_base_model_exactly():
    denoiser = _tiny("sd15")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(2, 77, FAMILIES["sd15"].TINY_DENOISER_CONFIG["cross_attention_dim"])
    with torch.no_grad():
        base = denoiser(x, torch.tensor([10, 500]), cond).sample
    lora.add_adapters(denoiser, LoraConfig(**LORA, dropout=0.5), ("*.to_q", "*.to_v"))
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            if ".lora_B." in name:
                p.normal_()
        adapted = denoiser(x, torch.tensor([10, 500]), cond).sample
        with lora.adapters_off(denoiser):
            off = denoiser(x, torch.tensor([10, 500]), cond).sample
    assert torch.equal(off, base) and not torch.allclose(adapted, base)
    # switched back on: the adapters train again
    assert all(p.requires_grad == lora.is_adapter(n) for n, p in denoiser.named_parameters())


def test_lora_settings_errors_name_the_key(tmp_path):
    def load(**sections):
        return load_config(str(write_run_config(tmp_path / "run.yaml", tmp_path, tmp_path / "out", **sections)))

    assert load(model={"pretrained_path": "m", "lora": {"rank": 8}}).model.lora.rank == 8
    with pytest.raises(ValueError, match="model.trainable and model.lora exclude each other"):
        load(model={"pretrained_path": "m", "lora": {"rank": 8}, "trainable": ["*"]})
    with pytest.raises(ValueError, match="reference.mode=adapters_off needs model.lora"):
        load(reference={"mode": "adapters_off"})
    with pytest.raises(ValueError, match="model.lora.targets: \\['\\*.to_qq'\\] match no"):
        lora.add_adapters(_tiny("sd15"), LoraConfig(targets=["*.to_q", "*.to_qq"]), ())


def _probe(tmp_path: Path, ds_config: str, configs: list[Path]) -> list[dict]:
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "lora_probe.py"), str(REPO / "ds_configs" / ds_config),
                           *map(str, configs)], cwd=REPO, env=env() | {"MASTER_PORT": str(free_port())},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def _synthetic(out: Path, family: str) -> Path:
    subprocess.run([sys.executable, str(REPO / "tools" / "make_synthetic.py"), "--out", str(out), "--family", family,
                    "--num-pairs", "4", "--pairs-per-shard", "4", "--resolution", "64", "--seed", "0"],
                   check=True, env=env(), capture_output=True)
    return out


@pytest.mark.slow
def test_video_families_train_adapters_against_the_base_and_export(tmp_path):
    configs = []
    for family in VIDEO_FAMILIES:
        data = _synthetic(tmp_path / family, family)
        configs.append(write_run_config(
            tmp_path / f"{family}.yaml", data, tmp_path / f"{family}-run",
            model={"pretrained_path": str(data / "model"), "family": family, "lora": LORA},
            reference={"mode": "adapters_off"}, data={"num_workers": 0}, optim={"lr": 1e-3},
            train={"max_steps": 2}, checkpoint={"every_steps": 100}))
    for family, result in zip(VIDEO_FAMILIES, _probe(tmp_path, "zero2.json", configs)):
        assert result["first"]["loss"] == pytest.approx(math.log(2), abs=1e-6), family
        assert result["first"]["implicit_acc"] == 0.5, family
        assert result["base_changed"] == [] and result["adapters_unmoved"] == [], family
        assert result["num_optimized"] == result["num_adapter_params"] > 0, family
        assert result["sum_abs_b"] > 0 and result["export_mismatch"] == [], family
