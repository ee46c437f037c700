"""Forward diffusion process, training targets, and the seeded per-pair draw.

Legend: N = batch, `...` = any latent layout (CHW for images, CFHW for video).

The draw (timestep, noise) of a pair is a pure function of
(global seed, pair key, draw index), computed on the CPU with a seeded
torch.Generator (docs/design.md §2). The reference cache is only valid because the
precompute tool and the trainer call the same function.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


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
class NoiseSchedule:
    """The forward process q(x_t | x_0) of a DDPM-family or flow-matching model."""

    alphas_cumprod: torch.Tensor  # [T] float32; unused for flow
    prediction_type: str
    num_train_timesteps: int

    @classmethod
    def from_config(cls, config: dict, prediction_type: str | None = None) -> "NoiseSchedule":
        """Build from a diffusers scheduler config dict (scheduler/scheduler_config.json)."""
        ptype = prediction_type or config.get("prediction_type", "epsilon")
        if ptype not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {ptype!r} is not one of {PREDICTION_TYPES}")
        num = int(config.get("num_train_timesteps", 1000))
        if ptype == "flow":
            return cls(torch.ones(num), ptype, num)
        betas = _betas(config)
        if config.get("rescale_betas_zero_snr", False):
            betas = _zero_terminal_snr(betas)
        return cls(torch.cumprod(1.0 - betas, dim=0), ptype, num)

    def _coefs(self, timesteps: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(signal, noise) coefficients per sample, shaped to broadcast over [N x ...]."""
        t = timesteps.long().cpu()
        if self.prediction_type == "flow":
            sigma = t.float() / self.num_train_timesteps
            a, s = 1.0 - sigma, sigma
        else:
            ac = self.alphas_cumprod[t]
            a, s = ac.sqrt(), (1.0 - ac).sqrt()
        shape = (-1,) + (1,) * (ndim - 1)
        return a.view(shape), s.view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t for x0, noise [N x ...] and integer timesteps [N]."""
        a, s = self._coefs(timesteps, x0.ndim)
        return a.to(x0) * x0 + s.to(x0) * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to predict at (x0, noise, t)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "flow":
            return noise - x0
        a, s = self._coefs(timesteps, x0.ndim)
        return a.to(x0) * noise - s.to(x0) * x0

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The timestep value the denoiser is conditioned on (integer t; flow models take t too)."""
        return timesteps


def _zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescaled betas whose last timestep has zero SNR (Lin et al., 2024), computed as diffusers does."""
    s = torch.cumprod(1.0 - betas, dim=0).sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    alphas_bar = ((s - sT) * s0 / (s0 - sT)) ** 2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def draw_seed(seed: int, key: str, draw_index: int) -> int:
    """A 63-bit generator seed from (global seed, pair key, draw index); stable across machines."""
    digest = hashlib.sha256(f"{int(seed)}\x00{key}\x00{int(draw_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw(
    seed: int,
    key: str,
    draw_index: int,
    latent_shape: tuple[int, ...],
    num_train_timesteps: int,
    timestep_range: tuple[int, int] | None = None,
) -> tuple[int, torch.Tensor]:
    """The pair's (timestep, noise [latent_shape] float32), shared by winner and loser.

    timestep_range is [lo, hi) within [0, num_train_timesteps); default the whole range.
    """
    lo, hi = timestep_range or (0, num_train_timesteps)
    if not 0 <= lo < hi <= num_train_timesteps:
        raise ValueError(f"timestep_range {lo, hi} must satisfy 0 <= lo < hi <= {num_train_timesteps}")
    g = torch.Generator(device="cpu").manual_seed(draw_seed(seed, key, draw_index))
    t = int(torch.randint(lo, hi, (1,), generator=g).item())
    noise = torch.randn(tuple(latent_shape), generator=g, dtype=torch.float32)
    return t, noise
