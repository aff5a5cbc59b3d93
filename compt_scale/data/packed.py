"""Tokenize once, pack into fixed-length sequences, store as a memory-mapped token stream.

Layout of the prepared data dir (built atomically: a temp dir renamed into place, under a lock, so
concurrent ranks or jobs never see half of it):
  tokenizer/      HF tokenizer dir (SentencePiece trained here, or a copy of the user's)
  train.bin       flat token stream (uint16 when the vocab fits, else uint32), documents joined by EOS
  val.bin
  meta.json       vocab_size, dtype, seq_len, token counts, the DataSpec that built it
Sample i is tokens[i*L : i*L + L + 1] (inputs + shifted targets), so a sample index fully determines
the data, and the sampler below maps (step, rank) to sample indices with no state beyond the step.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import CompTError
from ..files import build_once, files_fingerprint
from .corpus import load_splits

TEXT_KEYS = ("corpus", "paths", "text_field", "tokenizer", "vocab_size", "seq_len", "val_fraction", "max_chars")


def _train_sentencepiece(texts, vocab_size: int, work: Path):
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    sample = work / "spm_input.txt"
    with open(sample, "w") as f:
        for t in texts:
            f.write(t.replace("\x00", "") + "\n")
    prefix = work / "spm"
    # byte_fallback + identity normalization: any text (code indentation, unicode) round-trips exactly.
    try:
        spm.SentencePieceTrainer.train(
            input=str(sample), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, split_digits=True, num_threads=os.cpu_count() or 1,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, normalization_rule_name="identity",
            input_sentence_size=200_000, shuffle_input_sentence=True, minloglevel=2)
    except RuntimeError as e:  # e.g. fewer pieces than the corpus has distinct characters
        raise CompTError(f"data.vocab_size {vocab_size}: SentencePiece cannot train on this corpus: "
                         f"{str(e).splitlines()[0].split('] ')[-1]}") from None
    tok_dir = work / "sp"
    tok_dir.mkdir()
    shutil.copy(f"{prefix}.model", tok_dir / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(tok_dir))
    sample.unlink()
    return tok


def default_num_proc() -> int:
    return min(8, os.cpu_count() or 1)


def _tokenize_to(ds, tok, path: Path, dtype, num_proc: int = 1) -> int:
    """Tokenize every document (in `num_proc` processes via datasets.map; order is kept), append
    EOS to each, and write the flat token stream. Returns the token count."""
    eos = tok.eos_token_id

    def encode(batch):
        return {"ids": [ids + [eos] for ids in tok(batch["text"], add_special_tokens=False)["input_ids"]]}

    procs = num_proc if num_proc > 1 and len(ds) >= 2 * num_proc else None
    enc = ds.map(encode, batched=True, batch_size=256, num_proc=procs, remove_columns=ds.column_names,
                 load_from_cache_file=False, desc=None)
    n = 0
    with open(path, "wb") as f:
        for batch in enc.iter(batch_size=1024):
            arr = np.fromiter(itertools.chain.from_iterable(batch["ids"]), dtype=dtype)
            f.write(arr.tobytes())
            n += arr.size
    return n


def planned_vocab_size(data) -> int:
    """The vocabulary `prepare_data` will record: data.vocab_size for a tokenizer trained here, the
    length of an HF tokenizer dir's tokenizer otherwise (its added tokens included)."""
    if data.tokenizer == "train":
        return data.vocab_size
    from transformers import AutoTokenizer
    return len(AutoTokenizer.from_pretrained(data.tokenizer))


