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

from dpo_ds import engine, lora, models, perf, reference
from dpo_ds.config import RunConfig
from dpo_ds.data import PairLoader, ShardInfo, list_shards, prompt_dropout
from dpo_ds.dtypes import DTYPES
from dpo_ds.losses import bucket_sums, preference_loss, sft_loss
from dpo_ds.metrics import GapWatch, ManifoldWatch, Metrics, Window, perf_scalars
from dpo_ds.models.family import Family

log = logging.getLogger("dpo_ds")

# Diagnostics averaged over micro-batches and ranks, logged as train/<name> (val/<name>).
DIAGNOSTICS = ("loss", "implicit_acc", "reward_margin", "model_err_w", "model_err_l", "ref_err_w", "ref_err_l",
               "gap_w", "gap_l", "saturation")
SFT_DIAGNOSTICS = ("loss", "model_err_w", "model_err_l")
VAL_SCALARS = ("loss", "implicit_acc", "gap_w", "gap_l")
# Don't judge the bad-sample fraction on the first handful of pairs read.
MIN_PAIRS_FOR_BAD_FRACTION = 1000


@dataclass
class TrainState:
    """Everything besides weights, optimizer and the loader's position that a resume must restore."""
    step: int = 0                # optimizer steps taken
    samples_seen: int = 0        # pairs trained on, all ranks
    world_size: int = 1          # processes of the run that wrote this state
    num_nonfinite: int = 0       # micro-batches skipped for a non-finite loss


class NonFiniteLossError(RuntimeError):
    """Too many micro-batches in a row with a non-finite loss."""


class BadDataError(RuntimeError):
    """More bad samples than data.max_bad_fraction allows."""


