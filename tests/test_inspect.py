"""tools/inspect_shards.py: passes good shards with the right numbers, flags each kind of bad one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import REPO, env, write_raw_tar
from samples import SCHEMA, make_sample
from dpo_ds import data

TOOL = REPO / "tools" / "inspect_shards.py"


def pair(index: int, latent_shape=None) -> tuple[str, dict, dict[str, torch.Tensor]]:
    return make_sample(index, shift=1.0, latent_shape=latent_shape, caption="x" * (10 + index))


def write_good(folder: Path, indices: range, prefix: str = "shard") -> dict:
    pairs = {}
    with data.ShardWriter(str(folder), prefix=prefix, max_pairs=4) as writer:
        for i in indices:
            key, meta, tensors = pair(i)
            writer.write(key, meta, tensors)
            pairs[key] = tensors
    return pairs


def members(meta: dict, tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {"json": json.dumps(meta).encode(), "safetensors": safetensors.torch.save(tensors)}


def run(*args: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, str(TOOL), *args, "--json"], env=env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_good_shards_pass_with_their_statistics(tmp_path):
    pairs = write_good(tmp_path, range(10))
    code, s = run(str(tmp_path))
    assert code == 0 and s["is_valid"] and s["problems"] == []
    assert s["num_shards"] == 3 and s["num_pairs"] == 10 and s["num_bad_pairs"] == 0
    example = pair(0)[2]
    assert s["shapes"] == {name: list(shape) for name, shape in SCHEMA.items()}
    assert s["dtypes"] == {name: [str(t.dtype).replace("torch.", "")] for name, t in example.items()}
    assert s["families"] == {"sdxl": 10} and s["caption_chars"] == {"min": 10, "mean": 14.5, "max": 19}
    latents = torch.stack([torch.stack([t["latents_w"], t["latents_l"]]) for t in pairs.values()]).double()
    per_channel = latents.transpose(0, 2).flatten(1)  # [C x everything else]
    assert s["latent_channel_mean"] == pytest.approx(per_channel.mean(1).tolist(), abs=1e-5)
    assert s["latent_channel_std"] == pytest.approx(per_channel.std(1, unbiased=False).tolist(), abs=1e-5)
    table = subprocess.run([sys.executable, str(TOOL), str(tmp_path)], env=env(), capture_output=True, text=True)
    assert table.returncode == 0 and "latent channel 3" in table.stdout and table.stdout.rstrip().endswith("valid")


@pytest.mark.parametrize("kind", ["nan latent", "wrong shape", "missing member", "tie"])
def test_flags_a_bad_sample(tmp_path, kind):
    write_good(tmp_path, range(8))
    key, meta, tensors = pair(100)
    if kind == "nan latent":
        tensors["latents_l"][1, 2, 3] = float("nan")
        sample = members(meta, tensors)
    elif kind == "wrong shape":
        _, meta, tensors = pair(100, latent_shape=(4, 16, 16))
        sample = members(meta, tensors)
    elif kind == "missing member":
        sample = {"json": members(meta, tensors)["json"]}
    else:
        meta["label"] = 0.5
        sample = members(meta, tensors)
    write_raw_tar(tmp_path / "extra-000000.tar", [(key, sample)])
    code, s = run(str(tmp_path))
    assert code == 1 and not s["is_valid"] and s["num_bad_pairs"] == 1
    [problem] = s["problems"]
    assert problem["key"] == key and problem["shard"].endswith("extra-000000.tar")
    expected = {"nan latent": "latents_l has non-finite values", "wrong shape": "latents_w is (4, 16, 16)",
                "missing member": f"missing member {key}.safetensors", "tie": "label 0.5"}[kind]
    assert expected in problem["reason"]


def test_flags_a_duplicate_key_across_shards(tmp_path):
    write_good(tmp_path / "a", range(4))
    write_good(tmp_path / "b", range(3, 6), prefix="other")  # pair0003 again
    code, s = run(str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == 1 and s["num_pairs"] == 7 and s["num_bad_pairs"] == 1
    [problem] = s["problems"]
    assert problem["key"] == "pair0003" and "duplicate key" in problem["reason"] and "/a/" in problem["reason"]


@pytest.mark.parametrize("order", ["consecutive", "later"])
def test_flags_a_key_repeated_inside_a_shard(tmp_path, order):
    """A second sample with key pair0002 in one tar is a bad pair (the first is kept), never a silent overwrite."""
    samples = [(k, members(m, t)) for k, m, t in (pair(i) for i in range(4))]
    repeat = ("pair0002", members(*pair(7)[1:]))
    samples.insert(3 if order == "consecutive" else 4, repeat)
    write_raw_tar(tmp_path / "dup-000000.tar", samples)
    code, s = run(str(tmp_path))
    assert code == 1 and not s["is_valid"] and s["num_pairs"] == 5 and s["num_bad_pairs"] == 1
    [problem] = s["problems"]
    assert problem["key"] == "pair0002" and problem["shard"].endswith("dup-000000.tar")
    assert "repeats an earlier sample of this shard" in problem["reason"]


def test_flags_an_index_that_disagrees_and_no_shards_is_an_error(tmp_path):
    write_good(tmp_path, range(4))
    index = json.loads((tmp_path / "index.json").read_text())
    index["shards"][0]["num_pairs"] = 5
    (tmp_path / "index.json").write_text(json.dumps(index))
    code, s = run(str(tmp_path))
    assert code == 1 and "index.json lists 5 pairs, the shard holds 4" in s["problems"][0]["reason"]
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, str(TOOL), str(empty)], env=env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "no .tar shards" in proc.stderr


def test_shape_buckets_are_valid_and_a_pair_unlike_its_shards_record_is_flagged(tmp_path):
    """Shards whose index.json records several latent shapes (shape buckets) are valid; a shard whose pairs
    are not the shape its record says is flagged pair by pair, naming the record."""
    write_good(tmp_path, range(5), prefix="square")
    with data.ShardWriter(str(tmp_path), prefix="wide", max_pairs=4) as writer:
        for i in range(5, 8):
            writer.write(*pair(i, latent_shape=(4, 6, 10)))
    code, s = run(str(tmp_path))
    assert code == 0 and s["is_valid"] and s["latent_shapes"] == {"[4, 8, 8]": 5, "[4, 6, 10]": 3}
    index = json.loads((tmp_path / "index.json").read_text())
    [wide] = [e for e in index["shards"] if e["name"].startswith("wide")]
    wide["shape"] = [4, 10, 6]
    (tmp_path / "index.json").write_text(json.dumps(index))
    code, s = run(str(tmp_path))
    assert code == 1 and s["num_bad_pairs"] == 3
    assert all("latents_w is (4, 6, 10); index.json records (4, 10, 6)" in p["reason"] for p in s["problems"])
