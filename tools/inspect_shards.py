"""Validate shards against the shard format (docs/design.md §4) and summarise what they hold.

    python tools/inspect_shards.py SHARDS [SHARDS ...] [--json] [--max-problems N]

SHARDS: .tar paths, brace patterns, globs or folders, as data.shards takes them.
Checks every sample: both members present and nothing else, decodable json and safetensors,
latents float16/bfloat16 with the rank of their latent_layout, every float finite, the json's
fields (caption, family, latent_layout, scaling_factor, label 1.0: ties are never stored),
each tensor's shape the same as in most pairs (with shape buckets, shards whose index.json records
several latent shapes, each pair's latents as its shard's record says, and the other tensors as in most
pairs), keys unique within each shard (a repeat is a bad
pair; the reader keeps the first) and across all shards, and index.json's pair counts. Prints a table (pairs, shapes, dtypes, per-channel latent mean/std, caption
length); --json prints one object instead:
  {"is_valid", "num_shards", "num_pairs", "num_bad_pairs", "num_bytes", "problems": [{"shard", "key", "reason"}],
   "shapes": {name: [shape]}, "dtypes": {name: dtype}, "families", "latent_layouts", "scaling_factors",
   "latent_channel_mean", "latent_channel_std", "caption_chars": {"min", "mean", "max"}}
Exit status: 0 when every shard is valid, 1 when anything is invalid, 2 when no shards are found.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import torch

from dpo_ds.data import LATENT_NAMES, SHARD_ERRORS, BadSample, decode_sample, list_shards, tar_samples

LAYOUT_RANKS = {"CHW": 3, "CFHW": 4}
META_FIELDS = {"caption": str, "family": str, "latent_layout": str, "scaling_factor": (int, float),
               "label": (int, float)}


def _check_meta(meta: dict, tensors: dict[str, torch.Tensor]) -> str | None:
    for field, kinds in META_FIELDS.items():
        if not isinstance(meta.get(field), kinds) or isinstance(meta.get(field), bool):
            return f"json field {field!r} is {meta.get(field)!r}, expected {getattr(kinds, '__name__', 'a number')}"
    if meta["label"] != 1.0:
        return f"label {meta['label']}: pairs are stored winner first with label 1.0, and ties are dropped"
    if "shift_factor" in meta and not (meta["shift_factor"] is None or isinstance(meta["shift_factor"], (int, float))):
        return f"json field 'shift_factor' is {meta['shift_factor']!r}, expected a number or null"
    rank = LAYOUT_RANKS.get(meta["latent_layout"])
    if rank is None:
        return f"latent_layout {meta['latent_layout']!r} is not one of {sorted(LAYOUT_RANKS)}"
    if tensors["latents_w"].ndim != rank:
        return f"latents have shape {tuple(tensors['latents_w'].shape)}, not {meta['latent_layout']}"
    return None


class Report:
    """Everything learnt from one pass over the shards."""

    def __init__(self, max_problems: int):
        self.max_problems = max_problems
        self.problems: list[dict] = []
        self.num_problems = self.num_pairs = self.num_bad_pairs = self.num_bytes = 0
        self.first_shard_of: dict[str, str] = {}
        self.signatures: dict[tuple, list[tuple[str, str]]] = collections.defaultdict(list)  # shapes -> (shard, key)
        self.recorded: dict[str, tuple[int, ...] | None] = {}  # each shard's latent shape in index.json
        self.latent_shapes: collections.Counter = collections.Counter()
        self.dtypes: dict[str, set[str]] = collections.defaultdict(set)
        self.families: collections.Counter = collections.Counter()
        self.layouts: collections.Counter = collections.Counter()
        self.scaling_factors: collections.Counter = collections.Counter()
        self.caption_chars: list[int] = []
        self.channel_sums: torch.Tensor | None = None  # [C x 3]: count, sum, sum of squares (float64)

    def problem(self, shard: str, key: str | None, reason: str) -> None:
        self.num_problems += 1
        if len(self.problems) < self.max_problems:
            self.problems.append({"shard": shard, "key": key, "reason": reason})

    def add(self, shard: str, key: str, members: dict[str, bytes]) -> None:
        self.num_pairs += 1
        # A repeat inside this shard comes as a RepeatedKey, which decode_sample raises below.
        if self.first_shard_of.get(key, shard) != shard:
            self.problem(shard, key, f"duplicate key: also in {self.first_shard_of[key]}")
            self.num_bad_pairs += 1
            return
        self.first_shard_of.setdefault(key, shard)
        try:
            sample = decode_sample(key, members, schema=None)
        except BadSample as e:
            self.problem(shard, key, str(e))
            self.num_bad_pairs += 1
            return
        meta, tensors = sample["meta"], sample["tensors"]
        reason = _check_meta(meta, tensors)
        if reason is not None:
            self.problem(shard, key, reason)
            self.num_bad_pairs += 1
            return
        self.signatures[tuple(sorted((n, tuple(t.shape)) for n, t in tensors.items()))].append((shard, key))
        self.latent_shapes[str(list(tensors["latents_w"].shape))] += 1
        for name, tensor in tensors.items():
            self.dtypes[name].add(str(tensor.dtype).replace("torch.", ""))
        self.families[meta["family"]] += 1
        self.layouts[meta["latent_layout"]] += 1
        self.scaling_factors[meta["scaling_factor"]] += 1
        self.caption_chars.append(len(meta["caption"]))
        # Channels are dim 0 of both layouts; w and l both count.
        latents = torch.stack([tensors[n] for n in LATENT_NAMES], 1).double().flatten(1)
        sums = torch.stack([torch.full((latents.shape[0],), latents.shape[1], dtype=torch.float64),
                            latents.sum(1), latents.square().sum(1)], 1)
        if self.channel_sums is None:
            self.channel_sums = sums
        elif self.channel_sums.shape == sums.shape:  # a different channel count is flagged by the shape check
            self.channel_sums += sums

    def _check_buckets(self) -> None:
        """Shape buckets (docs/design.md §6): a pair's latents have its shard's recorded shape (shards that
        record none agree among themselves, as most of them do), and every other tensor is as in most pairs."""
        def others(signature: tuple) -> tuple:
            return tuple((n, s) for n, s in signature if n not in LATENT_NAMES)
        counts = collections.Counter()
        for signature, where in self.signatures.items():
            counts[others(signature)] += len(where)
        majority = max(counts, key=counts.get)
        unrecorded = collections.Counter()
        for signature, where in self.signatures.items():
            unrecorded[signature] += sum(self.recorded.get(shard) is None for shard, _ in where)
        usual = max(unrecorded, key=unrecorded.get)  # the shape of most pairs of shards that record none
        for signature, where in self.signatures.items():
            got = dict(signature)
            for shard, key in where:
                recorded = self.recorded.get(shard)
                if others(signature) != majority:
                    expected = dict(majority)
                    reason = "; ".join(f"{n} is {got.get(n)} where most pairs have {expected.get(n)}"
                                       for n in sorted(set(expected) | set(others(signature)))
                                       if expected.get(n) != got.get(n))
                elif recorded is not None and any(got[n] != recorded for n in LATENT_NAMES):
                    reason = f"latents_w is {got['latents_w']}; index.json records {recorded} for this shard"
                elif recorded is None and signature != usual:
                    reason = (f"latents_w is {got['latents_w']} where most pairs of shards that record no shape "
                              f"have {dict(usual)['latents_w']}")
                else:
                    continue
                self.problem(shard, key, f"wrong shape: {reason}")
                self.num_bad_pairs += 1

    def finish(self, shard_counts: list[tuple[str, int, int]]) -> dict:
        """Flag pairs whose shapes differ from most pairs' and index.json counts that disagree."""
        majority = max(self.signatures, key=lambda s: len(self.signatures[s]), default=())
        if len({s for s in self.recorded.values() if s is not None}) > 1:
            self._check_buckets()
        else:  # one shape: every tensor as in most pairs
            for signature, where in self.signatures.items():
                if signature == majority:
                    continue
                expected, got = dict(majority), dict(signature)
                diff = "; ".join(f"{n} is {got.get(n)} where most pairs have {expected.get(n)}"
                                 for n in sorted(set(expected) | set(got)) if expected.get(n) != got.get(n))
                for shard, key in where:
                    self.problem(shard, key, f"wrong shape: {diff}")
                    self.num_bad_pairs += 1
        for url, num_listed, num_read in shard_counts:
            if num_listed != num_read:
                self.problem(url, None, f"index.json lists {num_listed} pairs, the shard holds {num_read}")
        sums = self.channel_sums
        mean = (sums[:, 1] / sums[:, 0]) if sums is not None else torch.zeros(0, dtype=torch.float64)
        std = ((sums[:, 2] / sums[:, 0] - mean.square()).clamp_min(0).sqrt()) if sums is not None else mean
        chars = self.caption_chars
        return {
            "is_valid": self.num_problems == 0, "num_shards": len(shard_counts), "num_pairs": self.num_pairs,
            "num_bad_pairs": self.num_bad_pairs, "num_problems": self.num_problems, "num_bytes": self.num_bytes,
            "problems": self.problems, "shapes": {n: list(s) for n, s in majority},
            "latent_shapes": dict(self.latent_shapes),
            "dtypes": {n: sorted(d) for n, d in sorted(self.dtypes.items())},
            "families": dict(self.families), "latent_layouts": dict(self.layouts),
            "scaling_factors": {str(k): v for k, v in self.scaling_factors.items()},
            "latent_channel_mean": [round(x, 6) for x in mean.tolist()],
            "latent_channel_std": [round(x, 6) for x in std.tolist()],
            "caption_chars": {"min": min(chars), "mean": round(sum(chars) / len(chars), 2), "max": max(chars)}
            if chars else None,
        }


