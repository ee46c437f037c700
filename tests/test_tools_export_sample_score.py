"""tools/export.py, tools/sample.py and tools/score.py on tiny models built from config, nothing downloaded.

Export is checked against a real 2-process ZeRO-3 (and ZeRO-2) run through the `deepspeed` launcher;
sampling runs a tiny SDXL pipeline (tests/tiny_sdxl.py) with an exported UNet, and a tiny WanPipeline;
scoring uses a tiny CLIP.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, env, fork_train, write_run_config
from tiny_sdxl import RESOLUTION, build_tiny_clip, build_tiny_sd15, build_tiny_sdxl, build_tiny_wan

PROMPTS = ["the red cat", "", "a blue house, 3 windows", "the dog!"]  # the blank line is skipped
NUM_PROMPTS = 3
WEIGHTS = "diffusion_pytorch_model.safetensors"
SIDES = ("reference", "policy")


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *args], env=env(),
                          capture_output=True, text=True, timeout=300)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def load_tool(name: str):
    """A tool's module, to call its main() in this process (saves an interpreter start and the imports)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / WEIGHTS))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------- shared tiny models

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Tiny SDXL folder; its unet/ holds the weights the `tiny` fixture's runs start from (seed 0)."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("base") / "sdxl")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def policy_unet(base, tmp_path_factory) -> Path:
    """The base UNet with every weight perturbed: a policy whose samples visibly differ."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(base / "unet"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    out = tmp_path_factory.mktemp("policy") / "unet"
    unet.save_pretrained(str(out), safe_serialization=True)
    return out


def sample_args(base: Path, unet: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["--base", str(base), "--unet", str(unet), "--prompts", str(prompts), "--out", str(out),
            "--steps", "3", "--resolution", str(RESOLUTION), "--batch-size", "2", "--no-progress", *extra]


@pytest.fixture(scope="module")
def sampled(base, policy_unet, prompts, tmp_path_factory) -> Path:
    """tools/sample.py through its command line."""
    out = tmp_path_factory.mktemp("samples")
    ok(run_tool("sample", *sample_args(base, policy_unet, prompts, out)))
    return out


# ---------------------------------------------------------------- export

@pytest.fixture(scope="module")
def zero3_run(tiny, tmp_path_factory) -> Path:
    """4 steps on 2 ranks, ZeRO-3, checkpoints at steps 2 and 4; export/unet holds step 4's weights."""
    out = tmp_path_factory.mktemp("zero3")
    cfg = write_run_config(out / "run.yaml", tiny, out / "run", train={"max_steps": 4},
                           checkpoint={"every_steps": 2, "keep_last": 2})
    ok(fork_train(cfg))
    return out / "run"


@pytest.mark.slow
def test_export_of_zero3_checkpoint_equals_trained_weights(zero3_run, tiny):
    ok(run_tool("export", "--run", str(zero3_run)))  # latest, fp32, default folder
    exported = weights(zero3_run / "export" / "step_00000004" / "unet")
    trained = weights(zero3_run / "export" / "unet")
    assert exported.keys() == trained.keys()
    for name, value in trained.items():
        assert exported[name].dtype == torch.float32, name
        assert torch.equal(exported[name], value), f"{name} differs from the trained weights"
    initial = weights(tiny / "model" / "unet")
    assert any(not torch.equal(initial[n], trained[n]) for n in trained)  # the comparison could have failed


@pytest.mark.slow
def test_export_bf16_is_the_cast_and_tag_picks_the_checkpoint(zero3_run, tmp_path):
    from diffusers import UNet2DConditionModel

    export = load_tool("export")
    assert export.main(["--run", str(zero3_run), "--dtype", "bf16", "--out", str(tmp_path / "bf16")]) == 0
    trained = weights(zero3_run / "export" / "unet")
    bf16 = weights(tmp_path / "bf16")
    for name, value in trained.items():
        assert bf16[name].dtype == torch.bfloat16, name
        assert torch.equal(bf16[name], value.to(torch.bfloat16)), name
    assert UNet2DConditionModel.from_pretrained(str(tmp_path / "bf16"), torch_dtype=torch.bfloat16).dtype == torch.bfloat16

    assert export.main(["--run", str(zero3_run), "--tag", "step_00000002", "--out", str(tmp_path / "two")]) == 0
    step2 = weights(tmp_path / "two")
    assert any(not torch.equal(step2[n], trained[n]) for n in trained)  # step 2 is not step 4


