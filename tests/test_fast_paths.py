"""The fast paths (settings in dpo_ds/config.py, measured by tools/bench.py): each switch changes what it
should and leaves the loss as it was. Activation checkpointing off, on and selective, and channels-last latents,
on every family's tiny denoiser; the fused optimizer, channels-last, block compilation and the synchronisation-
free step in the real Trainer, one process, ZeRO-3, the live reference."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.utils.checkpoint

from conftest import REPO, env, free_port, write_run_config
from dpo_ds import models
from dpo_ds.config import load_config, resolve_ds_config


def _tiny(name: str):
    """The family's tiny denoiser and a one-pair batch of its layout (clips of 2 latent frames), drawn from seed 0."""
    cls = models.family_class(name)
    family = cls.tiny(64)
    torch.manual_seed(0)
    denoiser = family.denoiser_from_config(dict(cls.TINY_DENOISER_CONFIG))
    config = cls.TINY_DENOISER_CONFIG
    channels = int(config.get("out_channels", config["in_channels"]))
    shape = (channels, 2, 8, 8) if cls.LATENT_LAYOUT == "CFHW" else (channels, 8, 8)
    g = torch.Generator().manual_seed(0)
    batch = {k: v[None] for k, v in family.synthetic_conditioning(denoiser.config, 64, g, torch.float32).items()}
    batch.update(latents_w=torch.randn(1, *shape, generator=g), latents_l=torch.randn(1, *shape, generator=g),
                 noise=torch.randn(1, *shape, generator=g), t=torch.tensor([family.draw_t(g)]))
    return family, denoiser, batch


def _grads(family, denoiser, batch) -> dict[str, torch.Tensor]:
    e_w, e_l = family.pair_errors(denoiser, batch, *family.noisy_pair(batch), torch.float32)
    (e_w - 0.5 * e_l).sum().backward()
    return {n: p.grad for n, p in denoiser.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(models.FAMILIES))
def test_activation_checkpointing_off_on_and_selective_keep_the_gradients(name, monkeypatch):
    """selective recomputes every other one of the family's blocks (counted as torch's checkpoint is entered);
    all three settings give the same gradients."""
    family, denoiser, batch = _tiny(name)
    entered = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda fn, *a, **k: entered.append(fn) or checkpoint(fn, *a, **k))
    grads = {}
    for setting in (False, True, "selective"):
        model = copy.deepcopy(denoiser)
        models.prepare_policy(family, model, SimpleNamespace(gradient_checkpointing=setting, channels_last=False,
                                                            compile="none"))
        entered.clear()
        grads[setting] = _grads(family, model, batch)
        if setting == "selective":
            blocks = family.blocks(model)
            assert len(entered) == len(blocks[::2]) >= 1
            assert [fn.__self__ for fn in entered] == blocks[::2]
    assert grads[False].keys() == grads[True].keys() == grads["selective"].keys()
    for n, g in grads[False].items():
        assert torch.allclose(grads[True][n], g, rtol=1e-4, atol=1e-6), n
        assert torch.allclose(grads["selective"][n], g, rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize("name", sorted(n for n, cls in models.FAMILIES.items() if cls.HAS_CONV_LATENTS))
def test_channels_last_runs_every_spatial_convolution_channels_last_and_keeps_the_prediction(name):
    family, denoiser, batch = _tiny(name)
    x_t, _, t = family.noisy_pair(batch)
    with torch.no_grad():
        plain = family.predict(denoiser, x_t, t, batch, torch.float32)
    models.prepare_policy(family, denoiser, SimpleNamespace(gradient_checkpointing=False, channels_last=True,
                                                            compile="none"))
    outputs = []
    for module in denoiser.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, args, out: outputs.append(
                out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()))
    with torch.no_grad():
        fast = family.predict(denoiser, x_t, t, batch, torch.float32)
    assert len(outputs) > 10 and all(outputs)
    assert torch.allclose(fast, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("override, message", [
    ("--model.channels_last=true --model.family=wan", "model.channels_last is for the UNet families"),
    ("--model.compile=reduce-overhead", "model.compile"),
    ("--model.gradient_checkpointing=every_other", "model.gradient_checkpointing"),
    ("--optim.implementation=fused --optim.name=adafactor", "optim.implementation=fused chooses AdamW's kernel"),
])
def test_fast_path_settings_refuse_what_they_cannot_do(override, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["--output_dir=x", "--model.denoiser_config=c.json", "--model.scheduler_config=s.json",
                           "--data.shards=x", "--train.max_steps=1", *override.split()])


def test_fused_kernel_is_for_the_optimizer_the_trainer_builds(tmp_path):
    cfg = load_config(None, ["--output_dir=x", "--model.denoiser_config=c.json", "--model.scheduler_config=s.json",
                             "--data.shards=x", "--train.max_steps=1", "--optim.implementation=fused"])
    with pytest.raises(ValueError, match="offloaded to cpu"):
        resolve_ds_config(str(REPO / "ds_configs" / "zero3_offload.json"), cfg, 1, "fp32")
    with_optimizer = tmp_path / "ds.json"
    with_optimizer.write_text(json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}}))
    with pytest.raises(ValueError, match="optimizer section builds DeepSpeed's own AdamW"):
        resolve_ds_config(str(with_optimizer), cfg, 1, "fp32")


