"""Several training runs one after another in one job, as dpo_ds.train.main runs each: (DeepSpeed JSON, run
config) pairs in argv, the same settings step (dpo_ds.train.settings), the same Trainer, the process group
started once. Started by the real `deepspeed` launcher (tests/test_families.py), so a job of five runs pays the
launcher's and the ranks' start (interpreters, imports, the process group) once instead of five times. Rank 0
prints RESULT and a JSON list with, per run, its last step and the class of reference it trained against."""

import json
import sys

from dpo_ds import engine, launchenv
from dpo_ds.train import record_settings, settings, setup_logging

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
rank, world_size, _ = launchenv.rank_world_local()
setup_logging(rank)
runs = [settings(config, ds_path, [], world_size) for ds_path, config in zip(args[::2], args[1::2])]

from dpo_ds.trainer import Trainer  # noqa: E402  (as dpo_ds.train: diffusers once the settings are good)

engine.init_distributed()
results = []
for cfg, dtype, ds_config, family, shards in runs:
    record_settings(cfg, ds_config)
    trainer = Trainer(cfg, ds_config, dtype, family, shards)
    state = trainer.fit()
    results.append({"output_dir": cfg.output_dir, "step": state.step, "reference": type(trainer.reference).__name__})
if engine.rank() == 0:
    print("RESULT " + json.dumps(results), flush=True)
engine.destroy()
