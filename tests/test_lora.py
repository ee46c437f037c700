"""LoRA (model.lora) with the reference for free (reference.mode=adapters_off). In-process: the per-family
default targets, the settings' errors, adapters_off giving the base model exactly. One job of 2 ranks under the
real `deepspeed` launcher (tests/lora_probe.py) trains every family on ZeRO-2 and on ZeRO-3: the first step's
loss ln 2, the base bitwise unchanged, only the adapters in the optimizer, the export loaded by the family's
diffusers pipeline (`load_lora_weights`, tiny components) changing what it samples; a reference cache computed
from the base model serves a LoRA run. SDXL once more through the launcher on ZeRO-3 with checkpoints: the
adapters only, resume bitwise (forked ranks), and tools/export.py --merge writing the full model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (REPO, deepspeed_job, deepspeed_train, env, fork_train, free_port, make_synthetic, read_scalars,
                      write_run_config)
from dpo_ds import lora
from test_tools_export_sample_score import load_tool
from dpo_ds.config import LoraConfig, load_config
from dpo_ds.models import FAMILIES
from tiny_sdxl import build_tiny_sd15, build_tiny_sdxl, build_tiny_wan

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


def _synthetic(out: Path, family: str, pairs_per_shard: int = 2) -> Path:
    return make_synthetic(out, "--family", family, "--num-pairs", "4", "--pairs-per-shard", str(pairs_per_shard),
                          "--resolution", "64", "--seed", "0")


FAMILY_NAMES = ["sdxl", "sd15", "wan", "unet3d", "motion", "svd"]
STAGES = ("zero2.json", "zero3.json")


@pytest.mark.slow
def test_every_family_trains_adapters_on_zero2_and_zero3_and_its_pipeline_loads_them(tmp_path):
    """Every family on ZeRO-2 and on ZeRO-3, 2 ranks under the real launcher, all in one job: ln 2 and accuracy 1/2
    at the first step, the base bitwise unchanged, every adapter trained, the optimizer holding the adapters
    alone, the export loading back; the family's diffusers pipeline built from tiny components loads each export
    with `load_lora_weights` and samples otherwise (svd's pipeline has no LoRA loader: dpo_ds.lora.load, in the
    probe); the export made from an SD 1.5 checkpoint by tools/export.py loads too; and a reference cache
    computed from the base model alone serves a LoRA run (it fits its fingerprint)."""
    def sections(family: str, stage: str) -> dict:
        return dict(model={"pretrained_path": str(tmp_path / family / "model"), "family": family, "lora": LORA},
                    reference={"mode": "adapters_off"}, data={"num_workers": 0}, optim={"lr": 1e-3},
                    train={"max_steps": 2, "micro_batch_size": 1}, checkpoint={"every_steps": 100})

    runs = []
    for family in FAMILY_NAMES:
        data = _synthetic(tmp_path / family, family)  # a shard per rank
        runs += [(stage, write_run_config(tmp_path / f"{family}-{stage[:-5]}.yaml", data,
                                          tmp_path / f"{family}-{stage[:-5]}", **sections(family, stage)))
                 for stage in STAGES]
    cache = {"mode": "cache", "cache_dir": str(tmp_path / "rc")}
    cached = write_run_config(tmp_path / "cached.yaml", tmp_path / "unet3d", tmp_path / "cached-run",
                              **{**sections("unet3d", "zero2.json"), "reference": cache})
    precompute = subprocess.run([sys.executable, str(REPO / "tools" / "precompute_ref.py"), "--config", str(cached),
                                 "--num-draws", "1", "--no-progress"], cwd=REPO, capture_output=True, text=True,
                                env=env() | {"MASTER_PORT": str(free_port())}, timeout=300)
    assert precompute.returncode == 0, precompute.stderr[-4000:]
    (*results, from_cache), _ = deepspeed_job("lora_probe.py", runs + [("zero2.json", cached)])
    # ln 2 up to float32 rounding between the cached errors (computed in another process) and the policy's,
    # times β/4 = 125: abs 1e-4 is an error difference below 1e-6 (one pair per micro-batch, nothing averaged).
    assert from_cache["first"]["loss"] == pytest.approx(math.log(2), abs=1e-4) and from_cache["base_changed"] == []
    for (stage, _), result in zip(runs, results):
        run = (result["family"], stage)
        assert result["world_size"] == 2 and f"zero{result['zero_stage']}.json" == stage, run
        assert result["first"]["loss"] == pytest.approx(math.log(2), abs=1e-6), run
        assert result["first"]["implicit_acc"] == 0.5, run
        assert result["base_changed"] == [] and result["adapters_unmoved"] == [], run
        # ZeRO pads each rank's partition: at most world_size - 1 elements per adapter tensor; one base weight
        # in the optimizer would be far more.
        assert 0 < result["num_adapter_params"] <= result["num_optimized"] <= \
            result["num_adapter_params"] + result["num_adapter_tensors"] * (result["world_size"] - 1), (run, result)
        assert result["sum_abs_b"] > 0 and result["export_mismatch"] == [], run
    assert sorted((r["family"], s) for (s, _), r in zip(runs, results)) == sorted(
        (f, s) for f in FAMILY_NAMES for s in STAGES)

    parts = {"sdxl": build_tiny_sdxl(tmp_path / "parts-sdxl"), "sd15": build_tiny_sd15(tmp_path / "parts-sd15"),
             "wan": build_tiny_wan(tmp_path / "parts-wan")}
    parts["unet3d"] = parts["motion"] = parts["sd15"]  # SD's VAE and one CLIP text encoder (width 32)
    for family in PIPELINE_FAMILIES:
        for stage in STAGES:
            _load_changes_samples(family, tmp_path / family / "model", parts[family],
                                  tmp_path / f"{family}-{stage[:-5]}" / "export" / "lora")
    exported = load_tool("export").export(str(tmp_path / "sd15-zero2"), "latest", None, "fp32")  # from the checkpoint
    _load_changes_samples("sd15", tmp_path / "sd15" / "model", parts["sd15"], Path(exported))


def _adapters_in_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """The module weights of a checkpoint (rank 0's model-states file: ZeRO-2's mp_rank_00_, ZeRO-3's
    zero_pp_rank_0_mp_rank_00_)."""
    (path,) = [f for f in folder.glob("*model_states.pt") if "zero_pp_rank_" not in f.name or "rank_0_" in f.name]
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def _first_step(run: Path) -> tuple[float, float]:
    scalars = read_scalars(run / "tensorboard")
    return dict(scalars["train/loss"])[1], dict(scalars["train/implicit_acc"])[1]


# The families whose diffusers pipeline loads LoRA into their denoiser. Not unet3d: TextToVideoSDPipeline has
# load_lora_weights, but diffusers (0.42) gives UNet3DConditionModel no adapter support (no load_lora_adapter);
# not svd: StableVideoDiffusionPipeline has no LoRA loader. Both load with dpo_ds.lora.load (tests/lora_probe.py).
PIPELINE_FAMILIES = ["sdxl", "sd15", "wan", "motion"]


def _load_changes_samples(family_name: str, model: Path, parts: Path, lora_dir: Path) -> None:
    """The family's diffusers pipeline (its trained-from denoiser in `model`, the other components from `parts`)
    samples otherwise once `load_lora_weights` loaded the export in `lora_dir`."""
    family = FAMILIES[family_name]
    denoiser = family.denoiser_from_folder(str(model / family.DENOISER_SUBFOLDER), torch.float32)
    scheduler_config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    pipe = family.pipeline(str(parts), denoiser, family.sampling_scheduler(scheduler_config, family.SAMPLERS[0]),
                           torch.float32)
    size = dict(height=16, width=16, num_frames=5) if family_name == "wan" else dict(height=64, width=64)
    if family_name in ("unet3d", "motion"):
        size["num_frames"] = 2

    def sample():
        out = pipe("a red square", num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                   generator=torch.Generator().manual_seed(0), **size)
        return out.frames if hasattr(out, "frames") else out.images

    before = sample()
    pipe.load_lora_weights(str(lora_dir))
    assert any(".lora_A." in n for n, _ in denoiser.named_parameters()), family_name
    after = sample()
    assert not torch.equal(before, after), f"{family_name}: the LoRA export did not change the samples"


def _tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a (nested) checkpoint object, by path."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in _tensors(value, f"{prefix}/{key}").items()}


@pytest.mark.slow
def test_sdxl_lora_on_zero3_checkpoints_adapters_only_resumes_bitwise_and_exports(tiny, tmp_path):
    import shutil

    from safetensors.torch import load_file
    from tiny_sdxl import build_tiny_sdxl

    base = build_tiny_sdxl(tmp_path / "base")  # the tiny fixture's UNet (make_synthetic, seed 0) and its components
    sections = dict(model={"pretrained_path": str(base), "lora": LORA}, reference={"mode": "adapters_off"},
                    optim={"lr": 1e-3}, train={"max_steps": 2}, checkpoint={"every_steps": 1, "keep_last": 2})
    cfg = write_run_config(tmp_path / "run.yaml", tiny, tmp_path / "run", **sections)
    proc = deepspeed_train(cfg)
    assert proc.returncode == 0, proc.stderr[-6000:]
    loss, acc = _first_step(tmp_path / "run")
    assert loss == pytest.approx(math.log(2), abs=1e-6) and acc == 0.5

    # The checkpoint: the adapters, their Adam state and what resume needs; no base weight.
    ckpt = tmp_path / "run" / "checkpoints"
    step2 = ckpt / "step_00000002"
    module = _adapters_in_checkpoint(step2)
    assert module and all(lora.is_adapter(n) for n in module)
    base_bytes = (base / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert sum(f.stat().st_size for f in step2.iterdir()) < base_bytes / 2

    # Resume from step 1 in another folder: step 2's checkpoint is the same, bit for bit: adapters, Adam's state,
    # the schedule, the counters. Not the global torch RNG it records: the loader's iterator draws its base seed
    # from it once at the start of fit(), before step 1 in one run and after the restore in the other.
    resumed = tmp_path / "resumed"
    shutil.copytree(ckpt / "step_00000001", resumed / "checkpoints" / "step_00000001")
    (resumed / "checkpoints" / "latest").write_text("step_00000001")
    cfg_resumed = write_run_config(tmp_path / "resumed.yaml", tiny, resumed, **sections)
    proc = fork_train(cfg_resumed, "--checkpoint.resume=auto", "--checkpoint.export=false")
    assert proc.returncode == 0, proc.stderr[-6000:]
    for f in sorted(step2.glob("*.pt")):
        a = _tensors(torch.load(f, map_location="cpu", weights_only=False))
        b = _tensors(torch.load(resumed / "checkpoints" / "step_00000002" / f.name, map_location="cpu",
                                weights_only=False))
        assert a.keys() == b.keys() and [k for k in a if k != "/rng/torch" and not torch.equal(a[k], b[k])] == []

    _load_changes_samples("sdxl", base, base, tmp_path / "run" / "export" / "lora")

    # --merge: the full UNet; every weight the adapters do not touch is the base's, bit for bit.
    merged_dir = tmp_path / "merged"
    assert load_tool("export").main(["--run", str(tmp_path / "run"), "--merge", "--out", str(merged_dir)]) == 0
    merged, initial = load_file(str(merged_dir / "diffusion_pytorch_model.safetensors")), load_file(
        str(base / "unet" / "diffusion_pytorch_model.safetensors"))
    adapted = {n.split(".lora_")[0] + ".weight" for n in module}
    assert merged.keys() == initial.keys()
    assert [n for n in initial if (n in adapted) == torch.equal(merged[n], initial[n])] == []
