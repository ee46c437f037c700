"""Worlds x objectives x seeds (`make demo-worlds`): the objective comparison of tools/demo.py in every world.

Each world is `NAME:AGREEMENT` (tools/demo.py --world NAME --agreement AGREEMENT): the toy world with all
labels agreeing with its oracle and with a share flipped, and the detail world (tools/detail_world.py).
Every world runs `tools/demo.py --objectives ... --seeds ...` into OUTPUT_DIR/<world>_<agreement>/; the toy
worlds share one reference (flipping labels changes no image, so the reference trained on the pairs' images
is the same), the first toy world's. The tables of every world are gathered into OUTPUT_DIR/worlds.md and
worlds.json: per world and objective, the mean difference of the preferred rate over seeds with its 95%
Student t interval, the policy's rate, diversity within the preferred mode and share on the manifold (the
reference's and the data's beside them), and the runs that warned.

  python tools/demo_worlds.py --output-dir runs/worlds [--worlds toy:1,toy:0.75,toy:0.6,detail:0.9]
      [--objectives dpo,dpo+sft] [--seeds 0,1,2] [--nproc 2] [-- extra tools/demo.py arguments]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_world(out: Path, world: str, agreement: float, args, reference: Path | None) -> dict:
    cmd = [sys.executable, str(REPO / "tools" / "demo.py"), "--output-dir", str(out), "--world", world,
           "--agreement", str(agreement), "--objectives", args.objectives, "--seeds", args.seeds,
           "--nproc", str(args.nproc), "--live-steps", "0", "--checkpoint-every", str(args.dpo_steps),
           "--dpo-steps", str(args.dpo_steps), *(["--reference", str(reference)] if reference else []), *args.extra]
    print(f"demo_worlds: {world} world, {agreement:.0%} of labels agreeing: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((out / "report" / "objectives.json").read_text())


def table(results: list[dict]) -> str:
    lines = ["| world | labels agreeing | objective | mean difference [95% over seeds] | policy rate | diversity "
             "(policy / reference / data) | on manifold (policy / reference) | gap_w warning | manifold warning |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in results:
        for name, row in t["objectives"].items():
            runs = row["runs"]
            n = len(runs)
            lo, hi = row["ci95_over_seeds"]
            interval = (f"[{lo:+.3f}, {hi:+.3f}]" if n > 1 else
                        f"[{runs[0]['ci95'][0]:+.3f}, {runs[0]['ci95'][1]:+.3f}] (one seed, bootstrap)")
            lines.append(
                f"| {t['world']} | {t['agreement']:.0%} | {name} | {row['mean_difference']:+.3f} {interval} | "
                f"{sum(r['rate'] for r in runs) / n:.3f} (ref {t['reference_rate']:.3f}) | "
                f"{sum(r['diversity'] for r in runs) / n:.3f} / {t['reference_diversity']:.3f} / "
                f"{t['data_diversity']:.3f} | {sum(r['on_manifold'] for r in runs) / n:.1%} / "
                f"{t['reference_on_manifold']:.1%} | {sum(r['gap_w_warning'] for r in runs)}/{n} | "
                f"{sum(r['manifold_warning'] for r in runs)}/{n} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/worlds")
    p.add_argument("--worlds", default="toy:1,toy:0.75,toy:0.6,detail:0.9")
    p.add_argument("--objectives", default="all")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--dpo-steps", type=int, default=150)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--toy-reference", help="a toy-world reference folder from an earlier demo run")
    p.add_argument("extra", nargs="*", help="more tools/demo.py arguments, after --")
    args = p.parse_args(argv)
    out = Path(args.output_dir).resolve()
    results = []
    toy_reference = Path(args.toy_reference).resolve() if args.toy_reference else None
    for spec in args.worlds.split(","):
        world, _, agreement = spec.partition(":")
        agreement = float(agreement or 1)
        run_dir = out / f"{world}_{round(100 * agreement)}"
        results.append(run_world(run_dir, world, agreement, args, toy_reference if world == "toy" else None))
        if world == "toy" and toy_reference is None:
            toy_reference = run_dir / "reference"
    (out / "worlds.json").write_text(json.dumps(results, indent=2))
    first = results[0]
    (out / "worlds.md").write_text(
        f"# Worlds x objectives: {first['dpo_steps']} DPO steps, beta = {first['beta']}, lr = {first['lr']}, seeds "
        f"{', '.join(map(str, first['seeds']))}, {first['num_samples']} samples per model\n\n" + table(results))
    print(f"demo_worlds: {out / 'worlds.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