def test_xformers_without_a_gpu_is_a_clear_error(monkeypatch):
    """Installed or not, xformers needs a GPU (its kernels are CUDA only); this machine has none."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present here")
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "xformers" else find_spec(n, *a))
    for name in ("sdxl", "wan"):
        family, denoiser, _ = _tiny(name)
        with pytest.raises(ValueError, match="model.attention=xformers needs a CUDA GPU"):
            family.set_attention(denoiser, "xformers")


PROBE = r"""
import json, sys, traceback
import torch
from dpo_ds import engine, models
from dpo_ds.config import load_config, resolve_ds_config
from dpo_ds.data import list_shards
from dpo_ds.trainer import Trainer

# Where the host reads a tensor's value, it waits for the device: count those calls inside the step.
SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
hits, is_counting = [], [False]

def counted(name):
    method = getattr(torch.Tensor, name)
    def wrapper(self, *args, **kwargs):
        if is_counting[0]:
            caller = traceback.extract_stack(limit=2)[0]
            path = caller.filename.split("site-packages/")[-1]
            path = "dpo_ds/" + path.split("/dpo_ds/")[-1] if "/dpo_ds/" in path else path
            hits.append(f"{path} {caller.name} {name}")
        return method(self, *args, **kwargs)
    return wrapper

for name in SYNCS:
    setattr(torch.Tensor, name, counted(name))
# inductor's C++ compilation of the blocks takes about four minutes here (aot_eager 40 s): dynamo's own backend
# captures the same graphs, breaking where ZeRO-3's parameter hooks (compiler-disabled) gather the weights.
compile_module = torch.nn.Module.compile
BACKEND = "eager"
torch.nn.Module.compile = lambda self, mode=None: compile_module(self, backend=BACKEND)

engine.init_distributed()
results = {}
for variant, overrides in json.loads(sys.argv[3]).items():
    cfg = load_config(sys.argv[1], overrides + [f"--output_dir={sys.argv[4]}/{variant}"])
    trainer = Trainer(cfg, resolve_ds_config(sys.argv[2], cfg, 1, "fp32"), "fp32", models.build(cfg),
                      list_shards(cfg.data.shards))
    losses, syncs, conv_outputs = [], [], []
    forward_loss, train_step = trainer.forward_loss, trainer.train_step

    def recording(batch, reference=None):
        loss, diag = forward_loss(batch, reference)
        losses.append(loss.detach().clone())
        return loss, diag

    def counting(batches):
        hits.clear()
        is_counting[0] = True
        try:
            return train_step(batches)
        finally:
            is_counting[0] = False
            syncs.append(list(hits))

    trainer.forward_loss, trainer.train_step = recording, counting
    module = trainer.policy.module
    last_conv = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    last_conv.register_forward_hook(lambda m, args, out: conv_outputs.append(
        out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()))
    trainer.fit()
    optimizer = trainer.policy.optimizer.optimizer
    results[variant] = {"losses": [x.item() for x in losses], "syncs": syncs, "conv_channels_last": conv_outputs,
                        "fused": bool(optimizer.defaults.get("fused")),
                        "compiled": [b._compiled_call_impl is not None for b in trainer.family.blocks(module)]}
