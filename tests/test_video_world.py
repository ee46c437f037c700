"""The video world's clips and oracle (tools/video_world.py), in seconds: the direction is in the order of
the frames alone, the oracle reads it, and clips that move as no template does are off the manifold."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))

import video_world as vw  # noqa: E402


def _noisy(direction: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(vw.STARTS), (n,), generator=g)
    clean = torch.stack([vw.clip(direction, vw.STARTS[int(k)]) for k in starts])
    return clean + vw.SPREAD * torch.randn(clean.shape, generator=g)


@pytest.mark.parametrize("direction", vw.DIRECTIONS)
def test_oracle_reads_the_direction_of_clean_noisy_and_reversed_clips(direction):
    other = vw.DIRECTIONS[1 - vw.DIRECTIONS.index(direction)]
    clean = vw.templates()[vw.DIRECTIONS.index(direction)]
    right = direction == "right"
    assert (vw.moves_right(clean) == right).all() and vw.on_manifold(clean).all()
    noisy = _noisy(direction, 256, seed=1)
    assert (vw.moves_right(noisy) == right).all() and vw.on_manifold(noisy).all()
    assert vw.is_preferred(noisy, direction).all() and not vw.is_preferred(noisy, other).any()
    # the same clips played backwards move the other way, and are as near the data
    assert (vw.moves_right(noisy.flip(2)) == (not right)).all() and vw.on_manifold(noisy.flip(2)).all()


def test_no_single_frame_tells_the_direction():
    t = vw.templates()  # [2, S, C, F, H, W]
    for f in range(vw.F):
        # at every frame index, the set of frames over all starts is the same in both directions
        frames = [sorted(tuple(x.flatten().tolist()) for x in t[d, :, :, f]) for d in range(2)]
        assert frames[0] == frames[1], f
    # each clip moving right, read backwards, is the clip moving left from start + STEP (F - 1), itself
    # one of the world's motions
    for s in vw.STARTS:
        end = (s + vw.STEP * (vw.F - 1)) % vw.W
        assert end in vw.STARTS and torch.equal(vw.clip("right", s).flip(1), vw.clip("left", end))
    # and the noisy data's per-frame statistics agree between directions
    r, l = _noisy("right", 4096, seed=2), _noisy("left", 4096, seed=3)
    for f in range(vw.F):
        assert r[:, :, f].mean().item() == pytest.approx(l[:, :, f].mean().item(), abs=0.01)
        assert r[:, :, f].std().item() == pytest.approx(l[:, :, f].std().item(), rel=0.01)


def test_noise_frozen_frames_and_blends_are_off_the_manifold():
    g = torch.Generator().manual_seed(4)
    assert not vw.on_manifold(torch.randn(64, *vw.CLIP_SHAPE, generator=g)).any()
    p = vw.pattern()
    still = torch.stack([p] * vw.F, dim=1)[None]  # the pattern standing still: frames right, motion none
    assert not vw.on_manifold(still).any()
    t = vw.templates()
    n = len(vw.STARTS)
    blends = torch.stack([(t[0, i] + t[1, j]) / 2 for i in range(n) for j in range(n)])
    assert not vw.on_manifold(blends).any()


def test_the_on_manifold_threshold_separates_data_from_blends():
    # README and video_world.ON_MANIFOLD_RMS state these: the data's noise is below the threshold, the
    # nearest templates of opposite directions lie more than twice it apart (their blend is off), and a
    # frozen clip is as far
    d = vw.template_distances(vw.templates().flatten(0, 1)).flatten(1).sqrt()  # [2S, 2S]
    n = len(vw.STARTS)
    opposite = d[:n, n:].min().item()
    assert vw.SPREAD < vw.ON_MANIFOLD_RMS < opposite / 2
    still = torch.stack([vw.pattern()] * vw.F, dim=1)[None]
    assert vw.template_distances(still).sqrt().min().item() >= opposite - 1e-6


def test_data_writes_wan_shards_of_pairs_reversed_in_time(tmp_path):
    from dpo_ds.data import EMPTY_PROMPT_NAME

    import json
    import tarfile

    vw.write_data(str(tmp_path), num_pairs=8, prefer="left", seed=0, pairs_per_shard=4)
    shards = tmp_path / "shards"
    assert (shards / EMPTY_PROMPT_NAME).is_file()
    assert (tmp_path / "model" / "transformer" / "config.json").is_file()
    sched = json.loads((tmp_path / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert sched == vw.VIDEO_SCHEDULER_CONFIG
    transformer = json.loads((tmp_path / "model" / "transformer" / "config.json").read_text())
    assert {k: transformer[k] for k in vw.VIDEO_TRANSFORMER_CONFIG if k != "_class_name"} == \
        {k: v for k, v in vw.VIDEO_TRANSFORMER_CONFIG.items() if k != "_class_name"}
    assert json.loads((tmp_path / "world.json").read_text()) == vw.world()  # tools/demo_video.py's staleness check
    with tarfile.open(sorted(shards.glob("*.tar"))[0]) as tar:
        names = tar.getnames()
    assert any(n.endswith(".json") for n in names), names
