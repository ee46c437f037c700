"""Model FLOPs per pair and the peak they are measured against: perf/tflops and perf/mfu (docs/design.md §7).

The FLOPs of one policy forward and backward per pair are counted once at start, per latent shape, by
torch's FlopCounterMode on a copy of the denoiser built from its config on the meta device: shapes
alone decide the count, so it allocates no weights and never touches the ZeRO-3 partitioned engine.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from dpo_ds import models
from dpo_ds.models.family import Family

# Dense bf16 tensor-core TFLOP/s of one GPU, as vendors state it (no sparsity); matched in
# torch.cuda.get_device_name() (e.g. "NVIDIA H100 80GB HBM3") or logging.peak_tflops.
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "B200": 2250.0}


def peak_tflops(setting: float | str | None, device_name: str | None) -> float | None:
    """The peak perf/mfu divides by: logging.peak_tflops (a number, or a device of PEAK_TFLOPS) or, when it
    is unset, the device's name (None on CPU); None when neither names a known device."""
    if isinstance(setting, (int, float)):
        return float(setting)
    name = (setting or device_name or "").upper()
    return next((peak for device, peak in PEAK_TFLOPS.items() if device in name), None)


def pair_flops(family: Family, denoiser_config: dict, trainable: list[str] | tuple[str, ...] | None,
               latent_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """FLOPs of the policy's forward and backward on one pair (2 samples) with latents of `latent_shape`.

    Counted as the trainer runs it (family.noisy_pair, family.pair_errors), with the run's trainable
    parameters (a frozen weight has no weight gradient to compute) and without gradient checkpointing:
    model FLOPs, as MFU counts them, not the recomputed forward."""
    with torch.device("meta"):
        denoiser = family.denoiser_from_config(denoiser_config)
    # Not diffusers' override of .to, which warns about fp32 modules. "meta" again: a few constructors
    # ignore the default device (SVD's mix factors are torch.Tensor([alpha]), made on the CPU).
    torch.nn.Module.to(denoiser, "meta", dtype)
    models.select_trainable(denoiser, trainable)
    g = torch.Generator().manual_seed(0)
    side = latent_shape[-1] * 8  # an image size for the conditioning's values only; shapes do not depend on it
    batch = {k: v[None] for k, v in family.synthetic_conditioning(denoiser_config, side, g, dtype).items()}
    batch.update(latents_w=torch.zeros(1, *latent_shape), latents_l=torch.zeros(1, *latent_shape),
                 noise=torch.zeros(1, *latent_shape), t=torch.tensor([family.draw_t(g)]))
    # The forward process indexes the scheduler's tables (CPU tensors) by t: noised on CPU, counted on meta.
    noisy = [x.to("meta") for x in family.noisy_pair(batch)]
    batch = {k: v.to("meta") for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter:
        err_w, err_l = family.pair_errors(denoiser, batch, *noisy, dtype)
        (err_w.sum() + err_l.sum()).backward()
    return counter.get_total_flops()
