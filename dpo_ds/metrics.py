"""Metrics: sums over a logging window reduced across ranks, the sinks (TensorBoard event files and a
console progress bar, on rank 0 only), and the watches that warn of degradation (gap_w; losers' error).

The window reduces with the collective it is given (the trainer passes dpo_ds.engine's), so this
module imports no deepspeed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable

import torch

from dpo_ds.losses import NOISE_BUCKETS

log = logging.getLogger("dpo_ds")

# ManifoldWatch stays silent until the policy's error on losers has risen by this share of the reference's.
MANIFOLD_MIN_REL = 0.5


class Window:
    """Sums of per-micro-batch diagnostics over the steps between two metric writes.

    `sums` holds [ ] tensors by name, "count" (micro-batches) and optionally "buckets" ([3 x 4], per
    noise level: pairs, correct pairs, Σ gap_w, Σ gap_l; dpo_ds.losses.bucket_sums)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.seconds = 0.0
        self.data_wait = 0.0
        self.flops = 0  # this rank's policy forward and backward FLOPs (dpo_ds.perf)
        self.num_steps = 0

    def add(self, sums: dict[str, torch.Tensor], seconds: float, data_wait: float, flops: int = 0) -> None:
        for k, v in sums.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.seconds += seconds
        self.data_wait += data_wait
        self.flops += flops
        self.num_steps += 1

    def means(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
              prefix: str) -> tuple[dict[str, float], float]:
        """({prefix/name: mean over micro-batches and ranks}, micro-batches on all ranks), in one all-reduce;
        per noise level, the bucket sums as implicit accuracy and mean gaps."""
        names = sorted(n for n in self.sums if n not in ("count", "buckets"))
        flat = [self.sums[n].reshape(1) for n in names] + [self.sums["count"].reshape(1)]
        if "buckets" in self.sums:
            flat.append(self.sums["buckets"].reshape(-1))
        sums = all_reduce_sum(torch.cat([x.to(device, torch.float64) for x in flat]))
        count = sums[len(names)].item()
        out = {f"{prefix}/{name}": sums[i].item() / count for i, name in enumerate(names)}
        if "buckets" in self.sums:
            for b, (pairs, correct, gap_w, gap_l) in zip(NOISE_BUCKETS, sums[len(names) + 1:].view(-1, 4).tolist()):
                if pairs:
                    out.update({f"{prefix}/implicit_acc/{b}_noise": correct / pairs,
                                f"{prefix}/gap_w/{b}_noise": gap_w / pairs, f"{prefix}/gap_l/{b}_noise": gap_l / pairs})
        return out, count


def perf_scalars(flops: int, seconds: float, peak_tflops: float | None) -> dict[str, float]:
    """perf/tflops, this rank's achieved model TFLOP/s over a window of `seconds`, and perf/mfu, that over
    `peak_tflops` (logged only when a peak is known: logging.peak_tflops or a GPU of dpo_ds.perf's table)."""
    tflops = flops / max(seconds, 1e-9) / 1e12
    return {"perf/tflops": tflops, **({"perf/mfu": tflops / peak_tflops} if peak_tflops else {})}


class GapWatch:
    """Warns once when train/gap_w (e_w − r_w) stayed above zero for `window` steps (docs/design.md §1): the
    policy getting worse than the reference on what was preferred, which a falling loss can hide."""

    def __init__(self, window: int):
        self.window = window
        self.positive_since: int | None = None

    def message(self, step: int, scalars: dict[str, float]) -> str | None:
        """The warning, at the step gap_w has been positive for `window` steps in a row; else None."""
        if "train/gap_w" not in scalars:
            return None
        if scalars["train/gap_w"] <= 0:
            self.positive_since = None
            return None
        if self.positive_since is None:
            self.positive_since = step
        if step - self.positive_since + 1 != self.window:
            return None
        return (f"train/gap_w (e_w - r_w) has been above zero for {self.window} steps: the policy is getting "
                "worse than the reference on the preferred images. Implicit accuracy and a falling loss can hide "
                "this; lower optim.lr, raise dpo.beta, or add loss.sft_weight / loss.winner_hinge.")


class ManifoldWatch:
    """Warns once when the policy's change goes into making the rejected images worse far more than the
    preferred ones better: over the last `window` logged steps, mean gap_l (e_l − r_l) above `ratio` times
    mean −gap_w (r_w − e_w), and above `min_rel` times the reference's mean error on losers.

    It needs no oracle. A policy can meet the DPO objective by raising its error on rejected images alone;
    in the toy world at dpo.beta = 50 that run's samples left the data (a quarter near no mode) while
    gap_w stayed negative, so the gap_w watch was silent. There gap_l / −gap_w passed 30 at step 34 and 100
    by step 60; healthy runs stayed below 10.5 (the demo's) and 20.4 (dpo+sft at beta = 50) (README,
    "Does it work?")."""

    def __init__(self, window: int, ratio: float, min_rel: float = MANIFOLD_MIN_REL):
        self.window, self.ratio, self.min_rel = window, ratio, min_rel
        self.recent: list[tuple[float, float, float]] = []  # (gap_w, gap_l, ref_err_l) of the last steps
        self.has_warned = False

    def message(self, step: int, scalars: dict[str, float]) -> str | None:
        """The warning, at the first step the condition holds over a full window; else None."""
        if self.has_warned or "train/gap_l" not in scalars:
            return None
        self.recent = (self.recent + [(scalars["train/gap_w"], scalars["train/gap_l"],
                                       scalars["train/ref_err_l"])])[-self.window:]
        if len(self.recent) < self.window:
            return None
        gap_w, gap_l, ref_err_l = (sum(v) / self.window for v in zip(*self.recent))
        if gap_l <= self.ratio * max(-gap_w, 0.0) or gap_l <= self.min_rel * ref_err_l:
            return None
        self.has_warned = True
        winners = (f"fell only {-gap_w:.3g} below it ({gap_l / -gap_w:.0f} times less; " if gap_w < 0 else
                   "did not fall below it (")
        return (f"samples may be leaving the data: over the last {self.window} logged steps the policy's error on "
                f"rejected images rose {gap_l:.3g} above the reference's ({gap_l / ref_err_l:.0%} of it), while on "
                f"preferred ones it {winners}logging.loser_gap_ratio = {self.ratio:g}). The objective is being "
                "met by making rejected images worse, which can push samples off the data's manifold with no sign "
                "in implicit accuracy, loss or gap_w; check samples, and raise dpo.beta or add loss.sft_weight.")


class Metrics:
    def __init__(self, output_dir: str, *, is_writer: bool, total_steps: int, start_step: int, progress: bool):
        self.is_writer = is_writer
        self.tb = None
        self.bar = None
        if not is_writer:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        if progress:
            from tqdm import tqdm

            # On a terminal redraw often; in a batch log print a line a minute at most.
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            mininterval=0.5 if sys.stderr.isatty() else 60.0, desc="train")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.is_writer:
            return
        for name, v in values.items():
            self.tb.add_scalar(name, v, step)
        if self.bar is not None:  # an SFT run has no implicit accuracy: show what was logged, not "nan"
            shown = {"loss": ("train/loss", ".4f"), "acc": ("train/implicit_acc", ".2f")}
            self.bar.set_postfix({k: format(values[name], spec) for k, (name, spec) in shown.items() if name in values},
                                 refresh=False)

    def advance(self, num_steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(num_steps)

    def text(self, step: int, tag: str, message: str) -> None:
        """A warning that belongs both in the console and beside the curves."""
        if not self.is_writer:
            return
        log.warning("step %d: %s", step, message)
        self.tb.add_text(tag, message, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
