"""Encode raw preference pairs (prompt, two images or two videos, labels) into latent shards, once, offline.

Reads Parquet / JSONL / CSV manifests in the Pick-a-Pic layout (caption, jpg_0/jpg_1 as bytes or
paths, label_0/label_1 with ties as 0.5; for videos video_0/video_1). Writes (docs/design.md §4):

  OUT/PREFIX-CCCCCC-NNNNNN.tar, OUT/index.json   the pairs of manifest chunk C, shard N of it
  VAL_OUT/... the same layout              pairs whose key hash is below --val-fraction
  OUT/.encode/chunk-CCCCCC.json           a finished chunk: its shards and counts (resume skips it)
  OUT/.encode/summary.json                totals over every finished chunk
  OUT/empty_prompt.safetensors            (and in VAL_OUT) the family's conditioning of the prompt "" in
                                          --store-dtype, for data.empty_prompt_prob

One sample per pair, winner first (--family sdxl or sd15, latent_layout "CHW"):
  KEY.json         {caption, family, latent_layout, scaling_factor, shift_factor, label: 1.0,
                    source: {manifest, row, winner, labels, crop, crop_seeds, original_sizes[, id]}}
  KEY.safetensors  latents_w, latents_l [4, R/8, R/8] and the family's conditioning (its sample schema,
                   docs/design.md §9) in --store-dtype; what an image's size and crop decide in float32
With --family wan, one sample per pair of videos (latent_layout "CFHW"):
  KEY.json         {caption, family: "wan", latent_layout: "CFHW", scaling_factor: 1.0, shift_factor: null,
                    latents_mean, latents_std (per channel), label: 1.0,
                    source: {... as above, source_fps, frames (source frame indices), num_padded_frames,
                    num_frames, fps}}
  KEY.safetensors  latents_w, latents_l [16, 1 + (F-1)/4, H/8, W/8] = (z - latents_mean) / latents_std,
                   prompt_embeds [--max-sequence-length, 4096] (UMT5, zero past the prompt) in --store-dtype
  Frame k of a clip is the source frame on screen at k / --fps s; videos too short for
  --num-frames are dropped ("short video") or, with --short-clips pad, end in repeats of their last frame.
With --family unet3d (ModelScope / Zeroscope text-to-video), the same with SD's image VAE on each frame:
  KEY.json         {caption, family: "unet3d", latent_layout: "CFHW", scaling_factor (the VAE's), shift_factor:
                    null, label: 1.0, source: {... as for wan}}
  KEY.safetensors  latents_w, latents_l [4, F, H/8, W/8] (one latent frame per frame, times scaling_factor),
                   prompt_embeds [77, D] (CLIP's last hidden states) in --store-dtype
With --family svd (Stable Video Diffusion, image-to-video), SVD's temporal-decoder VAE's encoder on each frame:
  KEY.json         {... as for unet3d, family: "svd", source: {..., cond_aug, conditioning_image}}
  KEY.safetensors  latents_w, latents_l [4, F, H/8, W/8] (times scaling_factor), image_latents [4, H/8, W/8] (the
                   winner's first frame + --cond-aug noise, unscaled), image_embeds [1, D] (CLIP image_embeds
                   of that frame), added_time_ids [3] = (--fps - 1, 127, --cond-aug) float32; both clips of a
                   pair are conditioned on the winner's first frame, so DPO compares clips of one image
KEY is the --key-column value, else a hash of the caption and both files' bytes.

Shape buckets: image families take --buckets HxW [HxW ...] replaces the square --resolution. Each pair goes to the
bucket nearest its winner's aspect ratio, both images resized to cover it and cropped (as --crop says); SDXL's
time_ids record each image's original size, crop and the bucket's size. Each bucket of chunk C is written to
its own shards, PREFIX-CCCCCC-HxW-NNNNNN.tar, so index.json records one latent shape per shard (docs/design.md
§4), and training with data.resolution: null batches them one shape at a time (§6). Video families:
--buckets FxHxW [FxHxW ...] replaces --num-frames, --height and --width: the (H, W) nearest the winner's aspect
ratio, then the most frames F of that size both videos fill at --fps (else the fewest, padded or dropped as
--short-clips says); shards PREFIX-CCCCCC-FxHxW-NNNNNN.tar.

Chunk C is rows [C*N, (C+1)*N) of the manifests (N = --pairs-per-shard) and goes to rank
C % world_size. Shards depend on the chunk alone, so any world size writes the same files,
and a rerun with any world size skips the chunks already finished. Rank and world size come
from the launcher's environment (deepspeed/torchrun, mpirun, srun); no process group is made.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Iterator

import safetensors.torch
import torch

from dpo_ds import launchenv
from dpo_ds.data import EMPTY_PROMPT_NAME, INDEX_NAME, ShardWriter, merge_index, read_index
from dpo_ds.encode import (BadRow, ClipSpec, Manifest, PreparedPair, PreparedVideoPair, RowSpec, key_fraction,
                           prepare_row, prepare_video_row)
from dpo_ds.models import ENCODERS, encoder_class

log = logging.getLogger("encode_pairs")

PROGRESS_DIR = ".encode"
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
COMPUTE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NUM_LOGGED_PER_REASON = 20  # bad rows logged one by one per reason; the rest only counted


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", nargs="+", required=True, help="Parquet/JSONL/CSV file(s), read in this order")
    p.add_argument("--family", choices=sorted(ENCODERS), default="sdxl",
                   help="sdxl, sd15 (SD 1.5 / 2.x): pairs of images; wan: pairs of videos (Wan 2.1 T2V: "
                   "AutoencoderKLWan + UMT5); unet3d: pairs of videos (ModelScope / Zeroscope: SD's VAE per "
                   "frame + CLIP); svd: pairs of videos (Stable Video Diffusion: its VAE per frame, the winner's "
                   "first frame as the conditioning image)")
    p.add_argument("--model", required=True,
                   help="diffusers folder; sdxl: vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/; "
                   "sd15, unet3d, wan: vae/, text_encoder/, tokenizer/; svd: vae/, image_encoder/, "
                   "feature_extractor/")
    p.add_argument("--vae", default=None, help="VAE folder to use instead of MODEL/vae "
                   "(e.g. an fp16-safe SDXL VAE)")
    p.add_argument("--out", required=True, help="folder for the training shards")
    p.add_argument("--val-out", default=None, help="folder for the validation shards (needs --val-fraction)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out pairs whose key hash is below this; stable as the data grows")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--image-columns", nargs=2, default=["jpg_0", "jpg_1"], metavar=("IMAGE_0", "IMAGE_1"),
                   help="image bytes or paths (relative to the manifest or --image-root); e.g. image_0 image_1")
    p.add_argument("--label-columns", nargs=2, default=["label_0", "label_1"], metavar=("LABEL_0", "LABEL_1"))
    p.add_argument("--key-column", default=None, help="a unique id column to key pairs by (default: content hash)")
    p.add_argument("--video-columns", nargs=2, default=["video_0", "video_1"], metavar=("VIDEO_0", "VIDEO_1"),
                   help="video families: video bytes or paths (relative to the manifest or --image-root)")
    p.add_argument("--image-root", default=None, help="folder that relative image (or video) paths start from")
    p.add_argument("--resolution", type=int, default=1024, help="square target side in pixels")
    p.add_argument("--buckets", nargs="+", default=None, metavar="HxW|FxHxW",
                   help="target sizes instead of --resolution (images: HEIGHTxWIDTH, e.g. 1024x1024 896x1152 "
                   "1152x896) or --num-frames, --height, --width (videos: FRAMESxHEIGHTxWIDTH, e.g. 33x480x832 "
                   "81x480x832); each pair goes to the size nearest its winner's aspect ratio, and a video pair "
                   "to the most frames of it that both videos fill")
    p.add_argument("--height", type=int, default=None, help="video families: frame height (default --resolution)")
    p.add_argument("--width", type=int, default=None, help="video families: frame width (default --resolution)")
    p.add_argument("--num-frames", type=int, default=81, help="video families: frames per clip (Wan: 4k + 1; unet3d: any)")
    p.add_argument("--fps", type=float, default=16.0,
                   help="video families: frames are sampled at this rate from the start of each video")
    p.add_argument("--short-clips", choices=["drop", "pad"], default="drop",
                   help="videos shorter than --num-frames at --fps: drop the pair, or repeat the last frame "
                   "(counted either way)")
    p.add_argument("--max-sequence-length", type=int, default=512,
                   help="wan: text tokens per prompt (WanPipeline's default 512; unet3d: CLIP's 77, always)")
    p.add_argument("--cond-aug", type=float, default=0.02,
                   help="svd: noise augmentation strength of the conditioning image (the winner's first frame), "
                        "drawn per pair from --seed and its key; recorded in the time ids")
    p.add_argument("--crop", choices=["center", "random"], default="center",
                   help="random: one crop per image, seeded from --seed and the key, recorded in the json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mismatched-sizes", choices=["keep", "drop"], default="keep",
                   help="pairs whose two images differ in size: keep (each keeps its own size and crop) or drop")
    p.add_argument("--pairs-per-shard", type=int, default=1000, help="manifest rows per chunk (and shard)")
    p.add_argument("--max-shard-bytes", type=int, default=None, help="also roll a shard over at this size")
    p.add_argument("--prefix", default="pairs", help="shard file name prefix")
    p.add_argument("--batch-size", type=int, default=None,
                   help="pairs encoded per text-encoder pass (default 16 for images, 1 for videos; videos go "
                   "through the VAE one clip at a time)")
    p.add_argument("--num-workers", type=int, default=4, help="threads reading and resizing images or videos")
    p.add_argument("--dtype", choices=["auto", *COMPUTE_DTYPES], default="auto",
                   help="encoder precision: auto is bf16 on GPUs that have it, else fp32. SDXL's original VAE "
                   "and Wan's UMT5 overflow in fp16")
    p.add_argument("--store-dtype", choices=list(STORE_DTYPES), default="float16")
    p.add_argument("--device", default=None, help="default cuda:LOCAL_RANK when a GPU is present, else cpu")
    p.add_argument("--rank", type=int, default=None, help="override the rank found in the environment")
    p.add_argument("--world-size", type=int, default=None, help="override the world size found in the environment")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args(argv)
    args.is_video = encoder_class(args.family).IS_VIDEO
    if args.batch_size is None:
        args.batch_size = encoder_class(args.family).BATCH_SIZE
    if args.resolution < 1 or args.pairs_per_shard < 1 or args.batch_size < 1 or args.num_workers < 1:
        p.error("--resolution, --pairs-per-shard, --batch-size and --num-workers must be >= 1")
    if not args.is_video and (args.height is not None or args.width is not None):
        p.error("--height and --width are for video families; images are square, use --resolution")
    args.height, args.width = args.height or args.resolution, args.width or args.resolution
    if args.buckets is not None:
        try:
            args.buckets = [tuple(int(x) for x in b.lower().split("x")) for b in args.buckets]
        except ValueError:
            args.buckets = [()]
        rank = 3 if args.is_video else 2
        if any(len(b) != rank or min(b) < 1 for b in args.buckets) or len(set(args.buckets)) != len(args.buckets):
            p.error("--buckets takes distinct " + ("FRAMESxHEIGHTxWIDTH sizes, e.g. 33x480x832 81x480x832"
                    if args.is_video else "HEIGHTxWIDTH sizes in pixels, e.g. 1024x1024 896x1152"))
    if min(args.height, args.width, args.num_frames, args.max_sequence_length) < 1 or not args.fps > 0:
        p.error("--height, --width, --num-frames, --max-sequence-length must be >= 1 and --fps > 0")
    if not 0.0 <= args.val_fraction < 1.0:
        p.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if (args.val_fraction > 0) != (args.val_out is not None):
        p.error("--val-fraction and --val-out go together")
    return args


def _submit_ahead(pool: ThreadPoolExecutor, fn, items: Iterator[tuple], ahead: int) -> Iterator[tuple]:
    """(item, future of fn(*item)) in item order, at most `ahead` in flight, so decoded images stay bounded."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append((item, pool.submit(fn, *item)))
        if len(pending) >= ahead:
            yield pending.popleft()
    yield from pending


