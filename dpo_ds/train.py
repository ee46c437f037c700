"""Entry point: `python -m dpo_ds.train --deepspeed DS.json --config RUN.yaml [--section.key=value ...]`.

Everything a user can get wrong is checked before the process group starts,
and reported in one line naming the file or key.

Exit status: 0 done; 2 bad settings; 3 stopped by the loss or data guards; 75 (EX_TEMPFAIL,
"try again") stopped by SIGUSR1 or SIGTERM after a complete checkpoint on every rank:
rerun with --checkpoint.resume=auto to continue exactly where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from dpo_ds import engine, launchenv, models
from dpo_ds.config import dump_config, load_config, resolve_ds_config, training_dtype
from dpo_ds.data import check_family, list_shards

log = logging.getLogger("dpo_ds")

PREEMPTED = 75  # EX_TEMPFAIL: checkpointed on a stop signal; resume to continue


def _say(line: str) -> None:
    """One line on stderr in one write: print's separate newline lets ranks sharing a pipe run lines together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="dpo_ds.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run configuration YAML; any key can be overridden as --section.key=value")
    p.add_argument("--deepspeed", required=True, help="DeepSpeed JSON, e.g. ds_configs/zero3.json")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return p.parse_known_args(argv)


def setup_logging(rank: int) -> None:
    """Rank 0 logs INFO, the others WARNING and above; each line names its time and rank."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S")


def settings(config: str | None, ds_path: str, overrides: list[str], world_size: int) -> tuple:
    """(run config, training dtype, DeepSpeed config, family, shards) of a run, every setting a user can get
    wrong checked before any process group starts; raises ValueError naming the file or key."""
    cfg = load_config(config, overrides)
    dtype = training_dtype(cfg, engine.has_gpu(), engine.gpu_has_bf16())
    ds_config = resolve_ds_config(ds_path, cfg, world_size, dtype)
    family = models.build(cfg)  # the family's settings: model folder, scheduler, resolution, draw law
    # Every rank checks (no process group yet); index.json makes it cheap: a header per shard, and
    # no pass over the data when the index lists the keys.
    shards = list_shards(cfg.data.shards, check=True)
    check_family(shards, family.NAME, family.LATENT_LAYOUT)
    if len(shards) < world_size:
        raise ValueError(f"data.shards: {len(shards)} shards for {world_size} ranks; "
                         "write at least one shard per rank")
    return cfg, dtype, ds_config, family, shards


def record_settings(cfg, ds_config: dict) -> None:
    """Rank 0 writes the run's resolved settings into its output folder: config.yaml and ds_config.json."""
    if engine.rank() == 0:
        out = Path(cfg.output_dir)
        dump_config(cfg, out / "config.yaml")
        (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2))


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    # Installed first, so a signal during start-up is not lost: the trainer stops after the step in
    # flight, when any rank has seen one (SLURM sends USR1 before the time limit, TERM on preemption).
    stop = threading.Event()
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    rank, world_size, _ = launchenv.rank_world_local()
    setup_logging(rank)
    try:
        cfg, dtype, ds_config, family, shards = settings(args.config, args.deepspeed, overrides, world_size)
    except ValueError as e:
        _say(f"dpo_ds.train: error: {e}")
        return 2

    from dpo_ds.trainer import BadDataError, NonFiniteLossError, Trainer  # heavy imports (diffusers) only once the settings are known good

    engine.init_distributed()
    record_settings(cfg, ds_config)
    try:
        state = Trainer(cfg, ds_config, dtype, family, shards).fit(stop)
    except ValueError as e:
        _say(f"dpo_ds.train: rank {engine.rank()}: error: {e}")
        return 2
    except (NonFiniteLossError, BadDataError) as e:
        # Raised on every rank at the same step (the decision is all-reduced); the
        # last complete checkpoint stays the one a resume picks.
        _say(f"dpo_ds.train: rank {engine.rank()}: stopped: {e}")
        return 3
    except RuntimeError:
        # Mostly a peer that vanished: a collective fails ("Connection closed by peer"), or the launcher,
        # having seen the exit, ends this rank's loader workers. The launcher does not say which rank it
        # was; the survivors can, before the traceback.
        if engine.world_size() > 1:
            print(f"dpo_ds.train: rank {engine.rank()}: {engine.describe_lost_peers()}", file=sys.stderr, flush=True)
        raise
    finally:
        engine.destroy()
    if state.step < cfg.train.max_steps:
        _say(f"dpo_ds.train: rank {rank}: stopped by a signal at step {state.step} after a checkpoint; "
             f"resume with --checkpoint.resume=auto (exit {PREEMPTED})")
        return PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
