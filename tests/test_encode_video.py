"""tools/encode_pairs.py --family wan end to end: a tiny Wan-layout folder built from config (causal
3D VAE, UMT5 encoder, a word-level tokenizer the test writes), short generated videos written
with PyAV, the real CLI as a subprocess, then the inspector on what it wrote. Nothing is downloaded."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV is not installed; the video path needs it: pip install -e '.[video]'")

from conftest import REPO, env  # noqa: E402
from dpo_ds.encode import BadRow, ClipSpec, RowSpec, prepare_video_row, sample_frames  # noqa: E402
from test_encode import encode, ok, read_pairs, two_ranks_match_one  # noqa: E402  (the same CLI and shard readers)
from tiny_sdxl import LATENTS_MEAN, LATENTS_STD, build_tiny_wan  # noqa: E402

SIDE = 32  # pixels; latents 4 x 4 with the tiny VAE's 8x spatial factor
NUM_FRAMES, FPS = 5, 8  # latent frames 1 + (5 - 1) / 4 = 2
NUM_TOKENS = 16
GOOD_ROWS = [0, 1, 2, 3, 4, 5, 9, 10]  # rows of the manifest below that become pairs


def write_video(path: Path, seed: int, num_frames: int = 16, fps: int = 16, size: tuple[int, int] = (SIDE, SIDE)):
    """An H.264 mp4 (w, h) of a square moving 2 px a frame over a flat background that depends on seed."""
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18"}
        for i in range(num_frames):
            frame = np.full((height, width, 3), (30 + 12 * seed, 90, 160 - 7 * seed), np.uint8)
            x = (2 * i + 3 * seed) % (width - 8)
            frame[8:16, x:x + 8] = (230, (50 + 9 * seed) % 256, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decoded_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]


def write_manifest(folder: Path) -> tuple[Path, list[dict]]:
    """12 rows: 6 good, a tie, an unreadable video, a short video, a 24 fps video, a 48 x 32 video
    (kept: each side is cropped on its own), a missing file."""
    rows = []
    for i in range(12):
        for side in (0, 1):
            write_video(folder / f"{i}_{side}.mp4", seed=2 * i + side)
        rows.append({"caption": f"a video of number {i} moving", "video_0": f"{i}_0.mp4", "video_1": f"{i}_1.mp4",
                     "label_0": 1.0 if i % 2 == 0 else 0.0, "label_1": 0.0 if i % 2 == 0 else 1.0})
    rows[6]["label_0"] = rows[6]["label_1"] = 0.5
    (folder / "7_0.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing after")
    write_video(folder / "8_1.mp4", seed=17, num_frames=4)  # 0.25 s: 5 frames at 8 fps need 0.625 s
    write_video(folder / "9_1.mp4", seed=19, fps=24)  # 16 frames at 24 fps: frames 0, 3, 6, 9, 12
    write_video(folder / "10_0.mp4", seed=20, size=(48, SIDE))
    rows[11]["video_1"] = "no_such_file.mp4"
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def by_row(pairs: dict[str, dict]) -> dict[int, dict]:
    return {p["meta"]["source"]["row"]: p for p in pairs.values()}


def vae_latents(vae, frames: list[np.ndarray]) -> torch.Tensor:
    """uint8 frames [h, w, 3] -> Wan-normalised posterior mean [C, F', h/8, w/8], computed here, not by the tool."""
    x = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()[0]
    return (z - torch.tensor(LATENTS_MEAN).view(-1, 1, 1, 1)) / torch.tensor(LATENTS_STD).view(-1, 1, 1, 1)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("encode_video")
    model = build_tiny_wan(root / "model")
    (root / "videos").mkdir()
    manifest, rows = write_manifest(root / "videos")
    common = ["--family", "wan", "--manifest", str(manifest), "--model", str(model), "--resolution", str(SIDE),
              "--num-frames", str(NUM_FRAMES), "--fps", str(FPS), "--max-sequence-length", str(NUM_TOKENS),
              "--pairs-per-shard", "4", "--batch-size", "2", "--num-workers", "2"]
    summary = ok(encode(*common, "--out", str(root / "one")))
    return {"root": root, "model": model, "rows": rows, "videos": root / "videos", "common": common,
            "summary": summary}


def test_summary_counts_ties_unreadable_and_short_videos(world):
    s = world["summary"]
    assert s["rows"] == 12 and s["chunks"] == 3 and s["shards"] == 3
    assert s["pairs_written"] == len(GOOD_ROWS)
    assert s["ties_dropped"] == 1
    assert s["bad_rows"] == {"short video": 1, "unreadable video_0": 1, "unreadable video_1": 1}
    assert s["mismatched_sizes_kept"] == 1 and s["short_clips_padded"] == 0
    assert sorted(by_row(read_pairs(world["root"] / "one"))) == GOOD_ROWS


def test_samples_are_cfhw_latents_of_the_sampled_frames(world):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(str(world["model"] / "vae")).eval()
    pairs = by_row(read_pairs(world["root"] / "one"))
    for row, frames_w in ((0, [0, 2, 4, 6, 8]), (1, [0, 2, 4, 6, 8]), (9, [0, 3, 6, 9, 12])):
        meta, t = pairs[row]["meta"], pairs[row]["tensors"]
        assert meta["family"] == "wan" and meta["latent_layout"] == "CFHW" and meta["label"] == 1.0
        assert meta["scaling_factor"] == 1.0 and meta["shift_factor"] is None
        assert meta["latents_mean"] == pytest.approx(LATENTS_MEAN) and meta["latents_std"] == pytest.approx(LATENTS_STD)
        assert meta["caption"] == world["rows"][row]["caption"]
        assert set(t) == {"latents_w", "latents_l", "prompt_embeds"}
        assert t["latents_w"].dtype == t["latents_l"].dtype == t["prompt_embeds"].dtype == torch.float16
        assert t["latents_w"].shape == t["latents_l"].shape == (4, 2, 4, 4)
        winner = "video_0" if row % 2 == 0 else "video_1"  # label_0 wins on even rows
        loser = "video_1" if winner == "video_0" else "video_0"
        src = meta["source"]
        assert src["winner"] == winner and src["frames"] == [frames_w, [0, 2, 4, 6, 8]]
        assert src["num_padded_frames"] == [0, 0] and src["source_fps"] == [24.0 if row == 9 else 16.0, 16.0]
        for side, column, frames in (("w", winner, frames_w), ("l", loser, [0, 2, 4, 6, 8])):
            decoded = decoded_frames(world["videos"] / world["rows"][row][column])
            expected = vae_latents(vae, [decoded[i] for i in frames])
            torch.testing.assert_close(t[f"latents_{side}"].float(), expected, atol=3e-3, rtol=1e-2)
    assert not torch.equal(pairs[0]["tensors"]["latents_w"], pairs[0]["tensors"]["latents_l"])


def test_mismatched_sizes_are_center_cropped_each_on_its_own(world):
    from diffusers import AutoencoderKLWan

    pair = by_row(read_pairs(world["root"] / "one"))[10]  # label_0 wins; video_0 is 48 x 32 (w x h)
    assert pair["meta"]["source"]["original_sizes"] == [[SIDE, 48], [SIDE, SIDE]]
    vae = AutoencoderKLWan.from_pretrained(str(world["model"] / "vae")).eval()
    decoded = decoded_frames(world["videos"] / "10_0.mp4")
    expected = vae_latents(vae, [decoded[i][:, 8:40] for i in (0, 2, 4, 6, 8)])
    torch.testing.assert_close(pair["tensors"]["latents_w"].float(), expected, atol=3e-3, rtol=1e-2)


def test_round_trip_within_vae_reconstruction_error(world):
    """Decoding the stored latents gives the VAE's own reconstruction of the sampled clip."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(str(world["model"] / "vae")).eval()
    pair = by_row(read_pairs(world["root"] / "one"))[0]
    decoded = decoded_frames(world["videos"] / "0_0.mp4")
    x = torch.from_numpy(np.stack([decoded[i] for i in (0, 2, 4, 6, 8)])).permute(3, 0, 1, 2)[None] / 127.5 - 1.0
    mean, std = torch.tensor(LATENTS_MEAN).view(-1, 1, 1, 1), torch.tensor(LATENTS_STD).view(-1, 1, 1, 1)
    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(x).latent_dist.mode()).sample
        stored = pair["tensors"]["latents_w"].float() * std + mean
        decoded_stored = vae.decode(stored[None]).sample
    assert decoded_stored.shape == x.shape == (1, 3, NUM_FRAMES, SIDE, SIDE)
    vae_error = (reconstruction - x).abs().mean().item()
    assert (decoded_stored - x).abs().mean().item() == pytest.approx(vae_error, rel=0.02)
    assert (decoded_stored - reconstruction).abs().max().item() < 0.05 * max(vae_error, 1e-3) + 1e-2


def test_prompt_embeds_are_umt5_states_zero_past_the_prompt(world):
    from transformers import AutoTokenizer, UMT5EncoderModel

    pair = by_row(read_pairs(world["root"] / "one"))[3]
    caption = world["rows"][3]["caption"]  # "a video of number 3 moving": 6 words + </s>
    tokenizer = AutoTokenizer.from_pretrained(str(world["model"] / "tokenizer"))
    encoder = UMT5EncoderModel.from_pretrained(str(world["model"] / "text_encoder")).eval()
    tokens = tokenizer([caption], return_tensors="pt")
    assert tokens.input_ids.shape[1] == 7
    with torch.no_grad():
        states = encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state[0]
    embeds = pair["tensors"]["prompt_embeds"].float()
    assert embeds.shape == (NUM_TOKENS, 32)
    torch.testing.assert_close(embeds[:7], states, atol=5e-3, rtol=1e-2)
    assert embeds[7:].abs().max().item() == 0.0 and embeds[:7].abs().min().item() > 0.0


def test_two_ranks_write_the_same_pairs_as_one(world):
    two_ranks_match_one(world, len(GOOD_ROWS))


def test_inspector_accepts_the_video_shards(world):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "inspect_shards.py"), str(world["root"] / "one"),
                           "--json"], env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    assert report["is_valid"] and report["num_pairs"] == len(GOOD_ROWS)
    assert report["families"] == {"wan": len(GOOD_ROWS)} and report["latent_layouts"] == {"CFHW": len(GOOD_ROWS)}
    assert report["shapes"]["latents_w"] == [4, 2, 4, 4] and report["shapes"]["prompt_embeds"] == [NUM_TOKENS, 32]
    assert len(report["latent_channel_mean"]) == 4


def test_short_clips_pad_is_counted_and_settings_are_checked_on_resume(world, tmp_path):
    summary = ok(encode(*world["common"], "--short-clips", "pad", "--out", str(tmp_path / "pad")))
    assert summary["pairs_written"] == len(GOOD_ROWS) + 1 and summary["short_clips_padded"] == 1
    assert "short video" not in summary["bad_rows"]
    src = by_row(read_pairs(tmp_path / "pad"))[8]["meta"]["source"]  # label_0 wins: the short video_1 loses
    # 4 frames at 16 fps last 0.25 s: targets 0 and 0.125 s are real, 0.25, 0.375, 0.5 s repeat the last frame
    assert src["num_padded_frames"] == [0, 3] and src["frames"][1] == [0, 2, 3, 3, 3]
    bad = encode(*world["common"], "--fps", "4", "--out", str(world["root"] / "one"))
    assert bad.returncode == 2 and "fps" in bad.stderr


def test_frame_count_the_vae_cannot_take_is_a_clear_error(world, tmp_path):
    common = [a if a != str(NUM_FRAMES) else "6" for a in world["common"]]
    proc = encode(*common, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "--num-frames 6" in proc.stderr


def test_rows_take_video_bytes_and_sampling_repeats_frames_above_the_source_rate(world, tmp_path):
    videos = world["videos"]
    spec = RowSpec("caption", ("video_0", "video_1"), ("label_0", "label_1"), "id", None, (16, 24), None, False)
    clip = ClipSpec(num_frames=5, fps=Fraction(32), pad_short=False)  # twice the source rate
    row = {"caption": "a red square", "video_0": {"bytes": (videos / "0_0.mp4").read_bytes(), "path": None},
           "video_1": str(videos / "0_1.mp4"), "label_0": 0.0, "label_1": 1.0, "id": "clip-1"}
    pair = prepare_video_row(spec, clip, 3, str(tmp_path / "m.parquet"), row)
    assert pair.key == "clip-1" and pair.source["winner"] == "video_1" and pair.num_padded_frames == 0
    assert pair.pixels_w.shape == pair.pixels_l.shape == (3, 5, 16, 24) and pair.pixels_w.dtype == torch.uint8
    assert pair.source["frames"] == [[0, 0, 1, 1, 2]] * 2
    with pytest.raises(BadRow) as e:
        prepare_video_row(spec, clip, 3, str(tmp_path / "m.parquet"), {**row, "video_0": b"not a video"})
    assert e.value.reason == "unreadable video_0"
    pixels, info = sample_frames((videos / "8_1.mp4").read_bytes(), "v", ClipSpec(3, Fraction(16), False),
                                 (SIDE, SIDE), None)
    assert info["frames"] == [0, 1, 2] and pixels.shape == (3, 3, SIDE, SIDE)


def test_buckets_send_each_pair_to_its_aspect_ratio_and_the_most_frames_both_videos_fill(world, tmp_path):
    """--buckets FxHxW: the size nearest the winner's aspect ratio, then the longest clip of it both videos
    fill; each bucket in its own shards, whose shape index.json records; the loader batches them by shape."""
    from dpo_ds import data
    from dpo_ds.models import family_class

    videos = tmp_path / "videos"
    videos.mkdir()
    specs = [((SIDE, SIDE), 16, (SIDE, SIDE), 16), ((SIDE, SIDE), 16, (SIDE, SIDE), 6),
             ((48, SIDE), 16, (SIDE, SIDE), 16), ((SIDE, SIDE), 16, (48, SIDE), 16)]  # (w, h), frames at 16 fps
    rows = []
    for i, (size_0, frames_0, size_1, frames_1) in enumerate(specs):
        write_video(videos / f"{i}_0.mp4", seed=2 * i, num_frames=frames_0, size=size_0)
        write_video(videos / f"{i}_1.mp4", seed=2 * i + 1, num_frames=frames_1, size=size_1)
        rows.append({"caption": f"a video of number {i} moving", "video_0": f"{i}_0.mp4", "video_1": f"{i}_1.mp4",
                     "label_0": 1.0, "label_1": 0.0})
    (videos / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ok(encode("--family", "wan", "--manifest", str(videos / "pairs.jsonl"), "--model", str(world["model"]),
              "--buckets", "9x32x32", "5x32x32", "5x32x48", "--fps", "16", "--max-sequence-length", str(NUM_TOKENS),
              "--pairs-per-shard", "4", "--batch-size", "2", "--num-workers", "2", "--out", str(tmp_path / "out")))
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert {e["name"]: (e["shape"], e["num_pairs"]) for e in index["shards"]} == {
        "pairs-000000-9x32x32-000000.tar": ([4, 3, 4, 4], 2), "pairs-000000-5x32x32-000000.tar": ([4, 2, 4, 4], 1),
        "pairs-000000-5x32x48-000000.tar": ([4, 2, 4, 6], 1)}
    pairs = by_row(read_pairs(tmp_path / "out"))
    # Row 1: the 6-frame loser (0.375 s) fills 5 frames at 16 fps, not 9; row 2: the wide winner decides.
    expected = {0: (9, [32, 32]), 1: (5, [32, 32]), 2: (5, [32, 48]), 3: (9, [32, 32])}
    for row, (frames, size) in expected.items():
        source = pairs[row]["meta"]["source"]
        assert (source["num_frames"], source["resolution"]) == (frames, size)
        assert source["num_padded_frames"] == [0, 0] and len(source["frames"][0]) == frames
    wan = family_class("wan").tiny()
    shards = data.list_shards(str(tmp_path / "out"), check=True)
    loader = data.PairLoader(shards, batch_size=1, rank=0, world_size=1, seed=0, num_workers=0,
                             schema={"latents_w": None, "latents_l": None, "prompt_embeds": None}, draw_t=wan.draw_t)
    shapes = sorted(tuple(b["latents_w"].shape[1:]) for b in loader.epoch(0))
    assert shapes == [(4, 2, 4, 4), (4, 2, 4, 6), (4, 3, 4, 4), (4, 3, 4, 4)]
    bad = encode("--family", "wan", "--manifest", str(videos / "pairs.jsonl"), "--model", str(world["model"]),
                 "--buckets", "32x32", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "FRAMESxHEIGHTxWIDTH" in bad.stderr


def test_unet3d_family_encodes_each_frame_with_the_image_vae_and_samples_with_its_pipeline(world, tmp_path):
    """--family unet3d (ModelScope / Zeroscope layout): SD's image VAE on each frame (one latent frame per
    frame, times scaling_factor), one CLIP encoder's last states; the samples fit the unet3d family's
    schema, its UNet predicts on them, and TextToVideoSDPipeline samples a clip with the family's parts."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from dpo_ds.encode import PreparedVideoPair
    from dpo_ds.models import encoder_class, unet3d
    from tiny_sdxl import build_tiny_sd15

    model = build_tiny_sd15(tmp_path / "model")  # vae/, text_encoder/, tokenizer/ are what unet3d reads
    common = [a if a != str(world["model"]) else str(model) for a in world["common"]]
    summary = ok(encode(*_with_family(common, "unet3d"), "--out", str(tmp_path / "shards")))
    assert summary["pairs_written"] == len(GOOD_ROWS)
    vae = AutoencoderKL.from_pretrained(str(model / "vae")).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(model / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(model / "text_encoder")).eval()
    pairs = by_row(read_pairs(tmp_path / "shards"))
    meta, t = pairs[9]["meta"], pairs[9]["tensors"]  # label_1 wins; video_1 is 24 fps: frames 0, 3, 6, 9, 12
    assert meta["family"] == "unet3d" and meta["latent_layout"] == "CFHW"
    assert meta["scaling_factor"] == pytest.approx(0.18215) and meta["shift_factor"] is None
    assert set(t) == {"latents_w", "latents_l", "prompt_embeds"}
    assert t["latents_w"].shape == t["latents_l"].shape == (4, NUM_FRAMES, 4, 4)
    decoded = decoded_frames(world["videos"] / "9_1.mp4")
    x = torch.from_numpy(np.stack([decoded[i] for i in (0, 3, 6, 9, 12)])).permute(0, 3, 1, 2).float() / 127.5 - 1
    ids = tokenizer([meta["caption"]], padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.mode().permute(1, 0, 2, 3) * 0.18215  # [F, C, h, w] -> CFHW
        states = text_encoder(ids).last_hidden_state[0]
    torch.testing.assert_close(t["latents_w"].float(), expected, atol=3e-3, rtol=1e-2)
    torch.testing.assert_close(t["prompt_embeds"].float(), states, atol=2e-3, rtol=1e-2)

    family = unet3d.UNet3D.tiny(SIDE)
    schema = family.sample_schema(family.TINY_DENOISER_CONFIG)
    assert schema["prompt_embeds"] == tuple(t["prompt_embeds"].shape)
    torch.manual_seed(0)
    unet = family.denoiser_from_config(family.TINY_DENOISER_CONFIG).eval()
    batch = {name: v[None].float() for name, v in t.items()}
    batch |= {"noise": torch.randn_like(batch["latents_w"]), "t": torch.tensor([500.0], dtype=torch.float64)}
    with torch.no_grad():
        e_w, e_l = family.pair_errors(unet, batch, *family.noisy_pair(batch), torch.float32)
    assert torch.isfinite(e_w).all() and torch.isfinite(e_l).all()

    pipe = family.pipeline(str(model), unet, DDIMScheduler.from_config(family.SCHEDULER_CONFIG), torch.float32)
    clips = [family.sample(pipe, ["a red square"] * 2, [torch.Generator().manual_seed(s) for s in (0, 0)], steps=2,
                           guidance_scale=5.0, height=SIDE, width=SIDE, num_frames=3) for _ in range(2)]
    assert clips[0].shape == (2, 3, SIDE, SIDE, 3) and clips[0].dtype == np.uint8  # [N, F, H, W, RGB], as sample.py writes
    assert np.array_equal(clips[0], clips[1]) and np.array_equal(clips[0][0], clips[0][1])  # the seed fixes the clip
    with pytest.raises(ValueError, match="multiples of"):
        family.sample(pipe, ["a red square"], [torch.Generator()], steps=1, guidance_scale=1.0, height=SIDE + 4,
                      width=SIDE, num_frames=3)

    # --family motion (AnimateDiff) encodes as unet3d does; only the family its shards name differs.
    pixels = torch.randint(0, 256, (2, 3, 3, SIDE, SIDE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pair = PreparedVideoPair("k", 0, "a red square", pixels[0], pixels[1], {}, False, 0)
    samples = {name: next(encoder_class(name)(str(model), None, torch.device("cpu"), torch.float32, NUM_TOKENS)
                          .samples([pair], torch.float16, {})) for name in ("unet3d", "motion")}
    assert samples["motion"][1]["family"] == "motion" and samples["motion"][1]["latent_layout"] == "CFHW"
    assert all(torch.equal(samples["motion"][0][n], samples["unet3d"][0][n]) for n in samples["unet3d"][0])
    assert samples["motion"][0]["latents_w"].shape == (4, 3, 4, 4)


def _with_family(args: list[str], family: str) -> list[str]:
    """world["common"] with --family FAMILY instead of wan."""
    i = args.index("--family")
    return [*args[:i + 1], family, *args[i + 2:]]
