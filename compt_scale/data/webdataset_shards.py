"""Webdataset shards streamed for the open_clip family (`data.corpus: webdataset`), given the way
open_clip users give them: `/data/cc12m/{00000..01242}.tar`, several patterns joined by `::`,
`pipe:` commands (`pipe:aws s3 cp s3://b/{000..099}.tar -`), http(s) URLs and local paths.

The webdataset package opens the URLs (local files, `pipe:` subprocesses, curl for http) and groups tar
members into samples; this module decides which shards each reader streams, in which order, and where
an epoch ends, all from seeds, so the stream is a pure function of the spec and the run's geometry.

Readers: each rank runs `data.workers` loader processes (0: in the rank's own prefetch thread, one
reader). Reader `rank + worker * world` of R = world x workers, as open_clip's split_by_node followed by
split_by_worker. An epoch is `train_num_samples` pairs (open_clip's --train-num-samples): every reader
yields ceil(train_num_samples / (R x micro_batch)) micro-batches per epoch, so all ranks take the same
number of steps (open_clip rounds up the same way).
- `resampled: false` (default): epoch e shuffles the shard list with seed (seed, e) and deals it out:
  reader r gets shards r, r+R, r+2R, ... Within an epoch the readers' shards are disjoint; a reader
  that runs through its shards before its epoch quota goes round them again (reshuffled).
- `resampled: true`: every reader draws shards with replacement from its own seed (seed, epoch,
  reader), the multi-node setting of open_clip's --dataset-resampled (no shard-count constraint).
Samples pass through a shuffle buffer of `data.shuffle_buffer` samples (webdataset's shuffle, seeded per
reader and epoch), then are decoded: the image with open_clip's eval transform (image_files.load_image)
and M captions drawn from the sample's `.txt`/`.json` captions.

Resume: the loop restarts at a step; a rank has then consumed step x grad_accum micro-batches, which
fixes how many each of its readers produced (the loader takes them round-robin). Each reader jumps to
its epoch directly (epochs are seeded independently) and skips its remaining within-epoch samples
before decoding. With the same world size, workers and micro-batch the resumed stream is exactly the
uninterrupted one; with another geometry it continues in the same epoch at the same count of samples
seen, but the order (and which samples of that epoch are still ahead) differs.
"""
from __future__ import annotations

import functools
import io
import math
import random
import re
from dataclasses import dataclass
from itertools import islice
from typing import Iterator

import numpy as np
import torch

from ..config import ImageTextDataSpec
from ..errors import CompTError
from ..shard_urls import _scheme, is_local, local_path, resolve_patterns, split_patterns  # noqa: F401
from .image_text_files import _json_captions, split_captions

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_SEED = 8765


# ---------------------------------------------------------------- shard URLs (parse time)

def expand(patterns: list[str], where: str) -> list[str]:
    """Brace-expanded shard URLs; a pattern that braceexpand cannot read is a one-line error."""
    import braceexpand
    urls = []
    for p in patterns:
        try:
            got = list(braceexpand.braceexpand(p))
        except braceexpand.UnbalancedBracesError:  # type: ignore[attr-defined]  # braceexpand's .pyi omits it
            raise CompTError(f"{where}: malformed brace pattern {p!r}: unbalanced braces") from None
        # braceexpand leaves what it cannot read as is ('{00..x}', '{}'): that is never a shard name.
        bad = [u for u in got if ("{" in u or "}" in u) and (is_local(u) or ".." in u or "{}" in u)]
        if bad:
            raise CompTError(f"{where}: malformed brace pattern {p!r} (use {{000..099}} ranges or {{a,b}} lists)")
        urls += got
    return urls


def check_local(urls: list[str], where: str) -> None:
    missing = [u for u in urls if is_local(u) and not local_path(u).is_file()]
    if missing:
        raise CompTError(f"{where}: {len(missing)} of {len(urls)} shards not found (first: {missing[0]})")
    empty = [u for u in urls if is_local(u) and local_path(u).stat().st_size == 0]
    if empty:
        raise CompTError(f"{where}: empty shard file: {empty[0]}")


def train_and_val_urls(data) -> tuple[list[str], list[str]]:
    """Without `val_shards` the last shard of `shards` is held out for evaluation."""
    shards = expand(data.shards, "data.shards")
    if data.val_shards:
        return shards, expand(data.val_shards, "data.val_shards")
    return shards[:-1], shards[-1:]


