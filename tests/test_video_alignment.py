"""Does training move sampled clips toward the preferred motion? The video world end to end (tools/demo_video.py).

Reference: a small Wan transformer trained by flow matching on both directions (loss.type=sft); policy:
Diffusion-DPO from it with the demo's objective, through the deepspeed launcher with 2 processes and
the reference cache; samples scored by the video world's oracle against the reference's, from the same
initial noise. The same bar as tests/test_alignment.py's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, env

pytestmark = [pytest.mark.slow, pytest.mark.skip(
    reason="the reference now samples the world (100% of its samples near a motion after 400 SFT steps through "
           "the launcher), but Diffusion-DPO does not move the direction: 60 steps of dpo+sft at beta 500 and "
           "lr 1e-4, 3e-4, 1e-3 (and 200 at 3e-4) changed the rate by -0.002, +0.002, -0.012 (+0.000), every "
           "interval holding zero; fine-tuning on the preferred clips alone moved it 0.488 -> 0.52 "
           "(README, 'The video world')")]

# Fewer steps than make demo-video's (400 SFT and 60 DPO steps, 512 samples), for the suite's budget:
# tools/video_world_sweep.py puts 95-100% of the reference's samples on the manifold from 200-300 steps on.
FEWER_STEPS = ["--sft-steps", "300", "--dpo-steps", "30", "--checkpoint-every", "30", "--num-samples", "256"]


def _demo(out: Path, *args: str) -> tuple[dict, str]:
    """(report.json, what the terminal received)"""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "demo_video.py"), "--output-dir", str(out),
                           *FEWER_STEPS, *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "report" / "report.json").read_text()), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def preferring_right(tmp_path_factory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("video_right")
    return (out, *_demo(out, "--prefer", "right"))


def test_policy_moves_toward_the_preferred_motion(preferring_right):
    _, result, terminal = preferring_right
    # The evaluation means something only if the samples look like the data: nearly all near a motion,
    # and the reference samples both directions.
    assert result["on_manifold"]["reference"] >= 0.9 and result["on_manifold"]["policy"] >= 0.9, result
    assert 0.1 < result["reference_rate"] < 0.9 * result["on_manifold"]["reference"], result
    assert result["difference"] >= 0.10, result
    assert result["ci95"][0] > 0, result
    assert "[5/5] evaluation: " in terminal and "Traceback" not in terminal, terminal


def test_reversed_preferences_move_the_other_way(preferring_right, tmp_path):
    out_r, result_r, _ = preferring_right
    result_l, _ = _demo(tmp_path, "--prefer", "left", "--reference", str(out_r / "reference"))
    # Same reference, same samples of it: its samples near a motion move either right or left.
    on_manifold = result_r["on_manifold"]["reference"]
    assert result_l["reference_rate"] + result_r["reference_rate"] == pytest.approx(on_manifold)
    assert result_l["on_manifold"]["policy"] >= 0.9, result_l
    assert result_l["difference"] >= 0.10 and result_l["ci95"][0] > 0, result_l


def test_report_has_plots_and_a_strip_of_frames(preferring_right):
    from PIL import Image

    out, _, _ = preferring_right
    report = out / "report"
    assert "rate of motion to the right" in (report / "report.md").read_text()
    for name in ("rates.png", "curves.png", "strip.png"):
        with Image.open(report / name) as im:
            im.load()
            assert im.size[0] > 300 and im.size[1] > 150
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 20
