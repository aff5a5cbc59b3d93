"""Text data: user files through `datasets`, an HF tokenizer dir, packing, and the stateless sampler."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from compt_scale.config import TextDataSpec
from compt_scale.data.packed import PackedTokens, prepare_data, sample_indices
from compt_scale.errors import CompTError

DOCS = [f"def function_{i}(x):\n    return x * {i} + {i * i}  # document {i}\n" * 3 for i in range(400)]


def write(tmp_path, kind):
    if kind == "jsonl":
        p = tmp_path / "c.jsonl"
        p.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    elif kind == "parquet":
        p = tmp_path / "c.parquet"
        pq.write_table(pa.table({"body": DOCS}), p)
    else:
        p = tmp_path / "c.txt"
        p.write_text("".join(d.replace("\n", " ") + "\n" for d in DOCS))
    return p


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt"])
def test_user_files_with_an_hf_tokenizer_dir(tmp_path, tiny_data, kind, capsys):
    spec = TextDataSpec(corpus="files", paths=[str(write(tmp_path, kind))], text_field="body",
                    tokenizer=str(tiny_data / "tokenizer"), seq_len=32, val_fraction=0.1)
    out = prepare_data(spec, tmp_path / "data")
    meta = json.loads((out / "meta.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert meta["vocab_size"] == len(tok) == len(AutoTokenizer.from_pretrained(str(tiny_data / "tokenizer")))
    assert meta["tokens"]["train"] > 4 * meta["tokens"]["val"] > 0  # val_fraction 0.1, split by document
    # The packed stream decodes back to the documents, joined by EOS.
    stream = np.fromfile(out / "train.bin", dtype=meta["dtype"])
    first_doc = stream[: list(stream).index(tok.eos_token_id)]
    assert tok.decode(first_doc).strip() in {d.strip() for d in DOCS} | {d.replace("\n", " ").strip() for d in DOCS}
    # A second call reuses the prepared dir; a different spec is refused rather than mixed up.
    built = (out / "meta.json").stat().st_mtime_ns
    assert prepare_data(spec, tmp_path / "data") == out and (out / "meta.json").stat().st_mtime_ns == built
    with pytest.raises(CompTError, match="different data spec"):
        prepare_data(TextDataSpec(**{**spec.__dict__, "seq_len": 64}), tmp_path / "data")
    if kind == "jsonl":
        # The same path with edited contents is prepared again (the cache is keyed by content too).
        with open(spec.paths[0], "a") as f:
            f.writelines(json.dumps({"body": d.upper()}) + "\n" for d in DOCS[:100])
        capsys.readouterr()
        prepare_data(spec, tmp_path / "data")
        assert "changed since" in capsys.readouterr().err
        grown = json.loads((out / "meta.json").read_text())["tokens"]
        assert grown["train"] + grown["val"] > meta["tokens"]["train"] + meta["tokens"]["val"]


def test_missing_text_column_is_named(tmp_path, tiny_data):
    spec = TextDataSpec(corpus="files", paths=[str(write(tmp_path, "jsonl"))], text_field="text",
                    tokenizer=str(tiny_data / "tokenizer"))
    with pytest.raises(CompTError, match="data.text_field: column 'text'"):
        prepare_data(spec, tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_sampler_is_stateless_disjoint_and_covers_an_epoch(tiny_data):
    n = len(PackedTokens(tiny_data, "train", 32))
    mb, world, ga = 4, 2, 2
    steps = n // (mb * world * ga)
    seen = []
    for step in range(steps):
        for micro in range(ga):
            per_rank = [sample_indices(n, 0, step, micro, ga, mb, r, world) for r in range(world)]
            assert not set(per_rank[0]) & set(per_rank[1])
            seen += per_rank[0] + per_rank[1]
    assert len(set(seen)) == len(seen) == steps * mb * world * ga  # no repeats within an epoch
    assert sample_indices(n, 0, 7, 1, ga, mb, 1, world) == sample_indices(n, 0, 7, 1, ga, mb, 1, world)
    assert sample_indices(n, 1, 0, 0, ga, mb, 0, world) != sample_indices(n, 0, 0, 0, ga, mb, 0, world)


def test_stdlib_corpus_has_a_real_validation_split(tiny_data):
    meta = json.loads((tiny_data / "meta.json").read_text())
    assert meta["tokens"]["val"] > 2 * 33 and meta["tokens"]["train"] > 20 * meta["tokens"]["val"]
    x, y = PackedTokens(tiny_data, "val", 32).batch([0])
    assert (x[0, 1:] == y[0, :-1]).all()  # labels are the next tokens
