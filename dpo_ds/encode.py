"""Raw preference pairs -> what the families' encoders take: manifests, image and video preparation.

Used by tools/encode_pairs.py and the families' encoders (dpo_ds/models/, dpo_ds.models.ENCODERS).
Legend: B = pairs in a batch, R = target resolution (pixels), C/h/w = latent channels and sides
(R / vae_scale_factor), F = frames of a clip, F' = latent frames (1 + (F - 1) / 4 for Wan's causal
VAE). Pixels travel as uint8 [3 x R x R] (images) or [3 x F x H x W] (videos) until the batch is
encoded; the encoders take them in [-1, 1].

Manifest rows are dicts of column -> value; an image or video value is raw bytes, a path
(relative to the manifest's folder or image_root), or a Hugging Face `{"bytes", "path"}` struct.
Videos are decoded with PyAV (the `video` extra), imported only when a video is read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

MANIFEST_SUFFIXES = (".parquet", ".jsonl", ".csv")
# Pick-a-Pic stores inline bytes as jpg_0/jpg_1; other exports name them image_0/image_1.
DEFAULT_IMAGE_COLUMNS = (("jpg_0", "jpg_1"), ("image_0", "image_1"))
_KEY_OK = re.compile(r"^[A-Za-z0-9_-]+$")
_PARQUET_BATCH_ROWS = 64  # rows decoded at a time; inline images make rows large


class BadRow(ValueError):
    """A manifest row that cannot become a pair; `reason` is a short category for the summary."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def key_fraction(key: str) -> float:
    """A uniform number in [0, 1) that depends on the key only, so a split by it is stable as data grows."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2.0**64


# ---------------------------------------------------------------- manifests

class Manifest:
    """Rows of one or more Parquet / JSONL / CSV files, numbered globally in file order.

    Parquet is read lazily (only the row groups a range touches, only the needed columns);
    JSONL by line offsets; CSV is read whole (it holds paths, not image bytes).
    """

    def __init__(self, paths: list[str], columns: list[str]):
        if not paths:
            raise ValueError("no manifest given; pass --manifest FILE.parquet|.jsonl|.csv")
        self.paths, self.columns = list(paths), list(columns)
        self._files: list[tuple[str, int, object]] = []  # (path, num_rows, reader state)
        for path in self.paths:
            if not os.path.isfile(path):
                raise ValueError(f"manifest {path} does not exist")
            suffix = os.path.splitext(path)[1].lower()
            if suffix == ".parquet":
                import pyarrow.parquet as pq

                pf = pq.ParquetFile(path)
                absent = [c for c in self.columns if c not in pf.schema_arrow.names]
                if absent:
                    raise ValueError(f"manifest {path} has no column(s) {absent} (it has {pf.schema_arrow.names}); "
                                     "name the right ones with --caption-column/--image-columns/--label-columns")
                self._files.append((path, pf.metadata.num_rows, pf))
            elif suffix == ".jsonl":
                offsets, pos = [], 0
                with open(path, "rb") as f:
                    for line in f:
                        if line.strip():
                            offsets.append(pos)
                        pos += len(line)
                self._files.append((path, len(offsets), offsets))
            elif suffix == ".csv":
                with open(path, newline="", encoding="utf-8") as f:
                    rows = list(csv.DictReader(f))
                self._files.append((path, len(rows), rows))
            else:
                raise ValueError(f"manifest {path}: unknown format {suffix!r}; use one of {MANIFEST_SUFFIXES}")
        self.num_rows = sum(n for _, n, _ in self._files)

    def fingerprint(self) -> list[dict]:
        return [{"name": os.path.basename(p), "num_rows": n, "size_bytes": os.path.getsize(p)}
                for p, n, _ in self._files]

    def rows(self, start: int, stop: int) -> Iterator[tuple[int, str, dict]]:
        """(global row index, manifest path, row) for rows [start, stop)."""
        first = 0
        for path, num_rows, state in self._files:
            lo, hi = max(start, first) - first, min(stop, first + num_rows) - first
            if lo < hi:
                for i, row in enumerate(self._file_rows(path, state, lo, hi)):
                    yield first + lo + i, path, row
            first += num_rows

    def _file_rows(self, path: str, state: object, lo: int, hi: int) -> Iterator[dict]:
        if isinstance(state, list) and (not state or isinstance(state[0], int)):  # JSONL offsets
            with open(path, "rb") as f:
                for offset in state[lo:hi]:
                    f.seek(offset)
                    line = f.readline()
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        row = {"__error__": f"line is not JSON: {e}"}
                    yield row if isinstance(row, dict) else {"__error__": "line is not a JSON object"}
        elif isinstance(state, list):  # CSV rows
            for row in state[lo:hi]:
                yield {k: (v if v != "" else None) for k, v in row.items()}
        else:  # pyarrow ParquetFile: read only the row groups that overlap [lo, hi)
            meta = state.metadata
            groups, group_start, skip = [], 0, None
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                if group_start < hi and group_start + n > lo:
                    groups.append(g)
                    skip = lo - group_start if skip is None else skip
                group_start += n
            remaining = hi - lo
            for batch in state.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=groups, columns=self.columns):
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                batch = batch.slice(skip, min(remaining, batch.num_rows - skip))
                skip = 0
                yield from batch.to_pylist()
                remaining -= batch.num_rows
                if remaining <= 0:
                    return


# ---------------------------------------------------------------- one row -> one prepared pair

@dataclass(frozen=True)
class Geometry:
    """Where an image's pixels came from, in pixels: its original size, the top-left corner of the crop
    (measured after the resize), and the size of the crop. A family may condition on it (SDXL does)."""

    original_height: int
    original_width: int
    crop_top: int
    crop_left: int
    height: int
    width: int

    @classmethod
    def uncropped(cls, height: int, width: int) -> "Geometry":
        """An image that already had the target size: nothing resized, nothing cropped."""
        return cls(height, width, 0, 0, height, width)


@dataclass
class PreparedPair:
    """A row ready to encode: winner first. pixels uint8 [3 x R x R], with each image's geometry."""

    key: str
    row: int
    caption: str
    pixels_w: torch.Tensor
    pixels_l: torch.Tensor
    geometry_w: Geometry
    geometry_l: Geometry
    source: dict
    has_mismatched_sizes: bool
    bucket: tuple[int, int] | None = None  # the (height, width) both images were cropped to, with RowSpec.buckets