@pytest.mark.slow
def test_export_of_zero2_checkpoint_equals_trained_weights(tiny, tmp_path):
    cfg = write_run_config(tmp_path / "run.yaml", tiny, tmp_path / "run", train={"max_steps": 2},
                           checkpoint={"every_steps": 2, "keep_last": 1})
    ok(fork_train(cfg, ds_config="ds_configs/zero2.json"))
    assert load_tool("export").main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    exported, trained = weights(tmp_path / "out"), weights(tmp_path / "run" / "export" / "unet")
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[n], trained[n]) for n in trained)


def test_export_refuses_missing_and_incomplete_checkpoints(tiny, tmp_path, capsys):
    export = load_tool("export")
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)

    def refused(*args: str) -> str:
        assert export.main(["--run", str(run), *args]) == 2
        return capsys.readouterr().err

    assert "config.yaml does not exist" in refused()
    write_run_config(run / "config.yaml", tiny, run)
    err = refused()
    assert "latest does not exist" in err and "--tag" in err
    assert "incomplete" in refused("--tag", "step_00000002")
    assert "step_00000009 does not exist" in refused("--tag", "step_00000009")
    assert "--model.pretrained_path=NEW_PATH" in refused(f"--model.pretrained_path={tmp_path / 'moved'}")


@pytest.mark.slow
def test_sample_runs_tiny_sdxl_with_the_exported_unet(zero3_run, base, prompts, tmp_path):
    """The exported policy in the pipeline: it runs, and its samples are not the reference's."""
    assert load_tool("sample").main(sample_args(base, zero3_run / "export" / "unet", prompts, tmp_path,
                                                "--guidance-scale", "1.0")) == 0
    records = json.loads((tmp_path / "samples.json").read_text())["samples"]
    assert len(records) == NUM_PROMPTS
    diffs = [np.abs(pixels(tmp_path / r["policy"]).astype(int) - pixels(tmp_path / r["reference"])).max()
             for r in records]
    assert max(diffs) > 0, "the trained UNet sampled exactly what the reference did"


# ---------------------------------------------------------------- sample

def test_sample_writes_grid_images_and_records(sampled, prompts):
    summary = json.loads((sampled / "samples.json").read_text())
    records = summary["samples"]
    assert [r["prompt"] for r in records] == [p for p in PROMPTS if p]
    assert [r["seed"] for r in records] == list(range(NUM_PROMPTS))
    assert summary["columns"] == ["reference", "policy"] and summary["steps"] == 3
    grid = pixels(sampled / "grid.png")
    assert grid.shape == (NUM_PROMPTS * RESOLUTION, 2 * RESOLUTION, 3)
    for row, record in enumerate(records):
        ref, pol = pixels(sampled / record["reference"]), pixels(sampled / record["policy"])
        assert ref.shape == pol.shape == (RESOLUTION, RESOLUTION, 3)
        assert ref.std() > 0  # a picture, not a constant
        cells = grid[row * RESOLUTION:(row + 1) * RESOLUTION]
        assert np.array_equal(cells[:, :RESOLUTION], ref) and np.array_equal(cells[:, RESOLUTION:], pol)
    assert any(not np.array_equal(pixels(sampled / r["reference"]), pixels(sampled / r["policy"])) for r in records)
    assert not np.array_equal(pixels(sampled / records[0]["reference"]), pixels(sampled / records[2]["reference"]))