def inspect(spec: list[str], max_problems: int = 100) -> dict:
    """One pass over every sample of the shards; the summary dict that --json prints."""
    report = Report(max_problems)
    shard_counts = []
    for shard in list_shards(spec):
        report.recorded[shard.url] = shard.shape
        num_read = 0
        try:
            for key, members in tar_samples(shard.url):
                num_read += 1
                report.add(shard.url, key, members)
        except SHARD_ERRORS as e:
            report.problem(shard.url, None, f"tar unreadable after {num_read} pairs: {type(e).__name__}: {e}")
        report.num_bytes += max(shard.size_bytes, 0)
        shard_counts.append((shard.url, shard.num_pairs, num_read))
    return report.finish(shard_counts)


def print_table(summary: dict) -> None:
    rows = [("shards", summary["num_shards"]), ("pairs", summary["num_pairs"]),
            ("bad pairs", summary["num_bad_pairs"]), ("bytes", summary["num_bytes"]),
            ("families", summary["families"]), ("latent layouts", summary["latent_layouts"]),
            ("scaling factors", summary["scaling_factors"]), ("caption chars", summary["caption_chars"])]
    rows += [("tensors", "shape in most pairs, dtype")]
    rows += [(f"  {name}", f"{shape}  {'/'.join(summary['dtypes'].get(name, []))}")
             for name, shape in summary["shapes"].items()]
    rows += [(f"latent channel {c}", f"mean {m:+.4f}  std {s:.4f}")
             for c, (m, s) in enumerate(zip(summary["latent_channel_mean"], summary["latent_channel_std"]))]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    for p in summary["problems"]:
        print(f"INVALID {p['shard']}" + (f" {p['key']}" if p["key"] else "") + f": {p['reason']}")
    if summary["num_problems"] > len(summary["problems"]):
        print(f"... and {summary['num_problems'] - len(summary['problems'])} more problems")
    print("valid" if summary["is_valid"] else f"INVALID: {summary['num_problems']} problem(s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", nargs="+", help="shard paths, patterns or folders")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--max-problems", type=int, default=100, help="problems listed (all are counted)")
    args = p.parse_args(argv)
    try:
        summary = inspect(args.shards, args.max_problems)
    except ValueError as e:
        print(f"inspect_shards: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print_table(summary)
    return 0 if summary["is_valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
