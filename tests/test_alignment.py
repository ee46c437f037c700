"""Does training move samples toward what was preferred? The toy world, end to end (tools/demo.py).

Reference: a tiny UNet trained on both modes (loss.type=sft); policy: Diffusion-DPO from it with
the demo's default objective, through the deepspeed launcher with 2 processes and the reference
cache; samples scored by the toy's oracle against the reference's, from the same initial noise.
The beta = 50 failure and the noisy-label world (a quarter of the labels flipped) reuse the
reference: flipping labels changes no image.

DPO_DS_EFFICACY=1 also runs the long efficacy checks (tests/test_efficacy.py's, and here the noisy
world's, both directions): over the suite's budget, and expected to fail until the README's figures
for those worlds pass the bar.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, env

pytestmark = pytest.mark.slow

IS_EFFICACY = bool(os.environ.get("DPO_DS_EFFICACY"))
FEWER_STEPS = ["--sft-steps", "300", "--dpo-steps", "40", "--checkpoint-every", "20", "--num-samples", "256"]


def _demo(out: Path, *args: str) -> tuple[dict, str]:
    """(report.json, what the terminal received)"""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "demo.py"), "--output-dir", str(out), *FEWER_STEPS,
                           *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "report" / "report.json").read_text()), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def preferring_a(tmp_path_factory) -> tuple[Path, dict, str]:
    """The suite's one demo run with every stage: data, reference, cache, policy, live check, evaluation."""
    out = tmp_path_factory.mktemp("demo_a")
    return (out, *_demo(out, "--prefer", "A", "--live-steps", "3"))


def test_policy_moves_toward_the_preferred_mode(preferring_a):
    _, result, _ = preferring_a
    # The evaluation means something only if the samples look like the data: nearly all near a mode.
    assert result["on_manifold"]["reference"] >= 0.9 and result["on_manifold"]["policy"] >= 0.9, result
    assert result["difference"] >= 0.10, result
    assert result["ci95"][0] > 0, result


def test_reversed_preferences_move_the_other_way(preferring_a, tmp_path):
    out_a, result_a, _ = preferring_a
    result_b, terminal_b = _demo(tmp_path, "--prefer", "B", "--reference", str(out_a / "reference"),
                                 "--live-steps", "0")
    assert "[2/5] reference: " in terminal_b and "[5/5] evaluation: " in terminal_b, terminal_b
    # Same reference, same samples of it: its samples near a mode are either A or B.
    on_manifold = result_a["on_manifold"]["reference"]
    assert result_b["reference_rate"] + result_a["reference_rate"] == pytest.approx(on_manifold)
    assert result_b["difference"] >= 0.10 and result_b["ci95"][0] > 0, result_b


def _passes_the_bar(result: dict) -> None:
    """The alignment bar: 10 points or more, the interval above zero, 95% of samples on the manifold (a gain
    bought by fading what was rejected does not count)."""
    assert result["on_manifold"]["policy"] >= 0.95, result
    assert result["difference"] >= 0.10 and result["ci95"][0] > 0, result


# A quarter of the labels flipped. DPO's optimum then holds the margin at beta/2 x |z| = log(0.75 / 0.25): at the
# demo's beta = 500 that leaves the policy at the reference (+0.020 in 150 steps, README); beta = 50 allows 10x more.
NOISY = ["--agreement", "0.75", "--beta", "50", "--live-steps", "0", "--checkpoint-every", "40"]


NOT_YET = pytest.mark.xfail(reason="not reached yet: with a quarter of the labels flipped, dpo+sft moved the rate by "
                                   "+0.020 at beta = 500 and +0.016 at beta = 50 in 150 steps (README)")


@pytest.mark.skipif(not IS_EFFICACY, reason="a long efficacy run, known not to pass yet (README, 'Not done yet'); "
                                           "DPO_DS_EFFICACY=1 runs it")
@NOT_YET
def test_noisy_labels_still_move_samples_to_the_preferred_mode(preferring_a, tmp_path):
    """A quarter of the labels flipped (75% agree with the oracle): the recommended objective still passes."""
    out_a, _, _ = preferring_a
    result, _ = _demo(tmp_path, *NOISY, "--reference", str(out_a / "reference"))
    _passes_the_bar(result)


