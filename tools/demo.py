"""The embedded default job (`make demo`): does Diffusion-DPO move samples toward what was preferred?

The toy world of tools/toy_world.py, end to end through the real launcher, in the project's shape:

  1. data        2048 pairs, mode A preferred over mode B (`--prefer`), and a fresh tiny UNet
  2. reference   that UNet trained on both images of every pair (loss.type=sft): it samples both modes
  3. cache       tools/precompute_ref.py: the reference's errors for every pair and draw, once
  4. policy      Diffusion-DPO from the reference on ZeRO-3, reference.mode=cache (no reference model in
                 memory), by default with an SFT term on winners (`--objective`; the comparison below says why)
  5. live        the policy's first `--live-steps` steps again with reference.mode=live (the reference in its
                 own ZeRO-3 engine, parameters offloaded to CPU): train/loss step by step against step 4's
  6. evaluation  DDIM samples of reference and policy from the same initial noise, scored by the oracle;
                 OUTPUT_DIR/report/{report.md, report.json, curves.png, rates.png, samples.png}

Steps 2-5 run as `deepspeed --num_gpus NPROC launch/train.py --deepspeed ds_configs/zero3.json` (GPUs
when present, else CPU processes). `--reference DIR` reuses a reference folder made by an earlier run
and skips the training of step 2.

The terminal shows one line per stage, rank 0's progress bar and the stage's result; every process's
full output goes to OUTPUT_DIR/logs/ (the demo's own to logs/demo.log). A failing stage prints the end
of its log and the log's path.

`--objectives all --seeds 0,1,2` (make demo-objectives) also trains every objective of OBJECTIVES
below once per seed from the same reference (the run of step 4 stands for its own objective and
seed), and adds the table of their effect on the sampled preferred-mode rate, with intervals over
seeds, to the report (report/objectives.{md,json}).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import re
import shutil
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import detail_world  # noqa: E402  (sibling scripts, not a package)
import toy_world  # noqa: E402

# The worlds a demo can run in: each writes pairs and judges samples (oracle, manifold) its own way.
WORLDS = {"toy": toy_world, "detail": detail_world}

NUM_PAIRS = 2048
MICRO_BATCH = 16  # pairs per rank per step
LIVE_STEPS = 5
DPO_SCALARS = ("train/loss", "train/implicit_acc", "train/reward_margin", "train/gap_w", "train/gap_l")
GAP_W_WARNING = "train/gap_w (e_w - r_w) has been above zero"
MANIFOLD_WARNING = "samples may be leaving the data"  # dpo_ds.metrics.ManifoldWatch

# The objectives the comparison trains: name -> (what it is, overrides of the DPO run).
# Each names its loss.sft_weight: the config's default (1) is dpo+sft's.
OBJECTIVES = {
    "dpo": ("Diffusion-DPO, the paper's loss", ["--loss.sft_weight=0"]),
    "dpo+sft": ("plus an SFT term on winners, weight 1", ["--loss.sft_weight=1"]),
    "dpo+hinge": ("plus a hinge on e_w above r_w, weight 10", ["--loss.sft_weight=0", "--loss.winner_hinge=10"]),
    "dpo-loser0": ("no gradient through the loser's error", ["--loss.sft_weight=0", "--loss.loser_weight=0"]),
    "ipo": ("IPO-style bounded target, margin 5", ["--loss.sft_weight=0", "--loss.type=ipo", "--loss.ipo_margin=5"]),
}
# Two-sided 95% Student t quantiles by degrees of freedom, for intervals over a handful of seeds.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Console:
    """What the user sees: a line per stage, rank 0's progress bar, the stage's result in one line.

    Everything else goes to the logs: each child's whole output to its own file, and the demo's own
    (DeepSpeed's and diffusers' messages on import and checkpoint reads) to logs/demo.log, by pointing
    file descriptors 1 and 2 there; the terminal keeps a duplicate of the original standard output.
    """

    INDENT = "      "

    def __init__(self, logs: Path, num_stages: int):
        self.logs, self.num_stages, self.stage_num = logs, num_stages, 0
        self.term = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        self.is_tty = self.term.isatty()
        self.width = shutil.get_terminal_size((100, 24)).columns if self.is_tty else 100
        self.bar_len = 0
        self.t_stage = time.time()
        sys.stdout.flush()
        sys.stderr.flush()
        own = os.open(logs / "demo.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(own, 1)
        os.dup2(own, 2)
        os.close(own)

    def say(self, text: str = "") -> None:
        self._end_bar()
        self.term.write(text + "\n")

    def stage(self, title: str) -> None:
        self.stage_num += 1
        self.t_stage = time.time()
        self.say(f"[{self.stage_num}/{self.num_stages}] {title}")

    def result(self, text: str) -> None:
        self.say(f"{self.INDENT}{text} ({_duration(time.time() - self.t_stage)})")

    def bar(self, line: str) -> None:
        """Show a progress line in place of the last one."""
        line = (self.INDENT + line.strip())[:self.width - 1]
        self.term.write("\r" + line + " " * max(0, self.bar_len - len(line)))
        self.term.flush()
        self.bar_len = len(line)

    def _end_bar(self) -> None:
        if self.bar_len:
            self.term.write("\n")
            self.bar_len = 0

    def progress(self, total: int, desc: str, unit: str):
        """A progress bar of this process, on the terminal."""
        from tqdm import tqdm

        self._end_bar()
        return tqdm(total=total, desc=desc, unit=unit, file=self.term, ncols=min(self.width, 100) - len(self.INDENT),
                    bar_format=self.INDENT + "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]",
                    mininterval=0.5 if self.is_tty else 5.0)

    def run(self, cmd: list[str], env: dict, log: Path, bar: str) -> None:
        """Run `cmd` with all its output into `log`, showing only rank 0's progress bar (the tqdm bar
        whose description is `bar`). The child writes to a pseudo-terminal, so its bar redraws as
        often as it would on the user's terminal (the trainer's bar redraws once a minute in a file)."""
        bar_line = re.compile(re.escape(bar) + r": +\d+%\|[^|]*\| *\S+ \[[^\]]*\]")
        master, child_tty = pty.openpty()
        attrs = termios.tcgetattr(child_tty)
        attrs[1] &= ~termios.ONLCR  # keep the child's bytes as written: no \n -> \r\n
        termios.tcsetattr(child_tty, termios.TCSANOW, attrs)
        fcntl.ioctl(child_tty, termios.TIOCSWINSZ, struct.pack("HHHH", 24, self.width - len(self.INDENT) - 1, 0, 0))
        with open(log, "wb", buffering=0) as f:  # unbuffered: `tail -f` the log while the stage runs
            f.write(("+ " + " ".join(cmd) + "\n").encode())
            self.bar(f"starting {Path(cmd[0]).name} ... (until its progress bar appears; log: {_shown(log)})")
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=child_tty,
                                    stderr=child_tty)
            os.close(child_tty)
            pending = b""
            while True:
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError:  # EIO: every process writing to the terminal has exited
                    chunk = b""
                if not chunk:
                    break
                f.write(chunk)
                *lines, pending = re.split(rb"[\r\n]", pending + chunk)
                for line in lines:
                    # Another rank's message may follow the bar on its line: keep tqdm's part only.
                    match = bar_line.match(line.decode("utf-8", "replace").strip())
                    if match:
                        self.bar(match[0])
            os.close(master)
            rc = proc.wait()
        if rc != 0:
            self.fail(f"{Path(cmd[0]).name} exited with code {rc}", log)

    def fail(self, what: str, log: Path, num_lines: int = 25) -> None:
        tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-num_lines:]
        self.say(f"demo: stage {self.stage_num} failed: {what}. The last lines of {log}:")
        self.term.write("".join(f"  | {line[:300]}{' ...' if len(line) > 300 else ''}\n" for line in tail))
        self.term.write(f"demo: full log: {log} (all logs in {self.logs})\n")
        raise SystemExit(1)


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def _duration(seconds: float) -> str:
    seconds = round(seconds)  # first, so 119.6 s reads "2 min 00 s", not "1 min 60 s"
    return f"{seconds} s" if seconds < 90 else f"{seconds // 60} min {seconds % 60:02d} s"


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _plots(report: Path, curves: dict, result: dict, rate_curve: list[tuple[int, float, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DPO_SCALARS), figsize=(4 * len(DPO_SCALARS), 3.2))
    for ax, name in zip(axes, DPO_SCALARS):
        steps, values = zip(*curves[name])
        ax.plot(steps, values)
        if name.startswith("train/gap"):
            ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_title(name)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(report / "curves.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    steps = [s for s, _, _ in rate_curve]
    ax.plot(steps, [p for _, p, _ in rate_curve], "o-", label="policy")
    ax.plot(steps, [r for _, _, r in rate_curve], "s--", label="reference")
    ax.set_ylim(0, 1)
    ax.set_xlabel("DPO step")
    ax.set_ylabel(f"rate of preferred mode {result['prefer']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(report / "rates.png", dpi=90)
    plt.close(fig)


def _latent_image(x):
    """A 4x8x8 toy latent as a 64x64 RGB image: channels 0-2, the modes' +-0.8 mapped to 0-1."""
    img = (x[:3].permute(1, 2, 0).float() / (4 * toy_world.AMPLITUDE) + 0.5).clamp(0, 1)
    return img.repeat_interleave(8, 0).repeat_interleave(8, 1).numpy()


