"""Metric sinks: TensorBoard event files and a console progress bar, on rank 0 only.

Values arrive already reduced across ranks (the trainer does that); this
module only writes.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger("dpo_ds")


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
