"""Resuming on another world size: the data position mapped by keys, weights and Adam's state through
DeepSpeed's universal checkpoint. Loader unit tests on CPU, then 2 -> 1 -> 2 processes for real."""

from __future__ import annotations

import json
import math
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import fork_train, read_scalars, write_run_config
from dpo_ds import data
from test_data import all_keys, make_loader, write_pairs


def consumed_by_url(batches) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for batch in batches:
        for url, key in zip(batch["shard_urls"], batch["keys"]):
            out.setdefault(url, []).append(key)
    return out


def shard_of_key(shards) -> dict[str, str]:
    out = {}
    for shard in shards:
        with tarfile.open(shard.url) as tar:
            out.update({m.name.split(".")[0]: shard.url for m in tar})
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("old_world, new_world", [(2, 1), (1, 2), (2, 3)])
def test_epoch_goes_on_without_the_pairs_already_trained(tmp_path, old_world, new_world, num_workers):
    pairs = write_pairs(tmp_path, range(40), max_pairs=7)  # shards of 7, 7, 7, 7, 7, 5 pairs
    shards = data.list_shards(str(tmp_path))
    old = [make_loader(shards, rank=r, world_size=old_world, num_workers=num_workers) for r in range(old_world)]
    before = [list(loader.epoch(1))[:2] for loader in old]  # 2 batches of 3 on every old rank, mid-epoch
    exclude: dict[str, list[str]] = {}
    for batches in before:
        for url, keys in consumed_by_url(batches).items():
            exclude.setdefault(url, []).extend(keys)
    trained_before = [k for batches in before for k in all_keys(batches)]

    new = [make_loader(shards, rank=r, world_size=new_world, num_workers=num_workers) for r in range(new_world)]
    num_batches = new[0].num_batches(exclude)
    after = [list(loader.epoch(1, exclude=exclude)) for loader in new]
    assert [len(batches) for batches in after] == [num_batches] * new_world  # every rank steps together
    trained_after = [k for batches in after for k in all_keys(batches)]
    trained = trained_before + trained_after
    assert len(trained) == len(set(trained)), "a pair was trained twice in one epoch"
    num_left_over = len(pairs) - len(trained)
    assert num_left_over == new[0].num_left_over(exclude) < new_world * 3
    assert num_batches == (len(pairs) - len(trained_before)) // (new_world * 3)

    where = shard_of_key(shards)
    for batch in [b for batches in after for b in batches]:
        assert batch["shard_urls"] == [where[k] for k in batch["keys"]]
        assert batch["draw_index"].tolist() == [1] * 3  # the epoch's draw, whatever the plan


def test_an_epoch_remapped_twice_still_trains_each_pair_once(tmp_path):
    """2 ranks, then 1, then 3, all within one epoch: each plan leaves out what the ones before trained."""
    write_pairs(tmp_path, range(60), max_pairs=7)
    shards = data.list_shards(str(tmp_path))
    trained: list[str] = []
    exclude: dict[str, list[str]] | None = None
    for world_size, num_batches_run in ((2, 3), (1, 4), (3, None)):
        loaders = [make_loader(shards, rank=r, world_size=world_size) for r in range(world_size)]
        ran = [list(loader.epoch(0, exclude=exclude))[:num_batches_run] for loader in loaders]
        exclude = dict(exclude or {})
        for batches in ran:
            for url, keys in consumed_by_url(batches).items():
                exclude[url] = exclude.get(url, []) + keys
            trained += all_keys(batches)
    assert len(trained) == len(set(trained)) > 60 - 3 * 3


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_remapped_epoch_resumes_exactly_on_its_world_size(tmp_path, num_workers):
    write_pairs(tmp_path, range(40), max_pairs=7)
    shards = data.list_shards(str(tmp_path))
    exclude = consumed_by_url(list(make_loader(shards, world_size=2, rank=1).epoch(0))[:3])
    loader = make_loader(shards, rank=0, world_size=1, num_workers=num_workers)
    full = list(loader.epoch(0, exclude=exclude))
    for skip in (1, 4, len(full)):
        tail = list(loader.epoch(0, skip_batches=skip, exclude=exclude))
        assert all_keys(tail) == all_keys(full[skip:])
        for a, b in zip(tail, full[skip:]):
            assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["latents_w"], b["latents_w"])