class ChunkStats:
    def __init__(self, is_video: bool) -> None:
        self.num_rows = self.num_pairs = self.num_val_pairs = self.num_ties = self.num_mismatched_sizes = 0
        self.num_padded_clips = 0
        self.is_video = is_video
        self.bad_rows: collections.Counter = collections.Counter()

    def as_dict(self) -> dict:
        counts = {"rows": self.num_rows, "pairs_written": self.num_pairs, "val_pairs_written": self.num_val_pairs,
                  "ties_dropped": self.num_ties, "bad_rows": dict(sorted(self.bad_rows.items())),
                  "mismatched_sizes_kept": self.num_mismatched_sizes}
        if self.is_video:  # image runs keep the summary they always had
            counts["short_clips_padded"] = self.num_padded_clips
        return counts


class Encoder:
    """Encodes this rank's chunks with the family's encoder (dpo_ds.models.ENCODERS); owns the row reader
    threads and the counts."""

    def __init__(self, args: argparse.Namespace, manifest: Manifest, spec: RowSpec, clip: ClipSpec | None,
                 settings: dict, encoder, store_dtype: torch.dtype):
        self.args, self.manifest, self.spec, self.clip, self.settings = args, manifest, spec, clip, settings
        self.encoder, self.store_dtype = encoder, store_dtype
        self.num_logged: collections.Counter = collections.Counter()
        self.num_pairs_this_run = 0

    def chunk(self, chunk: int, progress) -> dict:
        """Encode one chunk into staging folders, publish its shards, return its marker."""
        args = self.args
        stage = os.path.join(args.out, PROGRESS_DIR, f"stage-{chunk:06d}")
        shutil.rmtree(stage, ignore_errors=True)  # what an interrupted attempt left
        stats, keys = ChunkStats(args.is_video), set()
        start = chunk * args.pairs_per_shard
        rows = self.manifest.rows(start, min(start + args.pairs_per_shard, self.manifest.num_rows))
        prefix = f"{args.prefix}-{chunk:06d}"
        splits = ["train", "val"] if args.val_out is not None else ["train"]
        # One writer per split and bucket (None: no buckets), so each shard holds one latent shape.
        buckets = args.buckets or [None]
        writers = {(split, bucket): ShardWriter(os.path.join(stage, split),
                                                prefix if bucket is None else f"{prefix}-{'x'.join(map(str, bucket))}",
                                                args.pairs_per_shard, args.max_shard_bytes)
                   for split in splits for bucket in buckets}
        with ThreadPoolExecutor(args.num_workers) as pool, contextlib.ExitStack() as stack:
            for writer in writers.values():
                stack.enter_context(writer)
            # A batch holds one bucket's pairs.
            batches: dict[tuple | None, list[PreparedPair | PreparedVideoPair]] = {b: [] for b in buckets}
            if args.is_video:
                prepare = lambda i, path, row: prepare_video_row(self.spec, self.clip, i, path, row)  # noqa: E731
            else:
                prepare = lambda i, path, row: prepare_row(self.spec, i, path, row)  # noqa: E731
            for (index, path, _), future in _submit_ahead(pool, prepare, rows, ahead=4 * args.batch_size):
                stats.num_rows += 1
                progress.update(1)
                try:
                    pair = future.result()
                    if pair.key in keys:
                        raise BadRow("duplicate key", f"key {pair.key} already in this chunk")
                except BadRow as e:
                    self._drop(stats, e, f"{path} row {index}")
                    continue
                keys.add(pair.key)
                stats.num_mismatched_sizes += pair.has_mismatched_sizes
                stats.num_padded_clips += args.is_video and pair.num_padded_frames > 0
                batch = batches[getattr(pair, "bucket", None)]
                batch.append(pair)
                if len(batch) == args.batch_size:
                    self._write_batch(batch, writers, stats)
                    batch.clear()
                    elapsed = max(progress.format_dict["elapsed"], 1e-9)
                    progress.set_postfix_str(f"{self.num_pairs_this_run / elapsed:.2f} pairs/s")
            for batch in batches.values():
                if batch:
                    self._write_batch(batch, writers, stats)
        marker = {"chunk": chunk, "settings": self.settings, "stats": stats.as_dict()}
        for split, folder in (("train", args.out), ("val", args.val_out)):
            marker[split] = []
            if split in splits:
                for entry in read_index(os.path.join(stage, split, INDEX_NAME)).values():
                    shutil.move(os.path.join(stage, split, entry["name"]), os.path.join(folder, entry["name"]))
                    marker[split].append(entry)
        _write_json(os.path.join(args.out, PROGRESS_DIR, f"chunk-{chunk:06d}.json"), marker)
        shutil.rmtree(stage, ignore_errors=True)
        return marker

    def _drop(self, stats: ChunkStats, error: BadRow, where: str) -> None:
        if error.reason == "tie":
            stats.num_ties += 1
            return
        stats.bad_rows[error.reason] += 1
        self.num_logged[error.reason] += 1
        if self.num_logged[error.reason] <= NUM_LOGGED_PER_REASON:
            log.warning("%s skipped: %s%s", where, error,
                        " (further rows with this reason are only counted)"
                        if self.num_logged[error.reason] == NUM_LOGGED_PER_REASON else "")

    def _write_batch(self, batch: list, writers: dict[tuple, ShardWriter], stats: ChunkStats) -> None:
        args = self.args
        bucket = getattr(batch[0], "bucket", None)
        if args.is_video:
            frames, height, width = bucket or (args.num_frames, args.height, args.width)
            source = {"resolution": [height, width], "num_frames": frames, "fps": args.fps}
        else:
            source = args.resolution if bucket is None else list(bucket)
        samples = self.encoder.samples(batch, self.store_dtype, source)
        for pair, (tensors, meta) in zip(batch, samples):
            is_val = args.val_out is not None and key_fraction(pair.key) < self.args.val_fraction
            try:
                writers[("val" if is_val else "train", bucket)].write(pair.key, meta, tensors)
            except ValueError as e:  # e.g. non-finite latents from a VAE overflowing in fp16
                stats.bad_rows["invalid sample"] += 1
                log.warning("row %d not written: %s", pair.row, e)
                continue
            stats.num_val_pairs += is_val
            stats.num_pairs += not is_val
            self.num_pairs_this_run += 1