def test_sample_same_seed_same_images(sampled, base, policy_unet, prompts, tmp_path):
    ok(run_tool("sample", *sample_args(base, policy_unet, prompts, tmp_path)))
    first = json.loads((sampled / "samples.json").read_text())["samples"]
    assert json.loads((tmp_path / "samples.json").read_text())["samples"] == first
    for record in first:
        for side in ("reference", "policy"):
            assert np.array_equal(pixels(tmp_path / record[side]), pixels(sampled / record[side])), record
    # Another batch size, in this process (other thread count): each prompt's noise comes from its own
    # seed, not from its batch, so only float rounding may differ.
    assert load_tool("sample").main(sample_args(base, policy_unet, prompts, tmp_path / "b", "--batch-size", "3",
                                                "--grid-rows", "2")) == 0
    assert pixels(tmp_path / "b" / "grid.png").shape == (2 * RESOLUTION, 2 * RESOLUTION, 3)
    for record in first:
        for side in ("reference", "policy"):
            np.testing.assert_allclose(pixels(tmp_path / "b" / record[side]).astype(int),
                                       pixels(sampled / record[side]).astype(int), atol=2)
    assert load_tool("sample").main(sample_args(base, policy_unet, prompts, tmp_path / "c", "--seed", "7")) == 0
    assert not np.array_equal(pixels(tmp_path / "c" / first[0]["reference"]),
                              pixels(sampled / first[0]["reference"]))


def test_sample_runs_the_sd15_family(prompts, tmp_path):
    """--family sd15 samples with StableDiffusionPipeline from an SD 1.5-layout folder: a picture per
    prompt and side, and a perturbed UNet samples other pictures than the base's."""
    from diffusers import UNet2DConditionModel

    base = build_tiny_sd15(tmp_path / "sd15")
    unet = UNet2DConditionModel.from_pretrained(str(base / "unet"))
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    unet.save_pretrained(str(tmp_path / "policy"), safe_serialization=True)
    assert load_tool("sample").main(sample_args(base, tmp_path / "policy", prompts, tmp_path / "out",
                                                "--family", "sd15")) == 0
    summary = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert summary["family"] == "sd15" and len(summary["samples"]) == NUM_PROMPTS
    for r in summary["samples"]:
        ref, pol = pixels(tmp_path / "out" / r["reference"]), pixels(tmp_path / "out" / r["policy"])
        assert ref.shape == pol.shape == (RESOLUTION, RESOLUTION, 3) and ref.std() > 0
    assert any(not np.array_equal(pixels(tmp_path / "out" / r["reference"]), pixels(tmp_path / "out" / r["policy"]))
               for r in summary["samples"])
    # A folder without the family's parts is refused, naming them.
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    shutil.rmtree(broken / "text_encoder")
    proc = run_tool("sample", *sample_args(broken, broken / "unet", prompts, tmp_path / "x", "--family", "sd15"))
    assert proc.returncode == 2 and "lacks ['text_encoder']; pass a sd15 diffusers folder" in proc.stderr


def test_sample_refuses_bad_inputs(base, policy_unet, tmp_path):
    sample = load_tool("sample")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert sample.main(sample_args(base, policy_unet, empty, tmp_path / "o")) == 2
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert sample.main(sample_args(base, tmp_path / "nowhere", prompts, tmp_path / "o")) == 2
    assert sample.main(sample_args(tmp_path, policy_unet, prompts, tmp_path / "o")) == 2


# ---------------------------------------------------------------- sample --family wan

WAN_PROMPTS = ["a red square moving", "the blue video of number 3"]
WAN_FRAMES, WAN_HEIGHT, WAN_WIDTH = 5, 16, 32  # 1 + 4k frames; sides multiples of 16 (VAE 8 x patch 2)


