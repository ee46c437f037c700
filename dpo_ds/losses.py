"""Diffusion-DPO loss and its diagnostics: pure tensor functions.

Legend: N = number of preference pairs in the batch.

docs/design.md §1 fixes the conventions implemented here (Wallace et al., 2024,
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
    loser_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO loss: mean over pairs of −log σ(−(β/2)·z).

    All error inputs are [N] per-sample errors (see `per_sample_error`) at one
    shared timestep and noise per pair; `weights` is an optional [N] ω(t).
    z = (e_w − r_w) − (e_l − r_l). Returns the scalar loss and detached [ ]
    diagnostics (docs/design.md §1).

    loser_weight scales the gradient that flows through e_l (1: the paper's
    loss; 0: the loser only sets the sigmoid's weight). The value of the loss
    does not change.
    """
    if not 0.0 <= loser_weight <= 1.0:
        raise ValueError(f"loser_weight must be in [0, 1], got {loser_weight}")
    if loser_weight != 1.0:
        # Same value, gradient scaled: w·e_l + (1 − w)·stopgrad(e_l).
        model_err_l = loser_weight * model_err_l + (1.0 - loser_weight) * model_err_l.detach()
    logits, diagnostics = _reward_margins(model_err_w, model_err_l, ref_err_w, ref_err_l, beta, weights)
    return -F.logsigmoid(logits).mean(), diagnostics


def _reward_margins(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor,
                    ref_err_l: torch.Tensor, beta: float, weights: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """[N] implicit reward margins −(β/2)·z, z = (e_w − r_w) − (e_l − r_l) (times ω(t) when given), and the
    detached [ ] diagnostics every preference objective reports. Checks the inputs' shapes."""
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
    logits = -0.5 * beta * z
    with torch.no_grad():
        diagnostics = {
            "implicit_acc": ((z < 0).float() + 0.5 * (z == 0).float()).mean(),
            "reward_margin": logits.mean(),
            "gap_w": gap_w.mean(),
            "gap_l": gap_l.mean(),
            "saturation": (torch.sigmoid(logits) > SATURATION_PROB).float().mean(),
            **{name: e.mean() for name, e in errs.items()},
        }
    return logits, {k: v.detach() for k, v in diagnostics.items()}


def diffusion_ipo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    *,
    beta: float,
    margin: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IPO-style bounded target (Azar et al., 2023): mean over pairs of (−(β/2)·z − margin)².

    Unlike DPO's −log σ, the squared loss stops pushing once a pair's reward
    margin reaches `margin`, so the loser's error is not raised without bound.
    Inputs as for `diffusion_dpo_loss`; same diagnostics.
    """
    logits, diagnostics = _reward_margins(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    return (logits - margin).pow(2).mean(), diagnostics


def sft_loss(*errors: torch.Tensor) -> torch.Tensor:
    """The plain diffusion objective: mean of the given [N] per-sample errors."""
    return torch.cat(errors).mean()


def preference_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    *,
    kind: str,
    beta: float,
    loser_weight: float = 1.0,
    sft_weight: float = 0.0,
    winner_hinge: float = 0.0,
    ipo_margin: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The configured objective: a DPO or IPO term plus optional regularisers.

    kind: "dpo" (diffusion_dpo_loss with loser_weight) or "ipo".
    sft_weight λ adds λ·mean(e_w): keep denoising the preferred images well.
    winner_hinge μ adds μ·mean(max(0, e_w − r_w)): penalise getting worse than
    the reference on what was preferred (the degradation docs/design.md §1 warns of).
    """
    if kind == "dpo":
        loss, diag = diffusion_dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta=beta,
                                        loser_weight=loser_weight)
    elif kind == "ipo":
        loss, diag = diffusion_ipo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta=beta,
                                        margin=ipo_margin)
    else:
        raise ValueError(f"preference loss kind {kind!r} is not 'dpo' or 'ipo'")
    if sft_weight:
        loss = loss + sft_weight * model_err_w.mean()
    if winner_hinge:
        loss = loss + winner_hinge * torch.relu(model_err_w - ref_err_w).mean()
    return loss, diag


NOISE_BUCKETS = ("low", "mid", "high")


def bucket_sums(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    noise_level: torch.Tensor,
) -> torch.Tensor:
    """Per noise-level bucket (thirds of [0, 1]: low, mid, high noise): sums to reduce across ranks.

    noise_level: [N] in [0, 1], the family's measure of how noisy each pair's draw is.

    Returns [3 x 4] float64: per bucket (pairs, correct pairs, Σ(e_w − r_w), Σ(e_l − r_l)),
    ties counting one half as in implicit accuracy. Divide by the pair count after reducing.
    """
    gap_w = (model_err_w - ref_err_w).detach().double()
    gap_l = (model_err_l - ref_err_l).detach().double()
    z = gap_w - gap_l
    correct = (z < 0).double() + 0.5 * (z == 0).double()
    num = len(NOISE_BUCKETS)
    bucket = (noise_level.double() * num).floor().long().clamp(0, num - 1)
    out = torch.zeros(num, 4, dtype=torch.float64, device=z.device)
    for column, values in enumerate((torch.ones_like(z), correct, gap_w, gap_l)):
        out[:, column].index_add_(0, bucket.to(z.device), values)
    return out