def validate(data) -> None:
    """Config-level checks of a `corpus: webdataset` data section (every command runs them)."""
    if data.paths:
        raise CompTError("data.paths: corpus webdataset reads data.shards (paths are for corpus files)")
    if not data.shards:
        raise CompTError("data.shards: corpus webdataset needs shard URLs (e.g. /data/cc12m/{00000..01242}.tar)")
    if data.train_num_samples is None or data.train_num_samples < 1:
        raise CompTError(f"data.train_num_samples: corpus webdataset needs the samples per epoch (open_clip's "
                         f"--train-num-samples), got {data.train_num_samples!r}")
    for key, low in (("workers", 0), ("shuffle_buffer", 1), ("val_samples", 8)):
        if getattr(data, key) < low:
            raise CompTError(f"data.{key}: must be >= {low}, got {getattr(data, key)}")
    train, val = train_and_val_urls(data)
    if not train:
        raise CompTError("data.shards: one shard and no data.val_shards: the last shard is held out for "
                         "evaluation, none is left to train on")
    if data.val_shards:
        check_local(train, "data.shards")
        check_local(val, "data.val_shards")
    else:
        check_local(train + val, "data.shards")


# ---------------------------------------------------------------- samples of one shard

def _first_line(e: BaseException) -> str:
    text = str(e.args[0]) if e.args else type(e).__name__
    status = re.search(r"\): exit (-?\d+) \(read\)", text)  # webdataset's Pipe: "(args, kw): exit N (read)"
    if status:
        return f"the pipe command exited with status {status.group(1)}"
    return (text.splitlines() or [type(e).__name__])[0][:300]


def shard_samples(url: str) -> Iterator[dict]:
    """The samples of one shard (webdataset's grouping of tar members by key), in shard order. A URL
    that cannot be opened or read, and a `pipe:` command that exits non-zero, raise one line."""
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander
    try:
        stream = wds.gopen(url)
    except Exception as e:  # noqa: BLE001 - gopen raises OSError, ValueError, ... per scheme
        raise CompTError(f"data.shards: cannot open {url}: {_first_line(e)}") from None
    finished = False
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
        finished = True
    except CompTError:
        raise
    except Exception as e:  # noqa: BLE001 - tarfile, subprocess and I/O errors of any kind
        why = _first_line(e)
        try:  # a failed pipe command shows up as a short tar: its exit status says more
            stream.close()
        except Exception as status:  # noqa: BLE001
            why = _first_line(status)
        raise CompTError(f"data.shards: cannot read {url}: {why}") from None
    finally:
        try:
            stream.close()  # a pipe's exit status is checked here
        except Exception as e:  # noqa: BLE001
            # A stream abandoned mid-shard (epoch cut, shutdown) kills its pipe: not an error.
            if finished:
                raise CompTError(f"data.shards: {url}: {_first_line(e)}") from None


def is_pair(sample: dict) -> bool:
    return any(k in sample for k in IMAGE_KEYS) and ("txt" in sample or "json" in sample)


def captions_of(sample: dict, data) -> list[str]:
    where = f"{sample.get('__url__')}:{sample.get('__key__')}"
    # .txt first: the caption open_clip itself trains on; .json captions (LaCLIP's rewrites) after it.
    caps = [sample["txt"].decode("utf-8", "replace")] if "txt" in sample else []
    if "json" in sample:
        caps += _json_captions(sample["json"], data, where)
    return split_captions(caps, data.caption_sep)


def image_bytes(sample: dict) -> bytes:
    return next(sample[k] for k in IMAGE_KEYS if k in sample)


def read_pairs(urls: list[str], data, limit: int) -> list[tuple[bytes, list[str]]]:
    """The first `limit` (image bytes, captions) pairs of `urls` in order (the evaluation split)."""
    rows = []
    for url in urls:
        for s in shard_samples(url):
            if is_pair(s) and (caps := captions_of(s, data)):
                rows.append((image_bytes(s), caps))
                if len(rows) == limit:
                    return rows
    return rows


