"""Streaming growth of Hugging Face safetensors checkpoints, one tensor at a time.

The source is read with plain file reads (no mmap: mapped pages would count towards resident memory
as the whole checkpoint is touched), slab by slab. Each target tensor is built from the student's
init rule, grown in place, written to its shard and freed, so peak memory is about one target
tensor plus an 8 MiB working block, whatever the model size. safetensors headers only need names,
dtypes and shapes, so each shard's header is written before any of its data.

Student init rule for streamed targets (no target model is materialized): norm weights = ones,
biases = zeros, every other tensor ~ normal(0, initializer_range) (`init_std` for OPT, 0.02 if the
config has neither), drawn from a generator seeded by (seed, tensor name) so it does not depend on
the order tensors are processed in.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
from pathlib import Path

import torch

from ..errors import CompTError
from ..files import atomic_dir
from .axes import CHUNK_ELEMS, Source
from .registry import grow_tensor, plan, source_key

_DT = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
       "BOOL": torch.bool}
_DT_NAME = {v: k for k, v in _DT.items()}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")


# ---------------------------------------------------------------- reading

class _FileSource(Source):
    """One tensor of a safetensors file, read by slabs with pread."""

    def __init__(self, path: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...]):
        self.path, self.offset, self.dtype, self.shape = path, offset, dtype, tuple(shape)
        self._full: torch.Tensor | None = None

    def _rows(self, lo: int, hi: int) -> torch.Tensor:
        row = math.prod(self.shape[1:]) * torch.empty((), dtype=self.dtype).element_size()
        buf = torch.empty((hi - lo,) + self.shape[1:], dtype=self.dtype)
        view = buf.view(-1).view(torch.uint8).numpy() if buf.numel() else memoryview(b"")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset + lo * row)
            n = f.readinto(view)
        if n != (hi - lo) * row:
            raise CompTError(f"{self.path}: truncated tensor data")
        return buf

    def read(self, dim: int, lo: int, hi: int) -> torch.Tensor:
        if not self.shape:
            return self._rows(0, 1).reshape(())
        if dim == 0:
            return self._rows(lo, hi)
        if self._full is None:  # slabs along an inner dim: read once (source <= target tensor)
            self._full = self._rows(0, self.shape[0])
        return self._full.narrow(dim, lo, hi - lo)

    @property
    def tensor(self):  # 0-d tensors
        return self.read(0, 0, 1)


class SafetensorsReader:
    """The tensors of an HF model dir (model.safetensors or a sharded index), without loading them."""

    def __init__(self, model_dir):
        d = Path(model_dir)
        index = d / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (d / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise CompTError(f"{d}: no model.safetensors or model.safetensors.index.json "
                             "(streaming growth reads safetensors checkpoints)")
        self.entries = {}
        for name in files:
            p = d / name
            with open(p, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CompTError(f"{p}: not a safetensors file ({len(head)} bytes, shorter than its header)")
                (n,) = struct.unpack("<Q", head)
                if not 0 < n <= p.stat().st_size - 8:
                    raise CompTError(f"{p}: not a safetensors file, or truncated (header of {n} bytes)")
                try:
                    header = json.loads(f.read(n))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise CompTError(f"{p}: corrupt safetensors header") from None
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                if v["dtype"] not in _DT:
                    raise CompTError(f"{p}: unsupported dtype {v['dtype']} for {k}")
                self.entries[k] = _FileSource(p, 8 + n + v["data_offsets"][0], _DT[v["dtype"]], v["shape"])

    def __contains__(self, key):
        return key in self.entries

    def __iter__(self):
        return iter(self.entries)

    def source(self, key: str) -> Source:
        return self.entries[key]

    def __getitem__(self, key: str) -> torch.Tensor:   # dict-like: the whole tensor
        s = self.entries[key]
        return s.read(0, 0, s.shape[0]) if s.shape else s.tensor


# ---------------------------------------------------------------- writing

def _write_shard(path: Path, items, produce) -> None:
    """items: [(key, dtype, shape)]; produce(key) -> tensor, called in order, written then dropped."""
    header: dict[str, dict[str, object]] = {"__metadata__": {"format": "pt"}}
    off = 0
    for k, dt, shape in items:
        n = math.prod(shape) * torch.empty((), dtype=dt).element_size()
        header[k] = {"dtype": _DT_NAME[dt], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)   # the format wants the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for k, dt, shape in items:
            t = produce(k)
            assert t.dtype == dt and tuple(t.shape) == tuple(shape), k
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t


def _nbytes(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def write_safetensors(out_dir: Path, items, produce, max_shard_bytes: int = 5 * 2**30,
                      write: bool = True) -> list[str]:
    """HF's layout: model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json.

    items: [(key, dtype, shape)] in order; produce(key) -> tensor, called once per key in that order
    (write=False: only called, for ranks that take part in each parameter's gather but write nothing).
    """
    shards: list[list[tuple]] = []
    cur: list[tuple] = []
    size = 0
    for it in items:
        n = _nbytes(it[1], it[2])
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += n
    shards.append(cur)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards, strict=True):
        if write:
            _write_shard(Path(out_dir) / name, shard, produce)
        else:
            for k, _, _ in shard:
                produce(k)
    if write and len(shards) > 1:
        wm = {k: n for n, sh in zip(names, shards, strict=True) for k, _, _ in sh}
        total = sum(_nbytes(d, s) for _, d, s in items)
        (Path(out_dir) / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2))
    return names


# ---------------------------------------------------------------- growth

def _seed_for(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1


def student_init(key: str, spec, shape, dtype, config, seed: int) -> torch.Tensor:
    """The documented per-tensor init rule (module docstring)."""
    if spec.norm:
        return torch.ones(shape, dtype=dtype)
    if key.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    std = getattr(config, "initializer_range", None) or getattr(config, "init_std", None) or 0.02
    g = torch.Generator().manual_seed(_seed_for(seed, key))
    if not shape:
        return torch.empty((), dtype=torch.float32).normal_(0.0, std, generator=g).to(dtype)
    out = torch.empty(shape, dtype=dtype)
    # drawn in fp32 slabs (fast on CPU) and cast into place: no full-size fp32 temporary
    step = max(1, CHUNK_ELEMS // max(1, math.prod(shape[1:])))
    for lo in range(0, shape[0], step):
        n = min(step, shape[0] - lo)
        out[lo:lo + n] = torch.empty((n,) + tuple(shape[1:])).normal_(0.0, std, generator=g)
    return out


def target_tensors(tgt_config) -> tuple[list[tuple[str, tuple]], dict[str, str]]:
    """Target keys + shapes from a meta-device model (no memory), and tied alias -> canonical key."""
    from ..meta import meta_decoder
    sd = meta_decoder(tgt_config).state_dict(keep_vars=True)
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    for k, v in sd.items():
        if id(v) in first:
            alias[k] = first[id(v)]
        else:
            first[id(v)] = k
    return [(k, tuple(v.shape)) for k, v in sd.items()], alias


def grow_hf_checkpoint(src_dir, tgt_config, out_dir, width: str = "insert", depth: str = "duplicate",
                       seed: int = 0, noise_snr: float | None = None,
                       max_shard_bytes: int = 5 * 2**30) -> dict:
    """Stream-grow an HF safetensors checkpoint into `out_dir` (a save_pretrained-style dir).
    Returns the report, also written as out_dir/grow_report.json."""
    from transformers import AutoConfig

    src_dir = Path(src_dir)
    if not (src_dir / "config.json").is_file():
        raise CompTError(f"{src_dir}: not a Hugging Face model dir (no config.json)")
    src_config = AutoConfig.from_pretrained(src_dir, local_files_only=True)
    tgt_config = type(tgt_config).from_dict(tgt_config.to_dict())  # never edit the caller's config
    reader = SafetensorsReader(src_dir)
    shapes, alias = target_tensors(tgt_config)
    steps, report, layout = plan(src_config, tgt_config, [k for k, _ in shapes], width, depth, noise_snr)
    for k, v in report["config_changes"].items():
        setattr(tgt_config, k, v)
    by_key = {st.key: st for st in steps}
    shape_of = dict(shapes)
    dtypes = {}
    for st in steps:   # resolve sources before writing anything: errors leave no output
        if st.src_key is not None:
            st.src_key = source_key(layout, src_config, st.src_key, reader)
            dtypes[st.key] = reader.source(st.src_key).dtype
    main_dtype = max(set(dtypes.values()), key=list(dtypes.values()).count)
    # Tied aliases are not written (as save_pretrained does) unless clone untied them.
    items = [(k, dtypes.get(k, main_dtype), s) for k, s in shapes
             if not (k in alias and not report["untied_embeddings"])]
    gen = torch.Generator()

    def produce(key):
        st = by_key[key]
        dt = dtypes.get(key, main_dtype)
        out = student_init(key, st.spec, shape_of[key], dt, tgt_config, seed)
        src = reader.source(st.src_key) if st.src_key else None
        gen.manual_seed(_seed_for(seed + 1, key))
        report["tensors"][key] = grow_tensor(st, src, out, layout, src_config, tgt_config, width, noise_snr, gen)
        return out

    with atomic_dir(out_dir, replace=False) as tmp:
        names = write_safetensors(tmp, items, produce, max_shard_bytes)
        tgt_config.architectures = src_config.architectures
        tgt_config.dtype = str(main_dtype).replace("torch.", "")
        tgt_config.to_json_file(str(tmp / "config.json"))
        for f in TOKENIZER_FILES:
            if (src_dir / f).is_file():
                shutil.copy2(src_dir / f, tmp / f)
        report.update(source=str(src_dir), seed=seed, noise_snr=noise_snr, shards=names,
                      init_rule="norm=1, bias=0, else normal(0, initializer_range), seeded per tensor")
        (tmp / "grow_report.json").write_text(json.dumps(report, indent=1))
    return report
