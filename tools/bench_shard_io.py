"""Benchmark: listing the keys of one shard from its tar headers (dpo_ds.data.shard_keys) vs through
webdataset's tar iterator, which is why the key listing keeps its own tarfile code (docs/design.md §4).

Writes one shard of --pairs SDXL-size pairs (ShardWriter, i.e. webdataset's TarWriter): latents_w and
latents_l [4, H/8, W/8], prompt_embeds [77, 2048], pooled_prompt_embeds [1280], time_ids_w/_l [6],
all float16. Then times, --repeats times each (median), every way of getting the shard's keys:
  header_seek      shard_keys(path): tarfile "r:*" reads each header and seeks over the payloads
  wds_iterator     webdataset.tariterators.tar_file_iterator over gopen(path): reads every payload
  wds_names_only   the same iterator with select_files refusing every member (its names collected
                   by the predicate): no payload is copied, but the stream still reads every byte
  pipe_cat         shard_keys("pipe:cat path"): a pipe: URL, which cannot seek, streams every byte
each with the shard's pages in the page cache ("warm") and dropped from it before every run with
posix_fadvise(DONTNEED) on the shard alone ("cold"; no root needed, nothing else is evicted), and the
megabytes read through read() calls for it (/proc/self/io rchar, which also counts reaped children:
pipe_cat's are cat's reads of the file plus this process's of the pipe). Prints one JSON line:
  {"shard_bytes", "pairs", "write_s", "warm": {way: s}, "cold": {way: s}, "read_mb": {way: MB}, ...}

  python tools/bench_shard_io.py [--out DIR] [--pairs 1000] [--resolution 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from webdataset.gopen import gopen  # noqa: E402
from webdataset.tariterators import base_plus_ext, tar_file_iterator  # noqa: E402

from dpo_ds.data import ShardWriter, shard_keys  # noqa: E402


def write_shard(out: str, num_pairs: int, resolution: int) -> str:
    """One shard of num_pairs SDXL-size pairs in out; returns its path."""
    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    with ShardWriter(out, prefix="bench", max_pairs=num_pairs) as writer:
        for i in range(num_pairs):
            tensors = {"latents_w": torch.randn(4, side, side, generator=g).half(),
                       "latents_l": torch.randn(4, side, side, generator=g).half(),
                       "prompt_embeds": torch.randn(77, 2048, generator=g).half(),
                       "pooled_prompt_embeds": torch.randn(1280, generator=g).half(),
                       "time_ids_w": torch.tensor([resolution, resolution, 0, 0, resolution, resolution]).half(),
                       "time_ids_l": torch.tensor([resolution, resolution, 0, 0, resolution, resolution]).half()}
            meta = {"caption": f"caption {i}", "family": "sdxl", "latent_layout": "CHW", "scaling_factor": 0.13025,
                    "shift_factor": None, "label": 1.0, "source": {"row": i}}
            writer.write(f"pair{i:06d}", meta, tensors)
    return os.path.join(out, "bench-000000.tar")


def keys_wds_iterator(path: str) -> list[str]:
    with gopen(path, "rb") as stream:
        return list(dict.fromkeys(base_plus_ext(m["fname"])[0] for m in tar_file_iterator(stream)))


def keys_wds_names_only(path: str) -> list[str]:
    names: list[str] = []
    with gopen(path, "rb") as stream:
        for _ in tar_file_iterator(stream, select_files=lambda name: names.append(name) and False):
            pass
    return list(dict.fromkeys(base_plus_ext(name)[0] for name in names))


def drop_from_page_cache(path: str) -> None:
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def bytes_read() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for the shard (default: a temporary folder, removed after)")
    p.add_argument("--pairs", type=int, default=1000)
    p.add_argument("--resolution", type=int, default=1024, help="image side; the latents are side/8")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or scratch
        start = time.perf_counter()
        path = write_shard(out, args.pairs, args.resolution)
        write_s = time.perf_counter() - start
        os.sync()  # written back, so that DONTNEED can drop the pages
        ways = {"header_seek": lambda: shard_keys(path), "wds_iterator": lambda: keys_wds_iterator(path),
                "wds_names_only": lambda: keys_wds_names_only(path), "pipe_cat": lambda: shard_keys(f"pipe:cat {path}")}
        result = {"shard_bytes": os.path.getsize(path), "pairs": args.pairs, "resolution": args.resolution,
                  "write_s": round(write_s, 3), "repeats": args.repeats}
        result["read_mb"] = {}
        for way, list_keys in ways.items():
            start = bytes_read()
            list_keys()
            result["read_mb"][way] = round((bytes_read() - start) / 1e6, 1)
        for cache in ("warm", "cold"):
            times = {}
            for way, list_keys in ways.items():
                runs = []
                for _ in range(args.repeats):
                    if cache == "cold":
                        drop_from_page_cache(path)
                    start = time.perf_counter()
                    keys = list_keys()
                    runs.append(time.perf_counter() - start)
                    assert len(keys) == args.pairs, (way, len(keys))
                times[way] = round(statistics.median(runs), 4)
            result[cache] = times
        result.update(cpus=os.cpu_count(), python=platform.python_version())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