def _sample_grid(path: Path, world, ref, pol, prefer: str, columns: int = 12) -> None:
    """Reference and policy samples from the same initial noise, column by column, each framed by
    the oracle's verdict (green: the preferred mode), next to the two modes' centres."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = world.patterns()
    fig, axes = plt.subplots(2, columns + 1, figsize=(1.1 * (columns + 1), 2.6))
    for row, (name, samples, centre) in enumerate((("reference", ref, a), ("policy", pol, b))):
        axes[row, 0].imshow(_latent_image(centre))
        axes[row, 0].set_title(f"mode {'AB'[row]}", fontsize=8)
        axes[row, 1].set_ylabel(name, fontsize=9)
        for col in range(columns):
            ax = axes[row, col + 1]
            x = samples[col:col + 1]
            label = world.mode_label(x)[0]
            ax.imshow(_latent_image(samples[col]))
            for side in ax.spines.values():
                side.set_color("tab:green" if label == prefer else "tab:red")
                side.set_linewidth(3)
            ax.set_title(label, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"samples, same initial noise per column (frame: green = preferred mode {prefer}; "
                 "'-' = near neither mode)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


class Demo:
    """One demo output folder: the data and reference, a reference cache per seed, DPO runs from it."""

    def __init__(self, args, overrides: list[str], console: Console):
        import torch

        self.args, self.overrides, self.console = args, overrides, console
        self.nproc = min(args.nproc, torch.cuda.device_count()) if torch.cuda.is_available() else args.nproc
        self.out = out = Path(args.output_dir).resolve()
        bin_dir = Path(sys.executable).parent
        self.env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONUNBUFFERED": "1"}
        self.world, self.data = self.world_and_data()
        base = {"seed": args.seed, "data": {"shards": str(self.data / "shards"), "resolution": 64, "num_workers": 1},
                "model": {"gradient_checkpointing": False}, "train": {"micro_batch_size": MICRO_BATCH},
                "checkpoint": {"keep_last": 100}, "logging": {"progress": True}}
        (out / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
        self.reference = Path(args.reference).resolve() if args.reference else out / "reference"

    def world_and_data(self):
        """The world's module (its data writer, oracle and sampler) and the folder of its pairs."""
        a = self.args
        agreement = "" if a.agreement == 1 else f"_agree{round(100 * a.agreement)}"
        return WORLDS[a.world], self.out / f"{a.world}_prefer_{a.prefer}{agreement}"

    def launch(self, ds_config: str = "zero3.json") -> list[str]:
        """The training command. The project's shape is the policy sharded with ZeRO-3 (the live reference,
        when used, in its own ZeRO-3 engine with parameters offloaded to CPU)."""
        return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(self.nproc), "--master_port",
                str(_free_port()), str(REPO / "launch" / "train.py"), "--deepspeed",
                str(REPO / "ds_configs" / ds_config), "--config", str(self.out / "base.yaml")]

    def write_data(self) -> str:
        if not (self.data / "model" / "scheduler" / "scheduler_config.json").is_file():
            shutil.rmtree(self.data, ignore_errors=True)  # a data folder cut off mid-write
            self.world.write_data(str(self.data), num_pairs=NUM_PAIRS, prefer=self.args.prefer, seed=0,
                                  agreement=self.args.agreement)
        num_shards = len(list((self.data / "shards").glob("*.tar")))
        flipped = "" if self.args.agreement == 1 else f" ({1 - self.args.agreement:.0%} of their labels flipped)"
        return f"{NUM_PAIRS} pairs{flipped} in {num_shards} shards and a fresh tiny UNet in {_shown(self.data)}"

    def train_reference(self) -> None:
        out, steps = self.out, self.args.sft_steps
        # The reference is only the starting point: plain diffusion training on ZeRO-2, which on a CPU
        # takes about half the time ZeRO-3's gathers take for a model this small.
        self.console.run(self.launch("zero2.json") + [f"--output_dir={out / 'sft'}",
                                                      f"--model.pretrained_path={self.data / 'model'}",
                                                      "--loss.type=sft", f"--train.max_steps={steps}", "--optim.lr=1e-3",
                                                      "--optim.warmup_steps=20", f"--checkpoint.every_steps={steps}"],
                         self.env, out / "logs" / "sft.log", bar="train")
        shutil.rmtree(self.reference, ignore_errors=True)
        shutil.copytree(out / "sft" / "export" / "unet", self.reference / "unet")
        shutil.copytree(self.data / "model" / "scheduler", self.reference / "scheduler")

    def num_draws(self) -> int:
        """Enough cached draws that no pair is trained twice on one draw."""
        return -(-self.args.dpo_steps * MICRO_BATCH * self.nproc // NUM_PAIRS)

    def cache(self, seed: int) -> Path:
        """The reference cache of run seed `seed`, computed on first use. The precompute gets only
        what a cache depends on (tools/precompute_ref.py --help lists it)."""
        cache = self.out / f"cache_seed{seed}"
        if not (cache / "manifest.json").is_file():
            self.console.run([sys.executable, str(REPO / "tools" / "precompute_ref.py"), "--config",
                              str(self.out / "base.yaml"), "--num-draws", str(self.num_draws()), "--batch-size", "128",
                              f"--seed={seed}", f"--model.pretrained_path={self.reference}",
                              f"--reference.cache_dir={cache}"],
                             {**self.env, "MASTER_PORT": str(_free_port())},
                             self.out / "logs" / f"precompute_seed{seed}.log", bar="reference (rank 0)")
        return cache

    def train_dpo(self, run_dir: Path, seed: int, overrides: list[str], checkpoint_every: int, *,
                  max_steps: int | None = None, live: bool = False) -> Path:
        """Diffusion-DPO from the reference, with the cache of `seed` or (`live`) the reference model
        itself; the run's log."""
        a = self.args
        reference = ["--reference.mode=live"] if live else ["--reference.mode=cache",
                                                             f"--reference.cache_dir={self.cache(seed)}"]
        log = self.out / "logs" / f"{run_dir.name}.log"
        self.console.run(self.launch() + [f"--output_dir={run_dir}", f"--seed={seed}",
                                        f"--model.pretrained_path={self.reference}", *reference,
                                        f"--train.max_steps={max_steps or a.dpo_steps}", f"--dpo.beta={a.beta}",
                                        f"--optim.lr={a.lr}", f"--checkpoint.every_steps={checkpoint_every}",
                                        *overrides],
                         self.env, log, bar="train")
        return log

    def sample(self, unets: list, desc: str) -> list:
        """Each model's DDIM samples from the same initial noise, under one progress bar."""
        a = self.args
        per_model = toy_world.NUM_SAMPLING_STEPS * -(-a.num_samples // toy_world.SAMPLING_BATCH)
        with self.console.progress(per_model * len(unets), desc, "step") as bar:
            return [toy_world.generate(unet, num_samples=a.num_samples, progress=bar) for unet in unets]


def _rate(world, samples, prefer: str) -> float:
    return world.is_preferred(samples, prefer).float().mean().item()


def _diversity(world, samples, prefer: str) -> float:
    """Mean pairwise RMS distance between the samples of the preferred mode (toy_world.diversity)."""
    return toy_world.diversity(samples, world.is_preferred(samples, prefer))


def _data_diversity(world, prefer: str, num_samples: int) -> float:
    return _diversity(world, world.data_samples(num_samples, prefer), prefer)


def _world_name(args) -> str:
    name = {"toy": "toy world", "detail": "detail world"}[args.world]
    return name if args.agreement == 1 else f"{name}, {args.agreement:.0%} of labels agreeing"


def summarise(world, pol_samples, ref_samples, prefer: str, curves: dict, log: Path) -> dict:
    """A DPO run's effect on the sampled preferred-mode rate (paired bootstrap over samples), the
    fraction of its samples near a mode, their diversity within the preferred mode, its last training
    values and whether it warned on gap_w and on the manifold."""
    diff, lo, hi = toy_world.bootstrap_difference(world.is_preferred(pol_samples, prefer),
                                                  world.is_preferred(ref_samples, prefer))
    text = log.read_text()
    return {"difference": diff, "ci95": [lo, hi], "rate": _rate(world, pol_samples, prefer),
            "on_manifold": world.on_manifold(pol_samples).float().mean().item(),
            "diversity": _diversity(world, pol_samples, prefer),
            "final": {k: curves[k][-1][1] for k in DPO_SCALARS}, "gap_w_warning": GAP_W_WARNING in text,
            "manifold_warning": MANIFOLD_WARNING in text}


def _interval_over_seeds(values: list[float]) -> tuple[float, float, float]:
    import statistics

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def compare_objectives(demo: Demo, names: list[str], seeds: list[int], ref_samples, report: Path,
                       done: dict[tuple[str, int], dict]) -> dict:
    """Train each objective once per seed from the same reference; its effect on the sampled rate.
    `done`: summaries of runs already made with these settings, by (objective, seed): not trained again."""
    from diffusers import UNet2DConditionModel

    a = demo.args
    world = demo.world
    ref_pref = world.is_preferred(ref_samples, a.prefer)
    rows = {}
    for name in names:
        what, overrides = OBJECTIVES[name]
        runs = []
        for seed in seeds:
            run = done.get((name, seed))
            if run is None:
                run_dir = demo.out / "objectives" / f"{name}_seed{seed}"
                log = demo.train_dpo(run_dir, seed, overrides, checkpoint_every=a.dpo_steps)
                pol = demo.sample([UNet2DConditionModel.from_pretrained(str(run_dir / "export" / "unet")).eval()],
                                  "sampling")[0]
                run = summarise(world, pol, ref_samples, a.prefer, _scalars(run_dir / "tensorboard"), log)
            runs.append({"seed": seed, **run})
            lo, hi = run["ci95"]
            demo.console.say(f"{Console.INDENT}objective {name} seed {seed}: {run['difference']:+.3f} "
                             f"[{lo:+.3f}, {hi:+.3f}]")
        mean, lo, hi = _interval_over_seeds([r["difference"] for r in runs])
        rows[name] = {"what": what, "overrides": overrides, "mean_difference": mean, "ci95_over_seeds": [lo, hi],
                      "runs": runs}
    data_div = _data_diversity(world, a.prefer, a.num_samples)
    table = {"world": a.world, "agreement": a.agreement, "prefer": a.prefer, "seeds": seeds,
             "dpo_steps": a.dpo_steps, "beta": a.beta, "lr": a.lr, "num_samples": a.num_samples,
             "reference_rate": ref_pref.float().mean().item(),
             "reference_on_manifold": world.on_manifold(ref_samples).float().mean().item(),
             "reference_diversity": _diversity(world, ref_samples, a.prefer), "data_diversity": data_div,
             "objectives": rows}
    (report / "objectives.json").write_text(json.dumps(table, indent=2))
    lines = [f"# Objectives compared: {_world_name(a)}, rate of the preferred mode {a.prefer}, policy minus "
             "reference\n",
             f"{a.dpo_steps} DPO steps from the same reference (its rate {table['reference_rate']:.3f}, "
             f"{table['reference_on_manifold']:.1%} on the manifold, diversity {table['reference_diversity']:.3f}; "
             f"the data's diversity {data_div:.3f}), beta = {a.beta}, lr = {a.lr}, seeds "
             f"{', '.join(map(str, seeds))} (the run seed: data order and draws); {a.num_samples} samples per model "
             "from the same initial noise. Interval: 95% Student t over the seeds; per seed, the paired bootstrap "
             "95% interval. Diversity: mean pairwise RMS distance between the samples of the preferred mode. "
             "Loss, implicit accuracy and gap_w are the last logged training values, averaged over seeds; the "
             "warnings count the seeds that raised them.\n",
             "| objective | overrides | mean difference [95% over seeds] | per seed [bootstrap 95%] | policy rate | "
             "diversity | policy on manifold | train/loss | implicit acc | gap_w | gap_w warning | manifold warning |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        runs = row["runs"]
        avg = {k: sum(r["final"][k] for r in runs) / len(runs) for k in DPO_SCALARS}
        per_seed = "; ".join(f"{r['difference']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]" for r in runs)
        lo, hi = row["ci95_over_seeds"]
        interval = f"[{lo:+.3f}, {hi:+.3f}]" if len(runs) > 1 else "(one seed)"
        lines.append(f"| {name} ({row['what']}) | {' '.join(row['overrides']) or 'none'} | "
                     f"{row['mean_difference']:+.3f} {interval} | {per_seed} | "
                     f"{sum(r['rate'] for r in runs) / len(runs):.3f} | "
                     f"{sum(r['diversity'] for r in runs) / len(runs):.3f} | "
                     f"{sum(r['on_manifold'] for r in runs) / len(runs):.1%} | {avg['train/loss']:.4f} | "
                     f"{avg['train/implicit_acc']:.3f} | {avg['train/gap_w']:+.2e} | "
                     f"{sum(r['gap_w_warning'] for r in runs)}/{len(runs)} | "
                     f"{sum(r['manifold_warning'] for r in runs)}/{len(runs)} |")
    (report / "objectives.md").write_text("\n".join(lines) + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--nproc", type=int, default=2, help="processes (GPUs if present, else CPU processes)")
    p.add_argument("--prefer", default="A", choices=("A", "B"), help="the mode the pairs prefer")
    p.add_argument("--world", default="toy", choices=list(WORLDS),
                   help="toy: two whole-image modes (tools/toy_world.py); detail: a small local feature decides "
                        "(tools/detail_world.py)")
    p.add_argument("--agreement", type=float, default=1.0,
                   help="share of pairs whose label agrees with the oracle; the rest are flipped (noisy labels)")
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--dpo-steps", type=int, default=150)
    p.add_argument("--checkpoint-every", type=int, default=50, help="DPO checkpoints, each evaluated for the curve")
    p.add_argument("--beta", type=float, default=500.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--objective", default="dpo+sft", choices=list(OBJECTIVES),
                   help="the headline run's objective (the one that moved samples furthest in the comparison)")
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="run seed: data order and every pair's draws")
    p.add_argument("--reference", help="a reference folder from an earlier demo run (skips the SFT step)")
    p.add_argument("--objectives", default="",
                   help=f"also compare these objectives (comma-separated, or 'all': {', '.join(OBJECTIVES)})")
    p.add_argument("--seeds", default="0,1,2", help="run seeds of the comparison (comma-separated)")
    p.add_argument("--live-steps", type=int, default=LIVE_STEPS,
                   help="rerun the first N policy steps with the live, CPU-offloaded reference and compare their "
                        "train/loss with the cached reference's (0: skip)")
    p.add_argument("overrides", nargs="*", help="extra --section.key=value for the DPO run, e.g. --loss.loser_weight=0")
    args, extra = p.parse_known_args(argv)
    overrides = OBJECTIVES[args.objective][1] + args.overrides + extra
    names = list(OBJECTIVES) if args.objectives == "all" else [n for n in args.objectives.split(",") if n]
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        p.error(f"unknown objective(s) {', '.join(unknown)}; known: {', '.join(OBJECTIVES)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    out = Path(args.output_dir).resolve()
    for sub in ("sft", "dpo", "live", "report", "objectives", "logs"):
        shutil.rmtree(out / sub, ignore_errors=True)  # a demo starts fresh; real runs resume instead
    for old in out.glob("cache*"):
        shutil.rmtree(old, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    num_stages = 5 + (args.live_steps > 0) + bool(names)  # data, reference, cache, policy, (live,) evaluation
    console = Console(out / "logs", num_stages)
    try:
        return _stages(args, overrides, names, seeds, console)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        console.say(f"demo: interrupted; the logs so far are in {_shown(out / 'logs')}/")
        return 130
    except BaseException as e:
        import traceback

        traceback.print_exc()  # into logs/demo.log
        console.fail(f"{type(e).__name__}: {e}", out / "logs" / "demo.log")


def _stages(args, overrides: list[str], names: list[str], seeds: list[int], console: Console) -> int:
    from diffusers import UNet2DConditionModel

    t_start = time.time()
    demo = Demo(args, overrides, console)
    out = demo.out
    console.say(f"dpo_ds demo: does Diffusion-DPO move samples toward the preferred mode {args.prefer}? "
                f"{demo.nproc} processes, ZeRO-3. Logs: {_shown(out / 'logs')}/")

    console.stage(f"data: the {_world_name(args)}'s preference pairs ({'feature' if args.world == 'detail' else 'mode'}"
                  " A against B)")
    console.result(demo.write_data())

    if not args.reference:
        console.stage(f"reference: {args.sft_steps} steps of plain diffusion training on both modes "
                      "(loss.type=sft, ZeRO-2)")
        demo.train_reference()
    else:
        console.stage(f"reference: {_shown(demo.reference)} (from an earlier run)")
    ref_unet = UNet2DConditionModel.from_pretrained(str(demo.reference / "unet")).eval()
    ref_samples = demo.sample([ref_unet], "sampling")[0]
    world = demo.world
    ref_rate = _rate(world, ref_samples, args.prefer)
    ref_near = world.on_manifold(ref_samples).float().mean().item()
    console.result(f"reference samples mode {args.prefer} at rate {ref_rate:.3f} ({ref_near:.0%} of its "
                   f"{args.num_samples} samples near a mode)")

    draws = f"{demo.num_draws()} draw{'s' if demo.num_draws() > 1 else ''}"
    console.stage(f"cache: the reference's errors for every pair, {draws} (tools/precompute_ref.py)")
    cache = demo.cache(args.seed)
    size_mb = sum(f.stat().st_size for f in cache.iterdir()) / 1e6
    console.result(f"{NUM_PAIRS} pairs x {draws}, {size_mb:.1f} MB in {_shown(cache)}")

    console.stage(f"policy: {args.dpo_steps} steps of {args.objective} ({OBJECTIVES[args.objective][0]}) from the "
                  "reference, reference.mode=cache")
    log = demo.train_dpo(out / "dpo", args.seed, overrides, args.checkpoint_every)
    curves = _scalars(out / "dpo" / "tensorboard")
    loss = curves["train/loss"]
    console.result(f"train/loss {loss[0][1]:.4f} -> {loss[-1][1]:.4f}, implicit accuracy "
                   f"{curves['train/implicit_acc'][-1][1]:.3f}, gap_w {curves['train/gap_w'][-1][1]:+.2e}"
                   + ("; WARNING: gap_w stayed above zero (see the log)" if GAP_W_WARNING in log.read_text() else "")
                   + ("; WARNING: samples may be leaving the data (see the log)" if MANIFOLD_WARNING in log.read_text()
                      else ""))

    live_check = None
    if args.live_steps > 0:
        n = min(args.live_steps, args.dpo_steps)
        console.stage(f"live reference: policy steps 1-{n} again, from the reference model itself "
                      "(ZeRO-3, offloaded to CPU)")
        demo.train_dpo(out / "live", args.seed, overrides + ["--checkpoint.export=false"], checkpoint_every=n,
                       max_steps=n, live=True)
        live = _scalars(out / "live" / "tensorboard")["train/loss"]
        cached = dict(loss)
        rel = [abs(v - cached[step]) / abs(cached[step]) for step, v in live]
        live_check = {"steps": n, "max_rel_diff_train_loss": max(rel)}
        console.result(f"train/loss at steps 1-{n}, live vs cached reference: largest relative difference "
                       f"{max(rel):.1e}")

    console.stage(f"evaluation: {args.num_samples} DDIM samples of each policy checkpoint, scored by the oracle")
    from dpo_ds.engine import consolidated_state_dict

    report = out / "report"
    report.mkdir()
    # The last step's checkpoint holds the exported weights: the export's samples stand for it.
    steps = [int(tag.name.split("_")[1]) for tag in sorted((out / "dpo" / "checkpoints").glob("step_*"))]
    steps = [step for step in steps if step != args.dpo_steps]
    unets = []
    for step in steps:
        unet = UNet2DConditionModel.from_config(ref_unet.config)
        unet.load_state_dict(consolidated_state_dict(str(out / "dpo" / "checkpoints"), f"step_{step:08d}"))
        unets.append(unet.eval())
    unets.append(UNet2DConditionModel.from_pretrained(str(out / "dpo" / "export" / "unet")).eval())
    *ckpt_samples, pol_samples = demo.sample(unets, "sampling")
    rate_curve = [(0, ref_rate, ref_rate)] + [(step, _rate(world, x, args.prefer), ref_rate)
                                              for step, x in zip(steps + [args.dpo_steps], [*ckpt_samples, pol_samples])]
    summary = summarise(world, pol_samples, ref_samples, args.prefer, curves, log)
    diff, (lo, hi), last = summary["difference"], summary["ci95"], summary["final"]
    on_manifold = {"reference": ref_near, "policy": summary["on_manifold"]}
    result = {"prefer": args.prefer, "reference_rate": ref_rate, "policy_rate": ref_rate + diff,
              "difference": diff, "ci95": [lo, hi], "on_manifold": on_manifold, "num_samples": args.num_samples,
              "dpo_steps": args.dpo_steps,
              "beta": args.beta, "lr": args.lr, "seed": args.seed, "objective": args.objective,
              "overrides": overrides, "final": last, "live_check": live_check,
              "world": args.world, "agreement": args.agreement,
              "diversity": {"reference": _diversity(world, ref_samples, args.prefer), "policy": summary["diversity"],
                            "data": _data_diversity(world, args.prefer, args.num_samples)},
              "gap_w_warning": summary["gap_w_warning"], "manifold_warning": summary["manifold_warning"],
              "rate_curve": rate_curve}
    _plots(report, curves, result, rate_curve)
    _sample_grid(report / "samples.png", world, ref_samples, pol_samples, args.prefer)
    console.result(f"policy samples mode {args.prefer} at rate {ref_rate + diff:.3f} ({summary['on_manifold']:.0%} "
                   f"near a mode)")
    objectives = ""
    if names:
        console.stage(f"objectives: {len(names)} objective(s) x {len(seeds)} seed(s), {args.dpo_steps} steps each, "
                      "from the same reference")
        # The headline run is the comparison's run of its objective and seed unless extra overrides
        # changed it (its checkpoints are more frequent; checkpoints do not change training).
        done = {(args.objective, args.seed): summary} if overrides == OBJECTIVES[args.objective][1] else {}
        compare_objectives(demo, names, seeds, ref_samples, report, done)
        objectives = (report / "objectives.md").read_text().replace("# Objectives compared", "## Objectives compared")
        console.result(f"table: {report / 'objectives.md'}")
    result["seconds"] = round(time.time() - t_start, 1)
    (report / "report.json").write_text(json.dumps(result, indent=2))
    live_line = ("" if live_check is None else
                 f"Live reference (ZeRO-3, offloaded to CPU) against the cache, train/loss over the first "
                 f"{live_check['steps']} steps: max relative difference {live_check['max_rel_diff_train_loss']:.1e}.\n\n")
    div = result["diversity"]
    (report / "report.md").write_text(
        f"# dpo_ds demo: {_world_name(args)}, mode {args.prefer} preferred\n\n"
        f"| | rate of mode {args.prefer} | diversity within mode {args.prefer} |\n|---|---|---|\n"
        f"| reference (SFT on both modes) | {ref_rate:.3f} | {div['reference']:.3f} |\n"
        f"| policy after {args.dpo_steps} DPO steps | {ref_rate + diff:.3f} | {div['policy']:.3f} |\n"
        f"| difference (bootstrap 95% interval) | {diff:+.3f} [{lo:+.3f}, {hi:+.3f}] | |\n"
        f"| the data | | {div['data']:.3f} |\n\n"
        "Diversity: the mean pairwise RMS distance between the samples of the preferred mode; a policy that "
        "gained the rate by collapsing onto one point of the mode reads near zero.\n\n"
        f"{args.num_samples} DDIM samples each, same initial noise; a sample counts for its mode only when it "
        f"lies near it (RMS distance below {toy_world.ON_MANIFOLD_RMS}): {on_manifold['reference']:.1%} of the "
        f"reference's samples do, {on_manifold['policy']:.1%} of the policy's. beta = {args.beta}, lr = {args.lr}, "
        f"seed {args.seed}, objective {args.objective}: {OBJECTIVES[args.objective][0]} "
        f"(overrides: {' '.join(overrides) or 'none'}).\n\n"
        f"Final train/loss {last['train/loss']:.4f}, implicit accuracy {last['train/implicit_acc']:.3f}, "
        f"gap_w {last['train/gap_w']:+.2e}, gap_l {last['train/gap_l']:+.2e}; gap_w warning: "
        f"{'yes' if result['gap_w_warning'] else 'no'}; manifold warning: "
        f"{'yes' if result['manifold_warning'] else 'no'}.\n\n" + live_line +
        "![rates](rates.png)\n\n![curves](curves.png)\n\n![samples](samples.png)\n\n" + objectives)
    rel = _shown
    console.say(f"\ndemo: done in {_duration(result['seconds'])}. Preferred mode {args.prefer}: reference "
                f"{ref_rate:.3f} -> policy {ref_rate + diff:.3f} ({diff:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}]).")
    console.say(f"  the report       {rel(report / 'report.md')}")
    console.say(f"  the pictures     {rel(report / 'rates.png')}, curves.png, samples.png (same folder)")
    console.say(f"  the curves       tensorboard --logdir {rel(out / 'dpo' / 'tensorboard')}")
    console.say(f"  the logs         {rel(out / 'logs')}/")
    console.say("  your own data    README.md, section \"Running a real job\" (and \"From raw preference data "
                "to shards\")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
