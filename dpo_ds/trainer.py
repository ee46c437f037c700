"""The training loop: fetch -> errors -> loss -> backward -> step -> metrics -> checkpoint.

Legend: B = pairs per micro-batch on this rank. Each micro-batch runs the
policy once on 2B samples (winners, then losers) at the pairs' shared draws.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dpo_ds import engine, models
from dpo_ds.config import RunConfig
from dpo_ds.data import PairLoader, list_shards
from dpo_ds.losses import diffusion_dpo_loss
from dpo_ds.metrics import Metrics
from dpo_ds.models import noisy_pair, pair_errors
from dpo_ds.noise import NoiseSchedule
from dpo_ds.reference import CachedReference, LiveReference, folder_weights_hash, fingerprint, weights_hash

log = logging.getLogger("dpo_ds")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Diagnostics averaged over micro-batches and ranks, logged as train/<name>.
DIAGNOSTICS = ("loss", "implicit_acc", "reward_margin", "model_err_w", "model_err_l", "ref_err_w", "ref_err_l",
               "gap_w", "gap_l", "saturation")
# Don't judge the bad-sample fraction on the first handful of pairs read.
MIN_PAIRS_FOR_BAD_FRACTION = 1000


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resume must restore."""
    step: int = 0                # optimizer steps taken
    samples_seen: int = 0        # pairs trained on, all ranks
    epoch: int = 0               # data position: epoch ...
    batch_in_epoch: int = 0      # ... and micro-batches of it consumed on each rank
    num_nonfinite: int = 0       # micro-batches skipped for a non-finite loss
    pairs_read: int = 0          # all ranks, good and bad
    pairs_bad: int = 0


class NonFiniteLossError(RuntimeError):
    """Too many micro-batches in a row with a non-finite loss."""


class BadDataError(RuntimeError):
    """More bad samples than data.max_bad_fraction allows."""


