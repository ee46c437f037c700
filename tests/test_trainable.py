"""model.trainable: a subset of the denoiser's parameters trains, the rest is frozen. In-process: the patterns'
matching and their errors; through the real `deepspeed` launcher (2 CPU processes, ZeRO-3): the optimizer
holds state for the trainable parameters only, those move, every frozen one is bitwise unchanged, the export
and the checkpoint still hold the whole model, and the live reference runs inside the policy."""

from __future__ import annotations

import pytest
import torch

from conftest import fork_train, write_run_config
from dpo_ds import models
from dpo_ds.config import load_config
from dpo_ds.models.sdxl import SDXL

TRAINABLE = ["up_blocks.1.*", "conv_out.*"]  # the tiny SDXL UNet's last up block and output convolution


def _tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return SDXL.denoiser_from_config(SDXL.TINY_DENOISER_CONFIG)


def test_patterns_select_the_trainable_parameters_and_freeze_the_rest():
    unet = _tiny_unet()
    models.select_trainable(unet, TRAINABLE)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in unet.named_parameters() if n.startswith(("up_blocks.1.", "conv_out."))}
    assert "conv_out.weight" in trainable and "up_blocks.1.resnets.0.conv1.weight" in trainable
    assert "up_blocks.0.attentions.0.proj_in.weight" not in trainable and "conv_in.weight" not in trainable
    # `*` crosses dots: one pattern reaches every block's cross-attention keys.
    models.select_trainable(unet, ["*.attn2.to_k.weight"])
    keys = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert keys and all(n.endswith(".attn2.to_k.weight") for n in keys) and len({n.split(".")[0] for n in keys}) == 3
    models.select_trainable(unet, None)  # unset: nothing changes
    assert [n for n, p in unet.named_parameters() if p.requires_grad] == keys


def test_a_pattern_that_matches_nothing_is_an_error_naming_the_key(tmp_path):
    unet = _tiny_unet()
    with pytest.raises(ValueError, match=r"model.trainable: \['up_block.*'\] match no parameter"):
        models.select_trainable(unet, ["conv_out.*", "up_block.*"])
    with pytest.raises(ValueError, match="model.trainable"):
        models.select_trainable(unet, [])
    assert all(p.requires_grad for p in unet.parameters())  # nothing was frozen by the refused setting
    path = write_run_config(tmp_path / "run.yaml", tmp_path, tmp_path / "out", model={"trainable": ["up_blocks.*"]})
    assert load_config(str(path)).model.trainable == ["up_blocks.*"]
    path = write_run_config(tmp_path / "run.yaml", tmp_path, tmp_path / "out", model={"trainable": "up_blocks.*"})
    with pytest.raises(ValueError, match="model.trainable"):
        load_config(str(path))


def _exp_avg_numel(state) -> int:
    """Elements of every `exp_avg` tensor in a (nested) optimizer state."""
    if isinstance(state, dict):
        return sum(v.numel() if k == "exp_avg" and torch.is_tensor(v) else _exp_avg_numel(v) for k, v in state.items())
    if isinstance(state, (list, tuple)):
        return sum(_exp_avg_numel(v) for v in state)
    return 0


@pytest.mark.slow
def test_only_the_trainable_parameters_train_have_optimizer_state_and_move(tiny, tmp_path):
    from safetensors.torch import load_file

    from dpo_ds.engine import consolidated_state_dict

    cfg = write_run_config(tmp_path / "run.yaml", tiny, tmp_path / "run", model={"pretrained_path": str(tiny / "model"),
                           "trainable": TRAINABLE}, train={"max_steps": 2}, checkpoint={"every_steps": 2})
    proc = fork_train(cfg)
    assert proc.returncode == 0, proc.stderr[-6000:]
    # The live reference ran inside the policy, on each rank's partitions of the initial trainable values
    # (tests/test_reference_memory.py checks it against a full copy).
    assert "the frozen part is shared, not copied" in proc.stderr
    initial = load_file(str(tiny / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    unet = _tiny_unet()
    models.select_trainable(unet, TRAINABLE)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    num_trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert 0 < num_trainable < sum(p.numel() for p in unet.parameters()) // 2

    # Adam's first moment, over both ranks' ZeRO-3 partitions, has one element per trainable element.
    tag = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    ckpt = tmp_path / "run" / "checkpoints" / tag
    files = sorted(ckpt.glob("*optim_states.pt"))
    assert len(files) == 2
    assert sum(_exp_avg_numel(torch.load(f, map_location="cpu", weights_only=False)) for f in files) == num_trainable

    exported = load_file(str(tmp_path / "run" / "export" / "unet" / "diffusion_pytorch_model.safetensors"))
    merged = consolidated_state_dict(str(tmp_path / "run" / "checkpoints"), tag)
    for name, weights in (("export", exported), ("checkpoint", merged)):
        assert weights.keys() == initial.keys(), name  # the whole model
        unmoved = sorted(n for n in trainable if torch.equal(weights[n], initial[n]))
        assert not unmoved, f"{name}: trainable parameters did not move: {unmoved[:5]}"
        moved = sorted(n for n in initial.keys() - trainable if not torch.equal(weights[n], initial[n]))
        assert not moved, f"{name}: frozen parameters changed: {moved[:5]}"
