"""Shard writing, listing and reading (dpo_ds.data): CPU only, nothing downloaded."""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import tarfile
import time

import pytest
import safetensors.torch
import torch

from conftest import write_raw_tar
from samples import FAMILY, SCHEMA, make_sample
from dpo_ds import data, noise
from dpo_ds.models import ddpm

# The law of t of a DDPM family over 1000 timesteps (dpo_ds.models.unet2d), and one over [100, 900).
LAW = functools.partial(ddpm.uniform_timestep, lo=0, hi=1000)
NARROW_LAW = functools.partial(ddpm.uniform_timestep, lo=100, hi=900)


def write_pairs(out_dir, indices, max_pairs, prefix="shard") -> dict[str, tuple[dict, dict]]:
    pairs = {}
    with data.ShardWriter(str(out_dir), prefix=prefix, max_pairs=max_pairs) as writer:
        for i in indices:
            key, meta, tensors = make_sample(i)
            writer.write(key, meta, tensors)
            pairs[key] = (meta, tensors)
    return pairs


def raw_members(index: int, **overrides) -> tuple[str, dict[str, bytes]]:
    key, meta, tensors = make_sample(index)
    tensors.update(overrides)
    return key, {"json": json.dumps(meta).encode(), "safetensors": safetensors.torch.save(tensors)}


def make_loader(shards, **kw) -> data.PairLoader:
    args = dict(batch_size=3, rank=0, world_size=1, seed=7, num_workers=2, shuffle_buffer=4,
                schema=SCHEMA, draw_t=LAW)
    return data.PairLoader(shards, **{**args, **kw})


