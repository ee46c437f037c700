"""Launcher entry point: `deepspeed [--hostfile H] launch/train.py --deepspeed DS.json --config RUN.yaml`."""
import sys

from dpo_ds.train import main

sys.exit(main())
