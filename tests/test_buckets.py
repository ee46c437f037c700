"""Shape buckets (dpo_ds.data.PairLoader): a data set whose latents come in several shapes (two frame
counts x two resolutions, as a video family's clips) is batched one shape at a time, every rank takes
the same number of batches in the same bucket order, resume is bitwise, and a world-size change trains
no pair twice. A data set of one shape keeps today's plan exactly. CPU only."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import torch

from samples import SCHEMA, make_sample
from test_data import LAW, all_keys, write_pairs
from dpo_ds import data

# Latents of any shape, as the wan family's schema leaves them.
OPEN_SCHEMA = {**SCHEMA, "latents_w": None, "latents_l": None}
# Two frame counts x two latent resolutions, [C, F, H, W].
SHAPES = [(4, 1, 8, 8), (4, 3, 8, 8), (4, 1, 6, 10), (4, 3, 6, 10)]


def write_buckets(folder, plan: list[tuple[tuple[int, ...], int, int]]) -> dict[str, tuple[int, ...]]:
    """plan: (latent shape, pairs, pairs per shard) per bucket, each through its own writer (prefix)
    into one folder and one index.json. Returns each key's shape."""
    shape_of, index = {}, 0
    for b, (shape, num_pairs, per_shard) in enumerate(plan):
        with data.ShardWriter(str(folder), prefix=f"b{b}", max_pairs=per_shard) as writer:
            for _ in range(num_pairs):
                key, meta, tensors = make_sample(index, latent_shape=shape)
                writer.write(key, meta, tensors)
                shape_of[key] = shape
                index += 1
    return shape_of


def loader(shards, **kw) -> data.PairLoader:
    args = dict(batch_size=2, rank=0, world_size=1, seed=7, num_workers=2, shuffle_buffer=4,
                schema=OPEN_SCHEMA, draw_t=LAW)
    return data.PairLoader(shards, **{**args, **kw})


def shapes_of(batches) -> list[tuple[int, ...]]:
    return [tuple(b["latents_w"].shape[1:]) for b in batches]


def consumed(batches) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for batch in batches:
        for url, key in zip(batch["shard_urls"], batch["keys"]):
            out.setdefault(url, []).append(key)
    return out


# A skewed mix: many pairs of one shape, few of others, one bucket too small for every rank.
SKEWED = [(SHAPES[0], 45, 5), (SHAPES[1], 12, 4), (SHAPES[2], 8, 2), (SHAPES[3], 3, 3)]


def test_the_index_records_each_shards_shape(tmp_path):
    write_buckets(tmp_path, [(SHAPES[0], 3, 2), (SHAPES[3], 2, 2)])
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["format"] == "dpo_ds.shards/3"
    assert [(e["name"], e["shape"]) for e in index["shards"]] == [
        ("b0-000000.tar", list(SHAPES[0])), ("b0-000001.tar", list(SHAPES[0])), ("b1-000000.tar", list(SHAPES[3]))]
    assert [s.shape for s in data.list_shards(str(tmp_path))] == [SHAPES[0], SHAPES[0], SHAPES[3]]
    # A shard whose pairs differ records no shape; an index of format /2 (no shapes) is still read.
    with data.ShardWriter(str(tmp_path / "mixed"), max_pairs=4) as writer:
        for i, shape in enumerate(SHAPES[:2]):
            writer.write(*make_sample(i, latent_shape=shape))
    assert "shape" not in json.loads((tmp_path / "mixed" / "index.json").read_text())["shards"][0]
    for e in index["shards"]:
        del e["shape"]
    index["format"] = "dpo_ds.shards/2"
    (tmp_path / "index.json").write_text(json.dumps(index))
    assert [(s.num_pairs, s.shape) for s in data.list_shards(str(tmp_path))] == [(2, None), (1, None), (2, None)]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("num_workers", [0, 3])
