"""Diagnostics that catch degradation, and validation on held-out pairs, through the real launcher."""

from __future__ import annotations

import math

import pytest

from conftest import fork_train, write_run_config

pytestmark = pytest.mark.slow


def _text_events(tb_dir) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"tensors": 0})
    acc.Reload()
    texts = []
    for tag in acc.Tags().get("tensors", []):
        for event in acc.Tensors(tag):
            texts.extend(v.decode() for v in event.tensor_proto.string_val)
    return texts


def test_too_large_lr_triggers_the_gap_w_warning_and_validation_is_logged(tiny, tmp_path):
    from conftest import read_scalars

    cfg = write_run_config(tmp_path / "run.yaml", tiny, tmp_path / "run",
                           train={"max_steps": 8}, optim={"lr": 3e-2},
                           data={"val_shards": str(tiny / "shards"), "val_every": 4, "val_max_batches": 2},
                           logging={"gap_w_window": 3, "progress": False},
                           checkpoint={"every_steps": 100, "export": False})
    proc = fork_train(cfg)
    assert proc.returncode == 0, proc.stderr[-5000:]
    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    gap_w = [v for _, v in scalars["train/gap_w"]]
    assert sum(v > 0 for v in gap_w) >= 3, f"lr 3e-2 should make the policy worse on winners: {gap_w}"
    assert "has been above zero for 3 steps" in proc.stderr
    assert any("getting worse than the reference" in t for t in _text_events(tmp_path / "run" / "tensorboard"))

    for name in ("val/loss", "val/implicit_acc", "val/gap_w", "val/gap_l"):
        assert [s for s, _ in scalars[name]] == [4, 8], name
        assert all(math.isfinite(v) for _, v in scalars[name]), name
    # Per noise level: the buckets that were drawn are logged.
    buckets = [n for n in scalars if n.startswith("train/implicit_acc/")]
    assert buckets and set(buckets) <= {f"train/implicit_acc/{b}_noise" for b in ("low", "mid", "high")}


def test_validation_uses_fixed_draws(tiny, tmp_path):
    """At a negligible lr the policy stays the reference: val/loss is log 2 at every validation."""
    from conftest import read_scalars

    cfg = write_run_config(tmp_path / "run.yaml", tiny, tmp_path / "run",
                           train={"max_steps": 2}, optim={"lr": 1e-12},
                           data={"val_shards": str(tiny / "shards"), "val_every": 1, "val_max_batches": 2},
                           logging={"progress": False}, checkpoint={"every_steps": 100, "export": False})
    proc = fork_train(cfg)
    assert proc.returncode == 0, proc.stderr[-5000:]
    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    # lr 1e-12 leaves the policy the reference: z = 0 on every held-out pair, at both validations.
    losses = [v for _, v in scalars["val/loss"]]
    assert losses == pytest.approx([math.log(2)] * 2, abs=1e-3)


def test_gap_watch_warns_once_after_the_window_and_resets():
    """The gap_w warning: at the window-th step in a row with gap_w > 0, once; a non-positive value resets it."""
    from dpo_ds.metrics import GapWatch

    watch = GapWatch(window=3)
    said = [watch.message(step, {"train/gap_w": g}) for step, g in enumerate([0.1, 0.2, -0.1, 0.1, 0.1, 0.3, 0.2], 1)]
    assert [i for i, m in enumerate(said, 1) if m] == [6]  # steps 4, 5, 6 in a row; not again at 7
    assert "above zero for 3 steps" in said[5]
    assert watch.message(8, {"train/loss": 0.5}) is None  # an SFT run logs no gap_w


def test_manifold_watch_warns_once_when_losers_get_worse_far_more_than_winners_better():
    """The oracle-free warning of samples leaving the data: over a full window, mean gap_l above ratio x
    mean −gap_w and above MANIFOLD_MIN_REL of the reference's error on losers; once."""
    from dpo_ds.metrics import MANIFOLD_MIN_REL, ManifoldWatch

    def said(values, window=3, ratio=20.0):
        watch = ManifoldWatch(window, ratio)
        out = [watch.message(step, {"train/gap_w": gw, "train/gap_l": gl, "train/ref_err_l": 1.0})
               for step, (gw, gl) in enumerate(values, 1)]
        return [step for step, m in enumerate(out, 1) if m], out

    healthy = [(-0.05, 0.6)] * 6  # losers 12x worse than winners better: the demo's kind of run
    assert said(healthy)[0] == []
    failing = [(-0.05, 0.6)] * 2 + [(-0.01, 0.8)] * 5  # 80x: the beta = 50 kind
    steps, out = said(failing)
    assert steps == [4]  # steps 2-4 average 31x (steps 1-3, 16x), and only once
    assert "samples may be leaving the data" in out[3] and "logging.loser_gap_ratio = 20" in out[3]
    # a large ratio on a small change says nothing: below MANIFOLD_MIN_REL of the reference's error
    assert said([(-0.001, 0.9 * MANIFOLD_MIN_REL)] * 5)[0] == []
    assert said([(+0.01, 0.9)] * 5)[0] == [3]  # winners worse too: certainly (gap_w's own watch warns as well)
    assert ManifoldWatch(3, 20.0).message(1, {"train/loss": 0.5}) is None  # an SFT run logs no gaps