def nearest_bucket(height: int, width: int, buckets: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The (height, width) of `buckets` nearest an image's aspect ratio (in log scale, so 1:2 and 2:1 are
    equally far from 1:1); the first listed wins a tie."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - aspect), buckets.index(b)))


def _field(row: dict, column: str) -> object:
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise BadRow(f"missing {column}", f"column {column!r} is absent or empty")
    return value


def _image_bytes(value: object, column: str, root: str) -> bytes:
    if isinstance(value, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        path = value if os.path.isabs(value) else os.path.join(root, value)
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise BadRow(f"unreadable {column}", f"{path}: {e.strerror or e}") from None
    raise BadRow(f"unreadable {column}", f"value is a {type(value).__name__}, expected bytes or a path")


def _open_image(data: bytes, column: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except UnidentifiedImageError:
        raise BadRow(f"unreadable {column}", f"{len(data)} bytes that are not an image PIL can decode") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # truncated files, bombs, bad modes
        raise BadRow(f"unreadable {column}", f"{type(e).__name__}: {e}") from None


def resize_and_crop(image: Image.Image, resolution: int | tuple[int, int],
                    crop_seed: int | None) -> tuple[torch.Tensor, Geometry]:
    """Scale to cover `resolution` (a side R, or (H, W)), then crop: center, or random from crop_seed.

    Returns pixels uint8 [3 x H x W] and the image's Geometry (original size, the crop's top-left
    corner after the resize, target size). The crop depends only on the image size and the seed,
    so every frame of a clip gets the same.
    """
    target_h, target_w = (resolution, resolution) if isinstance(resolution, int) else resolution
    width, height = image.size
    scale = max(target_h / height, target_w / width)  # = R / min(w, h) for a square target
    new_w, new_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=None)
    if crop_seed is None:
        top, left = int(round((new_h - target_h) / 2.0)), int(round((new_w - target_w) / 2.0))
    else:
        rng = random.Random(crop_seed)
        top, left = rng.randint(0, new_h - target_h), rng.randint(0, new_w - target_w)
    image = image.crop((left, top, left + target_w, top + target_h))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return pixels, Geometry(height, width, top, left, target_h, target_w)


@dataclass(frozen=True)
class RowSpec:
    """How to read a row: column names, where relative paths start, what to do with its images.

    For videos, image_columns and image_root name the video columns and where their paths start,
    and resolution is (H, W).
    """

    caption_column: str
    image_columns: tuple[str, str]
    label_columns: tuple[str, str]
    key_column: str | None
    image_root: str | None
    resolution: int | tuple[int, int]
    random_crop_seed: int | None  # None: center crop
    drop_mismatched_sizes: bool
    buckets: tuple[tuple[int, int], ...] | None = None  # images: (height, width) targets, instead of resolution


def _read_row(spec: RowSpec, manifest_path: str, row: dict) -> tuple[str, list[float], list[bytes], str]:
    """The media-independent part of a row: (caption, labels, the two files' bytes, key). Raises BadRow."""
    if "__error__" in row:
        raise BadRow("unparsable row", row["__error__"])
    caption = _field(row, spec.caption_column)
    if not isinstance(caption, str):
        raise BadRow(f"missing {spec.caption_column}", f"caption is a {type(caption).__name__}, expected text")
    labels = []
    for column in spec.label_columns:
        try:
            labels.append(float(_field(row, column)))
        except (TypeError, ValueError):
            raise BadRow("bad label", f"{column}={row.get(column)!r} is not a number") from None
    if not all(math.isfinite(x) for x in labels):
        raise BadRow("bad label", f"labels {labels} are not finite")
    if labels[0] == labels[1]:
        raise BadRow("tie", f"labels {labels}")
    data = [_image_bytes(_field(row, c), c, spec.image_root or os.path.dirname(manifest_path))
            for c in spec.image_columns]

    if spec.key_column is not None:
        key = str(_field(row, spec.key_column))
        if not _KEY_OK.match(key):
            raise BadRow("bad key", f"{spec.key_column}={key!r} must be letters, digits, '_' or '-'")
    else:  # what the pair is, not where it sits: the same key whatever the row order or world size
        digest = hashlib.sha256()
        for part in (caption.encode("utf-8"), *data):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
        key = digest.hexdigest()[:32]
    return caption, labels, data, key


def _crop_seeds(spec: RowSpec, key: str) -> list[int | None]:
    """One crop seed per side (w, l), from --seed and the key: the same crop whatever the world size."""
    if spec.random_crop_seed is None:
        return [None, None]
    return [int.from_bytes(hashlib.sha256(f"{spec.random_crop_seed}\0{key}\0{side}".encode()).digest()[:8], "little")
            for side in ("w", "l")]


def prepare_row(spec: RowSpec, index: int, manifest_path: str, row: dict) -> PreparedPair:
    """One manifest row -> a PreparedPair with the winner first. Raises BadRow with the reason."""
    caption, labels, data, key = _read_row(spec, manifest_path, row)
    images = [_open_image(d, c) for d, c in zip(data, spec.image_columns)]
    has_mismatched_sizes = images[0].size != images[1].size
    if has_mismatched_sizes and spec.drop_mismatched_sizes:
        raise BadRow("mismatched sizes", f"{spec.image_columns[0]} is {images[0].size}, "
                                         f"{spec.image_columns[1]} is {images[1].size}")
    winner = 0 if labels[0] > labels[1] else 1
    order = (winner, 1 - winner)
    crop_seeds = _crop_seeds(spec, key)
    # With buckets, both images go to the bucket nearest the winner's aspect ratio (a batch holds one shape).
    bucket = nearest_bucket(images[winner].height, images[winner].width, spec.buckets) if spec.buckets else None
    (pixels_w, geometry_w), (pixels_l, geometry_l) = (
        resize_and_crop(images[i], bucket or spec.resolution, seed) for i, seed in zip(order, crop_seeds))
    source = {"manifest": os.path.basename(manifest_path), "row": index, "winner": spec.image_columns[winner],
              "labels": labels, "crop": "center" if spec.random_crop_seed is None else "random",
              "crop_seeds": crop_seeds, "original_sizes": [list(images[i].size[::-1]) for i in order]}
    if spec.key_column is not None:
        source["id"] = key
    return PreparedPair(key, index, caption, pixels_w, pixels_l, geometry_w, geometry_l, source, has_mismatched_sizes,
                        bucket)


# ---------------------------------------------------------------- one row of videos -> one prepared pair

@dataclass(frozen=True)
class ClipSpec:
    """Which frames of a video make the clip: num_frames at fps from the first frame."""

    num_frames: int
    fps: Fraction
    pad_short: bool  # a video shorter than the clip: repeat its last frame (True) or drop the pair
    # (frames, height, width) targets instead of num_frames and RowSpec.resolution: prepare_video_row
    buckets: tuple[tuple[int, int, int], ...] | None = None


@dataclass
class PreparedVideoPair:
    """A row of two videos ready to encode: winner first. pixels uint8 [3 x F x H x W]."""

    key: str
    row: int
    caption: str
    pixels_w: torch.Tensor
    pixels_l: torch.Tensor
    source: dict
    has_mismatched_sizes: bool
    num_padded_frames: int  # over both clips
    bucket: tuple[int, int, int] | None = None  # (frames, height, width), with ClipSpec.buckets


def text_to_video_samples(encoder, batch: list[PreparedVideoPair], store_dtype: torch.dtype, source: dict,
                          meta: dict) -> Iterator[tuple[dict, dict]]:
    """(tensors, meta) of each pair of a text-to-video family's batch: both clips through
    encoder.encode_videos in one call, the captions through encoder.encode_prompts; `meta` holds the
    family's fields (family, layout, scaling), each pair adds its caption and source."""
    latents_w, latents_l = encoder.encode_videos(torch.stack([p.pixels_w for p in batch] +
                                                             [p.pixels_l for p in batch])).chunk(2)
    prompt_embeds = encoder.encode_prompts([p.caption for p in batch])
    for i, pair in enumerate(batch):
        tensors = {"latents_w": latents_w[i].to(store_dtype), "latents_l": latents_l[i].to(store_dtype),
                   "prompt_embeds": prompt_embeds[i].cpu().to(store_dtype)}
        yield tensors, {"caption": pair.caption, **meta, "label": 1.0,
                        "source": {"tool": "encode_pairs", **source, **pair.source}}


def video_size(data: bytes, column: str) -> tuple[int, int]:
    """(height, width) of a video's first video stream, from its header (nothing decoded). Raises BadRow."""
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise BadRow(f"unreadable {column}", "the file has no video stream")
            stream = container.streams.video[0]
            size = (stream.height, stream.width)
    except av.FFmpegError as e:
        raise BadRow(f"unreadable {column}", f"{len(data)} bytes PyAV cannot decode: {e}") from None
    if min(size) < 1:
        raise BadRow(f"unreadable {column}", f"the video stream has no size ({size})")
    return size


def sample_frames(data: bytes, column: str, clip: ClipSpec, resolution: tuple[int, int],
                  crop_seed: int | None) -> tuple[torch.Tensor, dict]:
    """Decode a video and take clip.num_frames frames at clip.fps, resized and cropped to resolution.

    Frame k is the source frame on screen at time k / fps from the first frame (the last one
    whose timestamp is <= k / fps), so a 24 fps source sampled at 8 fps gives frames 0, 3, 6, ...
    Times are exact fractions, so the choice is the same on every machine. Decoding stops once
    the clip is full; only the chosen frames are converted. Returns pixels uint8 [3 x F x H x W]
    and {"size": [h, w], "frames": source frame index of each clip frame (repeats included),
    "num_padded_frames", "source_fps"}.
    Raises BadRow("unreadable COLUMN") or BadRow("short video") (unless clip.pad_short).
    """
    import av

    targets = [Fraction(k) / clip.fps for k in range(clip.num_frames)]
    chosen: list[torch.Tensor] = []
    indices: list[int] = []
    on_screen: tuple | None = None  # (index, av frame, its pixels once converted, its time)

    def take() -> None:
        nonlocal on_screen
        index, frame, pixels, time = on_screen
        if pixels is None:
            pixels, _ = resize_and_crop(frame.to_image(), resolution, crop_seed)
            on_screen = (index, frame, pixels, time)
        chosen.append(pixels)
        indices.append(index)

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise BadRow(f"unreadable {column}", "the file has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            start = size = None
            for index, frame in enumerate(container.decode(stream)):
                if frame.pts is not None:
                    time = Fraction(frame.pts) * stream.time_base
                elif rate:
                    time = index / Fraction(rate)
                else:
                    raise BadRow(f"unreadable {column}", "frames have no timestamps and the stream no frame rate")
                start = time if start is None else start
                size = size or [frame.height, frame.width]
                while len(chosen) < clip.num_frames and targets[len(chosen)] < time - start:
                    take()
                if len(chosen) == clip.num_frames:
                    break
                on_screen = (index, frame, None, time - start)
    except av.FFmpegError as e:
        raise BadRow(f"unreadable {column}", f"{len(data)} bytes PyAV cannot decode: {e}") from None
    if on_screen is None:
        raise BadRow(f"unreadable {column}", "no frames decoded")
    # The last frame stays on screen for one frame duration; targets past that lie beyond the video.
    end = on_screen[3] + (1 / Fraction(rate) if rate else 0)
    while len(chosen) < clip.num_frames and targets[len(chosen)] < end:
        take()
    num_padded = clip.num_frames - len(chosen)
    if num_padded and not clip.pad_short:
        raise BadRow("short video", f"{column} lasts {float(end):.3f} s, the clip needs "
                                    f"{clip.num_frames} frames at {float(clip.fps):g} fps")
    for _ in range(num_padded):
        take()
    info = {"size": size, "frames": indices, "num_padded_frames": num_padded,
            "source_fps": round(float(rate), 6) if rate else None}
    return torch.stack(chosen, 1), info


def prepare_video_row(spec: RowSpec, clip: ClipSpec, index: int, manifest_path: str, row: dict) -> PreparedVideoPair:
    """One manifest row of two videos -> a PreparedVideoPair with the winner first. Raises BadRow."""
    caption, labels, data, key = _read_row(spec, manifest_path, row)
    winner = 0 if labels[0] > labels[1] else 1
    order = (winner, 1 - winner)
    crop_seeds = _crop_seeds(spec, key)
    # With buckets: the (height, width) nearest the winner's aspect ratio, then the most frames of it that
    # both videos fill at the clip's rate; the fewest frames when none (padded or dropped as pad_short says).
    candidates: list = [None]
    if clip.buckets:
        height, width = video_size(data[winner], spec.image_columns[winner])
        size = nearest_bucket(height, width, tuple(dict.fromkeys(b[1:] for b in clip.buckets)))
        candidates = sorted((b for b in clip.buckets if b[1:] == size), key=lambda b: -b[0])
    for n, bucket in enumerate(candidates):
        is_last = n == len(candidates) - 1
        this_clip = clip if bucket is None else ClipSpec(bucket[0], clip.fps, clip.pad_short and is_last)
        try:
            clips = {i: sample_frames(data[i], spec.image_columns[i], this_clip,
                                      spec.resolution if bucket is None else bucket[1:], seed)
                     for i, seed in zip(order, crop_seeds)}
            break
        except BadRow as e:
            if is_last or e.reason != "short video":
                raise
    sizes = [clips[i][1]["size"] for i in (0, 1)]
    has_mismatched_sizes = sizes[0] != sizes[1]
    if has_mismatched_sizes and spec.drop_mismatched_sizes:
        raise BadRow("mismatched sizes", f"{spec.image_columns[0]} is {sizes[0]} (h, w), "
                                         f"{spec.image_columns[1]} is {sizes[1]}")
    source = {"manifest": os.path.basename(manifest_path), "row": index, "winner": spec.image_columns[winner],
              "labels": labels, "crop": "center" if spec.random_crop_seed is None else "random",
              "crop_seeds": crop_seeds, "original_sizes": [clips[i][1]["size"] for i in order],
              "source_fps": [clips[i][1]["source_fps"] for i in order],
              "frames": [clips[i][1]["frames"] for i in order],
              "num_padded_frames": [clips[i][1]["num_padded_frames"] for i in order]}
    if spec.key_column is not None:
        source["id"] = key
    return PreparedVideoPair(key, index, caption, clips[winner][0], clips[1 - winner][0], source,
                             has_mismatched_sizes, sum(source["num_padded_frames"]), bucket)


# ---------------------------------------------------------------- what the families' encoders share
#
# Each family's encoder (captions and pixels to its shard samples) lives beside the family, under
# dpo_ds/models/, reached through dpo_ds.models.ENCODERS.

def subfolder(root: str, name: str, layout: str) -> str:
    """root/name, which must be a folder; the error names the `layout` --model should have."""
    path = os.path.join(root, name)
    if not os.path.isdir(path):
        raise ValueError(f"model folder {root} has no {name}/; point --model at {layout}")
    return path


class ImageVAE:
    """An AutoencoderKL from a local folder, frozen: the image families' pixels-to-latents half."""

    IS_VIDEO = False  # what tools/encode_pairs.py reads for this family: images
    BATCH_SIZE = 16   # pairs encoded at a time unless --batch-size says otherwise

    def __init__(self, vae_path: str, device: torch.device, dtype: torch.dtype):
        from diffusers import AutoencoderKL

        if not os.path.isfile(os.path.join(vae_path, "config.json")):
            raise ValueError(f"--vae {vae_path} has no config.json; point it at an AutoencoderKL folder")
        self.device, self.dtype = device, dtype
        self.vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=dtype).to(device).eval().requires_grad_(False)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        shift = self.vae.config.shift_factor  # None for SD's and SDXL's VAEs
        self.shift_factor = None if shift is None else float(shift)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_images(self, pixels_N3RR: torch.Tensor) -> torch.Tensor:
        """uint8 [N x 3 x R x R] -> scaled (and shifted) latents [N x C x h x w], float32.

        The posterior mean, not a sample: a sample would freeze one random draw into the data.
        """
        x = pixels_N3RR.to(self.device, torch.float32).div(127.5).sub(1.0).to(self.dtype)
        latents = self.vae.encode(x).latent_dist.mode().float()
        if self.shift_factor is not None:
            latents = latents - self.shift_factor
        return latents * self.scaling_factor

    def _meta(self, family: str, pair: PreparedPair, resolution: int) -> dict:
        return {"caption": pair.caption, "family": family, "latent_layout": "CHW",
                "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor, "label": 1.0,
                "source": {"tool": "encode_pairs", "resolution": resolution, **pair.source}}
