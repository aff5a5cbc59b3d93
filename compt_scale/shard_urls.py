"""Shard URLs as a spec gives them (open_clip's forms): `::`-joined patterns, local paths, `file:`,
`pipe:` and http(s) URLs. Torch-free, so the spec parser can resolve them at load time."""
from __future__ import annotations

from pathlib import Path

from .errors import CompTError


def _scheme(url: str) -> str | None:
    head, sep, _ = url.partition(":")
    return head.lower() if sep and len(head) > 1 and head.isalnum() else None


def is_local(url: str) -> bool:
    return _scheme(url) in (None, "file")


def local_path(url: str) -> Path:
    return Path(url[len("file:"):] if _scheme(url) == "file" else url)


def split_patterns(value) -> list[str]:
    """A string or a list of strings, each possibly several patterns joined by `::` (open_clip)."""
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, list) else None
    if items is None:
        raise CompTError(f"expected a string or a list of strings, got {value!r}")
    return [p.strip() for item in items for p in str(item).split("::") if p.strip()]


def resolve_patterns(value, base_dir: Path) -> list[str]:
    """Relative local patterns resolve against the spec's folder, as `data.paths` do; URLs stay as given."""
    out = []
    for p in split_patterns(value):
        if is_local(p) and _scheme(p) is None:
            q = Path(p).expanduser()
            p = str(q if q.is_absolute() else base_dir / q)
        out.append(p)
    return out
