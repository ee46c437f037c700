"""The toy worlds' oracles, manifolds, noisy labels and diversity (tools/toy_world.py, tools/detail_world.py),
in seconds: the data the demos write is what the oracles say it is, a faded detail is off the manifold, and a
collapsed mode has no diversity."""

from __future__ import annotations

import json
import sys
import tarfile

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))

import detail_world  # noqa: E402
import toy_world  # noqa: E402

WORLDS = (toy_world, detail_world)


@pytest.mark.parametrize("world", WORLDS, ids=lambda w: w.__name__)
def test_oracle_and_manifold_agree_with_the_data(world):
    a, b = world.data_samples(512, "A", seed=1), world.data_samples(512, "B", seed=2)
    assert world.on_manifold(a).all() and world.on_manifold(b).all()
    assert world.is_preferred(a, "A").all() and not world.is_preferred(b, "A").any()
    assert world.is_preferred(b, "B").all()
    assert set(world.mode_label(a)) == {"A"} and set(world.mode_label(b)) == {"B"}
    # far from the data: pure noise of the sampler's scale counts for no mode
    noise = torch.randn(256, *toy_world.LATENT_SHAPE, generator=torch.Generator().manual_seed(3))
    assert not world.on_manifold(noise).any() and set(world.mode_label(noise)) == {"-"}


def test_a_faded_detail_is_off_the_manifold_and_the_rest_decides_nothing():
    a = detail_world.data_samples(256, "A", seed=4)
    faded = a.clone()
    faded[(slice(None), *detail_world.PATCH)] *= 0.2
    assert not detail_world.on_manifold(faded).any()
    assert not detail_world.is_preferred(faded, "A").any()
    # the patch alone decides: A's scene parts with B's patches read B
    b = detail_world.data_samples(256, "B", seed=5)
    mixed = a.clone()
    mixed[(slice(None), *detail_world.PATCH)] = b[(slice(None), *detail_world.PATCH)]
    assert detail_world.is_preferred(mixed, "B").all()
    # 16 of the 256 latent values
    mask = torch.zeros(toy_world.LATENT_SHAPE, dtype=torch.bool)
    mask[detail_world.PATCH] = True
    assert mask.sum() == 16


@pytest.mark.parametrize("agreement", [1.0, 0.9, 0.75, 0.6])
def test_flipped_labels_are_exactly_the_disagreeing_share(agreement):
    flips = toy_world.flipped(2048, agreement, seed=0)
    assert flips.sum() == round((1 - agreement) * 2048)
    assert torch.equal(flips, toy_world.flipped(2048, agreement, seed=0))
    with pytest.raises(ValueError, match="agreement"):
        toy_world.flipped(8, 1.5, seed=0)


def _pairs(out) -> list[tuple[dict, dict]]:
    from safetensors.torch import load

    pairs = []
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for name in sorted(n for n in members if n.endswith(".json")):
            key = name[:-len(".json")]
            pairs.append((json.loads(members[name]), load(members[key + ".safetensors"])))
    return pairs


@pytest.mark.parametrize("world", WORLDS, ids=lambda w: w.__name__)
def test_written_pairs_follow_the_oracle_except_the_flipped_ones(world, tmp_path):
    world.write_data(str(tmp_path / "noisy"), num_pairs=40, prefer="B", seed=0, pairs_per_shard=16, agreement=0.75)
    world.write_data(str(tmp_path / "clean"), num_pairs=40, prefer="B", seed=0, pairs_per_shard=16)
    noisy, clean = _pairs(tmp_path / "noisy"), _pairs(tmp_path / "clean")
    assert len(noisy) == 40 and sum(not meta["source"]["agrees_with_oracle"] for meta, _ in noisy) == 10
    for (meta, t), (_, c) in zip(noisy, clean):
        w, l = t["latents_w"].float()[None], t["latents_l"].float()[None]
        agrees = meta["source"]["agrees_with_oracle"]
        assert bool(world.is_preferred(w, "B")) == agrees and bool(world.is_preferred(l, "B")) == (not agrees)
        # the same images as without flips: a reference trained on them is the same
        same = (t["latents_w"], t["latents_l"]) if agrees else (t["latents_l"], t["latents_w"])
        assert torch.equal(same[0], c["latents_w"]) and torch.equal(same[1], c["latents_l"])
    if world is detail_world:  # a pair's images differ on the patch alone
        outside = torch.ones(toy_world.LATENT_SHAPE, dtype=torch.bool)
        outside[detail_world.PATCH] = False
        assert all(torch.equal(t["latents_w"][outside], t["latents_l"][outside]) for _, t in noisy)


def test_diversity_is_the_datas_spread_and_zero_for_a_collapsed_mode():
    a = toy_world.data_samples(512, "A", seed=6)
    everything = torch.ones(512, dtype=torch.bool)
    assert toy_world.diversity(a, everything) == pytest.approx(2 ** 0.5 * toy_world.SPREAD, rel=0.02)
    assert toy_world.diversity(a[:1].expand(64, -1, -1, -1), everything[:64]) == pytest.approx(0.0, abs=1e-3)
    half = toy_world.diversity(0.5 * a, everything)
    assert half == pytest.approx(0.5 * toy_world.diversity(a, everything), rel=1e-4)
    assert toy_world.diversity(a, torch.zeros(512, dtype=torch.bool)) != toy_world.diversity(a, everything)  # nan
    # the detail world's modes vary by scene too: more diversity than the noise alone gives
    assert toy_world.diversity(detail_world.data_samples(512, "A", seed=7), everything) > 0.9