class Trainer:
    def __init__(self, cfg: RunConfig, ds_config: dict, dtype: str, family: Family, shards: list[ShardInfo]):
        """cfg, ds_config and dtype resolved, family built and shards listed at start-up (dpo_ds.train)."""
        self.cfg = cfg
        self.dtype = DTYPES[dtype]
        self.device = engine.device()
        self.family = family
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = str(self.out / "checkpoints")
        self.resume_tag = engine.find_resume_tag(self.ckpt_dir, cfg.checkpoint.resume)  # None: a fresh run

        torch.manual_seed(cfg.seed)  # identical fresh init on every rank (from-config models)
        denoiser = self.family.load_denoiser(cfg.model.pretrained_path, cfg.model.denoiser_config)
        self.family.set_attention(denoiser, cfg.model.attention)
        self.trainable = cfg.model.trainable if cfg.model.trainable is not None else family.DEFAULT_TRAINABLE
        if cfg.model.lora is None:
            models.select_trainable(denoiser, self.trainable)
        self.denoiser_config = dict(denoiser.config)
        self.is_sft = cfg.loss.type == "sft"
        self.has_cache = cfg.reference.mode == "cache" and not self.is_sft
        self.has_warned_cycling = False
        self.cache_drift: float | None = None  # ref/cache_drift of the last drift check, until it is logged
        self.is_drift_check_due = False
        self.is_checking_each_loss = cfg.train.nonfinite_check == "micro_batch"
        val_shards = list_shards(cfg.data.val_shards) if cfg.data.val_every else None
        refs = reference.for_training(cfg, family, shards, val_shards, denoiser, ds_config, dtype)
        self.reference, self.val_reference, self.drift_reference = refs.train, refs.val, refs.drift
        # After the references: a live one copies, and a cache's fingerprint hashes, the base model.
        if cfg.model.lora is not None:
            targets = cfg.model.lora.targets if cfg.model.lora.targets is not None else family.LORA_TARGETS
            num_adapted = lora.add_adapters(denoiser, cfg.model.lora, family.LORA_TARGETS)
            # FLOPs counted as if the adapted modules' weights trained: the low-rank adapters' own are few.
            self.trainable = [pattern + ".*" for pattern in targets]
            if engine.rank() == 0:
                log.info("LoRA: rank %d adapters on %d modules, base weights frozen", cfg.model.lora.rank, num_adapted)
        models.prepare_policy(family, denoiser, cfg.model)
        self.policy = engine.Policy(denoiser, engine.config_for_resume(ds_config, self.ckpt_dir, self.resume_tag),
                                    cfg.optim, cfg.train.max_steps, is_adapters_only=cfg.model.lora is not None)
        refs.bind(self.policy)  # a reference inside the policy takes its initial values now, before any resume
        if isinstance(self.reference, reference.AdaptersOffReference):
            self.reference.policy = self.policy  # its val_reference is the same object

        schema = self.family.sample_schema(self.denoiser_config)
        self.loader = PairLoader(
            shards, batch_size=cfg.train.micro_batch_size, rank=engine.rank(),
            world_size=engine.world_size(), seed=cfg.seed, num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer, pin_memory=cfg.data.pin_memory and engine.has_gpu(),
            schema=schema, draw_t=self.family.draw_t, num_draws=self.reference.num_draws if self.has_cache else None,
            dropout=prompt_dropout(cfg.data.empty_prompt_prob, shards, family.PROMPT_TENSORS, schema))
        self.pair_flops = self._count_flops(schema)
        self.peak_tflops = perf.peak_tflops(cfg.logging.peak_tflops, engine.device_name())
        self.flops = 0  # rank 0's policy FLOPs since the last logging window took them (0 on the others)
        self.state = TrainState()
        self.total_pairs = sum(s.num_pairs for s in self.loader.shards)
        self.gap_watch = GapWatch(cfg.logging.gap_w_window)
        self.manifold_watch = ManifoldWatch(cfg.logging.manifold_window, cfg.logging.loser_gap_ratio)
        if val_shards is not None:
            # Held-out pairs at a fixed draw (index 0), one pass in-process.
            self.val_loader = PairLoader(
                val_shards, batch_size=cfg.train.micro_batch_size, rank=engine.rank(),
                world_size=engine.world_size(), seed=cfg.seed, num_workers=0, shuffle_buffer=1,
                schema=schema, draw_t=self.family.draw_t, num_draws=1,
                dropout=prompt_dropout(cfg.data.empty_prompt_prob, val_shards, family.PROMPT_TENSORS, schema))

    def _count_flops(self, schema: dict) -> dict[tuple[int, ...], int]:
        """FLOPs of the policy's forward and backward per pair, for each latent shape the loader's buckets
        record (or the schema pins); a shape neither knows is counted when its first batch arrives. On rank 0,
        the rank whose perf/tflops and perf/mfu are logged."""
        if engine.rank() != 0:  # only rank 0 logs perf/*: the others skip the counting (a meta-device pass per shape)
            return {}
        shapes = {tuple(b) for b in self.loader.buckets if b is not None}
        if not shapes and schema["latents_w"] is not None:
            shapes = {tuple(schema["latents_w"])}
        return {shape: self._pair_flops(shape) for shape in shapes}

    def _pair_flops(self, shape: tuple[int, ...]) -> int:
        flops = perf.pair_flops(self.family, self.denoiser_config, self.trainable, shape, self.dtype)
        if engine.rank() == 0:
            log.info("policy forward and backward: %.4g GFLOPs per pair at latents %s", flops / 1e9, list(shape))
        return flops

    # ------------------------------------------------------------ the step

    def forward_loss(self, batch: dict, reference=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective of one micro-batch: policy and reference at the same noisy inputs."""
        x_t, target, t = self.family.noisy_pair(batch)
        model_err_w, model_err_l = self.family.pair_errors(self.policy, batch, x_t, target, t, self.dtype)
        if self.is_sft:
            loss = sft_loss(model_err_w, model_err_l)
            return loss, {"loss": loss.detach(), "model_err_w": model_err_w.detach().mean(),
                          "model_err_l": model_err_l.detach().mean()}
        ref_err_w, ref_err_l = (reference or self.reference).errors(batch, x_t, target, t)
        if self.is_drift_check_due:
            self.is_drift_check_due = False
            self.cache_drift = self._cache_drift(batch, x_t, target, t, ref_err_w, ref_err_l)
        lc = self.cfg.loss
        loss, diag = preference_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, kind=lc.type,
                                     beta=self.cfg.dpo.beta, loser_weight=lc.loser_weight, sft_weight=lc.sft_weight,
                                     winner_hinge=lc.winner_hinge, ipo_margin=lc.ipo_margin)
        buckets = bucket_sums(model_err_w, model_err_l, ref_err_w, ref_err_l, self.family.noise_level(batch["t"]))
        return loss, {"loss": loss.detach(), **diag, "buckets": buckets}

    def train_step(self, batches) -> dict[str, torch.Tensor]:
        """One optimizer step over train.grad_accum micro-batches; returns summed diagnostics."""
        sums: dict[str, torch.Tensor] = {}
        num_good = 0
        every = self.cfg.reference.drift_check_every
        # Decided from the step alone, so every rank runs the (collective, ZeRO-3) live reference together.
        self.is_drift_check_due = self.drift_reference is not None and (self.state.step + 1) % every == 0
        while num_good < self.cfg.train.grad_accum:
            batch = self._next_batch(batches)
            loss, diag = self.forward_loss(batch)
            # Every rank must skip together, or the ZeRO collectives in backward hang.
            if self.is_checking_each_loss and engine.any_rank_true(~torch.isfinite(loss)):
                self._skip_nonfinite()
                continue
            if not self.is_checking_each_loss:  # read at logging (_check_nonfinite_window)
                diag["nonfinite"] = (~torch.isfinite(loss)).float()
            self.policy.backward(loss)
            self.policy.step()
            num_good += 1
            self.flops += self._batch_flops(batch)
            self.nonfinite_in_row = 0
            for name, value in diag.items():
                sums[name] = sums[name] + value if name in sums else value
        sums["count"] = torch.full((), float(num_good), device=self.device)  # a fill, not a copy from the host
        return sums

    def _batch_flops(self, batch: dict) -> int:
        if engine.rank() != 0:
            return 0
        shape = tuple(batch["latents_w"].shape[1:])
        if shape not in self.pair_flops:  # shards that record no shape: counted once, on first sight
            self.pair_flops[shape] = self._pair_flops(shape)
        return self.pair_flops[shape] * len(batch["keys"])

    # ------------------------------------------------------------ around the step

    def fit(self, stop: threading.Event | None = None) -> TrainState:
        """Train to train.max_steps; or, once `stop` is set on any rank, checkpoint and return early."""
        self._maybe_resume()
        cfg, state = self.cfg, self.state
        is_writer = engine.rank() == 0
        metrics = Metrics(cfg.output_dir, is_writer=is_writer, total_steps=cfg.train.max_steps,
                          start_step=state.step, progress=cfg.logging.progress)
        batches = self.loader.batches()
        self.data_wait = 0.0
        self.nonfinite_in_row = 0
        window = Window()
        self.policy.train()
        try:
            while state.step < cfg.train.max_steps:
                t0 = time.perf_counter()
                sums = self.train_step(batches)
                state.step += 1
                state.samples_seen += cfg.train.grad_accum * cfg.train.micro_batch_size * engine.world_size()
                window.add(sums, time.perf_counter() - t0, self.data_wait, self.flops)
                self.data_wait, self.flops = 0.0, 0
                if state.step % cfg.logging.every_steps == 0 or state.step == cfg.train.max_steps:
                    scalars = self._reduce(window)
                    if not self.is_checking_each_loss:
                        self._check_nonfinite_window(int(scalars["train/nonfinite"]))
                    metrics.scalars(state.step, scalars)
                    for tag, watch in (("warnings/gap_w", self.gap_watch), ("warnings/manifold", self.manifold_watch)):
                        warning = watch.message(state.step, scalars)
                        if warning is not None:
                            metrics.text(state.step, tag, warning)
                    self._check_bad_fraction()
                    window = Window()
                if cfg.data.val_every and (state.step % cfg.data.val_every == 0 or state.step == cfg.train.max_steps):
                    metrics.scalars(state.step, self.validate())
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

    def _next_batch(self, batches) -> dict:
        t0 = time.perf_counter()
        batch = next(batches)
        if self.has_cache and self.loader.epoch_index >= self.reference.num_draws and not self.has_warned_cycling:
            self.has_warned_cycling = True
            if engine.rank() == 0:
                log.warning("reference cache %s holds %d draws per pair; from epoch %d on, draws are reused "
                            "cyclically (draw index = epoch mod %d)", self.cfg.reference.cache_dir,
                            self.reference.num_draws, self.loader.epoch_index, self.reference.num_draws)
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        self.data_wait += time.perf_counter() - t0
        _stop_without_pairs(batch, f"epoch {self.loader.epoch_index}")
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

    def _check_nonfinite_window(self, num_nonfinite: int) -> None:
        """train.nonfinite_check=logging: DeepSpeed skipped the optimizer steps these micro-batches were in."""
        if not num_nonfinite:
            return
        self.state.num_nonfinite += num_nonfinite
        if engine.rank() == 0:
            log.warning("step %d: %d micro-batches of the last logging window had a non-finite loss; DeepSpeed "
                        "skipped their optimizer steps (%d in all)", self.state.step, num_nonfinite,
                        self.state.num_nonfinite)
        if num_nonfinite >= self.cfg.train.max_nonfinite_in_row:
            raise NonFiniteLossError(
                f"{num_nonfinite} micro-batches of one logging window had a non-finite loss (train.max_nonfinite_in_row); "
                "lower optim.lr or dpo.beta, or check the data with tools/inspect_shards.py")

    def _reduce(self, window: Window) -> dict[str, float]:
        """train/* means over the logging window, over micro-batches and ranks, and perf/*."""
        out, count = window.means(engine.all_reduce_sum, self.device, "train")
        if "train/nonfinite" in out:  # train.nonfinite_check=logging: the window's non-finite micro-batches, all ranks
            out["train/nonfinite"] = round(out["train/nonfinite"] * count)
        out.update({
            "train/grad_norm": self.policy.grad_norm(),
            "train/lr": self.policy.lr(),
            "perf/pairs_per_s": count * self.cfg.train.micro_batch_size / max(window.seconds, 1e-9),
            "perf/step_time_s": window.seconds / window.num_steps,
            "perf/data_wait_frac": window.data_wait / max(window.seconds, 1e-9),
            **perf_scalars(window.flops, window.seconds, self.peak_tflops),
        })
        if self.cache_drift is not None:
            out["ref/cache_drift"], self.cache_drift = self.cache_drift, None
        if engine.has_gpu():
            out["mem/max_allocated_gb"] = engine.max_memory_allocated_gb()
        return out

    def _cache_drift(self, batch: dict, x_t, target, t, ref_err_w, ref_err_l) -> float:
        """Largest |cached - live| reference error over a random few pairs of this micro-batch, on all ranks."""
        g = torch.Generator().manual_seed(hash((self.cfg.seed, self.state.step, engine.rank())) & (2**62 - 1))
        drift = self.drift_reference.drift(batch, x_t, target, t, ref_err_w, ref_err_l,
                                           self.cfg.reference.drift_check_fraction, g)
        return engine.all_reduce_max(drift.reshape(1).to(torch.float64)).item()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """val/* on held-out pairs at draw index 0: no gradient, the same draws every time."""
        window = Window()
        self.policy.engine.eval()
        for i, batch in enumerate(self.val_loader.epoch(0)):
            if i == self.cfg.data.val_max_batches:
                break
            _stop_without_pairs(batch, "the held-out shards (data.val_shards)")
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            _, diag = self.forward_loss(batch, reference=self.val_reference)
            window.add({**diag, "count": torch.tensor(1.0, device=self.device)}, 0.0, 0.0)
        self.policy.train()
        means, _ = window.means(engine.all_reduce_sum, self.device, "val")
        return {k: v for k, v in means.items() if k.split("/")[1] in VAL_SCALARS and k.count("/") == 1}

    def _check_bad_fraction(self) -> None:
        counts = engine.all_reduce_sum(torch.tensor([float(self.loader.pairs_read), float(self.loader.pairs_bad)],
                                                    device=self.device))
        read, bad = counts.tolist()
        if bad and read >= min(MIN_PAIRS_FOR_BAD_FRACTION, self.total_pairs) and \
                bad / read > self.cfg.data.max_bad_fraction:
            raise BadDataError(f"{int(bad)} of {int(read)} pairs read were bad (> data.max_bad_fraction = "
                               f"{self.cfg.data.max_bad_fraction}); see the warnings above for keys and shards")

    # ------------------------------------------------------------ checkpoints and export

    def save_checkpoint(self) -> None:
        """A checkpoint of every rank, each with its loader's position beside it (a resume on another
        world size reads every old rank's: batch counts do not transfer, the pairs consumed do)."""
        tag = f"step_{self.state.step:08d}"
        self.state.world_size = engine.world_size()
        self.policy.save_checkpoint(self.ckpt_dir, tag, {"train_state": asdict(self.state)},
                                    self.cfg.checkpoint.keep_last, rank_state=self.loader.state_dict())
        if engine.rank() == 0:
            log.info("checkpoint %s/%s written", self.ckpt_dir, tag)

    def _maybe_resume(self) -> None:
        """Restore the newest checkpoint, if resuming: weights, optimizer, step counters, the loader's position."""
        tag = self.resume_tag
        if tag is None:
            return
        # Read from the files, as the engine does to choose how to load; TrainState.world_size is a record.
        saved_world_size = engine.checkpoint_world_size(self.ckpt_dir, tag)
        if saved_world_size != engine.world_size() and self.cfg.optim.name == "adafactor":
            raise ValueError(f"checkpoint {self.ckpt_dir}/{tag} was written by {saved_world_size} processes; "
                             "DeepSpeed's universal checkpoint carries Adam's state, not Adafactor's: resume it on "
                             "as many")
        client = self.policy.load_checkpoint(self.ckpt_dir, tag)
        # Checkpoints of dpo_ds before the loader kept its own position held part of it in train_state.
        legacy = {k: client["train_state"].pop(k) for k in ("epoch", "batch_in_epoch", "epoch_num_batches",
                                                            "pairs_read", "pairs_bad") if k in client["train_state"]}
        self.state = TrainState(**client["train_state"])
        saved = {r: engine.read_rank_state(self.ckpt_dir, tag, r) for r in self.loader.ranks_to_load(saved_world_size)}
        if None in saved.values():
            raise ValueError(f"checkpoint {self.ckpt_dir}/{tag} was written before dpo_ds recorded each rank's data "
                             "position; resume it with the dpo_ds version that wrote it")
        self.loader.load_state_dict({r: {**legacy, **s} for r, s in saved.items()}, saved_world_size)
        self.state.world_size = engine.world_size()
        if engine.rank() == 0:
            log.info("resumed from %s/%s at step %d (epoch %d, batch %d)", self.ckpt_dir, tag,
                     self.state.step, self.loader.epoch_index, self.loader.batch_in_epoch)

    def export(self) -> Path:
        """The trained denoiser as a diffusers folder under output_dir/export/; with LoRA, the adapters in
        diffusers' LoRA format under output_dir/export/lora/ (tools/export.py --merge writes a full model)."""
        if self.cfg.model.lora is not None:
            adapters = lora.adapter_weights(self.policy.full_state_dict(trainable_only=True))
            out = self.out / "export" / "lora"
            if engine.rank() == 0:
                log.info("exported %s", lora.save(self.family, adapters, self.cfg.model.lora, str(out)))
            engine.barrier()
            return out
        state_dict = self.policy.full_state_dict()
        out = self.out / "export" / self.family.DENOISER_SUBFOLDER
        if engine.rank() == 0:
            self.family.export(state_dict, self.denoiser_config, str(out), torch.float32)
            log.info("exported %s", out)
        engine.barrier()
        return out


def _stop_without_pairs(batch: dict, where: str) -> None:
    """Raise BadDataError on every rank when any rank's batch is empty (a loader worker found no good
    pair): decided together, since a rank that stopped alone would leave the others in a collective."""
    if engine.any_rank(not batch["keys"]):
        who = "this rank" if not batch["keys"] else "another rank"
        raise BadDataError(f"{who} found no good pair in {where}; see the warnings above for keys, shards "
                           "and reasons (tools/inspect_shards.py checks shards offline)")