def eval_split(data) -> tuple[dict, int, dict]:
    """For image_text.prepare_image_text: the evaluation pairs (the only split written to disk), the
    most captions any of them has, and what meta.json records about the stream. The first training
    shard is opened too, so a failing `pipe:` command or a file that is not a tar is reported here, as
    one line, before any rank builds a model."""
    train, val = train_and_val_urls(data)
    for _ in shard_samples(train[0]):
        break
    rows = read_pairs(val, data, data.val_samples)
    where = "data.val_shards" if data.val_shards else "data.shards (its last shard, held out)"
    if len(rows) < 8:
        raise CompTError(f"{where}: only {len(rows)} image-caption pairs for evaluation; need at least 8")
    stream = {"train_shards": len(train), "val_shards": len(val), "train_num_samples": data.train_num_samples,
              "resampled": data.resampled}
    return {"val": rows}, max(len(c) for _, c in rows), stream


# ---------------------------------------------------------------- the stream

@dataclass(frozen=True)
class StreamPlan:
    """Everything a reader needs: the stream is a function of this and (epoch, reader) alone."""
    data: ImageTextDataSpec
    urls: tuple[str, ...]        # training shards, expanded
    seed: int
    rank: int
    world: int
    micro_batch: int
    context_length: int
    captions: int                # M captions per image (LaCLIP)
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def workers(self) -> int:
        return max(1, self.data.workers)

    @property
    def readers(self) -> int:
        return self.world * self.workers

    @property
    def reader_batches(self) -> int:
        """Micro-batches per reader per epoch (open_clip's num_worker_batches, rounded up)."""
        samples = self.data.train_num_samples
        assert samples is not None  # validate() rejects a webdataset section without it
        return math.ceil(samples / (self.readers * self.micro_batch))

    def check(self) -> None:
        if not self.data.resampled and len(self.urls) < self.readers:
            raise CompTError(f"data.shards: {len(self.urls)} training shards for {self.readers} readers "
                             f"({self.world} ranks x {self.workers} workers); each reader needs its own shard: "
                             "fewer data.workers, more shards, or data.resampled: true")


def _rng(*key: int) -> random.Random:
    return random.Random(int(np.random.SeedSequence([k & 0xFFFFFFFF for k in key]).generate_state(1)[0]))


def reader_passes(plan: StreamPlan, epoch: int, reader: int) -> Iterator[Iterator[str]]:
    """The shard sequence of one reader in one epoch, as passes: without resampling, pass 0 is the
    reader's deal of the epoch's shuffled shard list and later passes go round the same shards again
    (reshuffled); resampled, one endless pass of draws with replacement."""
    if plan.data.resampled:
        rng = _rng(plan.seed, epoch, reader, 1)
        yield (plan.urls[rng.randrange(len(plan.urls))] for _ in iter(int, 1))
        return
    order = list(plan.urls)
    _rng(plan.seed, epoch, 0).shuffle(order)
    mine = order[reader::plan.readers]
    for again in range(1_000_000_000):
        yield iter(mine)
        mine = list(mine)
        _rng(plan.seed, epoch, reader, again + 2).shuffle(mine)


def _pairs(urls: Iterator[str], limit_dry: int) -> Iterator[dict]:
    dry = 0  # shards in a row without a usable sample: past the limit the stream would spin forever
    for url in urls:
        got = 0
        for s in shard_samples(url):
            if is_pair(s):
                got += 1
                yield s
        dry = 0 if got else dry + 1
        if dry > limit_dry:
            raise CompTError(f"data.shards: no image-caption sample (an image and a .txt or .json) in "
                             f"{dry} shards in a row, last {url}")


