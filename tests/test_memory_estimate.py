"""tools/memory_estimate.py: its parameter count is diffusers' WanTransformer3DModel's (built on the meta
device, no memory, nothing downloaded), its token count the README's, and the README quotes the table it prints."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import REPO

spec = importlib.util.spec_from_file_location("memory_estimate", REPO / "tools" / "memory_estimate.py")
memory_estimate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory_estimate)


@pytest.mark.parametrize("name, nominal, tolerance", [("Wan2.1-T2V-1.3B", 1.3e9, 0.10), ("Wan2.1-T2V-14B", 14e9, 0.05)])
def test_parameter_count_is_the_architectures(name, nominal, tolerance):
    """The formula counts what diffusers builds from the config, exactly; and it is near the nominal size
    (1.3B's is 1.42e9, 9% over its name, as its 2.84 GB bf16 file says; 14B's 14.29e9)."""
    from diffusers import WanTransformer3DModel

    model = memory_estimate.MODELS[name]
    count = memory_estimate.num_parameters(model["dim"], model["num_layers"], model["ffn_dim"])
    with torch.device("meta"):
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=model["num_heads"], attention_head_dim=128, in_channels=16,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=model["ffn_dim"], num_layers=model["num_layers"],
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    assert model["num_heads"] * 128 == model["dim"]
    assert count == sum(p.numel() for p in transformer.parameters())
    assert abs(count - nominal) / nominal < tolerance


def test_tokens_and_terms_follow_the_stated_formulas():
    assert memory_estimate.latent_tokens(81, 480, 832) == 21 * 30 * 52 == 32_760
    small = memory_estimate.MODELS["Wan2.1-T2V-1.3B"]
    one = memory_estimate.estimate(small, num_gpus=8, num_frames=81, height=480, width=832, micro_batch_size=1)
    two = memory_estimate.estimate(small, num_gpus=16, num_frames=81, height=480, width=832, micro_batch_size=2)
    assert one["model_states"] == 16 * one["params"] / 8 and two["model_states"] == one["model_states"] / 2
    assert one["saved_inputs"] == 2 * 32_760 * 1536 * 2 * 30 and two["saved_inputs"] == 2 * one["saved_inputs"]
    assert one["peak_cache"] < one["peak_live_offloaded"] < one["peak_live_on_gpu"]


def test_prints_the_table_and_says_it_is_arithmetic(capsys):
    assert memory_estimate.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ARITHMETIC, not measured") and "32,760 tokens" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert rows.keys() == set(memory_estimate.MODELS) and rows["Wan2.1-T2V-14B"][1] == "14.29e9"
    with pytest.raises(SystemExit) as exit_info:
        memory_estimate.main(["--num-frames", "80"])
    assert exit_info.value.code == 2


def test_readme_quotes_the_tools_output(capsys):
    """The README's Wan memory table is this command's output, not numbers typed by hand."""
    assert memory_estimate.main([]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed in (REPO / "README.md").read_text()
