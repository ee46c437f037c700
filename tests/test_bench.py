"""tools/bench.py's data figures on toy sizes (--quick): one JSON line per figure, then the table.
A smoke test of the pieces, not a measurement; the figures are in docs/BENCHMARKS.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, env


def test_quick_data_figures(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "--quick", "--out", str(tmp_path),
                           "--figures", "data_sdxl,data_wan"], env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    rows = [json.loads(line) for line in lines[:2]]
    assert [r["figure"] for r in rows] == ["data_sdxl", "data_wan"]
    # An epoch of 16 pairs in batches of 4 (8 in batches of 1), less the first batch, which is not timed.
    assert [r["pairs_timed"] for r in rows] == [12, 7]
    for r in rows:
        assert r["ratio"] == r["pairs_per_s"] / 10.0 > 0 and r["target"] == ">= 10" and r["pass"] == (r["ratio"] >= 10)
    assert lines[3].split() == ["figure", "ratio", "target", "pass"]
    assert [line.split()[0] for line in lines[4:]] == ["data_sdxl", "data_wan"]


def test_full_size_configs_are_the_published_models():
    """tools/bench_gpu.py's configs build SDXL base's UNet and Wan 2.1 1.3B (counted on the meta device)."""
    import torch

    sys.path.insert(0, str(REPO / "tools"))
    from bench_gpu import SDXL_BASE_UNET, WAN_1_3B
    from memory_estimate import MODELS, num_parameters

    from dpo_ds.models import family_class

    with torch.device("meta"):
        unet = family_class("sdxl").denoiser_from_config(SDXL_BASE_UNET)
        wan = family_class("wan").denoiser_from_config(WAN_1_3B)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    m = MODELS["Wan2.1-T2V-1.3B"]
    assert sum(p.numel() for p in wan.parameters()) == num_parameters(m["dim"], m["num_layers"], m["ffn_dim"])


def test_gpu_run_on_tiny_models(tmp_path):
    """`--gpu --tiny`: the GPU run's code (every variant, cached and live reference) on the CPU with the toy
    SDXL UNet; one JSON file whose TFLOP/s follow from the counted FLOPs and the step time."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "--gpu", "--tiny", "--models", "sdxl",
                           "--out", str(tmp_path)], env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "bench_gpu.json").read_text())
    sys.path.insert(0, str(REPO / "tools"))
    from bench_gpu import VARIANTS

    cases = result["cases"]
    assert [(c["variant"], c["reference"]) for c in cases] == \
        [(name, "cache") for name, _ in VARIANTS] + [(VARIANTS[0][0], "live")]
    for c in cases:
        assert "error" not in c, c
        assert c["pairs_per_s"] == pytest.approx(1 / c["step_s"], rel=1e-3) and c["pair_flops"] > 1e6
        assert c["tflops"] == pytest.approx(c["pair_flops"] * c["pairs_per_s"] / 1e12, rel=1e-3)
        assert c["mfu"] is None  # no peak on the CPU
    assert result["cached_over_live"]["sdxl"] == pytest.approx(cases[0]["step_s"] / cases[-1]["step_s"], rel=1e-3)
    assert result["tiny"] and result["dtype"] == "fp32"
    assert "cached over live reference step time" in proc.stdout
