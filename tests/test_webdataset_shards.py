"""Webdataset shards as open_clip users give them (`corpus: webdataset`): brace patterns, `pipe:` URLs,
each rank and loader worker on its own shards, resampled epochs of train_num_samples pairs, an exact
resume, and a CLIP stage trained from shards through the real chain command.

The shards are written here with the standard library's tarfile (not webdataset's writer), and every
sample's caption names it ("shard 3 item 5"): which samples a batch holds is read back from its tokens
and checked against the list of what was written."""
from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from compt_scale.chain.resolve import resolve
from compt_scale.config import ImageTextDataSpec, load_chain, parse_chain
from compt_scale.data.image_text import MEAN, STD, ImageText, load_image, prepare_image_text
from compt_scale.data.loader import first_batches
from compt_scale.data.webdataset_shards import StreamingImageText, expand
from compt_scale.errors import CompTError
from conftest import read_metrics, run_cli

SHARDS, PER_SHARD, CTX = 9, 8, 16
ALL = {(s, i) for s in range(SHARDS - 1) for i in range(PER_SHARD)}  # the last shard is held out for eval
CAPTION = re.compile(r"shard (\d+) item (\d+)")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """9 shards x 8 samples: a PNG (two orientations, as test_clip_data's CSV images) and a .txt
    caption; every third sample also has a .json with a second caption (LaCLIP-style)."""
    d = tmp_path_factory.mktemp("wds")
    rng = np.random.default_rng(0)
    for s in range(SHARDS):
        with tarfile.open(d / f"{s:05d}.tar", "w") as tar:
            for i in range(PER_SHARD):
                w, h = (40, 25) if i % 2 else (22, 45)
                png = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(png, "PNG")
                _add(tar, f"s{s}i{i}.png", png.getvalue())
                _add(tar, f"s{s}i{i}.txt", f"shard {s} item {i}".encode())
                if i % 3 == 0:
                    _add(tar, f"s{s}i{i}.json", json.dumps({"captions": [f"shard {s} item {i} again"]}).encode())
    return d


def data_spec(shard_dir: Path, **over) -> ImageTextDataSpec:
    fields = {"corpus": "webdataset", "shards": [str(shard_dir / "{00000..00008}.tar")], "image_size": 32,
              "train_num_samples": len(ALL), "shuffle_buffer": 10, "workers": 2, **over}
    return ImageTextDataSpec(**fields)


def stream(data: ImageTextDataSpec, **kw):
    meta = {"context_length": CTX, "mean": MEAN, "std": STD}
    return StreamingImageText(data, meta, captions=1).stream(**{"seed": 0, "start": 0, "micro_batch": 4, **kw})


def take(it, n: int) -> list[tuple]:
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def samples_of(batch) -> list[tuple[int, int]]:
    from open_clip.tokenizer import SimpleTokenizer
    tok = SimpleTokenizer()
    out = []
    for row in batch[1]:
        text = tok.decode([int(t) for t in row if int(t) not in (0, tok.sot_token_id, tok.eot_token_id)])
        out.append(tuple(map(int, CAPTION.search(text).groups())))
    return out