class Trainer:
    def __init__(self, cfg: RunConfig, ds_config: dict, dtype: str):
        self.cfg = cfg
        self.dtype = DTYPES[dtype]
        self.device = engine.device()
        self.spec = models.family(cfg.model.family)
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = str(self.out / "checkpoints")

        torch.manual_seed(cfg.seed)  # identical fresh init on every rank (from-config models)
        unet = self.spec.load_denoiser(cfg.model.pretrained_path, cfg.model.unet_config)
        self.spec.set_attention(unet, cfg.model.attention)
        self.unet_config = dict(unet.config)
        self.schedule = NoiseSchedule.from_config(
            models.load_scheduler_config(cfg.model.pretrained_path, cfg.model.scheduler_config),
            cfg.model.prediction_type)
        shards = list_shards(cfg.data.shards)
        self.has_cache = cfg.reference.mode == "cache"
        self.has_warned_cycling = False
        self.drift_reference: LiveReference | None = None
        self.cache_drift: float | None = None  # ref/cache_drift of the last drift check, until it is logged
        self.is_drift_check_due = False
        if self.has_cache:
            # The reference model is never built from a cache; only its weights are hashed, to check the cache.
            ref_hash = (folder_weights_hash(self.spec, cfg.reference.pretrained_path)
                        if cfg.reference.pretrained_path is not None else weights_hash(unet.state_dict()))
            expected = fingerprint(cfg, shards, ref_hash, num_draws=0, dtype=dtype)  # K is the cache's to say
            self.reference = CachedReference.load(cfg, expected, self.schedule.num_train_timesteps)
            if cfg.reference.drift_check_every:
                self.drift_reference = LiveReference.build(cfg, self.spec, unet, ds_config, self.dtype)
            elif engine.rank() == 0:
                log.info("reference: the reference model is not built (reference.mode=cache, no drift check)")
        else:
            self.reference = LiveReference.build(cfg, self.spec, unet, ds_config, self.dtype)
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.policy = engine.Policy(unet, ds_config, cfg.optim, cfg.train.max_steps)

        self.loader = PairLoader(
            shards, batch_size=cfg.train.micro_batch_size, rank=engine.rank(),
            world_size=engine.world_size(), seed=cfg.seed, num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            schema=self.spec.sample_schema(self.unet_config, cfg.data.resolution, cfg.model.vae_scale_factor),
            num_train_timesteps=self.schedule.num_train_timesteps, timestep_range=cfg.data.timestep_range,
            num_draws=self.reference.num_draws if self.has_cache else None)
        self.state = TrainState()
        self.total_pairs = sum(s.num_pairs for s in self.loader.shards)

    # ------------------------------------------------------------ the step

    def forward_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DPO loss of one micro-batch: policy and reference at the same noisy inputs."""
        x_t, target, t = noisy_pair(batch, self.schedule)
        model_err_w, model_err_l = pair_errors(self.spec, self.policy, batch, x_t, target, t, self.dtype)
        ref_err_w, ref_err_l = self.reference.errors(batch, x_t, target, t)
        if self.is_drift_check_due:
            self.is_drift_check_due = False
            self.cache_drift = self._cache_drift(batch, x_t, target, t, ref_err_w, ref_err_l)
        loss, diag = diffusion_dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta=self.cfg.dpo.beta)
        return loss, {"loss": loss.detach(), **diag}

    def train_step(self, batches) -> dict[str, torch.Tensor]:
        """One optimizer step over train.grad_accum micro-batches; returns summed diagnostics."""
        sums = {name: torch.zeros((), device=self.device) for name in DIAGNOSTICS}
        num_good = 0
        every = self.cfg.reference.drift_check_every
        # Decided from the step alone, so every rank runs the (collective, ZeRO-3) live reference together.
        self.is_drift_check_due = self.drift_reference is not None and (self.state.step + 1) % every == 0
        while num_good < self.cfg.train.grad_accum:
            batch = self._next_batch(batches)
            loss, diag = self.forward_loss(batch)
            # Every rank must skip together, or the ZeRO collectives in backward hang.
            if engine.any_rank(not torch.isfinite(loss).item()):
                self._skip_nonfinite()
                continue
            self.policy.backward(loss)
            self.policy.step()
            num_good += 1
            self.nonfinite_in_row = 0
            for name in DIAGNOSTICS:
                sums[name] += diag[name]
        sums["count"] = torch.tensor(float(num_good), device=self.device)
        return sums

    # ------------------------------------------------------------ around the step

    def fit(self, stop: threading.Event | None = None) -> TrainState:
        """Train to train.max_steps; or, once `stop` is set on any rank, checkpoint and return early."""
        self._maybe_resume()
        cfg, state = self.cfg, self.state
        is_writer = engine.rank() == 0
        metrics = Metrics(cfg.output_dir, is_writer=is_writer, total_steps=cfg.train.max_steps,
                          start_step=state.step, progress=cfg.logging.progress)
        batches = self._batches()
        self.data_wait = 0.0
        self.nonfinite_in_row = 0
        window = _Window()
        self.policy.train()
        try:
            while state.step < cfg.train.max_steps:
                t0 = time.perf_counter()
                sums = self.train_step(batches)
                state.step += 1
                state.samples_seen += int(sums["count"].item()) * cfg.train.micro_batch_size * engine.world_size()
                window.add(sums, time.perf_counter() - t0, self.data_wait)
                self.data_wait = 0.0
                if state.step % cfg.logging.every_steps == 0 or state.step == cfg.train.max_steps:
                    metrics.scalars(state.step, self._reduce(window))
                    self._check_bad_fraction()
                    window = _Window()
                metrics.advance()
                # Agreed over ranks, so every rank stops after the same step (a signal may reach one only).
                is_stopping = stop is not None and engine.any_rank(stop.is_set())
                if is_stopping or state.step % cfg.checkpoint.every_steps == 0 or state.step == cfg.train.max_steps:
                    self.save_checkpoint()
                if is_stopping:
                    return state
        finally:
            metrics.close()
        if cfg.checkpoint.export:
            self.export()
        return state

    def _batches(self):
        """Micro-batches from the saved data position on, epoch after epoch."""
        state = self.state
        while True:
            if self.has_cache and state.epoch >= self.reference.num_draws and not self.has_warned_cycling:
                self.has_warned_cycling = True
                if engine.rank() == 0:
                    log.warning("reference cache %s holds %d draws per pair; from epoch %d on, draws are reused "
                                "cyclically (draw index = epoch mod %d)", self.cfg.reference.cache_dir,
                                self.reference.num_draws, state.epoch, self.reference.num_draws)
            for batch in self.loader.epoch(state.epoch, skip_batches=state.batch_in_epoch):
                yield batch
            state.epoch += 1
            state.batch_in_epoch = 0

    def _next_batch(self, batches) -> dict:
        t0 = time.perf_counter()
        batch = next(batches)
        self.state.batch_in_epoch += 1  # advanced now: the generator moves to the next epoch lazily
        self.state.pairs_read += len(batch["keys"]) + batch["num_bad"]
        self.state.pairs_bad += batch["num_bad"]
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        self.data_wait += time.perf_counter() - t0
        return batch

    def _skip_nonfinite(self) -> None:
        self.state.num_nonfinite += 1
        self.nonfinite_in_row += 1
        if engine.rank() == 0:
            log.warning("step %d: non-finite loss on some rank; micro-batch skipped (%d in a row, %d in all)",
                        self.state.step, self.nonfinite_in_row, self.state.num_nonfinite)
        if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_in_row:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_row} micro-batches in a row had a non-finite loss (train.max_nonfinite_in_row); "
                "lower optim.lr or dpo.beta, or check the data with tools/inspect_shards.py")

    def _reduce(self, window: "_Window") -> dict[str, float]:
        """Means over the logging window, over micro-batches and ranks."""
        sums = torch.stack([window.sums[n] for n in DIAGNOSTICS] + [window.sums["count"]])
        sums = engine.all_reduce_sum(sums.to(self.device, torch.float64))
        count = sums[-1].item()
        out = {f"train/{name}": sums[i].item() / count for i, name in enumerate(DIAGNOSTICS)}
        pairs = count * self.cfg.train.micro_batch_size
        out.update({
            "train/grad_norm": self.policy.grad_norm(),
            "train/lr": self.policy.lr(),
            "perf/pairs_per_s": pairs / max(window.seconds, 1e-9),
            "perf/step_time_s": window.seconds / window.num_steps,
            "perf/data_wait_frac": window.data_wait / max(window.seconds, 1e-9),
        })
        if self.cache_drift is not None:
            out["ref/cache_drift"], self.cache_drift = self.cache_drift, None
        if engine.has_gpu():
            out["mem/max_allocated_gb"] = engine.max_memory_allocated_gb()
        return out

    @torch.no_grad()
    def _cache_drift(self, batch: dict, x_t: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                     ref_err_w: torch.Tensor, ref_err_l: torch.Tensor) -> float:
        """Largest |cached - live| reference error over a random few pairs of this micro-batch, on all ranks."""
        num_pairs = len(batch["keys"])
        num_checked = max(1, round(self.cfg.reference.drift_check_fraction * num_pairs))
        g = torch.Generator().manual_seed(hash((self.cfg.seed, self.state.step, engine.rank())) & (2**62 - 1))
        idx = torch.randperm(num_pairs, generator=g)[:num_checked].to(self.device)
        sub = {k: v[idx] if torch.is_tensor(v) and v.ndim and len(v) == num_pairs else v for k, v in batch.items()}
        both = torch.cat([idx, idx + num_pairs])  # x_t holds winners, then losers
        live_w, live_l = self.drift_reference.errors(sub, x_t[both], target[both], t[both])
        drift = torch.maximum((live_w - ref_err_w[idx]).abs().max(), (live_l - ref_err_l[idx]).abs().max())
        return engine.all_reduce_max(drift.reshape(1).to(torch.float64)).item()

    def _check_bad_fraction(self) -> None:
        counts = engine.all_reduce_sum(torch.tensor([float(self.state.pairs_read), float(self.state.pairs_bad)],
                                                    device=self.device))
        read, bad = counts.tolist()
        if bad and read >= min(MIN_PAIRS_FOR_BAD_FRACTION, self.total_pairs) and \
                bad / read > self.cfg.data.max_bad_fraction:
            raise BadDataError(f"{int(bad)} of {int(read)} pairs read were bad (> data.max_bad_fraction = "
                               f"{self.cfg.data.max_bad_fraction}); see the warnings above for keys and shards")

    # ------------------------------------------------------------ checkpoints and export

    def save_checkpoint(self) -> None:
        tag = f"step_{self.state.step:08d}"
        self.policy.save_checkpoint(self.ckpt_dir, tag, {"train_state": asdict(self.state)},
                                    self.cfg.checkpoint.keep_last)
        if engine.rank() == 0:
            log.info("checkpoint %s/%s written", self.ckpt_dir, tag)

    def _maybe_resume(self) -> None:
        tag = engine.find_resume_tag(self.ckpt_dir, self.cfg.checkpoint.resume)
        if tag is None:
            return
        client = self.policy.load_checkpoint(self.ckpt_dir, tag)
        self.state = TrainState(**client["train_state"])
        if self.state.batch_in_epoch >= self.loader.batches_per_epoch:
            self.state.epoch += 1
            self.state.batch_in_epoch = 0
        if engine.rank() == 0:
            log.info("resumed from %s/%s at step %d (epoch %d, batch %d)", self.ckpt_dir, tag,
                     self.state.step, self.state.epoch, self.state.batch_in_epoch)

    def export(self) -> Path:
        """The trained denoiser as a diffusers folder under output_dir/export/."""
        state_dict = self.policy.full_state_dict()
        out = self.out / "export" / self.spec.DENOISER_SUBFOLDER
        if engine.rank() == 0:
            self.spec.export(state_dict, self.unet_config, str(out), torch.float32)
            log.info("exported %s", out)
        engine.barrier()
        return out


class _Window:
    """Sums over the steps between two metric writes."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.seconds = 0.0
        self.data_wait = 0.0
        self.num_steps = 0

    def add(self, sums: dict[str, torch.Tensor], seconds: float, data_wait: float) -> None:
        for k, v in sums.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.seconds += seconds
        self.data_wait += data_wait
        self.num_steps += 1