def reader_samples(plan: StreamPlan, epoch: int, reader: int) -> Iterator[dict]:
    """Raw (undecoded) image-caption samples of one reader in one epoch through the shuffle buffer,
    one buffer per pass: a pass is drained before the next begins, so within a pass every sample of
    the reader's shards comes out once."""
    import webdataset as wds
    buf = plan.data.shuffle_buffer
    for k, urls in enumerate(reader_passes(plan, epoch, reader)):
        limit = len(plan.urls) + 8 if plan.data.resampled else len(plan.urls[reader::plan.readers]) - 1
        yield from wds.shuffle(buf, max(1, buf // 5), rng=_rng(plan.seed, epoch, reader, 2, k))(_pairs(urls, limit))


@functools.lru_cache(maxsize=4)
def _tokenizer(context_length: int):
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer(context_length=context_length)


def decode_batch(samples: list[dict], plan: StreamPlan, first: int, epoch: int, reader: int) -> tuple:
    from .image_files import load_image
    size = plan.data.image_size
    images, texts = [], []
    for j, s in enumerate(samples):
        try:
            images.append(load_image(io.BytesIO(image_bytes(s)), size))
        except (OSError, ValueError) as e:
            raise CompTError(f"data.shards: {s['__url__']}: cannot read image of {s['__key__']!r}: {e}") from None
        caps = captions_of(s, plan.data)
        if not caps:
            raise CompTError(f"data.shards: {s['__url__']}: sample {s['__key__']!r} has only empty captions")
        # M of the sample's captions without replacement (repeats only when it has fewer than M).
        perm = np.random.default_rng((CAPTION_SEED, plan.seed, epoch, reader, first + j)).permutation(len(caps))
        texts += [caps[perm[m % len(caps)]] for m in range(plan.captions)]
    pixels = torch.from_numpy(np.stack(images)).float().div_(255)
    pixels = (pixels - torch.tensor(plan.mean).view(1, 3, 1, 1)) / torch.tensor(plan.std).view(1, 3, 1, 1)
    tokens = _tokenizer(plan.context_length)(texts).long()
    tokens = tokens.view(len(samples), plan.captions, -1)
    return pixels, (tokens[:, 0] if plan.captions == 1 else tokens)


def reader_batches(plan: StreamPlan, reader: int, start: int) -> Iterator[tuple]:
    """One reader's micro-batches from its `start`-th on, endlessly, epoch after epoch."""
    per_epoch, mb = plan.reader_batches, plan.micro_batch
    epoch, skip = divmod(start, per_epoch)
    while True:
        # The skip is taken before decoding: a resume reads the skipped samples' bytes only.
        samples = islice(reader_samples(plan, epoch, reader), skip * mb, per_epoch * mb)
        for b in range(skip, per_epoch):
            chunk = list(islice(samples, mb))
            yield decode_batch(chunk, plan, b * mb, epoch, reader)
        epoch, skip = epoch + 1, 0


def produced_before(start: int, role: int, workers: int) -> int:
    """How many of the first `start` micro-batches of a rank came from worker `role` (round-robin)."""
    return max(0, (start - role + workers - 1) // workers)


class _RankStream(torch.utils.data.IterableDataset):
    """A rank's readers as DataLoader workers. The loader restarts with its worker 0, so on resume
    worker w plays the part of worker (w + start) % workers, the one whose batch is due next."""

    def __init__(self, plan: StreamPlan, start: int):
        super().__init__()
        self.plan, self.start = plan, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        role = (worker + self.start) % self.plan.workers
        reader = self.plan.rank + role * self.plan.world
        try:
            yield from reader_batches(self.plan, reader, produced_before(self.start, role, self.plan.workers))
        except CompTError as e:  # handed over as a value: a worker's exception would arrive as a traceback
            yield str(e)


def rank_batches(plan: StreamPlan, start: int) -> Iterator[tuple]:
    """A rank's micro-batches from its `start`-th on (start = step x grad_accum), endlessly."""
    plan.check()
    workers = plan.data.workers
    _tokenizer(plan.context_length)  # built (and open_clip imported) once, before the workers fork
    loader = torch.utils.data.DataLoader(_RankStream(plan, start), batch_size=None, num_workers=workers,
                                         prefetch_factor=2 if workers else None)
    it = iter(loader)
    try:
        for item in it:
            if isinstance(item, str):
                raise CompTError(item)
            yield item
    finally:
        del it  # stops the worker processes


class StreamingImageText:
    """The training split of a `corpus: webdataset` chain: streamed, not indexed (`streaming`)."""
    streaming = True

    def __init__(self, data, meta: dict, captions: int):
        self.data, self.meta, self.captions = data, meta, captions

    def plan(self, seed: int, micro_batch: int, rank: int, world: int) -> StreamPlan:
        train, _ = train_and_val_urls(self.data)
        return StreamPlan(self.data, tuple(train), seed, rank, world, micro_batch, self.meta["context_length"],
                          self.captions, tuple(self.meta["mean"]), tuple(self.meta["std"]))

    def stream(self, *, seed: int, start: int, micro_batch: int, rank: int, world: int) -> Iterator[tuple]:
        return rank_batches(self.plan(seed, micro_batch, rank, world), start)
