"""tools/precompute_ref.py's main for several run configs, one after another in this one process (one rank):
argv is the configs; each is computed with --num-draws 1 on a port of its own. Pays the interpreter's start
and imports once (tests/test_families.py's five caches)."""

import importlib.util
import os
import sys
from pathlib import Path

from conftest import free_port  # this folder is the script's first sys.path entry

spec = importlib.util.spec_from_file_location("precompute_ref", Path(__file__).parents[1] / "tools" / "precompute_ref.py")
precompute_ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(precompute_ref)
for config in sys.argv[1:]:
    os.environ["MASTER_PORT"] = str(free_port())
    code = precompute_ref.main(["--config", config, "--num-draws", "1", "--no-progress"])
    if code:
        sys.exit(code)
