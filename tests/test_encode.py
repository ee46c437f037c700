"""tools/encode_pairs.py end to end: a tiny SDXL-layout folder built from config, generated images,
the real CLI as a subprocess, then 2 training steps on what it wrote. Nothing is downloaded."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, env, fork_train, read_scalars, write_run_config
from dpo_ds import data
from dpo_ds.encode import BadRow, Geometry, RowSpec, key_fraction, prepare_row, resize_and_crop
from tiny_sdxl import RESOLUTION, build_tiny_sdxl

TOOL = REPO / "tools" / "encode_pairs.py"
GOOD_ROWS = [0, 1, 5, 6, 7, 8, 9, 10, 11]  # rows of the manifest below that become pairs


def make_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A smooth random picture (w, h): low-frequency noise, upsampled."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(3, 4, 4, generator=g)
    big = torch.nn.functional.interpolate(small[None], size=(size[1], size[0]), mode="bilinear")[0]
    return Image.fromarray((big.permute(1, 2, 0).numpy() * 255).astype("uint8"))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def manifest_rows() -> list[dict]:
    """12 Pick-a-Pic-style rows: 9 good (one with different image sizes), a tie, an unreadable
    image, a missing image."""
    rows = []
    for i in range(12):
        rows.append({"caption": f"the picture number {i}", "jpg_0": png(make_image(2 * i, (64, 64))),
                     "jpg_1": png(make_image(2 * i + 1, (64, 64))),
                     "label_0": 1.0 if i % 2 == 0 else 0.0, "label_1": 0.0 if i % 2 == 0 else 1.0})
    rows[2]["label_0"] = rows[2]["label_1"] = 0.5
    rows[3]["jpg_0"] = b"not an image at all"
    rows[4]["jpg_1"] = None
    rows[5]["jpg_1"] = png(make_image(11, (96, 64)))  # wider than high: center crop 16 px from the left
    return rows


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=5)  # chunks straddle row groups
    return path


def encode(*args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(TOOL), *args], env={**env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=300)
    return proc


def ok(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("summary ")][-1]
    return json.loads(line[len("summary "):])


def read_pairs(folder: Path) -> dict[str, dict]:
    pairs = {}
    for shard in data.list_shards(str(folder)):
        for key, members in data.tar_samples(shard.url):
            assert key not in pairs, f"duplicate key {key}"
            pairs[key] = data.decode_sample(key, members, schema=None)
    return pairs


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("encode")
    model = build_tiny_sdxl(root / "model")
    rows = manifest_rows()
    parquet = write_parquet(root / "pairs.parquet", rows)
    common = ["--manifest", str(parquet), "--model", str(model), "--resolution", str(RESOLUTION),
              "--pairs-per-shard", "4", "--batch-size", "3", "--num-workers", "2"]
    summary = ok(encode(*common, "--out", str(root / "one")))
    return {"root": root, "model": model, "rows": rows, "parquet": parquet, "common": common, "summary": summary}


def test_summary_counts_every_dropped_row(world):
    s = world["summary"]
    assert s["rows"] == 12 and s["chunks"] == 3 and s["shards"] == 3
    assert s["pairs_written"] == len(GOOD_ROWS)
    assert s["ties_dropped"] == 1
    assert s["bad_rows"] == {"missing jpg_1": 1, "unreadable jpg_0": 1}
    assert s["mismatched_sizes_kept"] == 1
    assert s["bytes"] == sum(os.path.getsize(p) for p in (world["root"] / "one").glob("*.tar"))
    index = json.loads((world["root"] / "one" / "index.json").read_text())
    assert [e["name"] for e in index["shards"]] == [f"pairs-{c:06d}-000000.tar" for c in range(3)]


def test_samples_hold_the_contract_and_winner_first(world):
    from diffusers import AutoencoderKL

    pairs = read_pairs(world["root"] / "one")
    by_row = {p["meta"]["source"]["row"]: p for p in pairs.values()}
    assert sorted(by_row) == GOOD_ROWS
    vae = AutoencoderKL.from_pretrained(str(world["model"] / "vae")).eval()
    for row in (0, 1):  # label_0 wins in row 0, label_1 in row 1
        pair, raw = by_row[row], world["rows"][row]
        meta, t = pair["meta"], pair["tensors"]
        assert meta["family"] == "sdxl" and meta["latent_layout"] == "CHW" and meta["label"] == 1.0
        assert meta["scaling_factor"] == pytest.approx(0.13025) and meta["shift_factor"] is None
        assert meta["caption"] == raw["caption"]
        assert t["latents_w"].dtype == torch.float16 and t["latents_w"].shape == (4, 8, 8)
        assert t["prompt_embeds"].shape == (77, 64) and t["pooled_prompt_embeds"].shape == (32,)
        winner, loser = ("jpg_0", "jpg_1") if row == 0 else ("jpg_1", "jpg_0")
        assert meta["source"]["winner"] == winner
        for side, column in (("w", winner), ("l", loser)):
            pixels = torch.from_numpy(np.asarray(Image.open(io.BytesIO(raw[column])), dtype=np.float32))
            x = pixels.permute(2, 0, 1)[None] / 127.5 - 1.0
            with torch.no_grad():
                own = vae.encode(x).latent_dist.mode() * 0.13025
            torch.testing.assert_close(t[f"latents_{side}"].float()[None], own, atol=2e-3, rtol=1e-2)
            assert t[f"time_ids_{side}"].tolist() == [64, 64, 0, 0, 64, 64]


def test_round_trip_within_vae_reconstruction_error(world):
    """Decoding the stored latents gives the VAE's own reconstruction of the (resized) image."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(world["model"] / "vae")).eval()
    pair = next(p for p in read_pairs(world["root"] / "one").values() if p["meta"]["source"]["row"] == 0)
    image = Image.open(io.BytesIO(world["rows"][0]["jpg_0"]))
    pixels, _ = resize_and_crop(image, RESOLUTION, crop_seed=None)
    x = pixels[None].float() / 127.5 - 1.0
    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(x).latent_dist.mode()).sample
        decoded = vae.decode(pair["tensors"]["latents_w"].float()[None] / 0.13025).sample
    vae_error = (reconstruction - x).abs().mean().item()
    assert (decoded - x).abs().mean().item() == pytest.approx(vae_error, rel=0.02)
    assert (decoded - reconstruction).abs().max().item() < 0.05 * max(vae_error, 1e-3) + 1e-2