def wan_args(base: Path, transformer: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["--family", "wan", "--base", str(base), "--transformer", str(transformer), "--prompts", str(prompts),
            "--out", str(out), "--steps", "2", "--guidance-scale", "2.0", "--height", str(WAN_HEIGHT),
            "--width", str(WAN_WIDTH), "--num-frames", str(WAN_FRAMES), "--batch-size", "2", "--no-progress", *extra]


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> dict[str, Path]:
    """A tiny Wan 2.1-layout base, a policy transformer with every weight perturbed, and sample.py's output."""
    from diffusers import WanTransformer3DModel

    root = tmp_path_factory.mktemp("wan")
    base = build_tiny_wan(root / "base")
    transformer = WanTransformer3DModel.from_pretrained(str(base / "transformer"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    transformer.save_pretrained(str(root / "policy"), safe_serialization=True)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(WAN_PROMPTS) + "\n")
    assert load_tool("sample").main(wan_args(base, root / "policy", prompts, root / "out")) == 0
    return {"base": base, "policy": root / "policy", "prompts": prompts, "out": root / "out"}


def test_sample_wan_writes_strips_grid_and_records(wan):
    """Each clip a strip of its frames (and an mp4 where PyAV is installed); the grid holds each prompt's
    reference row above its policy row; samples.json names every file; the perturbed policy's clips differ."""
    out = wan["out"]
    summary = json.loads((out / "samples.json").read_text())
    assert summary["family"] == "wan" and summary["num_frames"] == WAN_FRAMES and summary["fps"] == 16
    assert summary["sampler"] == "unipc" and summary["policy_transformer"] == str(wan["policy"].resolve())
    assert summary["reference_transformer"] == str((wan["base"] / "transformer").resolve())
    records = summary["samples"]
    assert [r["prompt"] for r in records] == WAN_PROMPTS and [r["seed"] for r in records] == [0, 1]
    grid = pixels(out / "grid.png")
    assert grid.shape == (2 * len(WAN_PROMPTS) * WAN_HEIGHT, WAN_FRAMES * WAN_WIDTH, 3)
    for i, record in enumerate(records):
        for row, side in enumerate(SIDES):
            strip = pixels(out / record[side])
            assert record[side] == f"{side}/{i:05d}.png"
            assert strip.shape == (WAN_HEIGHT, WAN_FRAMES * WAN_WIDTH, 3) and strip.std() > 0
            top = (2 * i + row) * WAN_HEIGHT
            assert np.array_equal(grid[top:top + WAN_HEIGHT], strip)  # all 5 frames fit the grid's default 8
            if importlib.util.find_spec("av") is None:
                assert f"{side}_video" not in record
                continue
            import av

            with av.open(str(out / record[f"{side}_video"])) as container:
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            assert len(frames) == WAN_FRAMES and frames[0].shape == (WAN_HEIGHT, WAN_WIDTH, 3)
    for record in records:
        assert not np.array_equal(pixels(out / record["reference"]), pixels(out / record["policy"]))
    assert not np.array_equal(pixels(out / records[0]["reference"]), pixels(out / records[1]["reference"]))


def test_sample_wan_same_seed_same_frames(wan, tmp_path):
    """A rerun (another grid) gives the very same frames; another batch size the same up to rounding;
    another seed other frames."""
    first = json.loads((wan["out"] / "samples.json").read_text())["samples"]
    assert load_tool("sample").main(wan_args(wan["base"], wan["policy"], wan["prompts"], tmp_path / "a",
                                             "--grid-frames", "3", "--grid-rows", "1")) == 0
    assert json.loads((tmp_path / "a" / "samples.json").read_text())["samples"] == first
    for record in first:
        for side in SIDES:
            assert np.array_equal(pixels(tmp_path / "a" / record[side]), pixels(wan["out"] / record[side])), record
    assert load_tool("sample").main(wan_args(wan["base"], wan["policy"], wan["prompts"], tmp_path / "one",
                                             "--batch-size", "1")) == 0
    for record in first:
        for side in SIDES:
            np.testing.assert_allclose(pixels(tmp_path / "one" / record[side]).astype(int),
                                       pixels(wan["out"] / record[side]).astype(int), atol=1)
    strips = [pixels(tmp_path / "a" / first[0][side]) for side in SIDES]
    shown = [np.concatenate([s[:, f * WAN_WIDTH:(f + 1) * WAN_WIDTH] for f in (0, 2, 4)], axis=1) for s in strips]
    assert np.array_equal(pixels(tmp_path / "a" / "grid.png"), np.concatenate(shown, axis=0))
    assert load_tool("sample").main(wan_args(wan["base"], wan["policy"], wan["prompts"], tmp_path / "b",
                                             "--seed", "5")) == 0
    assert not np.array_equal(pixels(tmp_path / "b" / first[0]["policy"]), pixels(wan["out"] / first[0]["policy"]))


def test_sample_wan_refuses_what_it_cannot_sample_and_score_refuses_clips(wan, clip, tmp_path, capsys):
    sample = load_tool("sample")
    base, policy, prompts = wan["base"], wan["policy"], wan["prompts"]
    args = wan_args(base, policy, prompts, tmp_path / "x")
    assert sample.main([a for a in args if a not in ("--num-frames", str(WAN_FRAMES))]) == 2
    assert "pass --num-frames" in capsys.readouterr().err
    assert sample.main(args + ["--num-frames", "6"]) == 2
    assert "num_frames 6: Wan's VAE needs 1 + 4·k frames" in capsys.readouterr().err
    assert sample.main(args + ["--sampler", "ddim"]) == 2
    assert "one of ['unipc', 'euler']" in capsys.readouterr().err
    assert load_tool("score").main(score_args(wan["out"], clip, tmp_path / "s.json")) == 2
    assert "holds video clips (5 frames, family wan); score.py scores images only" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


# ---------------------------------------------------------------- score

def score_args(samples: Path, clip: Path, out: Path) -> list[str]:
    return ["--samples", str(samples), "--model", str(clip), "--out", str(out), "--num-resamples", "2000",
            "--no-progress"]


def test_score_win_rate_interval_and_formula(sampled, clip, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    proc = ok(run_tool("score", *score_args(sampled, clip, tmp_path / "a.json")))
    assert "policy win rate" in proc.stdout
    result = json.loads((tmp_path / "a.json").read_text())
    lo, hi = result["win_rate_ci95"]
    assert 0.0 <= lo <= result["win_rate"] <= hi <= 1.0
    outcomes = [p["outcome"] for p in result["per_prompt"]]
    assert result["win_rate"] == pytest.approx(np.mean(outcomes))
    assert result["wins"] + result["ties"] + result["losses"] == result["num_prompts"] == NUM_PROMPTS
    for p in result["per_prompt"]:
        assert p["outcome"] == (1.0 if p["policy"] > p["reference"] else 0.5 if p["policy"] == p["reference"] else 0.0)

    # The score is CLIP's own logits_per_image: logit_scale * cos(image, text).
    model, processor = CLIPModel.from_pretrained(str(clip)).eval(), CLIPProcessor.from_pretrained(str(clip))
    records = json.loads((sampled / "samples.json").read_text())["samples"]
    for side in ("reference", "policy"):
        images = [Image.open(sampled / r[side]).convert("RGB") for r in records]
        inputs = processor(text=[r["prompt"] for r in records], images=images, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**inputs).logits_per_image.diagonal()
        assert [p[side] for p in result["per_prompt"]] == pytest.approx(logits.tolist(), abs=1e-4)

    # Deterministic, down to the bytes of the file; swapping the columns mirrors the win rate.
    ok(run_tool("score", *score_args(sampled, clip, tmp_path / "b.json")))
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    swapped = tmp_path / "swapped"
    shutil.copytree(sampled, swapped)
    summary = json.loads((swapped / "samples.json").read_text())
    for r in summary["samples"]:
        r["reference"], r["policy"] = r["policy"], r["reference"]
    (swapped / "samples.json").write_text(json.dumps(summary))
    assert load_tool("score").main(score_args(swapped, clip, tmp_path / "c.json")) == 0
    assert json.loads((tmp_path / "c.json").read_text())["win_rate"] == pytest.approx(1 - result["win_rate"])


def test_score_identical_images_tie_at_one_half(sampled, clip, tmp_path):
    """Policy images that are pixel copies of the reference's (separate files) are ties: 0.5 exactly."""
    shutil.copytree(sampled, tmp_path / "same")
    for path in (tmp_path / "same" / "reference").iterdir():
        shutil.copy(path, tmp_path / "same" / "policy" / path.name)
    assert load_tool("score").main(score_args(tmp_path / "same", clip, tmp_path / "s.json")) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["win_rate"] == 0.5 and result["win_rate_ci95"] == [0.5, 0.5]
    assert result["ties"] == NUM_PROMPTS and result["mean_score_diff"] == 0.0


def test_score_refuses_missing_images(sampled, clip, tmp_path):
    shutil.copytree(sampled, tmp_path / "broken")
    (tmp_path / "broken" / "policy" / "00001.png").unlink()
    proc = run_tool("score", *score_args(tmp_path / "broken", clip, tmp_path / "x.json"))
    assert proc.returncode == 2 and "policy/00001.png is missing" in proc.stderr
