"""Config: typed, validated once, and every bad setting stops before a process group exists."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, env, write_run_config
from dpo_ds.config import load_config, resolve_ds_config

BASE = ["--output_dir=out", "--model.denoiser_config=u.json", "--model.scheduler_config=s.json",
        "--data.shards=x.tar", "--train.max_steps=3"]


def test_overrides_reach_every_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: o\nmodel: {pretrained_path: m}\ndata: {shards: s}\ntrain: {max_steps: 5}\n")
    cfg = load_config(str(path), ["--dpo.beta=2000", "--optim.betas=[0.9, 0.99]", "--train.max_steps=7"])
    assert cfg.dpo.beta == 2000.0 and cfg.optim.betas == (0.9, 0.99) and cfg.train.max_steps == 7
    assert cfg.model.pretrained_path == "m" and cfg.reference.mode == "live"


@pytest.mark.parametrize("arg, expected", [
    ("--dpo.bogus=1", "unknown key 'dpo.bogus'"),
    ("--bogus.key=1", "unknown key 'bogus'"),
    ("--dpo.beta=lots", "dpo.beta"),
    ("--train.max_steps='3'", "train.max_steps"),
    ("--model.gradient_checkpointing=1", "model.gradient_checkpointing"),
    ("--optim.name=sgd", "optim.name"),
    ("--train.max_steps=0", "train.max_steps"),
    ("--model.family=wan22", "model.family: unknown family 'wan22'; the families are"),
])
def test_bad_settings_name_the_key(arg, expected):
    with pytest.raises(ValueError, match=expected.replace(".", r"\.")):
        load_config(None, BASE + [arg])


def test_model_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one"):
        load_config(None, ["--output_dir=o", "--model.family=sdxl", "--data.shards=x", "--train.max_steps=1"])


def _ds(tmp_path, content) -> str:
    p = tmp_path / "ds.json"
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(p)


def test_auto_values_filled_from_run_config(tmp_path):
    cfg = load_config(None, BASE + ["--train.micro_batch_size=3", "--train.grad_accum=2", "--train.grad_clip=0.5"])
    ds = resolve_ds_config(str(REPO / "ds_configs" / "zero3.json"), cfg, world_size=4, dtype="bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False


def test_auto_conflict_is_an_error(tmp_path):
    cfg = load_config(None, BASE + ["--train.micro_batch_size=2"])
    path = _ds(tmp_path, {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu = 4 contradicts train.micro_batch_size = 2"):
        resolve_ds_config(path, cfg, world_size=1, dtype="fp32")
    path = _ds(tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}, "zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match="optimizer.params.lr"):
        resolve_ds_config(path, cfg, world_size=1, dtype="fp32")


def test_bad_ds_json(tmp_path):
    cfg = load_config(None, BASE)
    with pytest.raises(ValueError, match="not valid JSON: line 1"):
        resolve_ds_config(_ds(tmp_path, "{bad json"), cfg, world_size=1, dtype="fp32")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_ds_config(str(tmp_path / "nope.json"), cfg, world_size=1, dtype="fp32")
    with pytest.raises(ValueError, match="stage must be 2 or 3"):
        resolve_ds_config(_ds(tmp_path, {"zero_optimization": {"stage": 1}}), cfg, world_size=1, dtype="fp32")


def _cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpo_ds.train", *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("case, expected", [
    ("unknown_key", "unknown key 'train.bogus'"),
    ("wrong_type", "dpo.beta"),
    ("auto_conflict", "gradient_clipping = 2.0 contradicts train.grad_clip = 1.0"),
    ("bad_json", "is not valid JSON"),
    ("missing_shards", "does not exist"),
    ("empty_shards", "no shards match"),
    ("no_unet_folder", "has no unet/config.json"),
])
def test_cli_fails_before_process_group(case, expected, tiny, tmp_path):
    cfg = write_run_config(tmp_path / "run.yaml", tiny, tmp_path / "out")
    ds = str(REPO / "ds_configs" / "zero3.json")
    extra = {
        "unknown_key": ["--train.bogus=1"],
        "wrong_type": ["--dpo.beta=[1]"],
        "missing_shards": [f"--data.shards={tmp_path}/missing-000000.tar"],
        "empty_shards": [f"--data.shards={tmp_path}/none-*.tar"],
        "no_unet_folder": [f"--model.pretrained_path={tmp_path}"],
    }.get(case, [])
    if case == "auto_conflict":
        ds = _ds(tmp_path, {"gradient_clipping": 2.0, "zero_optimization": {"stage": 3}})
    if case == "bad_json":
        ds = _ds(tmp_path, '{"zero_optimization": {"stage": 3},}')
    proc = _cli("--deepspeed", ds, "--config", str(cfg), *extra)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dpo_ds.train: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-3000:]
    assert "init_distributed" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["copied shard", "unreadable shards", "other family"])
def test_cli_refuses_bad_shards_before_process_group(case, tiny, tmp_path):
    """A shard copied under another name (its pairs would train twice an epoch), a data set of files
    that are not tars, and shards written for another model family: refused at start-up, naming the
    files, before anything is built."""
    shards, extra = tmp_path / "shards", []
    if case == "other family":
        shutil.copytree(tiny / "shards", shards)
        extra = ["--model.family=sd15"]
        expected = (f"shard {shards}/shard-\\d+.tar holds pairs for family 'sdxl' with latent_layout 'CHW' .*"
                    "model.family 'sd15'")
    elif case == "copied shard":
        shutil.copytree(tiny / "shards", shards)
        shutil.copy(shards / "shard-000001.tar", shards / "copy-000001.tar")  # not in index.json: headers are read
        expected = f"pair key '[^']+' is in shard {shards}/copy-000001.tar and in shard {shards}/shard-000001.tar"
    else:
        shards.mkdir()
        (shards / "shard-000000.tar").write_bytes(b"\0" * 100)
        (shards / "shard-000001.tar").write_text("<html>403 Forbidden</html>")
        expected = f"no shard opens as a tar: {shards}/shard-000000.tar .*; {shards}/shard-000001.tar"
    cfg = write_run_config(tmp_path / "run.yaml", tiny, tmp_path / "out", data={"shards": str(shards)})
    proc = _cli("--deepspeed", str(REPO / "ds_configs" / "zero3.json"), "--config", str(cfg), *extra)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dpo_ds.train: error:")]
    assert len(errors) == 1 and re.search(expected, errors[0]), proc.stderr[-3000:]
    assert "init_distributed" not in proc.stderr and not (tmp_path / "out").exists()


def test_exponent_floats_without_a_dot(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: o\nmodel: {pretrained_path: m}\ndata: {shards: s}\ntrain: {max_steps: 5}\n"
                    "optim: {lr: 1e-5}\n")
    assert load_config(str(path)).optim.lr == 1e-5
    assert load_config(str(path), ["--optim.lr=2e-3", "--dpo.beta=5e3"]).dpo.beta == 5000.0


def test_scale_lr_multiplies_by_the_global_batch(tmp_path):
    """The authors' --scale_lr: their SDXL 1e-8 at 2048 pairs per step is 2.048e-5."""
    args = BASE + ["--train.micro_batch_size=1", "--train.grad_accum=128", "--optim.lr=1e-8"]
    assert load_config(None, args).optim.peak_lr(2048) == 1e-8
    cfg = load_config(None, args + ["--optim.scale_lr=true"])
    assert cfg.optim.peak_lr(2048) == pytest.approx(2.048e-5)
    path = _ds(tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}, "zero_optimization": {"stage": 3}})
    ds = resolve_ds_config(path, cfg, world_size=16, dtype="bf16")
    assert ds["train_batch_size"] == 2048 and ds["optimizer"]["params"]["lr"] == pytest.approx(2.048e-5)
