"""Diffusion-DPO loss: hand-computed values, gradient direction, β scaling, ties, shape errors."""

import math
import subprocess
import sys

import pytest
import torch

from dpo_ds.losses import diffusion_dpo_loss, per_sample_error


def test_import_is_light():
    code = "import sys, dpo_ds.losses; assert 'deepspeed' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_per_sample_error_is_mean_over_non_batch_dims():
    pred = torch.zeros(2, 3, 4, 5)
    target = torch.ones(2, 3, 4, 5)
    target[1] *= 2
    assert torch.allclose(per_sample_error(pred, target), torch.tensor([1.0, 4.0]))
    video = torch.zeros(2, 4, 3, 8, 8)  # CFHW latents reduce the same way
    assert per_sample_error(video, video + 3).tolist() == [9.0, 9.0]


def test_matches_hand_computed_values():
    e_w, e_l = torch.tensor([0.10, 0.30]), torch.tensor([0.20, 0.10])
    r_w, r_l = torch.tensor([0.15, 0.25]), torch.tensor([0.15, 0.12])
    beta = 10.0
    loss, diag = diffusion_dpo_loss(e_w, e_l, r_w, r_l, beta=beta)
    z = [(0.10 - 0.15) - (0.20 - 0.15), (0.30 - 0.25) - (0.10 - 0.12)]  # [-0.1, 0.07]
    expected = sum(-math.log(1 / (1 + math.exp(beta / 2 * zi))) for zi in z) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert diag["implicit_acc"].item() == pytest.approx(0.5)
    assert diag["reward_margin"].item() == pytest.approx(sum(-beta / 2 * zi for zi in z) / 2, rel=1e-6)
    assert diag["gap_w"].item() == pytest.approx(((0.10 - 0.15) + (0.30 - 0.25)) / 2, abs=1e-7)
    assert diag["gap_l"].item() == pytest.approx(((0.20 - 0.15) + (0.10 - 0.12)) / 2, abs=1e-7)
    assert diag["saturation"].item() == 0.0


def test_lowering_winner_error_lowers_loss():
    e_w = torch.tensor([0.2, 0.3], requires_grad=True)
    e_l = torch.tensor([0.2, 0.1], requires_grad=True)
    r = torch.tensor([0.2, 0.2])
    loss, _ = diffusion_dpo_loss(e_w, e_l, r, r, beta=100.0)
    loss.backward()
    assert (e_w.grad > 0).all(), "raising the winner's error must raise the loss"
    assert (e_l.grad < 0).all(), "raising the loser's error must lower the loss"
    lower, _ = diffusion_dpo_loss(e_w.detach() - 0.01, e_l.detach(), r, r, beta=100.0)
    assert lower < loss


def test_beta_scales_the_logit():
    e_w, e_l, r = torch.tensor([0.1]), torch.tensor([0.2]), torch.tensor([0.15])
    _, d1 = diffusion_dpo_loss(e_w, e_l, r, r, beta=1.0)
    _, d2 = diffusion_dpo_loss(e_w, e_l, r, r, beta=3.0)
    assert d2["reward_margin"].item() == pytest.approx(3 * d1["reward_margin"].item(), rel=1e-6)
    loss_big, d = diffusion_dpo_loss(e_w, e_l, r, r, beta=1e4)
    assert loss_big.item() < 1e-6 and d["saturation"].item() == 1.0


def test_ties_give_log2_and_half_accuracy():
    e = torch.tensor([0.3, 0.5, 0.7])
    loss, diag = diffusion_dpo_loss(e, e, e, e, beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert diag["implicit_acc"].item() == 0.5
    assert diag["reward_margin"].item() == 0.0


def test_weights_multiply_z():
    e_w, e_l, r = torch.tensor([0.1, 0.1]), torch.tensor([0.2, 0.2]), torch.tensor([0.15, 0.15])
    _, plain = diffusion_dpo_loss(e_w, e_l, r, r, beta=10.0)
    _, weighted = diffusion_dpo_loss(e_w, e_l, r, r, beta=10.0, weights=torch.tensor([2.0, 0.0]))
    assert weighted["reward_margin"].item() == pytest.approx(plain["reward_margin"].item(), rel=1e-6)


def test_diagnostics_are_detached():
    e_w = torch.tensor([0.1], requires_grad=True)
    _, diag = diffusion_dpo_loss(e_w, torch.tensor([0.2]), torch.tensor([0.1]), torch.tensor([0.1]), beta=1.0)
    assert all(not v.requires_grad for v in diag.values())


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(2, 1), torch.zeros(())])
def test_shape_errors_raise(bad):
    good = torch.zeros(2)
    with pytest.raises(ValueError, match="ref_err_l"):
        diffusion_dpo_loss(good, good, good, bad, beta=1.0)
    with pytest.raises(ValueError, match="shape"):
        per_sample_error(torch.zeros(2, 3), torch.zeros(2, 4))