def test_a_position_from_other_shards_is_refused(tmp_path):
    write_pairs(tmp_path, range(10), max_pairs=5)
    loader = make_loader(data.list_shards(str(tmp_path)))
    with pytest.raises(ValueError, match="does not list"):
        loader.num_batches({str(tmp_path / "elsewhere.tar"): ["pair0000"]})
    url = loader.shards[0].url
    with pytest.raises(ValueError, match="has 5"):
        loader.num_batches({url: [f"k{i}" for i in range(6)]})


# ---------------------------------------------------------------- 2 -> 1 -> 2 processes, for real

# 32 pairs in 4 shards of 8, 2 pairs per micro-batch: an epoch is 8 steps on 2 processes, 16 on 1.
STOP_ON_TWO = 3       # epoch 0: 12 pairs trained on 2 processes, 20 left: 10 steps on 1 (to step 13)
STOP_ON_ONE = 14      # epoch 1: 1 step, 2 pairs on 1 process, 30 left: 7 steps on 2 (to step 21), 2 left over
END = 21


def _ok(proc) -> str:
    assert proc.returncode == 0, \
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc.stderr


def _position(ckpt: Path, step: int) -> tuple[dict, list[dict]]:
    """(train_state with the loader's epoch position, every rank's rank_state) of the checkpoint of `step`."""
    from dpo_ds import engine

    tag = ckpt / f"step_{step:08d}"
    states = [json.loads(p.read_text()) for p in sorted(tag.glob("rank_state_*.json"))]
    client = torch.load(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
    assert engine.checkpoint_world_size(str(ckpt), tag.name) == len(states)
    # The loader's position (the same epoch and batch counts on every rank) beside the step counters.
    assert all(s["epoch"] == states[0]["epoch"] and s["batch_in_epoch"] == states[0]["batch_in_epoch"] for s in states)
    position = {k: states[0][k] for k in ("epoch", "batch_in_epoch", "epoch_num_batches")}
    return {**client["train_state"], **position}, states


def _keys(keys_by_url: dict | None) -> list[str]:
    return [k for keys in (keys_by_url or {}).values() for k in keys]


@pytest.mark.slow
def test_two_to_one_to_two_processes(tiny, tmp_path):
    """Checkpointed mid-epoch on 2 processes, continued on 1 to mid next epoch, then on 2 again: in
    each epoch every pair is trained exactly once, the step counter and the loss curve go on, and
    the weights after the universal load are bitwise those of the 2-process checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    cfg = write_run_config(tmp_path / "run.yaml", tiny, run, train={"max_steps": STOP_ON_TWO},
                           checkpoint={"every_steps": 1, "keep_last": 100, "resume": "auto"})
    all_pairs = set(shard_of_key(data.list_shards(str(tiny / "shards"))))
    assert len(all_pairs) == 32

    _ok(fork_train(cfg, nproc=2))
    state, ranks = _position(ckpt, STOP_ON_TWO)
    assert (state["world_size"], state["epoch"], state["batch_in_epoch"]) == (2, 0, STOP_ON_TWO)
    epoch0_on_two = _keys(ranks[0]["consumed"]) + _keys(ranks[1]["consumed"])
    assert len(set(epoch0_on_two)) == len(epoch0_on_two) == STOP_ON_TWO * 2 * 2

    # Loaded on 1 process with no step taken, then exported: bitwise the 2-process checkpoint's weights.
    copy = tmp_path / "copy"
    shutil.copytree(ckpt / f"step_{STOP_ON_TWO:08d}", copy / "checkpoints" / f"step_{STOP_ON_TWO:08d}")
    (copy / "checkpoints" / "latest").write_text(f"step_{STOP_ON_TWO:08d}")
    _ok(fork_train(cfg, f"--output_dir={copy}", nproc=1))
    saved = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=f"step_{STOP_ON_TWO:08d}")
    exported = load_file(str(copy / "export" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert saved.keys() <= exported.keys()
    for name, value in saved.items():
        assert torch.equal(exported[name], value), f"{name} changed in the universal load"

    # 2 -> 1, up to step 13 (the end of epoch 0), then on into epoch 1.
    log = _ok(fork_train(cfg, f"--train.max_steps={STOP_ON_ONE}", nproc=1))
    assert "world size 2 -> 1: epoch 0 goes on without the 12 pairs trained in it so far: 10 micro-batches " \
           "per rank, 0 pairs left over" in log, log[-4000:]
    assert f"resumed from {ckpt}/step_{STOP_ON_TWO:08d} at step {STOP_ON_TWO} (epoch 0, batch 0)" in log
    assert (ckpt / f"step_{STOP_ON_TWO:08d}" / "universal" / "zero").is_dir()
    end0 = STOP_ON_TWO + 10
    state, (rank0,) = _position(ckpt, end0)
    assert (state["world_size"], state["epoch"], state["batch_in_epoch"], state["epoch_num_batches"]) == (1, 0, 10, 10)
    assert sorted(_keys(rank0["excluded"])) == sorted(epoch0_on_two)
    epoch0_on_one = _keys(rank0["consumed"])
    assert len(epoch0_on_one) == 20 and not set(epoch0_on_one) & set(epoch0_on_two)
    assert set(epoch0_on_one) | set(epoch0_on_two) == all_pairs
    # Each step's pairs are the difference of two consecutive checkpoints' records: 2 new ones per step.
    previous: set[str] = set()
    for step in range(STOP_ON_TWO + 1, end0 + 1):
        keys = set(_keys(_position(ckpt, step)[1][0]["consumed"]))
        assert previous < keys and len(keys - previous) == 2
        previous = keys

    # 1 -> 2, mid epoch 1.
    state, (rank0,) = _position(ckpt, STOP_ON_ONE)
    assert (state["epoch"], state["batch_in_epoch"], rank0["excluded"]) == (1, STOP_ON_ONE - end0, None)
    epoch1_on_one = _keys(rank0["consumed"])
    log = _ok(fork_train(cfg, f"--train.max_steps={END}", nproc=2))
    assert "world size 1 -> 2: epoch 1 goes on without the 2 pairs trained in it so far: 7 micro-batches " \
           "per rank, 2 pairs left over" in log, log[-4000:]
    state, ranks = _position(ckpt, END)
    assert (state["world_size"], state["epoch"], state["batch_in_epoch"], state["step"]) == (2, 1, 7, END)
    assert sorted(_keys(ranks[0]["excluded"])) == sorted(epoch1_on_one) and ranks[1]["excluded"] is None
    epoch1_on_two = _keys(ranks[0]["consumed"]) + _keys(ranks[1]["consumed"])
    epoch1 = epoch1_on_one + epoch1_on_two
    assert len(epoch1) == len(set(epoch1)) == 32 - 2 and set(epoch1) < all_pairs
    assert state["samples_seen"] == 32 + 30
    assert sum(r["pairs_read"] for r in ranks) == 32 + 30  # per-rank counters carried over, not duplicated

    # The step counter and the loss curve go on: one value per step, the fresh-start value
    # (policy = reference, loss = log 2) only at step 1, so the resumed policy was not reinitialised.
    losses = read_scalars(run / "tensorboard")["train/loss"]
    assert [s for s, _ in losses] == list(range(1, END + 1))
    assert losses[0][1] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(v) and abs(v - math.log(2)) > 1e-5 for _, v in losses[1:])

