"""Diffusion-DPO loss and its diagnostics: pure tensor functions.

Legend: N = number of preference pairs in the batch.

DESIGN.md §1 fixes the conventions implemented here (Wallace et al., 2024,
eq. 14, with the per-sample error a mean instead of a sum over latent
elements, so that published β values carry over across latent sizes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Pairs whose preference probability σ(−β/2·z) exceeds this have almost no
# gradient left; their fraction is the `saturation` diagnostic.
SATURATION_PROB = 0.99


def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, in float32.

    pred, target: [N x ...] (any latent layout). Returns [N].
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if pred.ndim < 2:
        raise ValueError(f"expected a batch of samples [N x ...], got shape {tuple(pred.shape)}")
    sq = (pred.float() - target.float()).pow(2)
    return sq.mean(dim=tuple(range(1, sq.ndim)))


def diffusion_dpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    *,
    beta: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO loss: mean over pairs of −log σ(−(β/2)·z).

    All error inputs are [N] per-sample errors (see `per_sample_error`) at one
    shared timestep and noise per pair; `weights` is an optional [N] ω(t).
    z = (e_w − r_w) − (e_l − r_l). Returns the scalar loss and detached [ ]
    diagnostics (DESIGN.md §1).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    errs = {"model_err_w": model_err_w, "model_err_l": model_err_l, "ref_err_w": ref_err_w, "ref_err_l": ref_err_l}
    for name, e in errs.items():
        if e.ndim != 1 or e.shape != model_err_w.shape:
            raise ValueError(f"{name} must have shape [N] = {tuple(model_err_w.shape[:1])}, got {tuple(e.shape)}")
    if weights is not None and weights.shape != model_err_w.shape:
        raise ValueError(f"weights must have shape {tuple(model_err_w.shape)}, got {tuple(weights.shape)}")

    gap_w = model_err_w - ref_err_w
    gap_l = model_err_l - ref_err_l
    z = gap_w - gap_l
    if weights is not None:
        z = z * weights
    logits = -0.5 * beta * z  # the implicit reward margin of each pair
    loss = -F.logsigmoid(logits).mean()

    with torch.no_grad():
        diagnostics = {
            "implicit_acc": ((z < 0).float() + 0.5 * (z == 0).float()).mean(),
            "reward_margin": logits.mean(),
            "gap_w": gap_w.mean(),
            "gap_l": gap_l.mean(),
            "saturation": (torch.sigmoid(logits) > SATURATION_PROB).float().mean(),
            **{name: e.detach().mean() for name, e in errs.items()},
        }
    return loss, {k: v.detach() for k, v in diagnostics.items()}
