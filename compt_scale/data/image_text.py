"""Image-caption pairs for the open_clip family: rendered synthetic scenes or a user's CSV, prepared once.

Layout of the prepared data dir (built in a temp dir and renamed into place under a lock, as in
data/packed.py, so concurrent ranks or jobs never see half of it):
  {split}_images.u8     uint8 memmap [N, 3, S, S] (S = data.image_size), RGB
  {split}_tokens.i32    int32 memmap [N, K, context_length]: open_clip SimpleTokenizer ids (vocab 49408),
                        K caption slots per image (K = the most captions any image has)
  {split}_ncaps.i32     int32 [N]: how many of the K slots image i fills (1..K)
  {split}_captions.txt  the first caption of each image, one per line, for people and tests
  {split}_captions.jsonl  all captions of each image, a JSON list per line
  zeroshot_*            ("shapes" only) a labelled split for zero-shot classification: single-object
                        scenes, their class ids and the tokenized class prompts (see zeroshot_split)
  meta.json             sizes, normalization, the DataSpec (+ context_length) that built it
Sample i of a split is images[i] and its captions: an index fully determines the pair, so the runner's
stateless sampler (data.packed.sample_indices) works unchanged; which M of an image's captions a
training step uses is drawn from (step, index) alone (LaCLIP's per-iteration caption sampling), so a
resumed run reads exactly what an uninterrupted one would have.

`corpus: shapes` draws 1-3 coloured shapes per image on a 3x3 grid and describes them, e.g. "a small
red circle at the top left and a large blue star in the center". Scene i depends only on i (its own
seeded RNG), so the data is the same on every machine and for any num_samples. With
`data.caption_variants: K` each scene gets K captions: the canonical one and K-1 templated paraphrases
of the same content (other wording, object order and joiners), LaCLIP's augmented captions in miniature.
`corpus: files` reads CSV/TSV files in open_clip's CsvDataset convention or webdataset tar shards,
each image with one or more captions (data/image_text_files.py); images are resized (shortest side, bicubic) and centre-cropped exactly
as open_clip's own eval transform does, so an export's `preprocess_val` sees what training saw.
`corpus: webdataset` streams its training split (data/webdataset_shards.py); only its eval split is
prepared here, from `data.val_shards` (or the held-out last shard).
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..errors import CompTError
from ..files import build_once, files_fingerprint
from .image_files import load_image  # noqa: F401  (part of this module's interface)

MEAN = (0.48145466, 0.4578275, 0.40821073)   # open_clip's OPENAI_DATASET_MEAN / STD: what its
STD = (0.26862954, 0.26130258, 0.27577711)   # default preprocess (and an export's) normalizes with
SCENE_SEED = 1234
CAPTION_SEED = 4321                           # per-step caption draws

# Palette chosen so any two colours differ by >= 90 in some channel: a pixel's nearest palette entry
# names its colour unambiguously (tests read captions back from pixels this way).
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 90, 230), "yellow": (240, 220, 40),
          "purple": (150, 50, 210), "orange": (250, 140, 20), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.10, "large": 0.15}        # outer radius as a fraction of the image side
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
SUPERSAMPLE = 4                               # draw large, box-downsample: anti-aliased edges


def position_phrase(row: int, col: int) -> str:
    if row == 1:
        return "in the center" if col == 1 else f"on the {COLS[col]}"
    return f"at the {ROWS[row]}" + ("" if col == 1 else f" {COLS[col]}")


def cell_of_phrase(phrase: str) -> tuple[int, int]:
    """Inverse of position_phrase (tests parse captions back into grid cells)."""
    for r in range(3):
        for c in range(3):
            if position_phrase(r, c) == phrase:
                return r, c
    raise ValueError(f"not a position phrase: {phrase!r}")


def scene(index: int) -> list[dict]:
    """The objects of scene `index`: shape, color, size word, grid cell and centre (fractions of S)."""
    rng = random.Random(SCENE_SEED * 1_000_003 + index)
    objects = []
    for cell in rng.sample(range(9), rng.randint(1, 3)):  # distinct cells: shapes never overlap
        row, col = divmod(cell, 3)
        size = rng.choice(list(SIZES))
        r = SIZES[size]
        # Jitter stays a quarter of the slack inside the cell, so the cell centre is always inside
        # the shape (even a star's inner core): a caption's cell names a pixel of the shape.
        slack = (1 / 6 - r) * 0.25
        cx = (col + 0.5) / 3 + rng.uniform(-slack, slack)
        cy = (row + 0.5) / 3 + rng.uniform(-slack, slack)
        objects.append({"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)), "size": size,
                        "row": row, "col": col, "cx": cx, "cy": cy, "r": r})
    return objects


def caption(objects: list[dict]) -> str:
    parts = [f"a {o['size']} {o['color']} {o['shape']} {position_phrase(o['row'], o['col'])}" for o in objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


OBJECT_TEMPLATES = ("a {size} {color} {shape} {pos}", "a {color} {shape}, {size}, {pos}",
                    "{pos} there is a {size} {color} {shape}", "a {size} {shape} colored {color} {pos}",
                    "one {size} {color} {shape} {pos}", "a {color} {size} {shape} {pos}")
JOINERS = (" and ", "; ", ", plus ", " as well as ")
PREFIXES = ("", "an image of ", "a picture showing ", "a dark background with ", "a drawing of ")


def paraphrases(objects: list[dict], index: int, k: int) -> list[str]:
    """k captions of one scene: the canonical caption first, then templated paraphrases of the same
    content (every object's size, colour, shape and position stated, different wording and order)."""
    out = [caption(objects)]
    rng = random.Random(SCENE_SEED * 7_919 + index)
    for _ in range(100 * k):  # distinct paraphrases while the templates allow (30+ per scene)
        if len(out) == k:
            break
        order = rng.sample(objects, len(objects))
        parts = [rng.choice(OBJECT_TEMPLATES).format(size=o["size"], color=o["color"], shape=o["shape"],
                                                      pos=position_phrase(o["row"], o["col"])) for o in order]
        text = rng.choice(PREFIXES) + rng.choice(JOINERS).join(parts)
        if text not in out:
            out.append(text)
    return out + [out[j % len(out)] for j in range(k - len(out))]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":  # equilateral, pointing up, centroid at the centre
        return [(cx + r * math.sin(a), cy - r * math.cos(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    # star: 5 points, inner radius 0.5 r
    return [(cx + (r if k % 2 == 0 else 0.5 * r) * math.sin(k * math.pi / 5),
             cy - (r if k % 2 == 0 else 0.5 * r) * math.cos(k * math.pi / 5)) for k in range(10)]


def render(objects: list[dict], size: int, background: int) -> Image.Image:
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), (background,) * 3)
    draw = ImageDraw.Draw(img)
    for o in objects:
        cx, cy, r, fill = o["cx"] * big, o["cy"] * big, o["r"] * big, COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o["shape"] == "square":
            h = 0.85 * r  # about a circle's area
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        else:
            draw.polygon(_polygon(o["shape"], cx, cy, r), fill=fill)
    return img.resize((size, size), Image.Resampling.BOX)


def shapes_sample(index: int, size: int, variants: int = 1) -> tuple[np.ndarray, list[str]]:
    objects = scene(index)
    background = random.Random(SCENE_SEED + 7 * index).randint(10, 70)  # dark grays, never a palette colour
    return np.asarray(render(objects, size, background)).transpose(2, 0, 1), paraphrases(objects, index, variants)


ZEROSHOT_PER_CLASS = 4


def zeroshot_split(size: int, tokenizer, tmp: Path) -> dict:
    """A labelled split: ZEROSHOT_PER_CLASS single-object scenes per class (colour x shape, 28 classes),
    drawn from their own seed (never a training scene), and per class the prompts of every size and
    position ("a small red circle at the top left", ...), averaged as CLIP's prompt ensembles are.
    Files: zeroshot_images.u8 [Z,3,S,S], zeroshot_labels.i32 [Z], zeroshot_prompts.i32 [C,P,ctx]."""
    classes = [(c, s) for c in COLORS for s in SHAPES]
    imgs, labels = [], []
    for label, (color, shape) in enumerate(classes):
        for k in range(ZEROSHOT_PER_CLASS):
            rng = random.Random(SCENE_SEED * 31 + label * 101 + k)
            row, col, sz = rng.randrange(3), rng.randrange(3), rng.choice(list(SIZES))
            o = {"shape": shape, "color": color, "size": sz, "row": row, "col": col, "cx": (col + 0.5) / 3,
                 "cy": (row + 0.5) / 3, "r": SIZES[sz]}
            imgs.append(np.asarray(render([o], size, rng.randint(10, 70))).transpose(2, 0, 1))
            labels.append(label)
    prompts = [[f"a {sz} {c} {s} {position_phrase(r, q)}" for sz in SIZES for r in range(3) for q in range(3)]
               for c, s in classes]
    np.stack(imgs).astype(np.uint8).tofile(tmp / "zeroshot_images.u8")
    np.asarray(labels, dtype=np.int32).tofile(tmp / "zeroshot_labels.i32")
    toks = tokenizer([p for ps in prompts for p in ps]).numpy().astype(np.int32)
    toks.tofile(tmp / "zeroshot_prompts.i32")
    return {"images": len(labels), "classes": [f"{c} {s}" for c, s in classes], "prompts": len(prompts[0])}


def val_count(n: int, fraction: float) -> int:
    # At least 64 (or a quarter) held out: eval batches are contrastive, and indices wrap around a
    # tiny val split, which would put the same pair twice in one batch.
    return max(math.ceil(n * fraction), min(64, n // 4))


# ---------------------------------------------------------------- CSV files

# ---------------------------------------------------------------- preparation

def _write_split(tmp: Path, split: str, items, n: int, size: int, tokenizer, ctx: int, k: int, load) -> None:
    imgs = np.memmap(tmp / f"{split}_images.u8", dtype=np.uint8, mode="w+", shape=(n, 3, size, size))
    toks: np.memmap = np.memmap(tmp / f"{split}_tokens.i32", dtype=np.int32, mode="w+", shape=(n, k, ctx))
    ncaps: np.ndarray = np.zeros(n, dtype=np.int32)
    with open(tmp / f"{split}_captions.txt", "w") as f, open(tmp / f"{split}_captions.jsonl", "w") as fj:
        for start in range(0, n, 256):
            chunk = items[start:start + 256]
            for j, item in enumerate(chunk):
                imgs[start + j], caps = load(item)
                caps = [" ".join(c.split()) for c in caps][:k]  # one line per caption
                ncaps[start + j] = len(caps)
                # Unused slots repeat the image's captions: any slot is a valid caption of the image.
                toks[start + j] = tokenizer([caps[i % len(caps)] for i in range(k)]).numpy().astype(np.int32)
                f.write(caps[0] + "\n")
                fj.write(json.dumps(caps) + "\n")
    ncaps.tofile(tmp / f"{split}_ncaps.i32")
    imgs.flush()
    toks.flush()
    del imgs, toks


def prepare_image_text(data, context_length: int, out: Path) -> Path:
    """Build (or reuse) the prepared image-text dir for a DataSpec. Safe to call from every rank."""
    from open_clip.tokenizer import SimpleTokenizer

    key = dataclasses.asdict(data)
    key.pop("cache_dir", None)
    key["context_length"] = context_length

    def build(tmp: Path) -> dict:
        size = data.image_size
        tokenizer = SimpleTokenizer(context_length=context_length)
        extra = {}
        if data.corpus == "shapes":
            n = data.num_samples
            n_val = val_count(n, data.val_fraction)
            splits = {"train": list(range(n - n_val)), "val": list(range(n - n_val, n))}
            k = data.caption_variants

            def load(i):
                return shapes_sample(i, size, k)
            extra["zeroshot"] = zeroshot_split(size, tokenizer, tmp)
        elif data.corpus == "files":
            from .image_text_files import ImageOpener, read_files
            rows = read_files(data, tmp / "hf-cache")
            n = len(rows)
            n_val = val_count(n, data.val_fraction)
            order = np.random.default_rng(0).permutation(n)  # CSVs are often sorted: shuffle the split
            splits = {"val": [rows[i] for i in sorted(order[:n_val])],
                      "train": [rows[i] for i in sorted(order[n_val:])]}
            k = max(len(r[1]) for r in rows) if rows else 1
            opener = ImageOpener()

            def load(row):
                try:
                    return load_image(opener(row[0]), size), row[1]
                except (OSError, ValueError, KeyError) as e:
                    raise CompTError(f"data.paths: cannot read image {row[0]}: {e}") from None
        elif data.corpus == "webdataset":  # the train split streams; only eval pairs are prepared
            from .webdataset_shards import eval_split
            splits, k, extra["stream"] = eval_split(data)
            n, n_val = len(splits["val"]) + data.train_num_samples, len(splits["val"])

            def load(row):
                return load_image(io.BytesIO(row[0]), size), row[1]
        else:
            raise CompTError(f"data.corpus: open_clip trains on 'shapes', 'files' or 'webdataset', got {data.corpus!r}")
        if n < 8 or n - n_val < 2:
            raise CompTError(f"data: only {n} image-caption pairs; need at least 8")
        counts = {}
        for split, items in splits.items():
            _write_split(tmp, split, items, len(items), size, tokenizer, context_length, k, load)
            counts[split] = len(items)
        if data.corpus == "files":
            opener.close()
        shutil.rmtree(tmp / "hf-cache", ignore_errors=True)
        return {"kind": "image_text", "samples": counts, "image_size": size, "context_length": context_length,
                "tokenizer": "open_clip SimpleTokenizer", "vocab_size": tokenizer.vocab_size,
                "mean": MEAN, "std": STD, "captions": k, **extra}

    return build_once(Path(out), key, build, files_fingerprint(data.paths if data.corpus == "files" else []))


class ImageText:
    """Pairs of a prepared split: `.batch(indices, step)` -> (images [B,3,S,S] float normalized, tokens
    [B,L] (captions=1) or [B,M,L] (M = captions)). With `step`, each image's M captions are drawn from
    its K without replacement (with repeats only when it has fewer than M), seeded by (step, index);
    without (eval, probes, alpha calibration), the first M, the same every time."""

    def __init__(self, data_dir: Path, split: str, captions: int = 1):
        d = Path(data_dir)
        meta = json.loads((d / "meta.json").read_text())
        n, s, ctx, k = meta["samples"][split], meta["image_size"], meta["context_length"], meta.get("captions", 1)
        self.images = np.memmap(d / f"{split}_images.u8", dtype=np.uint8, mode="r", shape=(n, 3, s, s))
        self.tokens: np.memmap = np.memmap(d / f"{split}_tokens.i32", dtype=np.int32, mode="r", shape=(n, k, ctx))
        nc = d / f"{split}_ncaps.i32"
        self.ncaps = np.fromfile(nc, dtype=np.int32) if nc.exists() else np.ones(n, dtype=np.int32)
        self.captions = captions
        self.mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(meta["std"]).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.tokens)

    def slots(self, i: int, step: int | None) -> list[int]:
        m, have = self.captions, int(self.ncaps[i])
        if step is None:
            return [j % have for j in range(m)]
        perm = np.random.default_rng((CAPTION_SEED, step, i)).permutation(have)
        return [int(perm[j % have]) for j in range(m)]

    def pixels(self, idx) -> torch.Tensor:
        images = torch.from_numpy(np.ascontiguousarray(self.images[idx])).float().div_(255)
        return (images - self.mean) / self.std

    def batch(self, indices, step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(list(indices), dtype=np.int64)
        rows = [self.tokens[i, self.slots(int(i), step)] for i in idx]
        tokens = torch.from_numpy(np.stack(rows)).long()
        return self.pixels(idx), (tokens[:, 0] if self.captions == 1 else tokens)