def test_patterns_urls_and_one_line_errors(shard_dir, tmp_path):
    pattern = str(shard_dir / "{00000..00008}.tar")
    assert expand([pattern], "x") == [str(shard_dir / f"{s:05d}.tar") for s in range(SHARDS)]
    assert expand(["pipe:cat /d/{a,b}.tar"], "x") == ["pipe:cat /d/a.tar", "pipe:cat /d/b.tar"]

    # A spec as users write it: a relative pattern (resolved against the spec's folder), '::'-joined.
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "name": "w", "family": "open_clip", "stages": [{"name": "a", "model": "clip-xs", "tokens": 8}],
        "data": {"corpus": "webdataset", "shards": f"{shard_dir}/{{00000..00003}}.tar::{shard_dir}/0000{{4,5}}.tar",
                 "val_shards": "pipe:cat " + str(shard_dir / "00008.tar"), "train_num_samples": 48}}))
    spec = resolve(load_chain(tmp_path / "c.yaml"))
    assert len(expand(spec.data.shards, "x")) == 6 and spec.data.val_shards == [f"pipe:cat {shard_dir}/00008.tar"]
    (shard_dir / "rel.yaml").write_text((tmp_path / "c.yaml").read_text().replace(f"cat {shard_dir}/", "cat ")
                                        .replace(f"{shard_dir}/", "./"))
    rel = resolve(load_chain(shard_dir / "rel.yaml")).data
    assert rel.shards[0] == str(shard_dir / "{00000..00003}.tar") and rel.val_shards == ["pipe:cat 00008.tar"]

    def error(**data) -> str:
        raw = {"name": "w", "family": "open_clip", "stages": [{"name": "a", "model": "clip-xs", "tokens": 8}],
               "data": {"corpus": "webdataset", "train_num_samples": 48, "shards": pattern, **data}}
        with pytest.raises(CompTError) as e:
            resolve(parse_chain(raw))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "data.shards: malformed brace pattern" in error(shards=str(shard_dir / "{00000..00008.tar"))
    assert "data.shards: malformed brace pattern" in error(shards=str(shard_dir / "{00..x}.tar"))
    assert error(shards=str(shard_dir / "{00000..00010}.tar")) == \
        f"data.shards: 2 of 11 shards not found (first: {shard_dir / '00009.tar'})"
    assert error(train_num_samples=None).startswith("data.train_num_samples: corpus webdataset needs")
    assert error(shards=str(shard_dir / "00000.tar")).startswith("data.shards: one shard and no data.val_shards")

    # A pipe: command that fails, and a file that is no tar: one line at preparation, before training.
    for bad, says in ((f"pipe:cat {tmp_path}/missing-{{0..1}}.tar", "the pipe command exited with status 1"),
                      (str(tmp_path / "c.yaml"), "cannot read")):
        with pytest.raises(CompTError) as e:
            prepare_image_text(data_spec(shard_dir, shards=[bad], val_shards=[pattern]), CTX, tmp_path / "p")
        assert says in str(e.value) and "\n" not in str(e.value) and not (tmp_path / "p").exists()


def test_eval_split_and_pipe_urls_read_the_same_pairs(shard_dir, tmp_path):
    local = prepare_image_text(data_spec(shard_dir), CTX, tmp_path / "local")
    piped = prepare_image_text(data_spec(shard_dir, shards=[f"pipe:cat {shard_dir}/{{00000..00008}}.tar"]),
                               CTX, tmp_path / "piped")
    meta = json.loads((local / "meta.json").read_text())
    assert meta["samples"] == {"val": PER_SHARD} and meta["stream"]["train_shards"] == SHARDS - 1
    for f in ("val_images.u8", "val_tokens.i32", "val_captions.jsonl"):
        assert (local / f).read_bytes() == (piped / f).read_bytes(), f
    # The held-out shard, in order, decoded with open_clip's eval transform; the .json caption is kept.
    caps = [json.loads(ln) for ln in (local / "val_captions.jsonl").read_text().splitlines()]
    assert caps[0] == ["shard 8 item 0", "shard 8 item 0 again"] and caps[1] == ["shard 8 item 1"]
    with tarfile.open(shard_dir / "00008.tar") as tar:
        want = load_image(io.BytesIO(tar.extractfile("s8i1.png").read()), 32)
    assert np.array_equal(ImageText(local, "val").images[1], want)

    # Training batches through pipe: URLs are the local ones, bit for bit.
    a = take(stream(data_spec(shard_dir, workers=0), rank=0, world=1), 3)
    b = take(stream(data_spec(shard_dir, workers=0, shards=[f"pipe:cat {shard_dir}/{{00000..00008}}.tar"]),
                    rank=0, world=1), 3)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


