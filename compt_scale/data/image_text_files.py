"""A user's image-caption files for the open_clip family: CSV/TSV (open_clip's CsvDataset convention)
and webdataset tar shards, each image with one or more captions (LaCLIP's augmented captions).

CSV: an image-path column (`data.image_field`) and caption columns: `data.caption_fields` if given,
else `data.text_field` (left at its default `text` and absent: open_clip's `title`) plus the numbered columns after it that exist (`title`, `title_1`, `title_2`,
... as LaCLIP's augmented CSVs have them). With `data.caption_sep`, every caption cell is split on it
too (several captions in one column). Empty cells are skipped; a row needs at least one caption.

Tar (webdataset): members grouped by key (the name up to the first dot of the base name, as
webdataset does): an image (`.jpg`, `.jpeg`, `.png`, `.webp`) and its captions, from `.json`
(a list of strings, or an object with a `captions` list or a `data.text_field` string/list) and/or
`.txt` (split on `data.caption_sep` when set). Read with the standard library's `tarfile`: a shard
is read in one pass, nothing is extracted to disk.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from ..errors import CompTError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_TEXT_FIELD = "text"        # data.text_field's default (the decoders' column name)
OPEN_CLIP_CAPTION_KEY = "title"    # open_clip's --csv-caption-key default (--csv-img-key: filepath)


def split_captions(values, sep: str | None) -> list[str]:
    out = []
    for v in values:
        if v is None:
            continue
        for c in (str(v).split(sep) if sep else [str(v)]):
            c = " ".join(c.split())
            if c:
                out.append(c)
    return out


def caption_columns(data, columns: list[str], where) -> list[str]:
    if data.caption_fields:
        missing = [c for c in data.caption_fields if c not in columns]
        if missing:
            raise CompTError(f"data.caption_fields: {missing[0]!r} not in {where} (columns: {', '.join(columns)})")
        return list(data.caption_fields)
    field = data.text_field
    if field == DEFAULT_TEXT_FIELD and field not in columns and OPEN_CLIP_CAPTION_KEY in columns:
        field = OPEN_CLIP_CAPTION_KEY   # the default left as is: open_clip's own (--csv-caption-key)
    if field not in columns:
        also = f" nor open_clip's {OPEN_CLIP_CAPTION_KEY!r}" if field == DEFAULT_TEXT_FIELD else ""
        raise CompTError(f"data.text_field: column {field!r}{also} not in {where} "
                         f"(columns: {', '.join(columns)})")
    cols, i = [field], 1
    while f"{field}_{i}" in columns:
        cols.append(f"{field}_{i}")
        i += 1
    return cols


def read_csv(data, p: Path, cache: Path) -> list[tuple[Path, list[str]]]:
    from datasets import load_dataset
    sep = "\t" if p.suffix == ".tsv" or "\t" in p.open(errors="replace").readline() else ","
    try:
        ds = load_dataset("csv", data_files=str(p), delimiter=sep, split="train", cache_dir=str(cache))
    except Exception as e:  # noqa: BLE001 - datasets/pyarrow raise many types for malformed files
        raise CompTError(f"data.paths: cannot read {p} as CSV: {str(e).splitlines()[0][:200]}") from None
    if data.image_field not in ds.column_names:
        raise CompTError(f"data.image_field: column {data.image_field!r} not in {p} "
                         f"(columns: {', '.join(ds.column_names)})")
    cols = caption_columns(data, ds.column_names, p)
    rows = []
    for n, row in enumerate(ds):
        q = Path(str(row[data.image_field])).expanduser()
        # Paths relative to the CSV's own folder first (a dataset moved as a whole keeps
        # working), then to the working directory as open_clip's CsvDataset reads them.
        if not q.is_absolute() and (p.parent / q).exists():
            q = p.parent / q
        caps = split_captions([row[c] for c in cols], data.caption_sep)
        if not caps:
            raise CompTError(f"data.paths: {p} row {n + 2} has no caption in {', '.join(cols)}")
        rows.append((q, caps))
    return rows


def _json_captions(raw: bytes, data, where: str) -> list:
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise CompTError(f"data.paths: {where}: not JSON ({e})") from None
    if isinstance(obj, dict):
        obj = obj.get("captions", obj.get(data.text_field, []))
    return obj if isinstance(obj, list) else [obj]


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    assert f is not None  # a regular file member (the caller checked isfile) always has a file object
    return f.read()


def read_tar(data, p: Path) -> list[tuple[tuple[Path, str], list[str]]]:
    """(image reference (tar path, member name), captions) for every sample of one shard."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(p) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = Path(m.name).name
                key = str(Path(m.name).parent / base.split(".", 1)[0])
                ext = "." + base.split(".", 1)[1].lower() if "." in base else ""
                s = samples.setdefault(key, {"caps": []})
                if ext in IMAGE_EXTS:
                    s["image"] = m.name
                elif ext == ".json":
                    s["caps"] += _json_captions(_member_bytes(tar, m), data, f"{p}:{m.name}")
                elif ext == ".txt":
                    s["caps"].append(_member_bytes(tar, m).decode("utf-8", "replace"))
    except (OSError, tarfile.TarError) as e:
        raise CompTError(f"data.paths: cannot read {p} as a tar shard: {e}") from None
    rows = []
    for key, s in samples.items():
        if "image" not in s:
            continue  # metadata-only entries
        caps = split_captions(s["caps"], data.caption_sep)
        if not caps:
            raise CompTError(f"data.paths: {p}: sample {key!r} has no caption (.json or .txt)")
        rows.append(((p, s["image"]), caps))
    return rows


def read_files(data, cache: Path) -> list[tuple[object, list[str]]]:
    rows: list[tuple[object, list[str]]] = []
    for p in map(Path, data.paths):
        rows += read_tar(data, p) if p.suffix == ".tar" else read_csv(data, p, cache)
    return rows


class ImageOpener:
    """Opens a row's image: a file path, or a member of a tar shard (shards kept open while used)."""

    def __init__(self):
        self.tars: dict[Path, tarfile.TarFile] = {}

    def __call__(self, ref):
        if isinstance(ref, tuple):
            tar_path, member = ref
            if tar_path not in self.tars:
                self.tars[tar_path] = tarfile.open(tar_path)  # noqa: SIM115 - kept open, closed by close()
            return io.BytesIO(self.tars[tar_path].extractfile(member).read())
        return ref

    def close(self) -> None:
        for t in self.tars.values():
            t.close()
