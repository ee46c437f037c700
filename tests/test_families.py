"""Every family other than SDXL (the image family SD 1.5, the text-to-video UNets unet3d and motion, the video
transformer Wan, the image-to-video UNet SVD with EDM) end to end through the real `deepspeed` launcher: 2 CPU
processes, ZeRO-3, the live offloaded reference and then the reference cache (with empty-prompt dropout, which
the cache must reproduce), export loaded back with diffusers; what the family trains by default moved, the rest
(motion's frozen SD 1.5 UNet) bitwise unchanged. The five live runs are one launcher job and the five cached runs
another (tests/train_many.py: dpo_ds.train's settings step and Trainer, run after run in the same ranks).
(SDXL's runs are tests/test_e2e.py and tests/test_reference_cache.py.)"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, deepspeed_job, env, make_synthetic, read_scalars, write_run_config
from dpo_ds.models import family_class, select_trainable

pytestmark = pytest.mark.slow

FAMILIES = ["sd15", "unet3d", "motion", "wan", "svd"]
MAX_STEPS = 3  # 16 pairs / (2 ranks x 2 pairs) = 4 micro-batches per epoch: all at draw index 0


def _ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Every family trained with the live reference, then from a reference cache: two launcher jobs of five runs."""
    root = tmp_path_factory.mktemp("families")
    live, cached = [], []
    for family in FAMILIES:
        data = root / family / "data"
        make_synthetic(data, "--family", family, "--num-pairs", "16", "--pairs-per-shard", "4", "--resolution", "64",
                       "--seed", "0")
        # beta 10: at beta 500 Adam's first steps amplify float32 rounding between the live and cached errors.
        # Half the pairs train on the empty prompt: the cache holds the errors of exactly those draws.
        # Wan's σ from the logit-normal density (uniform is the default): the law the cache must reproduce.
        law = {"sigma_density": "logit_normal"} if family == "wan" else {}
        sections = dict(model={"pretrained_path": str(data / "model"), "family": family, **law}, dpo={"beta": 10.0},
                        data={"empty_prompt_prob": 0.5},
                        train={"max_steps": MAX_STEPS}, checkpoint={"every_steps": 100})
        live.append(("zero3.json", write_run_config(root / family / "live.yaml", data, root / family / "live",
                                                    **sections)))
        cache_cfg = write_run_config(root / family / "cache.yaml", data, root / family / "cache", **sections,
                                     reference={"mode": "cache", "cache_dir": str(root / family / "refcache")})
        cached.append(("zero3.json", cache_cfg))
    results, _ = deepspeed_job("train_many.py", live)
    # motion trains its motion modules only: its live reference runs inside the policy (SharedReference)
    assert [(r["step"], r["reference"]) for r in results] == [
        (MAX_STEPS, "SharedReference" if family == "motion" else "LiveReference") for family in FAMILIES]
    _ok(subprocess.run([sys.executable, str(REPO / "tests" / "precompute_many.py"), *[str(c) for _, c in cached]],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=600))
    results, stderr = deepspeed_job("train_many.py", cached)
    assert [(r["step"], r["reference"]) for r in results] == [(MAX_STEPS, "CachedReference")] * len(FAMILIES)
    assert stderr.count("the reference model is not built") == len(FAMILIES), stderr[-4000:]
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_live_and_cached_alike_and_exports(family, trained):
    data, tmp_path = trained / family / "data", trained / family
    live, cache = (read_scalars(tmp_path / run / "tensorboard") for run in ("live", "cache"))
    assert live["train/loss"][0][1] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    for name in ("train/loss", "train/ref_err_w", "train/ref_err_l", "train/model_err_w"):
        assert [s for s, _ in cache[name]] == list(range(1, MAX_STEPS + 1)), name
        for (_, a), (_, b) in zip(live[name], cache[name]):
            assert math.isfinite(a) and b == pytest.approx(a, rel=1e-4), (name, live[name], cache[name])

    cls = family_class(family)
    initial = _weights(data / "model" / cls.DENOISER_SUBFOLDER)
    fresh = cls.denoiser_from_config(cls.TINY_DENOISER_CONFIG)
    select_trainable(fresh, cls.DEFAULT_TRAINABLE)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable and (family == "motion") == (trainable != {n for n, _ in fresh.named_parameters()})
    for run in ("live", "cache"):
        exported = tmp_path / run / "export" / cls.DENOISER_SUBFOLDER
        trained = _weights(exported)
        assert trained.keys() == initial.keys()
        unmoved = [n for n in trainable if torch.equal(initial[n], trained[n])]
        assert not unmoved, f"{run}: {len(unmoved)} parameters did not move: {unmoved[:5]}"
        moved = [n for n in initial.keys() - trainable if not torch.equal(initial[n], trained[n])]
        assert not moved, f"{run}: {len(moved)} frozen parameters changed: {moved[:5]}"
        # diffusers' from_pretrained of the family's class loads it back, and it is the family's tiny model
        denoiser = cls.denoiser_from_folder(str(exported), torch.float32)
        public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
        assert public(denoiser.config) == public(cls.denoiser_from_config(cls.TINY_DENOISER_CONFIG).config)