def _write_json(path: str, obj: object) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _markers(out: str) -> dict[int, dict]:
    folder = os.path.join(out, PROGRESS_DIR)
    markers = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.startswith("chunk-") and name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                marker = json.load(f)
            markers[marker["chunk"]] = marker
    return markers


def _check_settings(markers: dict[int, dict], settings: dict, out: str) -> None:
    for marker in markers.values():
        for field in sorted(set(settings) | set(marker["settings"])):
            if marker["settings"].get(field) != settings.get(field):
                raise ValueError(f"{out} holds chunk {marker['chunk']} encoded with {field}="
                                 f"{marker['settings'].get(field)!r}, this run has {settings.get(field)!r}; "
                                 f"use the same settings to resume, or a new --out")


def _publish_indexes(args: argparse.Namespace, markers: dict[int, dict]) -> None:
    """index.json of each output folder: its previous entries plus every finished chunk's shards.

    Ranks finish in any order; each writes what it sees under a lock, so the last one to
    finish writes the complete index. Where flock is unsupported the lock is skipped: shards
    missing from index.json are still found, only counted from their headers.
    """
    lock_path = os.path.join(args.out, PROGRESS_DIR, "index.lock")
    with open(lock_path, "a") as lock:
        with contextlib.suppress(OSError, ImportError):
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        markers = _markers(args.out)  # re-read under the lock
        for split, folder in (("train", args.out), ("val", args.val_out)):
            if folder is None:
                continue
            merge_index(folder, [e for m in markers.values() for e in m[split]])


