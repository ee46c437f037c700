"""What a newcomer's terminal shows while `make demo` runs: the demo's stage runner (tools/demo.py).

A real child process on the runner's pseudo-terminal writes a launcher's chatter and a tqdm bar, as
the trainer's rank 0 does; the terminal must get the stage line, the bar and the result, the log
everything. (tests/test_alignment.py checks the same on a whole demo run.)
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import REPO, env

CHILD = textwrap.dedent("""
    import sys, time
    from tqdm import tqdm
    print("[2026-01-01 00:00:00,000] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.")
    print("[INFO] [launch.py:245:main] process 1 spawned", file=sys.stderr, flush=True)
    for _ in tqdm(range(4), desc="train", mininterval=0):
        time.sleep(0.05)
        print("[rank1] chatter between redraws", flush=True)
    print("Processing zero checkpoint 'x'", flush=True)
    sys.exit(int(sys.argv[1]))
""")

RUNNER = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from demo import Console
    logs = Path(sys.argv[2])
    console = Console(logs, num_stages=1)
    print("the demo's own chatter")  # standard output now goes to logs/demo.log
    console.stage("policy: 4 steps")
    console.run([sys.executable, sys.argv[3], sys.argv[4]], {}, logs / "child.log", bar="train")
    console.result("train/loss 0.69 -> 0.01")
""")


def _stage(tmp_path: Path, exit_code: int) -> tuple[subprocess.CompletedProcess, Path]:
    logs = tmp_path / "logs"
    logs.mkdir()
    (tmp_path / "child.py").write_text(CHILD)
    (tmp_path / "runner.py").write_text(RUNNER)
    proc = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(REPO / "tools"), str(logs),
                           str(tmp_path / "child.py"), str(exit_code)],
                          env=env(), capture_output=True, text=True, timeout=120)
    return proc, logs


def test_terminal_shows_stage_bar_and_result_and_the_log_keeps_the_rest(tmp_path):
    proc, logs = _stage(tmp_path, 0)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    terminal = proc.stdout
    assert terminal.startswith("[1/1] policy: 4 steps\n"), terminal
    bars = [line.strip() for line in re.split(r"[\r\n]", terminal) if "%|" in line]
    assert any(b.startswith("train:   0%|") for b in bars) and any(b.startswith("train: 100%|") for b in bars), bars
    # only tqdm's part of a line, never a rank's message that followed it
    assert all(b.split("|")[-1].rstrip().endswith("]") for b in bars), bars
    assert re.search(r"\n {6}train/loss 0.69 -> 0.01 \(\d+ s\)\n$", terminal), terminal
    for chatter in ("Setting accelerator", "[INFO]", "chatter", "Processing zero checkpoint"):
        assert chatter not in terminal, terminal
    assert proc.stderr == ""
    child_log = (logs / "child.log").read_text()
    for everything in ("Setting accelerator", "spawned", "chatter between redraws", "train: 100%|", "Processing zero"):
        assert everything in child_log
    assert "the demo's own chatter" in (logs / "demo.log").read_text()


def test_a_failing_stage_shows_the_end_of_its_log_and_where_it_is(tmp_path):
    proc, logs = _stage(tmp_path, 3)
    assert proc.returncode == 1
    assert "demo: stage 1 failed: python" in proc.stdout and "exited with code 3" in proc.stdout, proc.stdout
    assert "  | Processing zero checkpoint 'x'" in proc.stdout
    assert f"demo: full log: {logs / 'child.log'}" in proc.stdout
    assert "train/loss" not in proc.stdout