@pytest.mark.skipif(not IS_EFFICACY, reason="a long efficacy run, known not to pass yet (README, 'Not done yet'); "
                                           "DPO_DS_EFFICACY=1 runs it")
@NOT_YET
def test_noisy_labels_reversed_move_the_other_way(preferring_a, tmp_path):
    out_a, _, _ = preferring_a
    result, _ = _demo(tmp_path, *NOISY, "--prefer", "B", "--reference", str(out_a / "reference"))
    _passes_the_bar(result)


def test_the_manifold_warning_fires_at_beta_50_and_not_on_the_demos_run(preferring_a, tmp_path):
    """The oracle-free warning (dpo_ds.metrics.ManifoldWatch) of the README's beta = 50 failure (plain DPO,
    samples leaving the data while gap_w stays negative); the demo's run does not raise it."""
    out_a, result_a, _ = preferring_a
    assert not result_a["manifold_warning"]
    # Same pairs, reference and seed as the demo's run: its reference cache fits (the demo reuses a complete one).
    shutil.copytree(out_a / "cache_seed0", tmp_path / "cache_seed0")
    result, terminal = _demo(tmp_path, "--objective", "dpo", "--beta", "50", "--reference",
                             str(preferring_a[0] / "reference"), "--live-steps", "0", "--checkpoint-every", "40",
                             "--num-samples", "64")  # the warning is the point here, not the samples
    assert result["manifold_warning"], result
    assert "WARNING: samples may be leaving the data" in terminal
    assert not result["gap_w_warning"]  # the failure the gap_w watch does not see


def test_report_files_are_real_plots(preferring_a):
    from PIL import Image

    out, result, _ = preferring_a
    report = out / "report"
    assert "rate of mode A" in (report / "report.md").read_text()
    for name in ("rates.png", "curves.png", "samples.png"):
        with Image.open(report / name) as im:
            im.load()
            assert im.size[0] > 300 and im.size[1] > 200
            # a real plot: many distinct colours, not a blank canvas
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 20
    assert [step for step, _, _ in result["rate_curve"]] == [0, 20, 40]


def test_terminal_shows_stages_progress_and_where_to_look(preferring_a):
    out, result, terminal = preferring_a
    lines = re.split(r"[\r\n]", terminal)
    stages = [line.split(":")[0] for line in lines if re.match(r"\[\d/\d\] ", line)]
    assert stages == ["[1/6] data", "[2/6] reference", "[3/6] cache", "[4/6] policy", "[5/6] live reference",
                      "[6/6] evaluation"], terminal
    bars = [line.strip() for line in lines if "%|" in line]
    for desc in ("train", "reference (rank 0)", "sampling"):
        assert any(re.match(re.escape(desc) + r": 100%\|.*\[\d\d:\d\d<\d\d:\d\d", b) for b in bars), (desc, bars)
    assert any(re.match(r"train: +[1-9]\d?%\|", b) for b in bars), "no bar between start and end"
    assert f"reference samples mode A at rate {result['reference_rate']:.3f}" in terminal
    # The live, CPU-offloaded reference gives the cached one's loss (tests/test_reference_cache.py proves it).
    assert result["live_check"]["steps"] == 3 and result["live_check"]["max_rel_diff_train_loss"] < 1e-3
    assert "train/loss at steps 1-3, live vs cached reference: largest relative difference" in terminal
    for chatter in ("Setting accelerator", "[INFO]", "launch.py", "Processing zero checkpoint",
                    "Loading checkpoint shards", "deepspeed --num_gpus", "Traceback"):
        assert chatter not in terminal, chatter
    for pointer in (str(out / "report" / "report.md"), "rates.png", f"tensorboard --logdir {out / 'dpo' / 'tensorboard'}",
                    f"{out / 'logs'}/", "Running a real job"):
        assert pointer in terminal, pointer
    assert {p.name for p in (out / "logs").iterdir()} == {"demo.log", "sft.log", "precompute_seed0.log", "dpo.log",
                                                          "live.log"}
    assert not [b for b in bars if "nan" in b], "an SFT run's bar showed its missing accuracy as nan"
    dpo_log = (out / "logs" / "dpo.log").read_text()
    assert "Setting accelerator" in dpo_log
    # counted before ZeRO-3 partitions the parameters (it said 0.00M)
    assert re.search(r"policy: [1-9][\d,]* trainable parameters, ZeRO stage 3", dpo_log)