def test_two_ranks_two_workers_read_disjoint_shards(shard_dir):
    """2 ranks x 2 loader workers = 4 readers over 8 training shards, micro-batch 4: an epoch
    (train_num_samples = 64) is 4 micro-batches per reader, 8 per rank; the loader alternates workers."""
    data = data_spec(shard_dir)
    epochs = []
    for epoch in range(2):
        seen, shards_of_reader = [], {}
        for rank in range(2):
            batches = take(stream(data, rank=rank, world=2, start=8 * epoch), 8)
            for k, batch in enumerate(batches):
                got = samples_of(batch)
                seen += got
                shards_of_reader.setdefault((rank, k % 2), set()).update(s for s, _ in got)
        assert Counter(seen) == Counter(ALL), epoch  # every sample once: nothing missed, nothing twice
        readers = list(shards_of_reader.values())
        assert all(len(r) == 2 for r in readers) and len(set().union(*readers)) == 8  # disjoint shards
        epochs.append((seen, readers))
    assert epochs[0][0] != epochs[1][0]  # reshuffled each epoch

    # More readers than shards is refused without resampling (open_clip asserts the same).
    with pytest.raises(CompTError, match=r"8 training shards for 10 readers \(2 ranks x 5 workers\)"):
        next(stream(data_spec(shard_dir, workers=5), rank=0, world=2))


def test_resampled_epochs_hold_train_num_samples(shard_dir):
    """Resampled: every reader draws shards with replacement; an epoch is train_num_samples pairs
    (24 = 2 ranks x 3 micro-batches x 4), each epoch drawn anew."""
    data = data_spec(shard_dir, resampled=True, train_num_samples=24, workers=0)
    per_rank = [[samples_of(b) for b in take(stream(data, rank=rank, world=2), 6)] for rank in range(2)]
    epochs = [sum((per_rank[r][e * 3 + k] for r in range(2) for k in range(3)), []) for e in range(2)]
    assert [len(e) for e in epochs] == [24, 24] and all(set(e) <= ALL for e in epochs)
    assert Counter(epochs[0]) != Counter(epochs[1])
    # open_clip rounds an epoch up to whole micro-batches on every reader: 26 pairs -> 2 x 4 x 4 = 32.
    data26 = data_spec(shard_dir, resampled=True, train_num_samples=26, workers=0)
    meta = {"context_length": CTX, "mean": MEAN, "std": STD}
    assert StreamingImageText(data26, meta, 1).plan(0, 4, 0, 2).reader_batches == 4


def test_resume_continues_the_stream_exactly(shard_dir):
    """A rank that resumes after 13 micro-batches (past half an epoch of 16, workers rotated) reads what
    the uninterrupted stream reads from there, across the epoch boundary."""
    data = data_spec(shard_dir)
    whole = take(stream(data, rank=0, world=1), 19)
    resumed = take(stream(data, rank=0, world=1, start=13), 6)
    for x, y in zip(whole[13:], resumed, strict=True):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    calib = first_batches(StreamingImageText(data, {"context_length": CTX, "mean": MEAN, "std": STD}, 1),
                          seed=0, count=2, micro_batch=4, rank=0, world=1)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(calib, whole[:2], strict=True))


@pytest.mark.slow
@pytest.mark.dist
def test_clip_stage_trains_from_shards(shard_dir, tmp_path):
    """`compt-scale chain` on a spec whose data are pipe: shard URLs: one clip-xs stage, 2 steps."""
    spec = {"name": "wds", "family": "open_clip", "seed": 0,
            "data": {"corpus": "webdataset", "shards": f"pipe:cat {shard_dir}/{{00000..00008}}.tar",
                     "train_num_samples": len(ALL), "image_size": 64, "shuffle_buffer": 16, "workers": 2},
            "train": {"micro_batch_size": 8, "eval_every": 2, "eval_batches": 1, "save_every": 2, "log_every": 1},
            "stages": [{"name": "xs", "model": "clip-xs", "tokens": 16}]}
    (tmp_path / "wds.yaml").write_text(yaml.safe_dump(spec))
    run_cli("chain", tmp_path / "wds.yaml", "--out", tmp_path / "out", env={"OMP_NUM_THREADS": "1"})
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())["stages"]["xs"]
    assert manifest["status"] == "done" and manifest["steps"] == 2 and manifest["tokens"] == 16
    steps = [r for r in read_metrics(tmp_path / "out" / "xs") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(np.isfinite(r["task_loss"]) for r in steps)
    assert (tmp_path / "out" / "xs" / "model" / "open_clip_config.json").is_file()