def all_keys(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def test_round_trip(tmp_path):
    pairs = write_pairs(tmp_path, range(30), max_pairs=8)
    shards = data.list_shards(str(tmp_path))
    assert [s.num_pairs for s in shards] == [8, 8, 8, 6]
    batches = list(make_loader(shards, num_workers=0).epoch(0))
    assert sorted(all_keys(batches)) == sorted(pairs)
    for batch in batches:
        for row, key in enumerate(batch["keys"]):
            for name, tensor in pairs[key][1].items():
                assert batch[name].dtype == torch.float32
                torch.testing.assert_close(batch[name][row], tensor.float(), rtol=0, atol=0)
    # The json is not in the batch; read it back the way a shard inspector would.
    for shard in shards:
        with tarfile.open(shard.url) as tar:
            names = tar.getnames()
            for key in {n.split(".")[0] for n in names}:
                members = {ext: tar.extractfile(f"{key}.{ext}").read() for ext in ("json", "safetensors")}
                assert data.decode_sample(key, members, SCHEMA)["meta"] == pairs[key][0]


def test_shards_are_byte_identical_and_indexed(tmp_path):
    write_pairs(tmp_path / "a", range(11), max_pairs=4)
    write_pairs(tmp_path / "b", range(11), max_pairs=4)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == ["index.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]  # no temp files left
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert index["format"] == "dpo_ds.shards/3"  # /2 plus each shard's latent shape
    assert [e["shape"] for e in index["shards"]] == [[4, 8, 8]] * 3
    assert [(e["num_pairs"], e["size_bytes"]) for e in index["shards"]] == [
        (n, os.path.getsize(tmp_path / "a" / f"shard-{i:06d}.tar")) for i, n in enumerate([4, 4, 3])
    ]
    assert [e["keys"] for e in index["shards"]] == [[f"pair{i:04d}" for i in r] for r in (range(4), range(4, 8),
                                                                                          range(8, 11))]
    # A second writer with another prefix adds its shards to the same index, keeping the others' keys.
    write_pairs(tmp_path / "a", range(100, 102), max_pairs=4, prefix="extra")
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert [e["name"] for e in index["shards"]] == ["extra-000000.tar"] + names[1:]
    assert [len(e["keys"]) for e in index["shards"]] == [2, 4, 4, 3]


def test_stale_index_is_recounted(tmp_path):
    write_pairs(tmp_path, range(6), max_pairs=6)
    index_path = tmp_path / "index.json"
    index = json.loads(index_path.read_text())
    index["shards"][0]["num_pairs"] = 99
    del index["shards"][0]["keys"]
    index_path.write_text(json.dumps(index))
    assert data.list_shards(str(tmp_path))[0].num_pairs == 99  # size matches: the index is trusted
    index["shards"][0]["size_bytes"] -= 512  # the shard grew since: the index is stale
    index_path.write_text(json.dumps(index))
    assert data.list_shards(str(tmp_path))[0].num_pairs == 6


def test_an_older_index_without_keys_is_read(tmp_path):
    write_pairs(tmp_path, range(10), max_pairs=4)
    index = json.loads((tmp_path / "index.json").read_text())
    index = {"format": "dpo_ds.shards/1", "shards": [{k: e[k] for k in ("name", "num_pairs", "size_bytes")}
                                                     for e in index["shards"]]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    assert [s.num_pairs for s in data.list_shards(str(tmp_path))] == [4, 4, 2]


def test_a_cut_short_shard_counts_every_lost_pair_bad(tmp_path, caplog):
    """A shard smaller than its index entry keeps the index's count: a cut that loses 3 pairs counts 3 bad."""
    write_pairs(tmp_path, range(8), max_pairs=8)
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    shard.write_bytes(shard.read_bytes()[: offsets[2 * 5 + 1] + 700])  # inside pair 5's second member
    with caplog.at_level(logging.WARNING, logger="dpo_ds.data"):
        [info] = data.list_shards(str(tmp_path))
        assert info.num_pairs == 8 and "cut short" in caplog.text
        batches = list(make_loader([info], batch_size=2, num_workers=0).epoch(0))
    assert sum(b["num_bad"] for b in batches) == 3
    assert len(set(all_keys(batches))) == 5
    assert f"shard {shard} gave 5 of its 8 pairs" in caplog.text


@pytest.mark.parametrize("order", ["consecutive", "later"])
def test_a_key_repeated_inside_a_shard_is_a_bad_pair(tmp_path, caplog, order):
    """Two samples with one key in a tar: the first is kept, the repeat is counted bad and named;
    the pair count that plans an epoch agrees with what the reader yields."""
    first, repeat = raw_members(2), raw_members(2, latents_w=torch.zeros(4, 8, 8).half())
    samples = [raw_members(0), raw_members(1), first, repeat, raw_members(3)] if order == "consecutive" else \
        [raw_members(0), first, raw_members(1), raw_members(3), repeat]
    write_raw_tar(tmp_path / "dup.tar", samples)
    [shard] = data.list_shards(str(tmp_path / "dup.tar"))
    assert shard.num_pairs == 5 == len(list(data.tar_samples(shard.url)))
    with caplog.at_level(logging.WARNING, logger="dpo_ds.data"):
        batches = list(make_loader([shard], batch_size=2, num_workers=0).epoch(0))
    assert sum(b["num_bad"] for b in batches) == 1
    keys = all_keys(batches)
    assert sorted(set(keys)) == ["pair0000", "pair0001", "pair0002", "pair0003"]
    row = [(b, i) for b in batches for i, k in enumerate(b["keys"]) if k == "pair0002"][0]
    assert torch.equal(row[0]["latents_w"][row[1]], make_sample(2)[2]["latents_w"].float())  # the first
    assert "bad pair pair0002 in shard" in caplog.text and "dup.tar" in caplog.text and "repeats" in caplog.text


def test_a_key_in_two_shards_is_refused_at_start(tmp_path):
    write_pairs(tmp_path / "d", range(8), max_pairs=4)
    (tmp_path / "d" / "copy-000000.tar").write_bytes((tmp_path / "d" / "shard-000001.tar").read_bytes())
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    index["shards"].append({**index["shards"][1], "name": "copy-000000.tar"})
    (tmp_path / "d" / "index.json").write_text(json.dumps(index))
    assert len(data.list_shards(str(tmp_path / "d"))) == 3  # only the start-up check looks at keys
    expected = f"pair key 'pair0004' is in shard {tmp_path}/d/copy-000000.tar and in shard {tmp_path}/d/shard-000001.tar"
    with pytest.raises(ValueError, match=expected):
        data.list_shards(str(tmp_path / "d"), check=True)
    # Where the index lists no keys (an older one, or none), they are read from the tar headers.
    index = {"format": "dpo_ds.shards/1", "shards": [{k: e[k] for k in ("name", "num_pairs", "size_bytes")}
                                                     for e in index["shards"]]}
    (tmp_path / "d" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=expected):
        data.list_shards(str(tmp_path / "d"), check=True)
    (tmp_path / "d" / "index.json").unlink()
    with pytest.raises(ValueError, match=expected):
        data.list_shards(str(tmp_path / "d"), check=True)
    with pytest.raises(ValueError, match="pair key 'pair0004' is in shard pipe:cat .*copy-000000.tar"):
        data.list_shards([f"pipe:cat {tmp_path}/d/{n}" for n in ("copy-000000.tar", "shard-000001.tar")], check=True)


def test_unreadable_shards_are_named_at_start(tmp_path, caplog):
    (tmp_path / "a.tar").write_bytes(b"not a tar at all" * 64)
    (tmp_path / "b.tar").write_bytes(b"")
    with pytest.raises(ValueError, match=f"no shard opens as a tar: {tmp_path}/a.tar .*; {tmp_path}/b.tar"):
        data.list_shards(str(tmp_path / "*.tar"), check=True)
    write_pairs(tmp_path, range(4), max_pairs=4)
    with caplog.at_level(logging.WARNING, logger="dpo_ds.data"):
        assert len(data.list_shards(str(tmp_path / "*.tar"), check=True)) == 3
    assert f"shard {tmp_path}/a.tar does not open as a tar" in caplog.text
    assert f"shard {tmp_path}/b.tar does not open as a tar" in caplog.text


@pytest.mark.parametrize("sizes", [[6] * 8, [5, 5, 5, 5, 5, 5, 1]])
def test_split_across_ranks_and_workers(tmp_path, sizes):
    pairs = {}
    for i, size in enumerate(sizes):
        pairs.update(write_pairs(tmp_path, range(100 * i, 100 * i + size), max_pairs=size, prefix=f"p{i}"))
    shards = data.list_shards(str(tmp_path / "*.tar"))
    for epoch in range(3):
        loaders = [make_loader(shards, rank=r, world_size=2, batch_size=2) for r in range(2)]
        assert loaders[0].batches_per_epoch == loaders[1].batches_per_epoch > 0
        per_rank = [list(loader.epoch(epoch)) for loader in loaders]
        assert [len(b) for b in per_rank] == [loaders[0].batches_per_epoch] * 2
        keys = all_keys(per_rank[0]) + all_keys(per_rank[1])
        assert len(keys) == len(set(keys)) == 2 * loaders[0].batches_per_epoch * 2
        assert set(keys) <= set(pairs)
        assert all(b["num_padded"] == 0 and b["num_bad"] == 0 for r in per_rank for b in r)
    if len(set(sizes)) == 1:
        assert set(keys) == set(pairs)  # equal shards dealt evenly: no surplus


def test_order_and_draws_are_deterministic(tmp_path):
    write_pairs(tmp_path, range(24), max_pairs=6)
    shards = data.list_shards(str(tmp_path))
    loader = make_loader(shards, draw_t=NARROW_LAW)
    first, again, other = list(loader.epoch(2)), list(loader.epoch(2)), list(loader.epoch(3))
    assert all_keys(first) == all_keys(again)
    assert all_keys(first) != all_keys(other)
    assert sorted(all_keys(first)) == sorted(all_keys(other))
    for epoch, batches in ((2, first), (3, other)):
        for batch in batches:
            assert batch["draw_index"].dtype == torch.long and batch["draw_index"].tolist() == [epoch] * 3
            # One noise tensor per pair, shaped like one latent: winner and loser share it.
            assert batch["noise"].shape == batch["latents_w"].shape == (3, 4, 8, 8)
            for row, key in enumerate(batch["keys"]):
                t, eps = noise.draw(7, key, epoch, (4, 8, 8), NARROW_LAW)
                assert batch["t"].dtype == torch.float64 and batch["t"][row].item() == t and 100 <= t < 900
                assert torch.equal(batch["noise"][row], eps)
    # The draw index changes the draw: the same pair gets new noise next epoch.
    key = first[0]["keys"][0]
    assert not torch.equal(noise.draw(7, key, 2, (4, 8, 8), LAW)[1], noise.draw(7, key, 3, (4, 8, 8), LAW)[1])


def test_draws_cycle_over_a_cache_of_k_draws(tmp_path):
    """With num_draws=K, epoch e draws at e mod K (a reference cache holds K draws); the order still uses e."""
    write_pairs(tmp_path, range(12), max_pairs=6)
    shards = data.list_shards(str(tmp_path))
    cycled, plain = make_loader(shards, num_draws=2), make_loader(shards)
    late, early = list(cycled.epoch(3)), list(plain.epoch(1))
    assert all_keys(late) == all_keys(list(plain.epoch(3)))  # shuffle of epoch 3
    by_key = {k: (b["t"][i], b["noise"][i]) for b in early for i, k in enumerate(b["keys"])}
    for batch in late:
        assert batch["draw_index"].tolist() == [1] * len(batch["keys"])
        for i, key in enumerate(batch["keys"]):
            assert batch["t"][i] == by_key[key][0] and torch.equal(batch["noise"][i], by_key[key][1])
    with pytest.raises(ValueError, match="num_draws"):
        make_loader(shards, num_draws=0)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core CI box is fine
@pytest.mark.parametrize("num_workers,max_pairs", [(2, 6), (3, 4)])
def test_resume_mid_epoch(tmp_path, num_workers, max_pairs):
    # Uneven worker quotas, so some workers run dry first and the round robin passes over them.
    write_pairs(tmp_path, range(30), max_pairs=max_pairs)
    loader = make_loader(data.list_shards(str(tmp_path)), num_workers=num_workers, batch_size=2)
    full = list(loader.epoch(1))
    assert len(full) == loader.batches_per_epoch
    for skip in range(1, loader.batches_per_epoch + 1):
        tail = list(loader.epoch(1, skip_batches=skip))
        assert [b["keys"] for b in tail] == [b["keys"] for b in full[skip:]], skip
        for resumed, original in zip(tail, full[skip:]):
            for name in ("t", "noise", "latents_w", "latents_l", "prompt_embeds"):
                assert torch.equal(resumed[name], original[name])


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    good = write_pairs(tmp_path, range(12), max_pairs=12, prefix="good")
    write_raw_tar(tmp_path / "bad-000000.tar", [
        raw_members(100),
        ("missing", {"json": b"{}"}),
        raw_members(101, latents_w=torch.full((4, 8, 8), float("nan")).half()),
        (raw_members(102)[0], {**raw_members(102)[1], "pt": b"\x80\x04not really a pickle"}),
        raw_members(103),
    ])
    write_pairs(tmp_path, range(200, 208), max_pairs=8, prefix="cut")
    shards = data.list_shards(str(tmp_path / "*.tar"))
    assert [s.num_pairs for s in shards] == [5, 8, 12]
    cut = tmp_path / "cut-000000.tar"  # truncated after listing, as if it rotted on disk
    cut.write_bytes(cut.read_bytes()[: 5 * 4096 + 700])

    with caplog.at_level(logging.WARNING, logger="dpo_ds.data"):
        batches = list(make_loader(shards, batch_size=4, num_workers=0).epoch(0))
    assert len(batches) == 25 // 4
    keys = all_keys(batches)
    num_bad = sum(b["num_bad"] for b in batches)
    num_padded = sum(b["num_padded"] for b in batches)
    distinct = set(keys)
    assert set(good) | {"pair0100", "pair0103"} <= distinct
    assert not distinct & {"missing", "pair0101", "pair0102"}
    assert len(distinct) + num_bad == 25  # every listed pair is read once or counted bad
    assert num_bad > 3 and num_padded == len(keys) - len(distinct) > 0
    log = caplog.text
    for key, reason in (("missing", "missing member"), ("pair0101", "non-finite"), ("pair0102", "pickle")):
        assert key in log and reason in log and "bad-000000.tar" in log
    assert str(cut) in log

    # Across 2 ranks x 2 workers the bad shards cost batches nowhere: every rank yields the same count.
    loaders = [make_loader(shards, batch_size=2, rank=r, world_size=2) for r in range(2)]
    assert [len(list(loader.epoch(0))) for loader in loaders] == [loaders[0].batches_per_epoch] * 2


class _Armed:
    """Unpickling this creates the file at its path: the proof that a pickle was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("kind", ["file", "pipe"])
def test_a_pickle_bearing_member_is_counted_bad_and_never_unpickled(tmp_path, caplog, kind):
    """Members come through webdataset's tar iterator as raw bytes: none of its decoders runs, and
    decode_sample refuses the pickle extensions before anything is decoded."""
    armed = pickle.dumps(_Armed(str(tmp_path / "executed")))
    write_raw_tar(tmp_path / "evil.tar", [
        raw_members(0),
        (raw_members(1)[0], {**raw_members(1)[1], "pyd": armed}),
        (raw_members(2)[0], {**raw_members(2)[1], "pth": armed}),
        ("evil", {"pickle": armed}),
        raw_members(3),
    ])
    url = str(tmp_path / "evil.tar") if kind == "file" else f"pipe:cat {tmp_path}/evil.tar"
    [shard] = data.list_shards([url])
    assert shard.num_pairs == 5
    raw = dict(data.tar_samples(url))
    assert raw["pair0001"]["pyd"] == raw["pair0002"]["pth"] == raw["evil"]["pickle"] == armed  # bytes, as stored
    with caplog.at_level(logging.WARNING, logger="dpo_ds.data"):
        batches = list(make_loader([shard], batch_size=2, num_workers=0).epoch(0))
    assert sum(b["num_bad"] for b in batches) == 3 and set(all_keys(batches)) == {"pair0000", "pair0003"}
    for key in ("pair0001", "pair0002", "evil"):
        assert f"bad pair {key} in shard {url}" in caplog.text
    assert caplog.text.count("pickle-bearing, never decoded") == 3
    assert not (tmp_path / "executed").exists()
    pickle.loads(armed)  # the payload was armed: loading it is what the reader never does
    assert (tmp_path / "executed").exists()


def test_a_failing_pipe_is_warned_about_and_its_pairs_counted_bad(tmp_path, caplog):
    write_pairs(tmp_path, range(6), max_pairs=6)
    url = f"pipe:cat {tmp_path}/shard-000000.tar"
    [shard] = data.list_shards([url])
    assert shard.num_pairs == 6
    # A command that fails after its whole output still fails the shard: webdataset's gopen raises OSError.
    with pytest.raises(OSError, match="exit 3"):
        list(data.tar_samples(url + "; exit 3"))
    # A reader that stops early stops the command (which would sleep on), with no error.
    start = time.monotonic()
    samples = data.tar_samples(url + "; sleep 60")
    assert next(samples)[0] == "pair0000"
    samples.close()
    assert time.monotonic() - start < 30
    (tmp_path / "shard-000000.tar").unlink()  # cat now exits 1 with no output
    with caplog.at_level(logging.WARNING, logger="dpo_ds.data"):
        batches = list(make_loader([shard], batch_size=3, num_workers=0).epoch(0))
    assert [(b["keys"], b["num_bad"]) for b in batches] == [([], 6), ([], 0)]
    assert f"shard {url} unreadable after 0 pairs" in caplog.text
    assert f"shard {url} gave 0 of its 6 pairs; counting the rest as bad" in caplog.text
    with caplog.at_level(logging.WARNING, logger="dpo_ds.data"):
        assert data.shard_keys(url) == []
    assert f"shard {url}: tar unreadable after 0 pairs" in caplog.text


def test_a_worker_with_only_bad_pairs_yields_empty_batches_naming_its_shard(tmp_path, caplog):
    """Not an exception inside a loader worker: empty batches, which the trainer stops on (every rank together)."""
    write_raw_tar(tmp_path / "bad.tar", [raw_members(i, latents_l=torch.zeros(2, 2).half()) for i in range(6)])
    loader = make_loader(data.list_shards(str(tmp_path / "bad.tar")), batch_size=3, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="dpo_ds.data"):
        batches = list(loader.epoch(0))
    assert len(batches) == loader.batches_per_epoch == 2
    assert [(b["keys"], b["num_bad"], b["num_padded"]) for b in batches] == [([], 6, 0), ([], 0, 0)]
    assert "found no good pair in epoch 0 in shards" in caplog.text and "bad.tar" in caplog.text


def test_list_shards_specs_and_errors(tmp_path):
    pairs = write_pairs(tmp_path / "d", range(10), max_pairs=3)
    braced = data.list_shards(str(tmp_path / "d" / "shard-{000000..000003}.tar"))
    assert [s.num_pairs for s in braced] == [3, 3, 3, 1]
    assert braced == data.list_shards(str(tmp_path / "d"))
    with pytest.raises(ValueError, match="shard-000004.tar does not exist"):
        data.list_shards(str(tmp_path / "d" / "shard-{000000..000009}.tar"))
    with pytest.raises(ValueError, match="no shards match .*nothing-"):
        data.list_shards(str(tmp_path / "nothing-*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=str(tmp_path / "empty")):
        data.list_shards([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="2 shards for 3 ranks"):
        make_loader(braced[:2], world_size=3)

    piped = data.list_shards([f"pipe:cat {s.url}" for s in braced])
    assert [(s.num_pairs, s.size_bytes) for s in piped] == [(3, -1), (3, -1), (3, -1), (1, -1)]
    local_batches = list(make_loader(braced, batch_size=2).epoch(0))
    piped_batches = list(make_loader(piped, batch_size=2).epoch(0))
    assert all_keys(piped_batches) == all_keys(local_batches) and set(all_keys(local_batches)) <= set(pairs)
    assert torch.equal(piped_batches[-1]["latents_w"], local_batches[-1]["latents_w"])


@pytest.mark.parametrize("key,override,reason", [
    ("nan", {"latents_w": torch.full((4, 8, 8), float("nan")).half()}, "non-finite"),
    ("fp32", {"latents_l": torch.zeros(4, 8, 8)}, "float16 or bfloat16"),
    ("shapes", {"latents_l": torch.zeros(4, 8, 4).half()}, "differ in shape"),
    ("has.dot", {}, "'.'"),
    ("has/slash", {}, "'/'"),
])
def test_writer_rejects_bad_pairs(tmp_path, key, override, reason):
    _, meta, tensors = make_sample(0)
    with data.ShardWriter(str(tmp_path)) as writer:
        with pytest.raises(ValueError, match=reason) as error:
            writer.write(key, meta, {**tensors, **override})
        assert repr(key) in str(error.value)
        writer.write("fine", meta, tensors)
    assert data.list_shards(str(tmp_path))[0].num_pairs == 1


def test_empty_prompt_dropout_replaces_the_prompt_tensors_of_dropped_pairs(tmp_path):
    """data.empty_prompt_prob: a dropped pair's prompt tensors (winner and loser share them) become the empty
    prompt's; everything else, its t and noise included, is what it would be without dropout."""
    pairs = write_pairs(tmp_path, range(40), max_pairs=20)
    shards = data.list_shards(str(tmp_path))
    names = FAMILY.PROMPT_TENSORS
    with pytest.raises(ValueError, match="empty_prompt.safetensors"):
        data.prompt_dropout(0.5, shards, names, SCHEMA)
    empty = {name: torch.full(SCHEMA[name], 0.5).half() for name in names}
    safetensors.torch.save_file(empty, str(tmp_path / data.EMPTY_PROMPT_NAME))
    dropout = data.prompt_dropout(0.5, shards, names, SCHEMA)
    assert data.prompt_dropout(0.0, shards, names, SCHEMA) is None
    samples = [data.decode_sample(k, m, SCHEMA) for s in shards for k, m in data.tar_samples(s.url)]
    plain, dropped = data.collate_pairs(samples, 3, 7, LAW), data.collate_pairs(samples, 3, 7, LAW, dropout)
    is_dropped = [noise.is_prompt_dropped(7, k, 3, 0.5) for k in plain["keys"]]
    assert 5 < sum(is_dropped) < 35
    for i, d in enumerate(is_dropped):
        for name in names:
            expected = empty[name].float() if d else plain[name][i]
            assert torch.equal(dropped[name][i], expected), (i, name)
    for name in ("t", "noise", *(n for n in SCHEMA if n not in names)):
        assert torch.equal(dropped[name], plain[name]), name
    assert set(plain["keys"]) == set(pairs)
    safetensors.torch.save_file({"prompt_embeds": torch.zeros(77, 16)}, str(tmp_path / data.EMPTY_PROMPT_NAME))
    with pytest.raises(ValueError, match="prompt_embeds is \\(77, 16\\); the model's schema says \\(77, 64\\)"):
        data.prompt_dropout(0.5, shards, names, SCHEMA)