def test_no_batch_mixes_shapes_and_every_rank_steps_together(tmp_path, caplog, num_workers):
    shape_of = write_buckets(tmp_path, SKEWED)
    shards = data.list_shards(str(tmp_path), check=True)
    with caplog.at_level(logging.WARNING, logger="dpo_ds.data"):
        loaders = [loader(shards, rank=r, world_size=3, num_workers=num_workers) for r in range(3)]
    # 9 shards of 5 -> 3 per rank, 7 batches; 3 of 4 -> 1 per rank, 2 batches; 4 of 2 -> 1 or 2 per rank, 1 batch;
    # 1 shard of 3: a rank gets none, so the bucket is left over, with a warning naming it.
    assert loaders[0].bucket_batches == {SHAPES[0]: 7, SHAPES[1]: 2, SHAPES[2]: 1, SHAPES[3]: 0}
    assert f"shape bucket {SHAPES[3]}" in caplog.text
    for epoch in range(2):
        per_rank = [list(ld.epoch(epoch)) for ld in loaders]
        assert [len(b) for b in per_rank] == [10] * 3  # every rank the same number of steps
        # No batch mixes shapes, and each pair has its own shape.
        for batches in per_rank:
            for batch in batches:
                assert {shape_of[k] for k in batch["keys"]} == {tuple(batch["latents_w"].shape[1:])}
                assert batch["noise"].shape == batch["latents_w"].shape
        # The same bucket on every rank at every step.
        assert shapes_of(per_rank[0]) == shapes_of(per_rank[1]) == shapes_of(per_rank[2])
        keys = [k for batches in per_rank for k in all_keys(batches)]
        assert len(keys) == len(set(keys)) == 3 * 10 * 2
        assert sorted(shapes_of(per_rank[0])) == sorted([SHAPES[0]] * 7 + [SHAPES[1]] * 2 + [SHAPES[2]])
    # The bucket order is seeded by the epoch: another epoch, another order (same counts).
    assert shapes_of(list(loaders[0].epoch(0))) != shapes_of(list(loaders[0].epoch(5)))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("num_workers,world_size", [(0, 1), (2, 2), (3, 1)])
def test_resume_mid_epoch_is_bitwise_with_buckets(tmp_path, num_workers, world_size):
    write_buckets(tmp_path, [(SHAPES[0], 16, 3), (SHAPES[1], 9, 3), (SHAPES[2], 7, 4), (SHAPES[3], 6, 2)])
    shards = data.list_shards(str(tmp_path))
    ld = loader(shards, num_workers=num_workers, world_size=world_size, rank=world_size - 1)
    full = list(ld.epoch(1))
    assert len(full) == ld.batches_per_epoch and len(set(shapes_of(full))) == 4
    for skip in range(1, len(full) + 1):
        tail = list(ld.epoch(1, skip_batches=skip))
        assert [b["keys"] for b in tail] == [b["keys"] for b in full[skip:]], skip
        for resumed, original in zip(tail, full[skip:]):
            for name in ("t", "noise", "latents_w", "latents_l", "prompt_embeds", "draw_index", "content_hash"):
                assert torch.equal(resumed[name], original[name])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_state_dict_resume_goes_on_bitwise_across_epochs(tmp_path):
    """The trainer's path: batches(), state_dict mid-epoch, a fresh loader's load_state_dict, batches()."""
    write_buckets(tmp_path, [(SHAPES[0], 12, 3), (SHAPES[3], 8, 2)])
    shards = data.list_shards(str(tmp_path))
    reference = loader(shards).batches()
    assert loader(shards).batches_per_epoch == 6 + 4
    expected = [next(reference) for _ in range(3 * 10)]  # three epochs
    first = loader(shards)
    stream = first.batches()
    for _ in range(7):
        next(stream)
    state = json.loads(json.dumps(first.state_dict()))
    second = loader(shards)
    second.load_state_dict({0: state}, 1)
    resumed = second.batches()
    for original in expected[7:]:
        batch = next(resumed)
        assert batch["keys"] == original["keys"]
        assert torch.equal(batch["noise"], original["noise"]) and torch.equal(batch["latents_w"], original["latents_w"])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("old_world,new_world", [(2, 3), (3, 1)])
