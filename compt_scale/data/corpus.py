"""Text sources: the embedded corpus (Python's own stdlib source and docs) and user files.

Both end as `datasets` Datasets with one `text` column, split into train/validation by document, so
the validation text is never seen in training whatever the packing.
"""
from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

import datasets

from ..errors import CompTError

datasets.disable_progress_bars()


def _is_val(key: str, fraction: float) -> bool:
    # A stable hash, not Python's salted hash(): the split must be the same on every rank and run.
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
    return (h % 10_000) < fraction * 10_000


def stdlib_documents(max_chars: int):
    """Yield (key, text): pydoc's English topic docs first, then stdlib modules in sorted order."""
    import pydoc_data.topics as topics

    total = 0
    for name in sorted(topics.topics):
        text = topics.topics[name]
        yield f"doc:{name}", text
        total += len(text)
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "/test" in rel or rel.startswith("test") or "idle_test" in rel:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if total + len(text) > max_chars:
            if total >= max_chars:
                return
            text = text[: max_chars - total]
        yield f"src:{rel}", text
        total += len(text)


def _chunks(text: str, size: int = 4096):
    """Split at line breaks into pieces of about `size` chars: a few huge modules must not decide the
    whole validation split by themselves."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def write_stdlib_jsonl(out_dir: Path, max_chars: int, val_fraction: float) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    train_p, val_p = out_dir / "corpus.train.jsonl", out_dir / "corpus.val.jsonl"
    with open(train_p, "w") as tr, open(val_p, "w") as va:
        for key, text in stdlib_documents(max_chars):
            for i, chunk in enumerate(_chunks(text)):
                (va if _is_val(f"{key}:{i}", val_fraction) else tr).write(json.dumps({"text": chunk}) + "\n")
    return train_p, val_p


def _loader_for(paths: list[str]) -> str:
    kinds = set()
    for p in paths:
        suffix = Path(p).suffix.lower()
        kind = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
        if kind is None:
            raise CompTError(f"data.paths: {p}: unsupported file type {suffix!r} (txt, jsonl, parquet)")
        kinds.add(kind)
    if len(kinds) > 1:
        raise CompTError(f"data.paths: mixed file types ({', '.join(sorted(kinds))}); use one kind")
    return kinds.pop()


def load_splits(data, work_dir: Path) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, validation) datasets with a `text` column, from the spec's DataSpec."""
    if data.corpus == "stdlib":
        train_p, val_p = write_stdlib_jsonl(work_dir, data.max_chars, data.val_fraction)
        ds = datasets.load_dataset("json", data_files={"train": str(train_p), "validation": str(val_p)},
                                   cache_dir=str(work_dir / "hf-cache"))
        return ds["train"], ds["validation"]
    kind = _loader_for(data.paths)
    try:
        ds = datasets.load_dataset(kind, data_files={"train": data.paths}, cache_dir=str(work_dir / "hf-cache"))["train"]
    except Exception as e:  # datasets raises many types for unreadable files
        raise CompTError(f"data.paths: cannot load: {str(e).splitlines()[0]}") from None
    field = "text" if kind == "text" else data.text_field
    if field not in ds.column_names:
        raise CompTError(f"data.text_field: column {field!r} not in {ds.column_names}")
    if field != "text":
        ds = ds.rename_column(field, "text")
    ds = ds.select_columns(["text"])
    bad = next((i for i, t in enumerate(ds["text"]) if not isinstance(t, str)), None)
    if bad is not None:  # JSON null / a number where text should be: name the row, do not crash on it
        raise CompTError(f"data.paths: row {bad + 1}: {field!r} is {ds[bad]['text']!r} (null or not text)")
    # Split by row so each document lands wholly on one side.
    is_val = [_is_val(f"row:{i}:{t[:64]}", data.val_fraction) for i, t in enumerate(ds["text"])]
    val_idx = [i for i, v in enumerate(is_val) if v]
    train_idx = [i for i, v in enumerate(is_val) if not v]
    if not val_idx or not train_idx:
        raise CompTError("data.paths: too few documents to hold out a validation split")
    return ds.select(train_idx), ds.select(val_idx)
