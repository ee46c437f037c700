"""The seeded per-pair draw, which every family shares.

The draw of a pair (its value t, then its noise) is a pure function of (global seed, pair key,
draw index) and the family's law for t (Family.draw_t), computed on the CPU with a seeded
torch.Generator (docs/design.md §2). The reference cache is only valid because the precompute
tool and the trainer call the same function. Each family's forward process lives with the family
(dpo_ds/models/).
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch


def draw_seed(seed: int, key: str, draw_index: int) -> int:
    """A 63-bit generator seed from (global seed, pair key, draw index); stable across machines."""
    digest = hashlib.sha256(f"{int(seed)}\x00{key}\x00{int(draw_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw(seed: int, key: str, draw_index: int, latent_shape: tuple[int, ...],
         law: Callable[[torch.Generator], float]) -> tuple[float, torch.Tensor]:
    """The pair's (t, noise [latent_shape] float32), shared by winner and loser.

    `law` is the family's law of t (Family.draw_t): it takes the pair's generator first, then the
    noise is drawn from the same generator, so t and noise are one function of the pair.
    """
    g = torch.Generator(device="cpu").manual_seed(draw_seed(seed, key, draw_index))
    t = law(g)
    noise = torch.randn(tuple(latent_shape), generator=g, dtype=torch.float32)
    return t, noise


def is_prompt_dropped(seed: int, key: str, draw_index: int, prob: float) -> bool:
    """Whether the pair trains on the empty prompt at this draw (data.empty_prompt_prob): part of the pair's
    seeded draw, from a generator of its own so t and the noise are those of a run without dropout."""
    if prob <= 0:
        return False
    g = torch.Generator(device="cpu").manual_seed(draw_seed(seed, f"{key}\x00empty prompt", draw_index))
    return bool(torch.rand((), generator=g).item() < prob)