def prepare_data(data, out: Path) -> Path:
    """Build (or reuse) the prepared data dir for a DataSpec. Safe to call from every rank."""
    # Only what shapes the token stream: a new unrelated DataSpec field must not invalidate caches.
    key = {k: v for k, v in dataclasses.asdict(data).items() if k in TEXT_KEYS}

    def build(tmp: Path) -> dict:
        train, val = load_splits(data, tmp)
        if data.tokenizer == "train":
            tok = _train_sentencepiece(train["text"], data.vocab_size, tmp)
        else:
            from transformers import AutoTokenizer
            try:
                tok = AutoTokenizer.from_pretrained(data.tokenizer, local_files_only=True)
            except (OSError, ValueError, TypeError, KeyError) as e:  # files present but not loadable
                raise CompTError(f"data.tokenizer: cannot load {data.tokenizer}: {str(e).strip().splitlines()[0]}") \
                    from None
        if tok.eos_token_id is None:
            raise CompTError(f"data.tokenizer: {data.tokenizer} has no EOS token")
        tok.save_pretrained(str(tmp / "tokenizer"))
        vocab = len(tok)
        dtype = np.uint16 if vocab <= 65535 else np.uint32
        procs = data.num_proc or default_num_proc()
        counts = {s: _tokenize_to(d, tok, tmp / f"{s}.bin", dtype, procs) for s, d in (("train", train), ("val", val))}
        for s, c in counts.items():
            if c < 2 * (data.seq_len + 1):
                raise CompTError(f"data: the {s} split has only {c} tokens, fewer than two sequences of "
                                 f"seq_len {data.seq_len}")
        for junk in ("sp", "hf-cache", "corpus.train.jsonl", "corpus.val.jsonl", "spm.model", "spm.vocab"):
            p = tmp / junk
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return {"vocab_size": vocab, "dtype": np.dtype(dtype).name, "seq_len": data.seq_len, "tokens": counts,
                "eos_id": tok.eos_token_id}

    # The corpus and tokenizer files' contents too: an edited corpus is prepared again.
    inputs = (data.paths if data.corpus != "stdlib" else []) + \
        ([data.tokenizer] if data.tokenizer != "train" and Path(data.tokenizer).exists() else [])
    return build_once(Path(out), key, build, files_fingerprint(inputs))


def doc_positions(inputs: np.ndarray, eos: int) -> np.ndarray:
    """Position ids [B, T] that restart at 0 after each EOS (the token after it starts a document)."""
    B, T = inputs.shape
    start = np.zeros((B, T), dtype=bool)
    start[:, 0] = True
    start[:, 1:] = inputs[:, :-1] == eos
    idx = np.broadcast_to(np.arange(T), (B, T))
    return idx - np.maximum.accumulate(np.where(start, idx, 0), axis=1)


class PackedTokens:
    """Fixed-length samples over a memory-mapped token stream.

    With `doc_positions`, a batch is (inputs, labels, position_ids): positions restart after each EOS,
    which the family turns into attention that does not cross documents.
    """

    def __init__(self, data_dir: Path, split: str, seq_len: int, doc_positions: bool = False):
        meta = json.loads((Path(data_dir) / "meta.json").read_text())
        self.tokens = np.memmap(Path(data_dir) / f"{split}.bin", dtype=meta["dtype"], mode="r")
        self.seq_len = seq_len
        self.num_samples = (len(self.tokens) - 1) // seq_len
        self.eos = None
        if doc_positions:
            self.eos = meta.get("eos_id")
            if self.eos is None:   # data prepared before meta.json recorded it
                from transformers import AutoTokenizer
                self.eos = AutoTokenizer.from_pretrained(str(Path(data_dir) / "tokenizer")).eos_token_id

    def __len__(self) -> int:
        return self.num_samples

    def batch(self, indices, step: int | None = None) -> tuple[torch.Tensor, ...]:
        L = self.seq_len
        rows = np.stack([np.asarray(self.tokens[i * L: i * L + L + 1], dtype=np.int64) for i in indices])
        t = torch.from_numpy(rows)
        inputs, labels = t[:, :-1].contiguous(), t[:, 1:].contiguous()
        if self.eos is None:
            return inputs, labels
        return inputs, labels, torch.from_numpy(doc_positions(rows[:, :-1], self.eos))


def sample_indices(num_samples: int, seed: int, step: int, micro: int, grad_accum: int,
                   micro_batch: int, rank: int, world: int) -> list[int]:
    """Sample ids for (step, micro-step, rank): a seeded permutation per epoch, no hidden state, so a
    resumed run reads exactly what an uninterrupted one would have."""
    per_step = micro_batch * world * grad_accum
    first = step * per_step + micro * micro_batch * world + rank * micro_batch
    out = []
    for g in range(first, first + micro_batch):
        epoch, pos = divmod(g, num_samples)
        perm = _perm(num_samples, seed + epoch)
        out.append(int(perm[pos]))
    return out


_PERM_CACHE: dict[tuple[int, int], np.ndarray] = {}


def _perm(n: int, seed: int) -> np.ndarray:
    key = (n, seed)
    if key not in _PERM_CACHE:
        _PERM_CACHE.clear()
        _PERM_CACHE[key] = np.random.default_rng(seed).permutation(n)
    return _PERM_CACHE[key]
