"""The DDPM forward process that SDXL and SD 1.5/2.x train with: integer timesteps 0..T-1, a beta
schedule read from a diffusers scheduler config, ε or v targets, and the uniform law of the timestep.

Legend: N = batch, `...` = any latent layout (CHW for images, CFHW for video).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def _betas(config: dict) -> torch.Tensor:
    """Beta schedule of a diffusers scheduler config, as diffusers computes it (float32)."""
    num = int(config.get("num_train_timesteps", 1000))
    kind = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float32)
    if kind == "linear":
        return torch.linspace(start, end, num, dtype=torch.float32)
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, num, dtype=torch.float32) ** 2
    if kind == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor(
            [min(1 - alpha_bar((i + 1) / num) / alpha_bar(i / num), 0.999) for i in range(num)],
            dtype=torch.float32,
        )
    raise ValueError(f"scheduler beta_schedule {kind!r} is not supported (linear, scaled_linear, squaredcos_cap_v2)")


@dataclass(frozen=True)
class DDPMProcess:
    """q(x_t | x_0) = N(sqrt(ᾱ_t)·x0, (1 − ᾱ_t)·I) over integer timesteps 0..T-1 (DDPM, SD, SDXL).

    The network predicts ε (epsilon) or v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x0 (v_prediction).
    """

    alphas_cumprod: torch.Tensor  # [T] float32
    prediction_type: str
    num_train_timesteps: int
    on_device: dict = field(default_factory=dict, compare=False, repr=False)  # device -> alphas_cumprod there

    PREDICTION_TYPES = ("epsilon", "v_prediction")

    @classmethod
    def from_config(cls, config: dict, prediction_type: str | None = None) -> "DDPMProcess":
        """Build from a diffusers scheduler config dict (scheduler/scheduler_config.json)."""
        ptype = prediction_type or config.get("prediction_type", "epsilon")
        if ptype not in cls.PREDICTION_TYPES:
            raise ValueError(f"prediction_type {ptype!r} is not one of {cls.PREDICTION_TYPES} for a DDPM-type "
                             "scheduler; flow matching belongs to a flow family")
        betas = _betas(config)
        if config.get("rescale_betas_zero_snr", False):
            betas = _zero_terminal_snr(betas)
        return cls(torch.cumprod(1.0 - betas, dim=0), ptype, int(config.get("num_train_timesteps", 1000)))

    def _coefs(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(signal, noise) coefficients per sample, shaped to broadcast over [N x ...]."""
        # A copy on t's device, made once: indexing the host's table with t would wait for the device every step.
        if t.device not in self.on_device:
            self.on_device[t.device] = self.alphas_cumprod.to(t.device)
        ac = self.on_device[t.device][t.long()]
        shape = (-1,) + (1,) * (ndim - 1)
        return ac.sqrt().view(shape), (1.0 - ac).sqrt().view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t for x0, noise [N x ...] and integer-valued timesteps t [N]."""
        a, s = self._coefs(t, x0.ndim)
        return a.to(x0) * x0 + s.to(x0) * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to predict at (x0, noise, t)."""
        if self.prediction_type == "epsilon":
            return noise
        a, s = self._coefs(t, x0.ndim)
        return a.to(x0) * noise - s.to(x0) * x0


def _zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescaled betas whose last timestep has zero SNR (Lin et al., 2024), computed as diffusers does."""
    s = torch.cumprod(1.0 - betas, dim=0).sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    alphas_bar = ((s - sT) * s0 / (s0 - sT)) ** 2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def uniform_timestep(g: torch.Generator, lo: int, hi: int) -> float:
    """An integer timestep uniform in [lo, hi), as a float (the draw's value is a float for every family)."""
    return float(torch.randint(lo, hi, (1,), generator=g).item())