def test_mismatched_sizes_get_their_own_time_ids(world):
    pair = next(p for p in read_pairs(world["root"] / "one").values() if p["meta"]["source"]["row"] == 5)
    # row 5: label_1 wins, and jpg_1 is 96 x 64 (w x h): the winner is center-cropped 16 px from the left.
    assert pair["tensors"]["time_ids_w"].tolist() == [64, 96, 0, 16, 64, 64]
    assert pair["tensors"]["time_ids_l"].tolist() == [64, 64, 0, 0, 64, 64]
    assert pair["meta"]["source"]["original_sizes"] == [[64, 96], [64, 64]]


def test_prompt_embeds_are_penultimate_states_and_projection(world):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    model = world["model"]
    pair = next(p for p in read_pairs(world["root"] / "one").values() if p["meta"]["source"]["row"] == 0)
    states = []
    for suffix, cls in (("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)):
        tokenizer = CLIPTokenizer.from_pretrained(str(model / f"tokenizer{suffix}"))
        encoder = cls.from_pretrained(str(model / f"text_encoder{suffix}")).eval()
        ids = tokenizer([world["rows"][0]["caption"]], padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2][0])
    torch.testing.assert_close(pair["tensors"]["prompt_embeds"].float(), torch.cat(states, -1), atol=5e-3, rtol=1e-2)
    torch.testing.assert_close(pair["tensors"]["pooled_prompt_embeds"].float(), out.text_embeds[0],
                               atol=5e-3, rtol=1e-2)


def two_ranks_match_one(world, num_rows: int) -> None:
    """Encoding with two ranks (RANK/WORLD_SIZE set by hand) writes the pairs one rank wrote into root/one."""
    root = world["root"]
    cmd = [sys.executable, str(TOOL), *world["common"], "--out", str(root / "two"), "--no-progress"]
    procs = [subprocess.Popen(cmd,
                              env={**env(), "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-4000:]
    per_rank = [json.loads([ln for ln in o.splitlines() if ln.startswith("summary ")][-1][8:]) for o, _ in outs]
    assert [s["chunks"] for s in per_rank] == [2, 1]  # chunks 0, 2 and chunk 1
    assert sum(s["pairs_written"] for s in per_rank) == num_rows
    one, two = read_pairs(root / "one"), read_pairs(root / "two")
    assert sorted(one) == sorted(two)
    for key in one:
        assert one[key]["meta"] == two[key]["meta"]
        for name, tensor in one[key]["tensors"].items():
            assert torch.equal(tensor, two[key]["tensors"][name]), (key, name)
    index = json.loads((root / "two" / "index.json").read_text())
    assert len(index["shards"]) == 3  # the last rank to finish published every chunk
    # The per-rank indexes merge with their keys, which training's start-up check reads instead of the tars.
    assert index["format"] == "dpo_ds.shards/3"
    for entry in index["shards"]:
        assert entry["keys"] == [key for key, _ in data.tar_samples(str(root / "two" / entry["name"]))]
        assert len(entry["shape"]) in (3, 4)  # each shard's latent shape: its shape bucket


def test_two_ranks_write_the_same_pairs_as_one(world):
    two_ranks_match_one(world, len(GOOD_ROWS))


def test_resume_skips_finished_chunks_and_refuses_other_settings(world):
    root = world["root"]
    out = root / "resume"
    ok(encode(*world["common"], "--out", str(out)))
    marker = out / ".encode" / "chunk-000001.json"
    shard = out / "pairs-000001-000000.tar"
    before = shard.read_bytes()
    marker.unlink()
    shard.unlink()
    summary = ok(encode(*world["common"], "--out", str(out)))
    assert summary["chunks_skipped"] == 2 and summary["pairs_written"] == len(GOOD_ROWS)
    assert shard.read_bytes() == before  # the redone chunk is byte-identical
    again = ok(encode(*world["common"], "--out", str(out)))
    assert again["chunks_skipped"] == 3
    bad = encode(*world["common"], "--out", str(out), "--crop", "random")
    assert bad.returncode == 2 and "crop" in bad.stderr


def test_jsonl_paths_random_crop_drop_mismatched_and_val_split(world, tmp_path):
    rows = world["rows"]
    lines = []
    for i, row in enumerate(rows):
        entry = {"caption": row["caption"], "label_0": row["label_0"], "label_1": row["label_1"]}
        for column in ("jpg_0", "jpg_1"):
            if row[column] is not None:
                (tmp_path / f"{i}_{column}.png").write_bytes(row[column])
                entry[column] = f"{i}_{column}.png"
        lines.append(json.dumps(entry))
    lines[6] = lines[6].replace("6_jpg_1.png", "no_such_file.png")
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    summary = ok(encode("--manifest", str(tmp_path / "pairs.jsonl"), "--model", str(world["model"]),
                        "--resolution", str(RESOLUTION), "--pairs-per-shard", "5", "--batch-size", "4",
                        "--crop", "random", "--seed", "3", "--mismatched-sizes", "drop",
                        "--val-fraction", "0.5", "--out", str(tmp_path / "train"), "--val-out", str(tmp_path / "val")))
    assert summary["bad_rows"] == {"missing jpg_1": 1, "mismatched sizes": 1, "unreadable jpg_0": 1,
                                   "unreadable jpg_1": 1}
    assert summary["ties_dropped"] == 1
    train, val = read_pairs(tmp_path / "train"), read_pairs(tmp_path / "val")
    assert summary["pairs_written"] == len(train) and summary["val_pairs_written"] == len(val)
    assert train and val and not set(train) & set(val)
    assert all(key_fraction(k) < 0.5 for k in val) and all(key_fraction(k) >= 0.5 for k in train)
    # Keys hash the caption and the image bytes: the same pairs get the same keys from Parquet.
    parquet_keys = {k for k, p in read_pairs(world["root"] / "one").items() if p["meta"]["source"]["row"] not in (5, 6)}
    assert set(train) | set(val) == parquet_keys
    for pair in (train | val).values():
        assert pair["meta"]["source"]["crop"] == "random" and len(pair["meta"]["source"]["crop_seeds"]) == 2
        assert pair["tensors"]["time_ids_w"].tolist() == [64, 64, 0, 0, 64, 64]  # square images: nothing to crop


def test_random_crop_is_seeded_and_recorded():
    image = make_image(0, (100, 64))
    a, geometry_a = resize_and_crop(image, 64, crop_seed=7)
    b, geometry_b = resize_and_crop(image, 64, crop_seed=7)
    assert torch.equal(a, b) and geometry_a == geometry_b
    top, left = geometry_a.crop_top, geometry_a.crop_left
    assert top == 0 and 0 <= left <= 36
    expected = torch.from_numpy(np.array(image.crop((left, 0, left + 64, 64)))).permute(2, 0, 1)
    assert torch.equal(a, expected)
    centered, geometry_c = resize_and_crop(make_image(1, (200, 100)), 64, crop_seed=None)  # 128 x 64 after the resize
    assert geometry_c == Geometry(100, 200, 0, 32, 64, 64)


def test_missing_column_in_the_whole_file_is_a_clear_error(world, tmp_path):
    rows = [{k: v for k, v in r.items() if k != "label_1"} for r in world["rows"][:2]]
    parquet = write_parquet(tmp_path / "no_label.parquet", rows)
    proc = encode("--manifest", str(parquet), "--model", str(world["model"]), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "label_1" in proc.stderr and "--label-columns" in proc.stderr


@pytest.mark.slow
def test_trains_two_steps_on_encoded_shards(world, tmp_path):
    model = world["model"]
    cfg = write_run_config(tmp_path / "run.yaml", model.parent, tmp_path / "run",
                           model={"pretrained_path": str(model)},
                           data={"shards": str(world["root"] / "one"), "resolution": RESOLUTION,
                                 "num_workers": 1, "shuffle_buffer": 4},
                           train={"micro_batch_size": 2, "max_steps": 2}, checkpoint={"every_steps": 2, "keep_last": 1})
    proc = fork_train(cfg, nproc=1)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000002"
    losses = [v for _, v in read_scalars(tmp_path / "run" / "tensorboard")["train/loss"]]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_rows_take_hugging_face_image_structs_and_report_bad_labels(tmp_path):
    image = png(make_image(0, (72, 48)))
    (tmp_path / "b.png").write_bytes(png(make_image(1, (64, 64))))
    spec = RowSpec("caption", ("image_0", "image_1"), ("label_0", "label_1"), "id", None, 32, None, False)
    row = {"caption": "a cat", "image_0": {"bytes": image, "path": None}, "image_1": {"bytes": None, "path": "b.png"},
           "label_0": 0.0, "label_1": 1.0, "id": "abc-1"}
    pair = prepare_row(spec, 7, str(tmp_path / "m.parquet"), row)
    assert pair.key == "abc-1" and pair.source["winner"] == "image_1" and pair.has_mismatched_sizes
    assert pair.pixels_w.shape == (3, 32, 32) and pair.geometry_l == Geometry(48, 72, 0, 8, 32, 32)
    for change, reason in (({"label_1": "x"}, "bad label"), ({"id": "a/b"}, "bad key"),
                           ({"caption": None}, "missing caption")):
        with pytest.raises(BadRow) as e:
            prepare_row(spec, 7, str(tmp_path / "m.parquet"), {**row, **change})
        assert e.value.reason == reason


def test_sd15_family_encodes_one_text_encoders_last_states(world, tmp_path):
    """--family sd15: the VAE's latents and one CLIP encoder's last hidden states, no pooled embedding or
    time ids; the samples fit the sd15 family's schema for its UNet, so training reads them."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from dpo_ds.models import sd15
    from tiny_sdxl import build_tiny_sd15

    model = build_tiny_sd15(tmp_path / "sd15")
    common = [a if a != str(world["model"]) else str(model) for a in world["common"]]
    summary = ok(encode(*common, "--family", "sd15", "--out", str(tmp_path / "shards")))
    assert summary["pairs_written"] == len(GOOD_ROWS)
    family = sd15.SD15.tiny(RESOLUTION)
    schema = family.sample_schema(sd15.SD15.TINY_DENOISER_CONFIG)
    pairs = {k: data.decode_sample(k, m, schema) for shard in data.list_shards(str(tmp_path / "shards"))
             for k, m in data.tar_samples(shard.url)}
    assert len(pairs) == len(GOOD_ROWS)
    tokenizer = CLIPTokenizer.from_pretrained(str(model / "tokenizer"))
    encoder = CLIPTextModel.from_pretrained(str(model / "text_encoder")).eval()
    for pair in pairs.values():
        assert pair["meta"]["family"] == "sd15" and pair["meta"]["latent_layout"] == "CHW"
        assert set(pair["tensors"]) == {"latents_w", "latents_l", "prompt_embeds"}
        ids = tokenizer([pair["meta"]["caption"]], padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            expected = encoder(ids).last_hidden_state[0]
        assert torch.allclose(pair["tensors"]["prompt_embeds"].float(), expected, atol=2e-3)
    # The empty prompt's conditioning beside the shards, for data.empty_prompt_prob.
    empty = data.load_empty_prompt(data.list_shards(str(tmp_path / "shards")), family.PROMPT_TENSORS, schema)
    ids = tokenizer([""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(empty["prompt_embeds"], encoder(ids).last_hidden_state[0], atol=2e-3)


def test_buckets_write_one_shape_per_shard_with_each_buckets_time_ids(world, tmp_path):
    """--buckets: each pair goes to the bucket nearest its winner's aspect ratio, into shards of that bucket
    alone (index.json records their shape); SDXL's time_ids hold each image's own crop and the bucket's size."""
    sizes = [((64, 64), (64, 64)), ((128, 64), (128, 64)), ((64, 128), (64, 128)), ((128, 64), (64, 64)),
             ((80, 64), (64, 64)), ((64, 64), (128, 64))]  # (w, h) of winner (jpg_0), loser (jpg_1)
    rows = [{"caption": f"bucket picture {i}", "jpg_0": png(make_image(100 + 2 * i, w)),
             "jpg_1": png(make_image(101 + 2 * i, l)), "label_0": 1.0, "label_1": 0.0}
            for i, (w, l) in enumerate(sizes)]
    parquet = write_parquet(tmp_path / "buckets.parquet", rows)
    ok(encode("--manifest", str(parquet), "--model", str(world["model"]), "--out", str(tmp_path / "out"),
              "--buckets", "64x64", "48x96", "96x48", "--pairs-per-shard", "6", "--batch-size", "2",
              "--num-workers", "2"))
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert {e["name"]: (e["shape"], e["num_pairs"]) for e in index["shards"]} == {
        "pairs-000000-64x64-000000.tar": ([4, 8, 8], 3), "pairs-000000-48x96-000000.tar": ([4, 6, 12], 2),
        "pairs-000000-96x48-000000.tar": ([4, 12, 6], 1)}
    by_row = {p["meta"]["source"]["row"]: p for p in read_pairs(tmp_path / "out").values()}
    expected = {0: (64, 64), 1: (48, 96), 2: (96, 48), 3: (48, 96), 4: (64, 64), 5: (64, 64)}  # 80x64: 1.25:1
    for row, (height, width) in expected.items():
        tensors = by_row[row]["tensors"]
        assert tuple(tensors["latents_w"].shape) == tuple(tensors["latents_l"].shape) == (4, height // 8, width // 8)
        assert tensors["time_ids_w"][4:].tolist() == tensors["time_ids_l"][4:].tolist() == [height, width]
        assert by_row[row]["meta"]["source"]["resolution"] == [height, width]
    # Row 3: a wide winner takes the 48x96 bucket; its square loser is scaled to 96x96, cropped 24 px from the top.
    assert by_row[3]["tensors"]["time_ids_w"].tolist() == [64, 128, 0, 0, 48, 96]
    assert by_row[3]["tensors"]["time_ids_l"].tolist() == [64, 64, 24, 0, 48, 96]
    # Row 5: the square winner decides; the wide loser is center-cropped 32 px from the left.
    assert by_row[5]["tensors"]["time_ids_l"].tolist() == [64, 128, 0, 32, 64, 64]
    # The loader batches them one shape at a time, with data.resolution null (any latent shape).
    from dpo_ds.models import family_class
    family = family_class("sdxl")(family_class("sdxl").SCHEDULER_CONFIG, None, None, 8)
    schema = family.sample_schema(family.TINY_DENOISER_CONFIG)
    assert schema["latents_w"] is None
    shards = data.list_shards(str(tmp_path / "out"), check=True)
    loader = data.PairLoader(shards, batch_size=1, rank=0, world_size=1, seed=0, num_workers=0, schema=schema,
                             draw_t=family.draw_t)
    batches = list(loader.epoch(0))
    assert len(batches) == 6 and sum(b["num_bad"] for b in batches) == 0
    assert sorted(tuple(b["latents_w"].shape[2:]) for b in batches) == [(6, 12)] * 2 + [(8, 8)] * 3 + [(12, 6)]
    bad = encode("--manifest", str(parquet), "--model", str(world["model"]), "--out", str(tmp_path / "x"),
                 "--buckets", "64x")
    assert bad.returncode == 2 and "--buckets takes distinct HEIGHTxWIDTH sizes" in bad.stderr
