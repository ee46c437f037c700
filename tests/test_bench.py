"""tools/bench.py's data figures on toy sizes (--quick): one JSON line per figure, then the table.
A smoke test of the pieces, not a measurement; the figures are in docs/BENCHMARKS.md."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, env


def test_quick_data_figures(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "--quick", "--out", str(tmp_path),
                           "--figures", "data_sdxl,data_wan"], env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    rows = [json.loads(line) for line in lines[:2]]
    assert [r["figure"] for r in rows] == ["data_sdxl", "data_wan"]
    # An epoch of 16 pairs in batches of 4 (8 in batches of 1), less the first batch, which is not timed.
    assert [r["pairs_timed"] for r in rows] == [12, 7]
    for r in rows:
        assert r["ratio"] == r["pairs_per_s"] / 10.0 > 0 and r["target"] == ">= 10" and r["pass"] == (r["ratio"] >= 10)
    assert lines[3].split() == ["figure", "ratio", "target", "pass"]
    assert [line.split()[0] for line in lines[4:]] == ["data_sdxl", "data_wan"]
