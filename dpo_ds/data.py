"""Shards of latent preference pairs: writing them, listing them, reading them into batches.

Shard format (docs/design.md §4): a POSIX tar in webdataset layout, one pair per sample,
exactly two members per key:
  KEY.json         {"caption", "family", "latent_layout", "scaling_factor", "shift_factor",
                    "label", "source"}
  KEY.safetensors  latents_w, latents_l (float16/bfloat16, same shape) + the family's conditioning
Beside the shards, index.json:
  {"format": "dpo_ds.shards/3", "shards": [{"name", "num_pairs", "size_bytes", "keys": [str], "shape": [int]}, ...]}
  ("shape": the latents' shape shared by every pair of the shard, absent when they differ; the loader's
  shape buckets, PairLoader. dpo_ds.shards/2, without "shape", and /1, without "keys" either, are still
  read; keys missing are then read from the tar headers when the start-up check needs them.)
A key repeated inside one tar (after its first sample, consecutive or not) is a bad sample:
the first sample with the key is kept, every repeat is counted bad and named with key and shard.

Batch legend (PairLoader.epoch yields, B = batch_size, `...` = latent layout CHW or CFHW):
  keys [B] str, shard_urls [B] str (each pair's shard), draw_index [B] long (= epoch, or epoch mod num_draws),
  content_hash [B] int64 (hash of the pair's KEY.safetensors, decode_sample),
  t [B] float64 (the draw's value, by the family's law), noise [B x ...] float32,
  latents_w / latents_l [B x ...] float32, every conditioning tensor [B x ...] float32 (the loader workers send
  them in the shards' dtype, half the bytes, and epoch() converts them),
  num_bad int, num_padded int (of the B, repeats of earlier pairs that fill a batch bad pairs left short).
  A batch with no keys (and no tensors) means its worker found no good pair in the epoch; the
  warning before it names the worker's shards, and the trainer stops every rank on it.

This is the only module that decodes sample bytes, and nothing here uses pickle. webdataset writes the
tars (TarWriter, its encoder off: our bytes go in unchanged), opens shard URLs (gopen: files, `pipe:CMD`)
and iterates their members (tar_file_iterator); its samples, decoders and encoders are never used, so
members stay raw bytes until decode_sample. Listing keys reads tar headers only, with tarfile, which
webdataset cannot do (docs/design.md §4).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import math
import os
import random
import re
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterator

import braceexpand
import safetensors.torch
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import Pipe, gopen
from webdataset.tariterators import tar_file_iterator
from webdataset.writer import TarWriter

from dpo_ds import noise

log = logging.getLogger("dpo_ds.data")

INDEX_NAME = "index.json"
EMPTY_PROMPT_NAME = "empty_prompt.safetensors"  # beside index.json: the family's conditioning of the prompt ""
INDEX_FORMAT = "dpo_ds.shards/3"
INDEX_FORMATS = ("dpo_ds.shards/1", "dpo_ds.shards/2", INDEX_FORMAT)  # read; /1 has no "keys", /1 and /2 no "shape"
MEMBER_EXTENSIONS = ("json", "safetensors")
LATENT_NAMES = ("latents_w", "latents_l")
LATENT_DTYPES = (torch.float16, torch.bfloat16)
PICKLE_EXTENSIONS = {"pt", "pth", "pickle", "pkl", "pyd", "npy"}
BATCH_FIELDS = {"keys", "shard_urls", "draw_index", "content_hash", "t", "noise", "num_bad", "num_padded"}
# webdataset's rule: the key is the member path up to the first dot of its file name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# Errors that mean "this shard's bytes are unreadable", as opposed to a bug in this module.
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError)


class BadSample(ValueError):
    """A sample that breaks the shard format; the message is the reason."""


class RepeatedKey(BadSample):
    """A key met again in the tar that already gave a sample with it (tar_samples yields this
    in place of the repeat's members, so every reader counts and names it like any bad sample)."""


def decode_sample(key: str, members: dict[str, bytes], schema: dict[str, tuple[int, ...] | None] | None) -> dict:
    """Validate and decode one pair: {ext: bytes} -> {"key", "meta": dict, "tensors": {name: Tensor},
    "content_hash": int}.

    schema maps every tensor name besides the latents to its shape (None = any shape); the
    latents may be listed too, to pin their shape. schema=None skips the name and shape checks.
    members may be the RepeatedKey that tar_samples yields for a repeated key: it is raised.
    Raises BadSample with the reason.

    content_hash: the first 8 bytes of the SHA-256 of the KEY.safetensors bytes, as a signed 64-bit int.
    The reference cache stores it per pair and checks it on every lookup, so a shard re-encoded under
    its old name (other VAE, other crop) is never served errors computed on its old contents.
    """
    if isinstance(members, BadSample):
        raise members
    extra = sorted(set(members) - set(MEMBER_EXTENSIONS))
    if extra:
        # Checked before anything is decoded: a stranger's .pt must never reach a deserializer.
        is_pickle = any(ext.rsplit(".", 1)[-1].lower() in PICKLE_EXTENSIONS for ext in extra)
        names = ", ".join(f"{key}.{ext}" for ext in extra)
        raise BadSample(f"unexpected member {names}" + (" (pickle-bearing, never decoded)" if is_pickle else ""))
    missing = [f"{key}.{ext}" for ext in MEMBER_EXTENSIONS if ext not in members]
    if missing:
        raise BadSample(f"missing member {', '.join(missing)}")
    try:
        meta = json.loads(members["json"].decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
        raise BadSample(f"undecodable json: {e}") from None
    if not isinstance(meta, dict):
        raise BadSample(f"json is a {type(meta).__name__}, expected an object")
    try:
        tensors = safetensors.torch.load(members["safetensors"])
    except Exception as e:  # safetensors raises its own SafetensorError besides builtin errors
        raise BadSample(f"undecodable safetensors: {e}") from None

    for name in LATENT_NAMES:
        if name not in tensors:
            raise BadSample(f"no tensor {name!r}")
        if tensors[name].dtype not in LATENT_DTYPES:
            raise BadSample(f"{name} is {tensors[name].dtype}, expected float16 or bfloat16")
    if tensors["latents_w"].shape != tensors["latents_l"].shape:
        raise BadSample(f"latents_w and latents_l differ in shape: {[tuple(tensors[n].shape) for n in LATENT_NAMES]}")
    if schema is not None:
        unknown = sorted(set(tensors) - set(schema) - set(LATENT_NAMES))
        if unknown:
            raise BadSample(f"tensor(s) {unknown} are not in the schema {sorted(schema)}")
        for name, shape in schema.items():
            if name not in tensors:
                raise BadSample(f"no tensor {name!r}, which the schema requires")
            if shape is not None and tuple(tensors[name].shape) != tuple(shape):
                raise BadSample(f"{name} has shape {tuple(tensors[name].shape)}, the schema says {tuple(shape)}")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not _is_finite(tensor):
            raise BadSample(f"{name} has non-finite values")
    digest = hashlib.sha256(members["safetensors"]).digest()[:8]
    return {"key": key, "meta": meta, "tensors": tensors, "content_hash": int.from_bytes(digest, "little", signed=True)}


def _is_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. min and max propagate NaN and reach ±inf, so their two values tell;
    torch.isfinite(x).all() makes a bool tensor of the sample's size first, 4x slower on a Wan-size pair."""
    if not tensor.numel():
        return True
    lo, hi = torch.aminmax(tensor)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


class ShardWriter:
    """Writes pairs into `prefix-000000.tar`, `prefix-000001.tar`, ... in out_dir, then index.json.

    A shard rolls over at max_pairs pairs, or before a pair that would take it past max_bytes
    (approximately: the tar's end-of-archive padding, at most 10 KiB, comes on top). Shards
    appear under their final name only once complete. Headers carry no time or owner, so the
    same input gives byte-identical shards. Writers with different prefixes may share out_dir
    one after the other; each close merges its shards into index.json.
    """

    def __init__(self, out_dir: str, prefix: str = "shard", max_pairs: int = 1000, max_bytes: int | None = None):
        if max_pairs < 1:
            raise ValueError(f"ShardWriter max_pairs must be >= 1, got {max_pairs}")
        if not prefix or "/" in prefix:
            raise ValueError(f"ShardWriter prefix {prefix!r} must be a non-empty file name prefix")
        self.out_dir, self.prefix = out_dir, prefix
        self.max_pairs, self.max_bytes = max_pairs, max_bytes
        os.makedirs(out_dir, exist_ok=True)
        self._keys: set[str] = set()
        self._index_entries: list[dict] = []
        self._file = self._tar = None
        self._shard_keys: list[str] = []
        self._shard_shapes: set[tuple[int, ...]] = set()  # the open shard's latent shapes

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self._tar is not None:
            # Only complete shards are published; the one being written when the caller failed is dropped.
            self._tar.close()
            self._file.close()
            os.remove(self._file.name)
            self._file = self._tar = None
        self.close()

    def write(self, key: str, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Append one pair. Raises ValueError naming the key when it would be a bad sample."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"pair key {key!r} must be non-empty, without '.' or '/' "
                             "(webdataset splits member names at the first dot)")
        if key in self._keys:
            raise ValueError(f"pair key {key!r} was already written; keys must be unique across the dataset")
        try:
            meta_bytes = json.dumps(meta, sort_keys=True, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise ValueError(f"pair {key!r}: meta is not plain JSON: {e}") from None
        # A copy, because safetensors refuses tensors that share storage (e.g. w and l views of one batch).
        tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
        members = {"json": meta_bytes, "safetensors": safetensors.torch.save(tensors)}
        try:
            decode_sample(key, members, schema=None)
        except BadSample as e:
            raise ValueError(f"pair {key!r} is not a valid sample: {e}") from None

        num_bytes = sum(512 + -(-len(b) // 512) * 512 for b in members.values())  # header + padded payload
        if self._tar is not None and (
            len(self._shard_keys) >= self.max_pairs
            or (self.max_bytes is not None and self._tar.tarstream.offset + num_bytes > self.max_bytes)
        ):
            self._finish_shard()
        if self._tar is None:
            name = f"{self.prefix}-{len(self._index_entries):06d}.tar"
            self._file = open(os.path.join(self.out_dir, name + ".tmp"), "wb")
            # encoder=False: bytes in, bytes out (no handler, so nothing is ever pickled); no time, owner or group.
            self._tar = TarWriter(self._file, user="", group="", mode=0o644, mtime=0, encoder=False)
            self._shard_keys, self._shard_shapes = [], set()
        self._tar.write({"__key__": key, **members})  # members in sorted order: KEY.json, KEY.safetensors
        self._shard_keys.append(key)
        self._shard_shapes.add(tuple(tensors["latents_w"].shape))
        self._keys.add(key)

    def _finish_shard(self) -> None:
        self._tar.close()
        self._file.close()
        path = self._file.name[: -len(".tmp")]
        os.replace(self._file.name, path)
        entry = {"name": os.path.basename(path), "num_pairs": len(self._shard_keys),
                 "size_bytes": os.path.getsize(path), "keys": list(self._shard_keys)}
        if len(self._shard_shapes) == 1:  # the shard's shape bucket (PairLoader); none when its pairs differ
            entry["shape"] = list(next(iter(self._shard_shapes)))
        self._index_entries.append(entry)
        self._file = self._tar = None

    def close(self) -> None:
        """Finish the open shard and merge this writer's shards into index.json."""
        if self._tar is not None:
            self._finish_shard()
        merge_index(self.out_dir, self._index_entries)


def merge_index(folder: str, entries: list[dict]) -> None:
    """Merge shard entries into folder's index.json, atomically: an entry replaces the one of its name.
    The writer and tools/encode_pairs.py (which serializes its ranks with a lock) both publish through this."""
    path = os.path.join(folder, INDEX_NAME)
    merged = {**read_index(path), **{e["name"]: e for e in entries}}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"format": INDEX_FORMAT, "shards": [merged[name] for name in sorted(merged)]}, f, indent=1)
    os.replace(tmp, path)


@dataclass(frozen=True)
class ShardInfo:
    url: str
    num_pairs: int
    size_bytes: int  # -1 when unknown (pipe: URLs)
    shape: tuple[int, ...] | None = None  # the latents' shape of every pair, from index.json; None when unknown


def read_index(index_path: str) -> dict[str, dict]:
    """index.json's entries by shard name, each with "keys" when the index lists them; {} when absent
    or unusable (then shards are counted)."""
    if not os.path.exists(index_path):
        return {}
    try:
        with open(index_path) as f:
            index = json.load(f)
        if index["format"] not in INDEX_FORMATS:
            raise ValueError(f"format {index['format']!r}")
        entries = {e["name"]: {k: e[k] for k in ("name", "num_pairs", "size_bytes")} for e in index["shards"]}
        for e in index["shards"]:
            # Keys that disagree with the count are not trusted; the start-up check then reads the tar headers.
            if isinstance(e.get("keys"), list) and len(e["keys"]) == e["num_pairs"]:
                entries[e["name"]]["keys"] = e["keys"]
            shape = e.get("shape")
            if shape is not None:
                if not (isinstance(shape, list) and shape and all(type(d) is int and d > 0 for d in shape)):
                    raise ValueError(f"shard {e['name']}: shape {shape!r} is not a list of positive ints")
                entries[e["name"]]["shape"] = tuple(shape)
        return entries
    except (ValueError, KeyError, TypeError) as e:
        log.warning("%s is not a %s index (%r); counting pairs from the tar headers", index_path, INDEX_FORMAT, e)
        return {}


@contextlib.contextmanager
def _open_shard(url: str) -> Iterator:
    """A binary stream of the shard from webdataset's gopen: a local file, or the stdout of a `pipe:CMD` URL,
    whose failure (a non-zero exit status, seen at a read or when the stream ends) raises OSError."""
    # An absolute path, so that gopen never takes a relative path's "name:" for a URL scheme.
    stream = gopen(url if url.startswith("pipe:") else os.path.abspath(url), "rb")
    is_pipe = isinstance(stream, Pipe)
    try:
        yield stream
        while is_pipe and stream.read(1 << 20):  # the tar's padding, so the command exits cleanly
            pass
        stream.close()
    except Exception:
        if is_pipe and stream.status not in (None, *stream.ignore_status):  # gopen's message is its Popen args
            raise OSError(f"{url!r} exited with status {stream.status}") from None
        raise
    finally:
        if is_pipe and not stream.stream.closed:  # a reader that stopped early does not care how the command ends
            stream.ignore_errors = True
            stream.proc.kill()
        stream.close()


def shard_keys(url: str) -> list[str]:
    """The key of every sample tar_samples yields, repeats included, so its length is what the reader
    plans with. For local files only the headers are read (tarfile seeks over payloads; webdataset's
    iterator would read them all), for pipe: URLs every byte streams past."""
    keys: list[str] = []
    try:
        mode = "r|*" if url.startswith("pipe:") else "r:*"  # "r:" seeks over payloads
        with _open_shard(url) as stream, tarfile.open(fileobj=stream, mode=mode) as tar:
            keys += (key for key, _ in _samples((m.name, None) for m in tar if m.isreg()))
    except SHARD_ERRORS as e:
        log.warning("shard %s: tar unreadable after %d pairs (%s); counting those", url, len(keys), _why(e))
    return keys


def list_shards(spec: str | list[str], check: bool = False) -> list[ShardInfo]:
    """Shards of a spec: .tar paths, brace patterns, globs, directories (*.tar inside), `pipe:CMD` URLs.

    A local shard's pair count comes from index.json beside it when the sizes agree. A shard smaller
    than its entry was cut short: it keeps the index's count (with a warning), so the pairs it lost are
    counted bad, by shard, when it is read. Otherwise (no entry, a bigger shard, pipe: URLs) the tar
    headers are counted. check=True, for training start-up, also refuses a key in two shards (naming
    both; keys come from the index, or from the tar headers where it lists none) and a spec whose
    local shards all fail to open as a tar (warning about each one that fails, when some open).
    """
    urls: list[str] = []
    for item in [spec] if isinstance(spec, str) else list(spec):
        if item.startswith("pipe:"):
            urls.append(item)
            continue
        for path in braceexpand.braceexpand(item):
            if os.path.isdir(path):
                found = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
                if not found:
                    raise ValueError(f"no .tar shards in directory {path}")
                urls += found
            elif any(c in path for c in "*?["):
                found = sorted(glob.glob(path))
                if not found:
                    raise ValueError(f"no shards match {path}")
                urls += found
            elif not os.path.isfile(path):
                raise ValueError(f"shard {path} does not exist")
            else:
                urls.append(path)
    if not urls:
        raise ValueError(f"no shards match {spec!r}")
    repeated = sorted({u for u in urls if urls.count(u) > 1})
    if repeated:
        raise ValueError(f"shard {repeated[0]} is listed more than once; each pair must be visited once per epoch")

    indexes: dict[str, dict[str, dict]] = {}
    shards, keys_of = [], {}  # keys_of: url -> keys in tar order, or None where the index lists none
    for url in urls:
        if url.startswith("pipe:"):
            keys_of[url] = shard_keys(url)
            shards.append(ShardInfo(url, len(keys_of[url]), -1))
            continue
        index_path = os.path.join(os.path.dirname(os.path.abspath(url)), INDEX_NAME)
        if index_path not in indexes:
            indexes[index_path] = read_index(index_path)
        entry = indexes[index_path].get(os.path.basename(url))
        size = os.path.getsize(url)
        if entry is not None and size <= entry["size_bytes"]:
            if size < entry["size_bytes"]:
                log.warning("shard %s has %d bytes, %s says %d: cut short; the pairs it lost will count as bad",
                            url, size, index_path, entry["size_bytes"])
            keys_of[url] = entry.get("keys")
            shards.append(ShardInfo(url, int(entry["num_pairs"]), size, entry.get("shape")))
            continue
        if entry is not None:
            log.warning("shard %s has %d bytes, %s says %d; counting its pairs",
                        url, size, index_path, entry["size_bytes"])
        keys_of[url] = shard_keys(url)
        shards.append(ShardInfo(url, len(keys_of[url]), size))
    if check:
        _check_readable(shards)
        _check_unique_keys(shards, keys_of)
    return shards


def _why(error: Exception) -> str:
    """One line for a shard error: tarfile's "r:*" ReadError lists every compression it tried, tar's last."""
    lines = str(error).splitlines() or [""]
    return lines[-1].removeprefix("- method tar: ") if len(lines) > 1 else f"{type(error).__name__}: {lines[0]}"


def _check_readable(shards: list[ShardInfo]) -> None:
    """Each local shard opens as a tar (which reads its first member header); pipe: URLs are not run."""
    unreadable = {}
    for shard in shards:
        if shard.url.startswith("pipe:"):
            continue
        try:
            with open(shard.url, "rb") as f, tarfile.open(fileobj=f, mode="r:*"):
                pass
        except SHARD_ERRORS as e:
            unreadable[shard] = _why(e)
    if unreadable and len(unreadable) == len(shards):
        listed = "; ".join(f"{s.url} ({why})" for s, why in list(unreadable.items())[:3])
        raise ValueError(f"no shard opens as a tar: {listed}" + (f"; and {len(unreadable) - 3} more"
                                                                  if len(unreadable) > 3 else ""))
    for shard, why in unreadable.items():
        log.warning("shard %s does not open as a tar (%s); its %d listed pairs will count as bad",
                    shard.url, why, shard.num_pairs)


def _check_unique_keys(shards: list[ShardInfo], keys_of: dict[str, list[str] | None]) -> None:
    """Refuse a key in two shards (a shard copied under another name): its pairs would be trained twice an epoch."""
    unknown = [s.url for s in shards if keys_of[s.url] is None]
    if unknown:
        log.info("index.json lists no keys for %d shard(s) (an older index); reading their tar headers to check "
                 "that no key is in two shards", len(unknown))
    shard_of: dict[str, str] = {}
    for shard in shards:
        keys = keys_of[shard.url] if keys_of[shard.url] is not None else shard_keys(shard.url)
        for key in dict.fromkeys(keys):  # a repeat inside one shard is the reader's to count
            first = shard_of.setdefault(key, shard.url)
            if first != shard.url:
                raise ValueError(f"pair key {key!r} is in shard {first} and in shard {shard.url} (a shard copied "
                                 "under another name?); its pairs would be trained twice an epoch: remove one")


def check_family(shards: list[ShardInfo], family: str, latent_layout: str) -> None:
    """Refuse shards written for another model family or latent layout, naming the shard: its pairs would be
    bad samples one by one (wrong shapes), or, where shapes happen to agree, silently train the wrong thing.
    Reads the first json member of each local shard (payloads before it are seeked over); pipe: URLs are not
    run. Unreadable shards are the start-up check's (list_shards check=True) to report."""
    for shard in shards:
        if shard.url.startswith("pipe:"):
            continue
        try:
            with tarfile.open(shard.url, mode="r:*") as tar:
                member = next((m for m in tar if m.isfile() and (match := _KEY_EXT.match(m.name))
                               and match[2] == "json"), None)
                meta = json.loads(tar.extractfile(member).read()) if member is not None else None
        except (*SHARD_ERRORS, ValueError):
            continue  # unreadable or a bad sample: counted when read
        if not isinstance(meta, dict):
            continue
        found = (meta.get("family"), meta.get("latent_layout"))
        if found != (family, latent_layout):
            key = _KEY_EXT.match(member.name)[1]
            raise ValueError(f"shard {shard.url} holds pairs for family {found[0]!r} with latent_layout {found[1]!r} "
                             f"(pair {key!r}); the run's model.family {family!r} takes {latent_layout!r}: encode the "
                             "shards for this model, or set model.family to theirs")


def _seed_of(*parts: object) -> int:
    """A stable 63-bit seed from its parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256("\x00".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def tar_samples(url: str) -> Iterator[tuple[str, dict[str, bytes] | RepeatedKey]]:
    """(key, {ext: bytes}) per sample in tar order, undecoded; see _samples for where samples start.
    Members come from webdataset's tar_file_iterator as raw bytes (no webdataset decoder ever sees them).
    The tools that read raw members (inspection, the reference cache) read them through this."""
    with _open_shard(url) as stream:
        members = tar_file_iterator(stream, skip_meta=None)
        yield from _samples((m["fname"], m["data"]) for m in members)


def _samples(members: Iterator[tuple[str, bytes | None]]) -> Iterator[tuple[str, dict | RepeatedKey]]:
    """Samples from a tar's regular members (name, payload, or None when unread): consecutive members
    with one key form a sample, until a member's extension comes again (a.json a.safetensors a.json ...
    is two samples). A key that already gave a sample, here or earlier in the tar, gives (key, RepeatedKey)
    in place of its members: the first sample is kept, every repeat is a bad one. Top-level `__*__`
    members, which webdataset's iterator skips as its metadata, are skipped here too."""
    seen: set[str] = set()
    key, sample = None, {}
    for name, payload in members:
        match = _KEY_EXT.match(name)
        if not match or ("/" not in name and name.startswith("__") and name.endswith("__")):
            continue
        if match[1] != key or match[2] in sample:
            if key is not None:
                yield key, _repeat(key) if key in seen else sample
                seen.add(key)
            key, sample = match[1], {}
        sample[match[2]] = None if key in seen else payload
    if key is not None:
        yield key, _repeat(key) if key in seen else sample


def _repeat(key: str) -> RepeatedKey:
    return RepeatedKey(f"key {key} repeats an earlier sample of this shard; the first is kept, this one skipped")


@dataclass(frozen=True)
class _Piece:
    """What one loader slot reads of a shard: its pairs outside `excluded`, counted in tar order,
    from position start up to stop (None: to the end)."""
    shard: ShardInfo
    excluded: frozenset[str] = frozenset()
    start: int = 0
    stop: int | None = None

    @property
    def num_pairs(self) -> int:
        end = self.shard.num_pairs - len(self.excluded) if self.stop is None else self.stop
        return end - self.start


def _round_robin_resume(quotas: list[int], num_skip: int) -> tuple[list[int], int]:
    """(batches each worker must drop, the worker whose turn is next) to resume at batch num_skip.

    The DataLoader takes one batch from each worker in turn, passing over exhausted workers;
    since every worker yields exactly its quota, that order is known in advance. A fresh
    DataLoader starts its turns at worker 0, so the caller rotates workers to put the next one there.
    """
    skips, remaining, next_worker = [0] * len(quotas), list(quotas), 0
    while num_skip > 0:
        if remaining[next_worker]:
            remaining[next_worker] -= 1
            skips[next_worker] += 1
            num_skip -= 1
        next_worker = (next_worker + 1) % len(quotas)
    return skips, next_worker


def _shuffled(items: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    """items through a shuffle buffer: each step yields a random one of the next buffer_size."""
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            j = rng.randrange(len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def _turns(quotas: list[int]) -> list[int]:
    """The worker each of an epoch's batches comes from: the DataLoader's turns (see _round_robin_resume)."""
    turns, remaining, worker = [], list(quotas), 0
    while any(remaining):
        if remaining[worker]:
            remaining[worker] -= 1
            turns.append(worker)
        worker = (worker + 1) % len(quotas)
    return turns


def _cut(pieces: list[_Piece], lo: int, hi: int) -> list[_Piece]:
    """The pairs at positions [lo, hi) of the pieces' pairs taken one after the other, as pieces."""
    out, offset = [], 0
    for piece in pieces:
        start, stop = max(lo - offset, 0), min(hi - offset, piece.num_pairs)
        if start < stop:
            out.append(_Piece(piece.shard, piece.excluded, piece.start + start, piece.start + stop))
        offset += piece.num_pairs
    return out


@dataclass(frozen=True)
class _Schedule:
    """One loader slot's share of an epoch of several shape buckets: its pieces of shards per bucket,
    and the bucket of each of its batches, in the order the slot yields them."""
    pieces: dict[tuple[int, ...] | None, list[_Piece]]
    order: tuple[tuple[int, ...] | None, ...]


def _bucket_sort_key(shape: tuple[int, ...] | None) -> tuple:
    return (0, ()) if shape is None else (1, shape)


class PairLoader:
    """Batches of pairs for one rank, split over ranks and loader workers without overlap.

    Every epoch the shard list is shuffled from (seed, epoch) and dealt round robin to the
    world_size * num_workers (rank, worker) slots; consecutive slots are different ranks, so
    every rank holds a shard. batches_per_epoch is the least any rank can get under any shuffle
    (from the ShardInfo counts alone), so it is the same on every rank and in every epoch
    without communication; pairs beyond it are left over for that epoch (none when all shards
    hold the same number of pairs and it divides evenly).

    An epoch can also be planned without some of its pairs (`exclude`, by shard url): the ones
    trained before a resume on another world size. The remaining pairs, in the epoch's shard order
    and tar order, are cut into equal contiguous runs, one per (rank, worker) slot, so each rank
    reads only the shards its run touches; the last pairs, fewer than world_size * batch_size, are
    left over for that epoch.

    Tensors whose schema shape is None may have any shape, but one worker's pairs in one epoch
    must agree (a batch is stacked); a pair that differs from the worker's first is bad.

    Shape buckets. A shard's latent shape comes from index.json ("shape", ShardInfo.shape). When the
    shards record one shape (or none) the plan is the one above, unchanged, shards that record none
    included. When they record several, shards that record none form one more bucket (read with the
    rule above), and each bucket is planned on its own; no batch mixes buckets: the epoch's shuffled shard order, restricted to the bucket,
    is dealt round robin to the ranks; the bucket gives every rank n_b batches, the least any rank can
    get under any shuffle (whole batches; the rest of the bucket is left over in that epoch); with
    `exclude`, the bucket's remaining pairs are cut into equal contiguous runs, one per rank. Every rank
    takes sum_b n_b batches in an epoch, in one bucket order drawn from (seed, epoch) and identical on
    every rank, so all ranks run the same shape at the same step (it matters for speed, not for
    correctness: ranks of one step wait for the slowest). A rank's pairs of a bucket, in shard and tar
    order, are cut into contiguous runs, one per loader worker, sized by the batches of that bucket
    that fall on the worker's turns; a worker reads each of its buckets through its own shuffle buffer.
    A pair whose latents differ from its shard's recorded shape is bad (counted and named).
    """

    def __init__(self, shards: list[ShardInfo], *, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int = 2, shuffle_buffer: int = 256, schema: dict[str, tuple[int, ...] | None],
                 draw_t: Callable[[torch.Generator], float], num_draws: int | None = None,
                 dropout: PromptDropout | None = None, pin_memory: bool = False):
        if batch_size < 1 or num_workers < 0 or not 0 <= rank < world_size:
            raise ValueError(f"PairLoader needs batch_size >= 1, num_workers >= 0, 0 <= rank < world_size; "
                             f"got {batch_size}, {num_workers}, {rank}, {world_size}")
        if BATCH_FIELDS & set(schema):
            raise ValueError(f"schema names {sorted(BATCH_FIELDS & set(schema))} clash with batch fields; rename them")
        if len(shards) < world_size:
            raise ValueError(f"{len(shards)} shards for {world_size} ranks: every rank needs a shard; "
                             "write smaller shards or use fewer ranks")
        self.shards = list(shards)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.num_workers, self.shuffle_buffer, self.schema = num_workers, shuffle_buffer, dict(schema)
        self.draw_t = draw_t  # the family's law of t (Family.draw_t)
        self.dropout = dropout  # data.empty_prompt_prob, or None
        self.pin_memory = pin_memory  # batches in page-locked memory, for asynchronous copies to a GPU
        # With a reference cache of K draws per pair, epoch e uses draw e mod K: the policy must see
        # exactly the noisy latents the cached errors were computed on. The shuffle still uses e.
        if num_draws is not None and num_draws < 1:
            raise ValueError(f"num_draws must be >= 1, got {num_draws}")
        self.num_draws = num_draws
        self.num_slots_per_rank = max(num_workers, 1)  # num_workers=0 reads in-process, as one slot
        # The position of batches() (state_dict): this rank's pairs of the current epoch by shard url, and
        # the pairs the epoch's plan leaves out (None: the loader's own plan).
        self.epoch_index, self.batch_in_epoch, self.epoch_num_batches = 0, 0, 0
        self.consumed: dict[str, list[str]] = {}
        self.excluded: dict[str, list[str]] | None = None
        self.pairs_read = self.pairs_bad = 0  # this rank's, good and bad (summed over ranks when judged)

        # A shard without a recorded shape (an older index, a pipe: URL, no entry) is read as before buckets:
        # with one recorded shape (or none) there is one bucket; only among several is it a bucket of its own.
        shapes = {s.shape for s in self.shards}
        known = sorted(shapes - {None})
        self.buckets = sorted(shapes, key=_bucket_sort_key) if len(known) > 1 else known[:1] or [None]
        if len(self.buckets) > 1:
            self.bucket_batches = {}
            for bucket in self.buckets:
                # Rank r holds len(range(r, n, W)) of the bucket's shards whatever the shuffle; its worst case
                # is the smallest ones.
                counts = sorted(s.num_pairs for s in self.shards if s.shape == bucket)
                self.bucket_batches[bucket] = min(sum(counts[: len(range(r, len(counts), world_size))]) // batch_size
                                                  for r in range(world_size))
                if self.bucket_batches[bucket] == 0:
                    log.warning("shape bucket %s: %d pairs in %d shards cannot give a batch of %d to each of %d ranks "
                                "in every shuffle; they are left over every epoch", bucket, sum(counts), len(counts),
                                batch_size, world_size)
            self.batches_per_epoch = sum(self.bucket_batches.values())
            if self.batches_per_epoch == 0:
                raise ValueError(f"no shape bucket of {len(self.shards)} shards can give a batch of {batch_size} to "
                                 f"every rank in every shuffle; use a smaller batch, fewer ranks or more data")
            if rank == 0:
                log.info("%d shape buckets, batches per rank per epoch: %s", len(self.buckets),
                         ", ".join(f"{b}: {n}" for b, n in self.bucket_batches.items()))
            return

        # Slot s holds len(range(s, n, S)) shards whatever the shuffle; its worst case is the
        # smallest ones. Per-slot floors make this a lower bound on every rank's batches.
        num_slots = world_size * self.num_slots_per_rank
        counts = sorted(s.num_pairs for s in self.shards)
        def worst(slot: int) -> int:
            return sum(counts[: len(range(slot, len(counts), num_slots))]) // batch_size
        self.batches_per_epoch = min(
            sum(worst(w * world_size + r) for w in range(self.num_slots_per_rank)) for r in range(world_size)
        )
        if self.batches_per_epoch == 0:
            raise ValueError(f"{sum(counts)} pairs in {len(counts)} shards cannot give a batch of {batch_size} to "
                             f"every rank in every shuffle; use fewer workers, a smaller batch or more data")

    def num_batches(self, exclude: dict[str, list[str]] | None = None) -> int:
        """Batches per rank of an epoch planned without the pairs in `exclude` ({shard url: keys});
        batches_per_epoch when exclude is None."""
        if exclude is None:
            return self.batches_per_epoch
        if len(self.buckets) > 1:
            return sum(self._bucket_remaining(exclude).values())
        num_remaining = sum(self._remaining(exclude).values())
        return num_remaining // (self.world_size * self.batch_size)

    def _bucket_remaining(self, exclude: dict[str, list[str]]) -> dict[tuple[int, ...] | None, int]:
        """Batches per rank of each shape bucket in an epoch planned without `exclude`."""
        remaining = self._remaining(exclude)
        return {bucket: sum(remaining[s.url] for s in self.shards if s.shape == bucket)
                // (self.world_size * self.batch_size) for bucket in self.buckets}

    def num_left_over(self, exclude: dict[str, list[str]]) -> int:
        """Pairs outside `exclude` that an epoch planned without them leaves over, all ranks."""
        num_remaining = sum(self._remaining(exclude).values())
        return num_remaining - self.num_batches(exclude) * self.world_size * self.batch_size

    def _remaining(self, exclude: dict[str, list[str]]) -> dict[str, int]:
        """Pairs per shard url outside `exclude`, which is checked against the shard list."""
        counts = {s.url: s.num_pairs for s in self.shards}
        for url, keys in exclude.items():
            if url not in counts:
                raise ValueError(f"the data position names shard {url}, which data.shards does not list; "
                                 "resume with the shards the run was trained on")
            if len(set(keys)) > counts[url]:
                raise ValueError(f"the data position holds {len(set(keys))} pairs of shard {url}, which has "
                                 f"{counts[url]}; resume with the shards the run was trained on")
            counts[url] -= len(set(keys))
        return counts

    def _plan(self, epoch: int, exclude: dict[str, list[str]] | None = None) -> list[tuple[list[_Piece], int]]:
        """This rank's (pieces of shards, batch quota) per worker in this epoch; quotas sum to num_batches."""
        order = list(self.shards)
        random.Random(_seed_of(self.seed, epoch)).shuffle(order)
        if len(self.buckets) > 1:
            return self._bucket_plan(epoch, order, exclude)
        if exclude is not None:
            return self._remainder_plan(order, exclude)
        num_slots = self.world_size * self.num_slots_per_rank
        plan = [order[w * self.world_size + self.rank :: num_slots] for w in range(self.num_slots_per_rank)]
        quotas = [sum(s.num_pairs for s in shards) // self.batch_size for shards in plan]
        assert sum(quotas) >= self.batches_per_epoch, (quotas, self.batches_per_epoch)
        # Trim the fullest worker first, so the workers stay interleaved for as long as possible.
        for _ in range(sum(quotas) - self.batches_per_epoch):
            quotas[max(range(len(quotas)), key=lambda w: (quotas[w], w))] -= 1
        return [([_Piece(s) for s in shards], quota) for shards, quota in zip(plan, quotas)]

    def _bucket_plan(self, epoch: int, order: list[ShardInfo],
                     exclude: dict[str, list[str]] | None) -> list[tuple[_Schedule, int]]:
        """(a _Schedule, batch quota) per worker of an epoch of several shape buckets (the class docstring)."""
        runs: dict[tuple[int, ...] | None, list[_Piece]] = {}  # this rank's pairs of each bucket, in order
        if exclude is None:
            num_batches = self.bucket_batches
            for bucket in self.buckets:
                shards = [s for s in order if s.shape == bucket]
                runs[bucket] = [_Piece(s) for s in shards[self.rank :: self.world_size]]
        else:
            num_batches = self._bucket_remaining(exclude)
            remaining = self._remaining(exclude)
            excluded = {url: frozenset(keys) for url, keys in exclude.items()}
            for bucket in self.buckets:
                pieces = [_Piece(s, excluded.get(s.url, frozenset()), 0, remaining[s.url])
                          for s in order if s.shape == bucket]
                run = num_batches[bucket] * self.batch_size
                runs[bucket] = _cut(pieces, self.rank * run, (self.rank + 1) * run)
        # One bucket order for every rank: a pure function of (seed, epoch) and the buckets' batch counts.
        sequence = [bucket for bucket in self.buckets for _ in range(num_batches[bucket])]
        random.Random(_seed_of(self.seed, epoch, "buckets")).shuffle(sequence)
        total, num_slots = len(sequence), self.num_slots_per_rank
        quotas = [total // num_slots + (w < total % num_slots) for w in range(num_slots)]
        turns = _turns(quotas)
        orders = [[b for b, w in zip(sequence, turns) if w == worker] for worker in range(num_slots)]
        plan, lo = [], {bucket: 0 for bucket in self.buckets}
        for worker in range(num_slots):
            pieces = {}
            for bucket in self.buckets:
                hi = lo[bucket] + orders[worker].count(bucket) * self.batch_size
                if hi > lo[bucket]:
                    pieces[bucket] = _cut(runs[bucket], lo[bucket], hi)
                lo[bucket] = hi
            plan.append((_Schedule(pieces, tuple(orders[worker])), quotas[worker]))
        return plan

    def _remainder_plan(self, order: list[ShardInfo], exclude: dict[str, list[str]]) -> list[tuple[list[_Piece], int]]:
        """The pairs outside `exclude` in shard order, cut into one contiguous run per slot: rank r
        gets the r-th run of num_batches * batch_size pairs, split among its workers by their quotas."""
        remaining = self._remaining(exclude)
        excluded = {url: frozenset(keys) for url, keys in exclude.items()}
        num_batches = self.num_batches(exclude)
        quotas = [num_batches // self.num_slots_per_rank + (w < num_batches % self.num_slots_per_rank)
                  for w in range(self.num_slots_per_rank)]
        plan, lo = [], self.rank * num_batches * self.batch_size
        for quota in quotas:
            hi = lo + quota * self.batch_size
            pieces, offset = [], 0  # offset: position of the shard's first remaining pair in the epoch's order
            for shard in order:
                start, stop = max(lo - offset, 0), min(hi - offset, remaining[shard.url])
                if start < stop:
                    pieces.append(_Piece(shard, excluded.get(shard.url, frozenset()), start, stop))
                offset += remaining[shard.url]
            plan.append((pieces, quota))
            lo = hi
        return plan

    def epoch(self, epoch: int, skip_batches: int = 0, exclude: dict[str, list[str]] | None = None) -> Iterator[dict]:
        """The batches of this epoch from batch skip_batches on: exactly num_batches(exclude) - skip_batches.

        exclude ({shard url: keys}) plans the epoch without those pairs; see the class docstring.
        """
        num_batches = self.num_batches(exclude)
        if not 0 <= skip_batches <= num_batches:
            raise ValueError(f"skip_batches {skip_batches} is outside [0, {num_batches}]")
        plan = self._plan(epoch, exclude)
        skips, next_worker = _round_robin_resume([quota for _, quota in plan], skip_batches)
        slots = [(shards, quota, skip) for (shards, quota), skip in zip(plan, skips)]
        dataset = _EpochPairs(self, epoch, slots[next_worker:] + slots[:next_worker], first_slot=next_worker)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            persistent_workers=False, in_order=True, pin_memory=self.pin_memory)
        num_yielded = 0
        for batch in loader:
            num_yielded += 1
            yield _as_float32(batch)
        assert num_yielded == num_batches - skip_batches, (num_yielded, num_batches, skip_batches)


    # ------------------------------------------------------------ the position, epoch after epoch

    def batches(self) -> Iterator[dict]:
        """This rank's batches from the current position on, epoch after epoch, advancing the position
        (state_dict) as each batch is handed out. One of these per run: it is the loader's own cursor."""
        while True:
            self.epoch_num_batches = self.num_batches(self.excluded)
            for batch in self.epoch(self.epoch_index, skip_batches=self.batch_in_epoch, exclude=self.excluded):
                # Advanced now, before the batch is trained: the generator moves to the next epoch lazily.
                self.batch_in_epoch += 1
                for url, key in zip(batch["shard_urls"], batch["keys"]):
                    self.consumed.setdefault(url, []).append(key)
                # Repeats that pad a short batch were read once already; they are not pairs read again.
                self.pairs_read += len(batch["keys"]) - batch["num_padded"] + batch["num_bad"]
                self.pairs_bad += batch["num_bad"]
                yield batch
            self.epoch_index += 1
            self.batch_in_epoch = 0
            self.consumed, self.excluded = {}, None

    def state_dict(self) -> dict:
        """This rank's position as plain JSON: the epoch, its batches and pairs consumed here, the pairs the
        epoch's plan leaves out (rank 0 writes them; every rank has the same), and the read / bad counts."""
        return {"epoch": self.epoch_index, "batch_in_epoch": self.batch_in_epoch,
                "epoch_num_batches": self.epoch_num_batches, "consumed": self.consumed,
                "excluded": self.excluded if self.rank == 0 else None,
                "pairs_read": self.pairs_read, "pairs_bad": self.pairs_bad}

    def ranks_to_load(self, saved_world_size: int) -> list[int]:
        """Whose saved states load_state_dict needs: this rank's and rank 0's on the same world size, else all."""
        return sorted({self.rank, 0}) if saved_world_size == self.world_size else list(range(saved_world_size))

    def load_state_dict(self, saved: dict[int, dict], saved_world_size: int) -> None:
        """Restore the position from the states the ranks of a checkpoint saved (by rank; ranks_to_load says which).

        On the world size that saved them the position is exact (epoch, batches consumed), so the run
        goes on bitwise. On another, the epoch goes on with a plan that leaves out every pair the old
        ranks consumed in it, dealt afresh to the new ranks; no pair is trained twice in an epoch.
        """
        mine = saved[self.rank] if saved_world_size == self.world_size else saved[0]
        self.epoch_index, self.batch_in_epoch = mine["epoch"], mine["batch_in_epoch"]
        self.epoch_num_batches = mine["epoch_num_batches"]
        if saved_world_size == self.world_size:
            self.consumed, self.excluded = mine["consumed"], saved[0]["excluded"]
            self.pairs_read, self.pairs_bad = mine["pairs_read"], mine["pairs_bad"]
        else:
            states = [saved[r] for r in range(saved_world_size)]
            assert all(s["epoch"] == self.epoch_index for s in states), [s["epoch"] for s in states]
            # The old ranks' counts are summed into rank 0's, so the bad fraction's sum over ranks is unchanged.
            self.pairs_read = sum(s["pairs_read"] for s in states) if self.rank == 0 else 0
            self.pairs_bad = sum(s["pairs_bad"] for s in states) if self.rank == 0 else 0
            self.consumed, self.excluded = {}, None
            if self.batch_in_epoch < self.epoch_num_batches:
                excluded: dict[str, set[str]] = {}
                for keys_by_url in [states[0]["excluded"] or {}] + [s["consumed"] for s in states]:
                    for url, keys in keys_by_url.items():
                        excluded.setdefault(url, set()).update(keys)
                self.excluded = {url: sorted(keys) for url, keys in excluded.items()}
                if self.rank == 0:
                    log.info("world size %d -> %d: epoch %d goes on without the %d pairs trained in it so far: %d "
                             "micro-batches per rank, %d pairs left over", saved_world_size, self.world_size,
                             self.epoch_index, sum(len(k) for k in excluded.values()),
                             self.num_batches(self.excluded), self.num_left_over(self.excluded))
            else:
                self.epoch_index += 1  # the old ranks finished the epoch; its leftover stays left over
                if self.rank == 0:
                    log.info("world size %d -> %d at the end of an epoch: epoch %d starts afresh",
                             saved_world_size, self.world_size, self.epoch_index)
            self.batch_in_epoch = 0
        if self.batch_in_epoch >= self.num_batches(self.excluded):
            self.epoch_index += 1
            self.batch_in_epoch = 0
            self.consumed, self.excluded = {}, None


class _EpochPairs(IterableDataset):
    """One epoch of one rank; each DataLoader worker streams its own slot of the plan."""

    def __init__(self, loader: PairLoader, epoch: int, plan: list[tuple[list[_Piece], int, int]], first_slot: int):
        # plan is rotated: DataLoader worker i serves slot (first_slot + i); the slot seeds the shuffle.
        self.cfg, self.epoch, self.plan, self.first_slot = loader, epoch, plan, first_slot
        self.num_bad = 0  # since the previous batch; per worker, since each worker has its own copy

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        pieces, quota, num_skip = self.plan[worker]
        slot = (self.first_slot + worker) % len(self.plan)
        if not quota:
            return iter(())
        if isinstance(pieces, _Schedule):
            return self._scheduled(slot, pieces, num_skip)
        return self._batches(slot, pieces, quota, num_skip)

    def _scheduled(self, slot: int, schedule: _Schedule, num_skip: int) -> Iterator[dict]:
        """A slot's batches of several shape buckets in the schedule's order, from batch num_skip on."""
        done = schedule.order[:num_skip]
        streams = {bucket: self._batches(slot, pieces, schedule.order.count(bucket), done.count(bucket), bucket)
                   for bucket, pieces in schedule.pieces.items()}
        try:
            for bucket in schedule.order[num_skip:]:
                yield next(streams[bucket])
        finally:
            for stream in streams.values():
                stream.close()

    def _batches(self, slot: int, pieces: list[_Piece], quota: int, num_skip: int,
                 bucket: tuple[int, ...] | None | str = "") -> Iterator[dict]:
        """bucket: the shape bucket these pieces are (seeds the shuffle); "" when the epoch has one."""
        batch_size = self.cfg.batch_size
        parts = (self.cfg.seed, self.epoch, self.cfg.rank, slot) + (() if bucket == "" else ("bucket", bucket))
        good = self._good_samples(pieces, random.Random(_seed_of(*parts)))
        try:
            earliest: list[dict] = []  # repeated, in order, when bad samples leave the quota short
            num_padded_total = 0
            for batch_index in range(quota):
                samples, num_padded = [], 0
                while len(samples) < batch_size:
                    sample = next(good, None)
                    if sample is None:
                        if not earliest:  # not one good pair: the batch stays empty, and the trainer stops
                            if batch_index == 0:
                                log.warning("rank %d worker %d found no good pair in epoch %d in shards %s",
                                            self.cfg.rank, slot, self.epoch, ", ".join(p.shard.url for p in pieces))
                            break
                        sample = earliest[num_padded_total % len(earliest)]
                        num_padded += 1
                        num_padded_total += 1
                    elif len(earliest) < batch_size:
                        earliest.append(sample)
                    samples.append(sample)
                if batch_index >= num_skip:  # skipped batches were read and checked, but never drawn or stacked
                    yield self._collate(samples, num_padded) if samples else self._empty()
        finally:
            good.close()  # stops a pipe: command still streaming surplus pairs, also when closed early

    def _good_samples(self, pieces: list[_Piece], rng: random.Random) -> Iterator[dict]:
        """Decoded good samples in shuffled order; bad ones are logged and counted in self.num_bad."""
        shapes = None
        recorded = {p.shard.url: p.shard.shape for p in pieces}
        for key, members, url in _shuffled(self._raw_samples(pieces), self.cfg.shuffle_buffer, rng):
            try:
                sample = decode_sample(key, members, self.cfg.schema)
                sample_shapes = {name: t.shape for name, t in sample["tensors"].items()}
                if recorded[url] is not None and tuple(sample_shapes["latents_w"]) != recorded[url]:
                    raise BadSample(f"latents_w has shape {tuple(sample_shapes['latents_w'])}; index.json records "
                                    f"{recorded[url]} for every pair of this shard (its shape bucket)")
                if shapes is not None and sample_shapes != shapes:
                    raise BadSample(f"shapes {sample_shapes} differ from this worker's first pair {shapes}; "
                                    "a batch needs one shape per tensor")
            except BadSample as e:
                log.warning("bad pair %s in shard %s: %s; skipped", key, url, e)
                self.num_bad += 1
                continue
            shapes = sample_shapes
            yield {**sample, "url": url}

    def _raw_samples(self, pieces: list[_Piece]) -> Iterator[tuple[str, dict[str, bytes], str]]:
        for piece in pieces:
            shard, num_read, position = piece.shard, 0, 0
            samples = tar_samples(shard.url)
            try:
                for key, members in samples:
                    if key in piece.excluded and not isinstance(members, RepeatedKey):
                        continue  # trained before a resume; a repeat of it was not, and counts bad
                    position += 1
                    if position > piece.start:
                        num_read += 1
                        yield key, members, shard.url
                    if piece.stop is not None and num_read == piece.num_pairs:
                        break
            except SHARD_ERRORS as e:
                log.warning("shard %s unreadable after %d pairs: %s: %s", shard.url, num_read, type(e).__name__, e)
            finally:
                samples.close()  # a piece that ends before the shard does stops reading there
            if num_read < piece.num_pairs:
                log.warning("shard %s gave %d of its %d pairs; counting the rest as bad",
                            shard.url, num_read, piece.num_pairs)
                self.num_bad += piece.num_pairs - num_read

    def _empty(self) -> dict:
        """A batch without pairs: its worker has none, and the consumer must stop (every rank together)."""
        batch = {"keys": [], "shard_urls": [], "num_bad": self.num_bad, "num_padded": 0}
        self.num_bad = 0
        return batch

    def _collate(self, samples: list[dict], num_padded: int) -> dict:
        cfg = self.cfg
        draw_index = self.epoch % cfg.num_draws if cfg.num_draws else self.epoch
        batch = collate_pairs(samples, draw_index, cfg.seed, cfg.draw_t, cfg.dropout, as_float32=False)
        batch["shard_urls"] = [s["url"] for s in samples]
        batch["num_bad"], batch["num_padded"] = self.num_bad, num_padded
        self.num_bad = 0
        return batch


@dataclass(frozen=True)
class PromptDropout:
    """data.empty_prompt_prob: a pair trains on the empty prompt's conditioning (`empty`, the family's
    prompt tensors for "") with probability `prob`, decided by its seeded draw (noise.is_prompt_dropped)."""
    prob: float
    empty: dict[str, torch.Tensor]


def load_empty_prompt(shards: list[ShardInfo], names: tuple[str, ...],
                      schema: dict[str, tuple[int, ...] | None]) -> dict[str, torch.Tensor]:
    """The empty prompt's conditioning written beside the shards (EMPTY_PROMPT_NAME, by tools/encode_pairs.py):
    tensors `names`, shaped as the schema says. Every folder of local shards must hold the same one."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for folder in sorted({os.path.dirname(os.path.abspath(s.url)) for s in shards if not s.url.startswith("pipe:")}):
        path = os.path.join(folder, EMPTY_PROMPT_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"data.empty_prompt_prob > 0 needs {path}, the empty prompt's conditioning; "
                             "tools/encode_pairs.py writes it beside the shards (or set data.empty_prompt_prob=0)")
        found[path] = safetensors.torch.load_file(path)
    if not found:
        raise ValueError(f"data.empty_prompt_prob > 0 needs {EMPTY_PROMPT_NAME} beside local shards; "
                         "pipe: URLs have no folder to hold it")
    (first, empty), *others = found.items()
    for path, tensors in others:
        if tensors.keys() != empty.keys() or any(not torch.equal(tensors[k], empty[k]) for k in empty):
            raise ValueError(f"{path} differs from {first}: the shard folders were encoded with other text encoders")
    for name in names:
        if name not in empty or (schema.get(name) is not None and tuple(empty[name].shape) != tuple(schema[name])):
            raise ValueError(f"{first}: {name} is {tuple(empty[name].shape) if name in empty else 'missing'}; "
                             f"the model's schema says {schema.get(name)}")
    return {name: empty[name].float() for name in names}


def prompt_dropout(prob: float, shards: list[ShardInfo], names: tuple[str, ...],
                   schema: dict[str, tuple[int, ...] | None]) -> PromptDropout | None:
    """The run's PromptDropout for these shards (None when prob is 0); raises ValueError naming what is missing."""
    return PromptDropout(prob, load_empty_prompt(shards, names, schema)) if prob > 0 else None


def collate_pairs(samples: list[dict], draw_index: int, seed: int, draw_t: Callable[[torch.Generator], float],
                  dropout: PromptDropout | None = None, as_float32: bool = True) -> dict:
    """Decoded pairs at one draw index as one batch: keys, content hashes, each pair's (t, noise) from
    noise.draw with the family's law draw_t, and every tensor of the schema stacked as float32, a pair's
    prompt tensors replaced by the empty prompt's where its draw drops the prompt (winner and loser share
    the prompt, so both). The trainer and the reference-cache tool both batch through this, so a cached
    reference error is always computed on the very draw training uses.

    as_float32=False keeps the shards' dtypes (float16 mostly) for the loader workers: half the bytes
    through shared memory, converted by PairLoader.epoch in the consumer (the same values: float16 and
    bfloat16 are exact in float32)."""
    draws = [noise.draw(seed, s["key"], draw_index, tuple(s["tensors"]["latents_w"].shape), draw_t)
             for s in samples]
    if dropout is not None:
        dropped = [noise.is_prompt_dropped(seed, s["key"], draw_index, dropout.prob) for s in samples]
        samples = [{**s, "tensors": {**s["tensors"], **dropout.empty}} if d else s for s, d in zip(samples, dropped)]
    batch = {
        "keys": [s["key"] for s in samples],
        "draw_index": torch.full((len(samples),), draw_index, dtype=torch.long),
        "content_hash": torch.tensor([s["content_hash"] for s in samples], dtype=torch.int64),
        "t": torch.tensor([t for t, _ in draws], dtype=torch.float64),
        "noise": torch.stack([n for _, n in draws]),
    }
    for name in sorted(samples[0]["tensors"]):
        tensors = [s["tensors"][name] for s in samples]
        batch[name] = torch.stack([t.float() for t in tensors] if as_float32 else tensors)
    return batch


def _as_float32(batch: dict) -> dict:
    """A worker's batch (collate_pairs as_float32=False) with every shard tensor as float32."""
    return {k: v.float() if torch.is_tensor(v) and k not in BATCH_FIELDS else v for k, v in batch.items()}