def test_another_world_size_trains_no_pair_twice_with_buckets(tmp_path, old_world, new_world):
    shape_of = write_buckets(tmp_path, SKEWED[:3])
    shards = data.list_shards(str(tmp_path))
    old = [loader(shards, rank=r, world_size=old_world) for r in range(old_world)]
    before = [list(ld.epoch(1))[:3] for ld in old]
    exclude: dict[str, list[str]] = {}
    for batches in before:
        for url, keys in consumed(batches).items():
            exclude.setdefault(url, []).extend(keys)
    new = [loader(shards, rank=r, world_size=new_world) for r in range(new_world)]
    after = [list(ld.epoch(1, exclude=exclude)) for ld in new]
    num_batches = new[0].num_batches(exclude)
    assert [len(b) for b in after] == [num_batches] * new_world > [0] * new_world
    assert len({tuple(shapes_of(b)) for b in after}) == 1  # the same bucket order on every new rank
    for batch in [b for batches in after for b in batches]:
        assert {shape_of[k] for k in batch["keys"]} == {tuple(batch["latents_w"].shape[1:])}
    trained = [k for b in before for k in all_keys(b)] + [k for b in after for k in all_keys(b)]
    assert len(trained) == len(set(trained)), "a pair was trained twice in one epoch"
    # Each bucket leaves over fewer than one batch per new rank.
    assert len(shape_of) - len(trained) == new[0].num_left_over(exclude) < 3 * new_world * 2
    # And the remapped epoch resumes exactly on its own world size.
    tail = list(new[0].epoch(1, skip_batches=2, exclude=exclude))
    assert [b["keys"] for b in tail] == [b["keys"] for b in after[0][2:]]


def test_a_pair_unlike_its_shards_recorded_shape_is_bad_and_named(tmp_path, caplog):
    write_buckets(tmp_path, [(SHAPES[0], 4, 4), (SHAPES[1], 4, 4)])
    index = json.loads((tmp_path / "index.json").read_text())
    index["shards"][1]["shape"] = list(SHAPES[2])  # the index says otherwise than the shard's pairs
    (tmp_path / "index.json").write_text(json.dumps(index))
    shards = data.list_shards(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="dpo_ds.data"):
        batches = list(loader(shards, num_workers=0).epoch(0))
    assert sum(b["num_bad"] for b in batches) == 4
    assert f"in shard {shards[1].url}: latents_w has shape {SHAPES[1]}; index.json records {SHAPES[2]}" in caplog.text
    assert all(b["keys"] == [] or tuple(b["latents_w"].shape[1:]) == SHAPES[0] for b in batches)


# The keys of every batch of a single-shape set, as the loader dealt them before shape buckets existed
# (commit e99cd42): 40 pairs in shards of 7, world sizes 1 to 3, 0 or 2 workers, epochs 0 to 2, and a
# remapped epoch. The hash of tensors too was compared by hand (docs: the branch's report).
SINGLE_SHAPE_KEYS_SHA256 = "df30af0fd49ce3f6f7538e03233d5f3197c69c31fc2f4e3e43dfcdb22792b6cd"


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_one_shape_keeps_todays_plan(tmp_path):
    """Shards that record their (one) shape are dealt exactly as shards that record none, as before buckets."""
    write_pairs(tmp_path, range(40), max_pairs=7)
    recorded = data.list_shards(str(tmp_path))
    assert {s.shape for s in recorded} == {tuple(SCHEMA["latents_w"])}
    unrecorded = [data.ShardInfo(s.url, s.num_pairs, s.size_bytes) for s in recorded]
    digest = hashlib.sha256()
    for world_size in (1, 2, 3):
        for num_workers in (0, 2):
            for rank in range(world_size):
                kw = dict(rank=rank, world_size=world_size, num_workers=num_workers, batch_size=3, schema=SCHEMA)
                a, b = loader(recorded, **kw), loader(unrecorded, **kw)
                assert a.buckets == [tuple(SCHEMA["latents_w"])] and a.batches_per_epoch == b.batches_per_epoch
                for epoch in range(3):
                    batches_a, batches_b = list(a.epoch(epoch)), list(b.epoch(epoch))
                    assert [x["keys"] for x in batches_a] == [x["keys"] for x in batches_b]
                    assert all(torch.equal(x["noise"], y["noise"]) for x, y in zip(batches_a, batches_b))
                    digest.update(repr([x["keys"] for x in batches_a]).encode())
                exclude = consumed(list(a.epoch(1))[:2])
                other = loader(recorded, **{**kw, "rank": 0, "world_size": world_size % 3 + 1})
                digest.update(repr([x["keys"] for x in other.epoch(1, exclude=exclude)]).encode())
    if SINGLE_SHAPE_KEYS_SHA256 is not None:
        assert digest.hexdigest() == SINGLE_SHAPE_KEYS_SHA256