def _write_empty_prompt(args: argparse.Namespace, encoder) -> None:
    """EMPTY_PROMPT_NAME beside each output folder's index: the family's conditioning of the prompt "", in the
    store dtype, which training with data.empty_prompt_prob uses. Every rank writes the same bytes, atomically."""
    empty = {name: t.to("cpu", STORE_DTYPES[args.store_dtype]).contiguous() for name, t in encoder.empty_prompt().items()}
    for folder in (args.out, args.val_out):
        if folder is not None:
            path = os.path.join(folder, EMPTY_PROMPT_NAME)
            safetensors.torch.save_file(empty, path + f".{os.getpid()}.tmp")
            os.replace(path + f".{os.getpid()}.tmp", path)


def _totals(markers: list[dict]) -> dict:
    totals = {"chunks": len(markers), "rows": 0, "pairs_written": 0, "val_pairs_written": 0, "ties_dropped": 0,
              "mismatched_sizes_kept": 0, "bad_rows": collections.Counter(), "bytes": 0, "shards": 0}
    for marker in markers:
        for field in ("rows", "pairs_written", "val_pairs_written", "ties_dropped", "mismatched_sizes_kept"):
            totals[field] += marker["stats"][field]
        if "short_clips_padded" in marker["stats"]:  # video runs only
            totals["short_clips_padded"] = totals.get("short_clips_padded", 0) + marker["stats"]["short_clips_padded"]
        totals["bad_rows"].update(marker["stats"]["bad_rows"])
        totals["bytes"] += sum(e["size_bytes"] for e in marker["train"] + marker["val"])
        totals["shards"] += len(marker["train"]) + len(marker["val"])
    totals["bad_rows"] = dict(sorted(totals["bad_rows"].items()))
    return totals