print("RESULT " + json.dumps(results))
"""

DS_GRAD_NORM_CHECK = "deepspeed/runtime/utils.py is_invalid_grad_norm __bool__"  # in ZeRO-3's step


@pytest.mark.slow
def test_fast_paths_in_the_trainer_keep_the_loss_and_the_step_waits_for_nothing(tiny, tmp_path):
    """One process, ZeRO-3, the live reference, 4 steps of the real Trainer per variant, from one init and one
    data order. Every variant's losses are the default's. The step reads nothing back from the device but
    DeepSpeed's own check of the gradient norm (once per optimizer step; it skips a non-finite one), and by
    default the non-finite loss check (once per micro-batch; nonfinite_check=logging drops it). The first two
    steps are left out: DeepSpeed records its parameter trace there and agrees on it across ranks. (The compiled
    blocks' graphs, run by dynamo's eager backend, read a few scalars of their own: not counted.)"""
    cfg = write_run_config(tmp_path / "run.yaml", tiny, tmp_path / "unused", train={"max_steps": 4},
                           data={"num_workers": 1}, logging={"every_steps": 2, "progress": False},
                           checkpoint={"every_steps": 100, "export": False})
    variants = {
        "default": [],
        "fast": ["--optim.implementation=fused", "--train.nonfinite_check=logging", "--model.channels_last=true",
                 "--model.gradient_checkpointing=selective"],
        "compiled": ["--model.compile=default", "--model.gradient_checkpointing=false"],
    }
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc = subprocess.run([sys.executable, str(script), str(cfg), str(REPO / "ds_configs" / "zero3.json"),
                           json.dumps(variants), str(tmp_path / "runs")], cwd=REPO,
                          env=env() | {"MASTER_PORT": str(free_port())}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    default, fast, compiled = result["default"], result["fast"], result["compiled"]

    assert len(default["losses"]) == 4 and default["losses"][0] == pytest.approx(0.6931472, abs=1e-6)
    for variant in (fast, compiled):
        assert variant["losses"] == pytest.approx(default["losses"], rel=1e-4)
    assert default["losses"][-1] != pytest.approx(default["losses"][0], rel=1e-4)  # it trained

    assert not default["fused"] and fast["fused"]
    assert not any(default["conv_channels_last"]) and fast["conv_channels_last"] and all(fast["conv_channels_last"])
    assert not any(default["compiled"]) and all(compiled["compiled"])

    # The for-loop AdamW (PyTorch's default on the CPU) reads its step count, a CPU tensor: no device wait.
    for_loop_step_count = "torch/optim/optimizer.py _get_value item"
    for step_syncs in default["syncs"][2:]:
        assert sorted(step_syncs) == sorted([DS_GRAD_NORM_CHECK, "dpo_ds/engine.py any_rank_true item",
                                             for_loop_step_count]), step_syncs
    for step_syncs in fast["syncs"][2:]:
        assert step_syncs == [DS_GRAD_NORM_CHECK]


@pytest.mark.slow
def test_nonfinite_losses_checked_at_logging_stop_the_run(tiny, tmp_path):
    """train.nonfinite_check=logging: an absurd learning rate makes the losses non-finite after the first step;
    DeepSpeed skips those optimizer steps, the trainer reports them at the next logging step and stops once a
    window holds train.max_nonfinite_in_row of them."""
    cfg = write_run_config(tmp_path / "run.yaml", tiny, tmp_path / "run",
                           train={"max_steps": 30, "max_nonfinite_in_row": 2, "grad_clip": 0.0,
                                  "nonfinite_check": "logging"},
                           optim={"lr": 1e30}, logging={"every_steps": 2, "progress": False},
                           checkpoint={"every_steps": 100, "export": False})
    proc = subprocess.run([sys.executable, "launch/train.py", "--deepspeed", "ds_configs/zero3.json",
                           "--config", str(cfg)], cwd=REPO, env=env() | {"MASTER_PORT": str(free_port())},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-5000:]
    assert "step 2: 1 micro-batches of the last logging window had a non-finite loss" in proc.stderr
    assert "stopped: 2 micro-batches of one logging window had a non-finite loss" in proc.stderr