@pytest.mark.slow
def test_wan_clips_of_two_frame_counts_and_two_sizes_train_and_resume_bitwise(tmp_path):
    """Through the real deepspeed launcher, 2 ranks, ZeRO-3, live reference: wan clips in four shape buckets
    (1 or 2 latent frames x 8x8 or 4x8) train; a run stopped at step 3 and resumed ends with the very weights
    of the uninterrupted run."""
    import sys

    from safetensors.torch import load_file

    from conftest import REPO, fork_train, read_scalars, write_run_config
    from dpo_ds.models import family_class

    sys.path.insert(0, str(REPO / "tools"))
    import make_synthetic

    make_synthetic.write_model(str(tmp_path / "model"), seed=0, family="wan")
    wan = family_class("wan").tiny()
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 1, 8, 8), (4, 2, 8, 8), (4, 1, 4, 8), (4, 2, 4, 8)]
    index = 0
    for b, shape in enumerate(shapes):  # 8 pairs per bucket in 2 shards: 2 micro-batches of 2 per rank
        with data.ShardWriter(str(tmp_path / "shards"), prefix=f"b{b}", max_pairs=4) as writer:
            for _ in range(8):
                tensors = {name: torch.randn(shape, generator=g).half() for name in ("latents_w", "latents_l")}
                tensors.update(wan.synthetic_conditioning(wan.TINY_DENOISER_CONFIG, 64, g, torch.float16))
                meta = {"caption": f"clip {index}", "family": "wan", "latent_layout": "CFHW", "scaling_factor": 1.0,
                        "shift_factor": None, "label": 1.0, "source": {"index": index}}
                writer.write(f"clip{index:04d}", meta, tensors)
                index += 1
    sections = dict(model={"pretrained_path": str(tmp_path / "model"), "family": "wan"}, dpo={"beta": 10.0},
                    data={"shards": str(tmp_path / "shards"), "num_workers": 2})
    straight = write_run_config(tmp_path / "straight.yaml", tmp_path, tmp_path / "straight", **sections,
                                train={"max_steps": 6}, checkpoint={"every_steps": 6, "keep_last": 1})
    proc = fork_train(straight)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "4 shape buckets" in proc.stderr
    # perf/tflops: the policy's FLOPs per pair counted at start for each bucket's shape (dpo_ds.perf).
    assert all(f"GFLOPs per pair at latents {list(shape)}" in proc.stderr for shape in shapes)
    assert all(v > 0 for _, v in read_scalars(tmp_path / "straight" / "tensorboard")["perf/tflops"])
    cfg = write_run_config(tmp_path / "run.yaml", tmp_path, tmp_path / "run", **sections,
                           train={"max_steps": 3}, checkpoint={"every_steps": 3, "keep_last": 2})
    proc = fork_train(cfg)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    proc = fork_train(cfg, "--train.max_steps=6", "--checkpoint.resume=auto")
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "at step 3 (epoch 0, batch 3)" in proc.stderr
    a, b = (read_scalars(tmp_path / run / "tensorboard")["train/loss"] for run in ("straight", "run"))
    assert [s for s, _ in b] == list(range(1, 7)) and a == b
    a, b = (load_file(str(tmp_path / run / "export" / "transformer" / "diffusion_pytorch_model.safetensors"))
            for run in ("straight", "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_shards_without_a_recorded_shape_join_the_only_bucket_or_form_their_own():
    """A shard whose index records no shape is read as before buckets: with one recorded shape it joins it
    (today's plan); among several it is a bucket of its own. Planning reads no shard."""
    a, b = SHAPES[0], SHAPES[3]
    def shards(*shapes):
        return [data.ShardInfo(f"/nowhere/s{i}.tar", 4, 100, shape) for i, shape in enumerate(shapes)]
    assert loader(shards(a, None, a)).buckets == [a]
    assert loader(shards(None, None)).buckets == [None]
    mixed = loader(shards(a, None, b, b), world_size=1)
    assert mixed.buckets == [None, a, b] and mixed.bucket_batches == {None: 2, a: 2, b: 4}
