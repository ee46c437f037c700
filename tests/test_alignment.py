"""Does training move samples toward what was preferred? The toy world, end to end (tools/demo.py).

Reference: a tiny UNet trained on both modes (loss.type=sft); policy: Diffusion-DPO from it with
the demo's default objective, through the deepspeed launcher with 2 processes and the reference
cache; samples scored by the toy's oracle against the reference's, from the same initial noise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, env

pytestmark = pytest.mark.slow

FEWER_STEPS = ["--sft-steps", "300", "--dpo-steps", "80", "--checkpoint-every", "40", "--num-samples", "256"]


def _demo(out: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "demo.py"), "--output-dir", str(out), *FEWER_STEPS,
                           *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "report" / "report.json").read_text())


@pytest.fixture(scope="module")
def preferring_a(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo_a")
    return out, _demo(out, "--prefer", "A")


def test_policy_moves_toward_the_preferred_mode(preferring_a):
    _, result = preferring_a
    # The evaluation means something only if the samples look like the data: nearly all near a mode.
    assert result["on_manifold"]["reference"] >= 0.9 and result["on_manifold"]["policy"] >= 0.9, result
    assert result["difference"] >= 0.10, result
    assert result["ci95"][0] > 0, result


def test_reversed_preferences_move_the_other_way(preferring_a, tmp_path):
    out_a, result_a = preferring_a
    result_b = _demo(tmp_path, "--prefer", "B", "--reference", str(out_a / "reference"))
    # Same reference, same samples of it: its samples near a mode are either A or B.
    on_manifold = result_a["on_manifold"]["reference"]
    assert result_b["reference_rate"] + result_a["reference_rate"] == pytest.approx(on_manifold)
    assert result_b["difference"] >= 0.10 and result_b["ci95"][0] > 0, result_b


def test_report_files_are_real_plots(preferring_a):
    from PIL import Image

    out, result = preferring_a
    report = out / "report"
    assert "rate of mode A" in (report / "report.md").read_text()
    for name in ("rates.png", "curves.png", "samples.png"):
        with Image.open(report / name) as im:
            im.load()
            assert im.size[0] > 300 and im.size[1] > 200
            # a real plot: many distinct colours, not a blank canvas
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 20
    assert [step for step, _, _ in result["rate_curve"]] == [0, 40, 80]