def test_beta_must_be_positive():
    z = torch.zeros(1)
    with pytest.raises(ValueError, match="beta"):
        diffusion_dpo_loss(z, z, z, z, beta=0.0)


def test_loser_weight_scales_only_the_loser_gradient():
    r = torch.tensor([0.2, 0.2])
    grads = {}
    for w in (1.0, 0.25, 0.0):
        e_w = torch.tensor([0.25, 0.1], requires_grad=True)
        e_l = torch.tensor([0.1, 0.3], requires_grad=True)
        loss, _ = diffusion_dpo_loss(e_w, e_l, r, r, beta=20.0, loser_weight=w)
        loss.backward()
        grads[w] = (loss.item(), e_w.grad.clone(), e_l.grad.clone())
    assert grads[0.25][0] == pytest.approx(grads[1.0][0]) == pytest.approx(grads[0.0][0])
    assert torch.allclose(grads[0.25][1], grads[1.0][1]) and torch.allclose(grads[0.0][1], grads[1.0][1])
    assert torch.allclose(grads[0.25][2], 0.25 * grads[1.0][2]) and torch.equal(grads[0.0][2], torch.zeros(2))
    with pytest.raises(ValueError, match="loser_weight"):
        diffusion_dpo_loss(r, r, r, r, beta=1.0, loser_weight=1.5)


def test_ipo_is_bounded_at_the_margin():
    from dpo_ds.losses import diffusion_ipo_loss

    r = torch.tensor([0.2])
    # −(β/2)·z = margin exactly: zero loss, zero gradient.
    e_w = torch.tensor([0.2 - 0.1], requires_grad=True)
    loss, _ = diffusion_ipo_loss(e_w, r, r, r, beta=20.0, margin=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-10) and e_w.grad.abs().item() < 1e-5
    # past the margin the loss pulls back: descent raises e_w again (DPO would keep lowering it)
    e_w = torch.tensor([0.0], requires_grad=True)
    loss, _ = diffusion_ipo_loss(e_w, r, r, r, beta=20.0, margin=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(1.0) and e_w.grad.item() < 0


def test_preference_loss_regularisers():
    from dpo_ds.losses import preference_loss

    e_w, e_l = torch.tensor([0.3, 0.1]), torch.tensor([0.2, 0.2])
    r = torch.tensor([0.2, 0.2])
    base, _ = preference_loss(e_w, e_l, r, r, kind="dpo", beta=10.0)
    plain, _ = diffusion_dpo_loss(e_w, e_l, r, r, beta=10.0)
    assert base.item() == pytest.approx(plain.item())
    sft, _ = preference_loss(e_w, e_l, r, r, kind="dpo", beta=10.0, sft_weight=2.0)
    assert sft.item() == pytest.approx(plain.item() + 2.0 * 0.2)
    hinge, _ = preference_loss(e_w, e_l, r, r, kind="dpo", beta=10.0, winner_hinge=3.0)
    assert hinge.item() == pytest.approx(plain.item() + 3.0 * (0.1 + 0.0) / 2)
    with pytest.raises(ValueError, match="kind"):
        preference_loss(e_w, e_l, r, r, kind="kto", beta=1.0)


def test_sft_loss_is_the_mean_error():
    from dpo_ds.losses import sft_loss

    assert sft_loss(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])).item() == 2.0


def test_bucket_sums():
    from dpo_ds.losses import bucket_sums

    e_w = torch.tensor([0.1, 0.3, 0.2, 0.2])
    e_l = torch.tensor([0.2, 0.2, 0.2, 0.2])
    r = torch.full((4,), 0.2)
    out = bucket_sums(e_w, e_l, r, r, torch.tensor([0, 100, 500, 999]) / 1000)
    assert out[:, 0].tolist() == [2.0, 1.0, 1.0]          # pairs per bucket
    assert out[:, 1].tolist() == [1.0, 0.5, 0.5]          # correct (ties count 1/2)
    assert out[:, 2].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-7)  # −0.1 and +0.1 in "low"
    assert out[0, 1].item() == 1.0
    assert out[:, 3].abs().sum().item() == pytest.approx(0.0, abs=1e-7)