def _device_and_dtype(args: argparse.Namespace, local_rank: int) -> tuple[torch.device, torch.dtype]:
    has_gpu = torch.cuda.is_available()
    device = torch.device(args.device or (f"cuda:{local_rank}" if has_gpu else "cpu"))
    if args.dtype != "auto":
        return device, COMPUTE_DTYPES[args.dtype]
    is_bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return device, torch.bfloat16 if is_bf16_gpu else torch.float32


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    env_rank, env_world, local_rank = launchenv.rank_world_local()
    rank = env_rank if args.rank is None else args.rank
    world = env_world if args.world_size is None else args.world_size
    logging.basicConfig(level=logging.INFO, format=f"[%(asctime)s encode rank{rank}] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}")
        media_columns = args.video_columns if args.is_video else args.image_columns
        columns = [args.caption_column, *media_columns, *args.label_columns]
        columns += [args.key_column] if args.key_column else []
        manifest = Manifest(args.manifest, columns)
        spec = RowSpec(args.caption_column, tuple(media_columns), tuple(args.label_columns), args.key_column,
                       args.image_root, (args.height, args.width) if args.is_video else args.resolution,
                       args.seed if args.crop == "random" else None, args.mismatched_sizes == "drop",
                       tuple(args.buckets) if args.buckets else None)
        clip = ClipSpec(args.num_frames, Fraction(str(args.fps)), args.short_clips == "pad",
                        tuple(args.buckets) if args.buckets else None) if args.is_video else None
        # Everything a stored sample depends on; a resumed run must match it field by field.
        settings = {"manifests": manifest.fingerprint(), "columns": columns, "resolution": args.resolution,
                    "crop": args.crop, "seed": args.seed if args.crop == "random" else None,
                    "mismatched_sizes": args.mismatched_sizes, "pairs_per_shard": args.pairs_per_shard,
                    "max_shard_bytes": args.max_shard_bytes, "prefix": args.prefix,
                    "val_fraction": args.val_fraction, "store_dtype": args.store_dtype,
                    "model": os.path.abspath(args.model), "vae": args.vae and os.path.abspath(args.vae)}
        if args.family != "sdxl":  # SDXL runs keep the settings they always had, so their outputs still resume
            settings.update(family=args.family)
        if args.family == "svd":
            settings.update(cond_aug=args.cond_aug, seed=args.seed)
        if args.buckets:  # likewise: runs without buckets keep their settings
            settings.update(buckets=[list(b) for b in args.buckets])
        if args.is_video:
            settings.update( height=args.height, width=args.width, num_frames=args.num_frames,
                            fps=args.fps, short_clips=args.short_clips,
                            max_sequence_length=args.max_sequence_length)
        os.makedirs(os.path.join(args.out, PROGRESS_DIR), exist_ok=True)
        if args.val_out is not None:
            os.makedirs(args.val_out, exist_ok=True)
        markers = _markers(args.out)
        _check_settings(markers, settings, args.out)
        num_chunks = math.ceil(manifest.num_rows / args.pairs_per_shard)
        mine = list(range(rank, num_chunks, world))
        pending = [c for c in mine if c not in markers]
        encoder = None
        if pending:
            device, dtype = _device_and_dtype(args, local_rank)
            if args.is_video:
                # svd noise-augments its conditioning image from each pair's generator (--seed, the pair's key).
                svd_args = {"cond_aug": args.cond_aug, "seed": args.seed} if args.family == "svd" else {}
                encoder = encoder_class(args.family)(args.model, args.vae, device, dtype, args.max_sequence_length,
                                                     **svd_args)
                spatial, temporal = encoder.spatial_scale_factor, encoder.temporal_scale_factor
                if args.height % spatial or args.width % spatial:
                    raise ValueError(f"--height {args.height} and --width {args.width} must be multiples of the "
                                     f"VAE's spatial scale factor {spatial}")
                if (args.num_frames - 1) % temporal:
                    nearest = 1 + temporal * max(1, (args.num_frames - 1) // temporal)
                    raise ValueError(f"--num-frames {args.num_frames} must be 1 + a multiple of the VAE's temporal "
                                     f"scale factor {temporal}, e.g. {nearest}")
                for frames, height, width in args.buckets or []:
                    if height % spatial or width % spatial or (frames - 1) % temporal:
                        raise ValueError(f"--buckets {frames}x{height}x{width}: frames must be 1 + a multiple of the "
                                         f"VAE's temporal scale factor {temporal}, height and width multiples of "
                                         f"its spatial scale factor {spatial}")
            else:
                encoder = encoder_class(args.family)(args.model, args.vae, device, dtype)
                if args.resolution % encoder.vae_scale_factor:
                    raise ValueError(f"--resolution {args.resolution} is not a multiple of the VAE's scale factor "
                                     f"{encoder.vae_scale_factor}")
                for height, width in args.buckets or []:
                    if height % encoder.vae_scale_factor or width % encoder.vae_scale_factor:
                        raise ValueError(f"--buckets {height}x{width} is not a multiple of the VAE's scale factor "
                                         f"{encoder.vae_scale_factor}")
    except ValueError as e:
        print(f"encode_pairs: error: {e}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    log.info("%d manifest rows in %d chunks; this rank (%d of %d) has %d, %d already finished",
             manifest.num_rows, num_chunks, rank, world, len(mine), len(mine) - len(pending))
    num_pending_rows = sum(min(args.pairs_per_shard, manifest.num_rows - c * args.pairs_per_shard) for c in pending)
    started = time.time()
    with tqdm(total=num_pending_rows, unit="row", disable=args.no_progress or rank != 0, dynamic_ncols=True,
              desc="encode") as progress:
        if pending:
            work = Encoder(args, manifest, spec, clip, settings, encoder, STORE_DTYPES[args.store_dtype])
            for chunk in pending:
                markers[chunk] = work.chunk(chunk, progress)
    _publish_indexes(args, markers)
    if encoder is not None:
        _write_empty_prompt(args, encoder)
    elapsed = time.time() - started

    all_markers = _markers(args.out)
    rank_totals = _totals([all_markers[c] for c in mine if c in all_markers])
    rank_totals.update(rank=rank, world_size=world, chunks_skipped=len(mine) - len(pending),
                       seconds=round(elapsed, 3))
    totals = _totals(list(all_markers.values()))
    totals.update(chunks_total=num_chunks, is_complete=len(all_markers) == num_chunks)
    _write_json(os.path.join(args.out, PROGRESS_DIR, "summary.json"), totals)
    num_new = sum(all_markers[c]["stats"]["pairs_written"] + all_markers[c]["stats"]["val_pairs_written"]
                  for c in pending)
    bad = ", ".join(f"{reason}: {n}" for reason, n in rank_totals["bad_rows"].items()) or "none"
    print(f"encode_pairs rank {rank}/{world}: {rank_totals['rows']} rows in {len(mine)} chunks "
          f"({rank_totals['chunks_skipped']} already finished)\n"
          f"  pairs written     {rank_totals['pairs_written']} train, {rank_totals['val_pairs_written']} validation\n"
          f"  ties dropped      {rank_totals['ties_dropped']}\n"
          f"  bad rows          {sum(rank_totals['bad_rows'].values())} ({bad})\n"
          f"  mismatched sizes  {rank_totals['mismatched_sizes_kept']} pairs kept\n"
          + (f"  short clips       {rank_totals.get('short_clips_padded', 0)} pairs padded\n" if args.is_video else "")
          + f"  bytes             {rank_totals['bytes']} in {rank_totals['shards']} shards\n"
          f"  this run          {num_new} pairs in {elapsed:.1f} s ({num_new / max(elapsed, 1e-9):.2f} pairs/s)")
    print("summary " + json.dumps(rank_totals, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
