"""Image-caption data for the open_clip family: rendered scenes say what they show, preparation is
deterministic, CSV files go through `datasets` and match open_clip's own eval transform."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from compt_scale.chain.resolve import resolve
from compt_scale.config import ImageTextDataSpec
from compt_scale.config import parse_chain as parse_only
from compt_scale.data.image_text import COLORS, ImageText, cell_of_phrase, prepare_image_text
from compt_scale.errors import CompTError


def parse_chain(raw):
    return resolve(parse_only(raw))


OBJECT = re.compile(r"a (small|large) (\w+) (circle|square|triangle|star) "
                    r"((?:at|on|in) the (?:top|bottom|left|right|center)(?: left| right)?)")


def decode(tokens) -> str:
    from open_clip.tokenizer import SimpleTokenizer
    tok = SimpleTokenizer()
    ids = [int(t) for t in tokens if int(t) not in (0, tok.sot_token_id, tok.eot_token_id)]
    return tok.decode(ids).strip()


def nearest_color(rgb) -> str:
    return min(COLORS, key=lambda c: sum((int(a) - b) ** 2 for a, b in zip(rgb, COLORS[c], strict=True)))


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    spec = ImageTextDataSpec(corpus="shapes", num_samples=96, image_size=64)
    return prepare_image_text(spec, 32, tmp_path_factory.mktemp("shapes") / "data")


@pytest.mark.slow
def test_captions_describe_the_pixels(shapes_dir):
    meta = json.loads((shapes_dir / "meta.json").read_text())
    assert meta["samples"] == {"train": 72, "val": 24} and meta["context_length"] == 32
    n = meta["samples"]["train"]
    images = np.memmap(shapes_dir / "train_images.u8", dtype=np.uint8, mode="r", shape=(n, 3, 64, 64))
    tokens = np.memmap(shapes_dir / "train_tokens.i32", dtype=np.int32, mode="r", shape=(n, 32))
    captions = (shapes_dir / "train_captions.txt").read_text().splitlines()
    seen = 0
    for i in range(n):
        text = decode(tokens[i])
        assert text.replace(" ,", ",") == captions[i]
        objects = OBJECT.findall(text)
        assert 1 <= len(objects) <= 3 and len(objects) == text.count(" a ") + 1
        for _size, color, _shape, where in objects:
            row, col = cell_of_phrase(where)
            # The caption's grid cell centre is a pixel of the shape it names, in the named colour.
            y, x = int((row + 0.5) * 64 / 3), int((col + 0.5) * 64 / 3)
            assert nearest_color(images[i, :, y, x]) == color, (i, text)
            seen += 1
        # Cells no caption names are background: dark gray, not a palette colour.
        named = {cell_of_phrase(o[3]) for o in objects}
        for r in range(3):
            for c in range(3):
                if (r, c) not in named:
                    px = images[i, :, int((r + 0.5) * 64 / 3), int((c + 0.5) * 64 / 3)]
                    assert px.max() <= 70 and px.max() == px.min()
    assert seen > 100


def test_preparation_is_deterministic(shapes_dir, tmp_path):
    again = prepare_image_text(ImageTextDataSpec(corpus="shapes", num_samples=96, image_size=64), 32, tmp_path / "a")
    for f in ("train_images.u8", "train_tokens.i32", "val_images.u8", "val_tokens.i32", "val_captions.txt"):
        assert (again / f).read_bytes() == (shapes_dir / f).read_bytes(), f
    # A scene depends on its index only: a bigger dataset starts with the same pairs.
    bigger = prepare_image_text(ImageTextDataSpec(corpus="shapes", num_samples=200, image_size=64), 32, tmp_path / "b")
    assert (bigger / "train_captions.txt").read_text().splitlines()[:72] == \
        (shapes_dir / "train_captions.txt").read_text().splitlines()
    # The same dir with another spec is refused, not silently reused.
    with pytest.raises(CompTError, match="different data spec"):
        prepare_image_text(ImageTextDataSpec(corpus="shapes", num_samples=97, image_size=64), 32, tmp_path / "a")


def test_batches_are_normalized_like_open_clip(shapes_dir):
    import open_clip
    images, tokens = ImageText(shapes_dir, "val").batch([3, 0])
    assert images.shape == (2, 3, 64, 64) and tokens.shape == (2, 32) and tokens.dtype == torch.long
    raw = np.memmap(shapes_dir / "val_images.u8", dtype=np.uint8, mode="r", shape=(24, 3, 64, 64))
    pil = Image.fromarray(np.ascontiguousarray(raw[3].transpose(1, 2, 0)))
    expected = open_clip.image_transform(64, is_train=False)(pil)
    torch.testing.assert_close(images[0], expected, atol=1e-5, rtol=1e-5)


def test_csv_files_through_datasets(tmp_path):
    import open_clip
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(12):
        w, h = (80, 50) if i % 2 else (45, 90)  # both orientations: shortest-side resize + centre crop
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png\ta picture number {i}")
    csv = tmp_path / "pairs.csv"  # tab-separated, as open_clip's CsvDataset expects by default
    csv.write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    spec = ImageTextDataSpec(corpus="files", paths=[str(csv)], image_field="filepath", text_field="title", image_size=32)
    d = prepare_image_text(spec, 16, tmp_path / "data")
    meta = json.loads((d / "meta.json").read_text())
    assert meta["samples"]["train"] + meta["samples"]["val"] == 12
    val = ImageText(d, "val")
    caption = (d / "val_captions.txt").read_text().splitlines()[0]
    i = int(caption.split()[-1])
    images, tokens = val.batch([0])
    expected = open_clip.image_transform(32, is_train=False)(Image.open(tmp_path / "img" / f"{i}.png"))
    torch.testing.assert_close(images[0], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens[0], open_clip.get_tokenizer("", context_length=16)([caption])[0])

    # open_clip's own CSV (filepath/title, tab-separated) under the default text field works as is.
    default = ImageTextDataSpec(corpus="files", paths=[str(csv)], image_size=32)
    d2 = prepare_image_text(default, 16, tmp_path / "data2")
    assert (d2 / "val_captions.txt").read_text() == (d / "val_captions.txt").read_text()
    other = ImageTextDataSpec(corpus="files", paths=[str(csv)], text_field="caption")
    with pytest.raises(CompTError, match=r"data.text_field: column 'caption' not in .*columns: filepath, title"):
        prepare_image_text(other, 16, tmp_path / "other")
    bad = ImageTextDataSpec(corpus="files", paths=[str(csv)], image_field="image", text_field="title")
    with pytest.raises(CompTError, match=r"data.image_field: column 'image' not in"):
        prepare_image_text(bad, 16, tmp_path / "bad")


def _spec(**over):
    raw = {"name": "c", "family": "open_clip", "data": {"corpus": "shapes", "num_samples": 64},
           "stages": [{"name": "a", "model": "clip-xs", "tokens": 64}, {"name": "b", "model": "clip-s", "tokens": 64}]}
    raw.update(over)
    return raw


@pytest.mark.parametrize("over, message", [
    ({"data": {"corpus": "stdlib"}}, "data.corpus: must be 'shapes' or 'files' or 'webdataset', got 'stdlib'"),
    ({"data": {"corpus": "shapes", "image_size": 32}}, "stages[0].model: vision_cfg.image_size 64 differs"),
    ({"stages": [{"name": "a", "model": "clip-s", "tokens": 8}, {"name": "b", "model": "clip-xs", "tokens": 8}]},
     "stages[1].model: 'clip-xs' is not larger than its predecessor 'clip-s'"),
    ({"stages": [{"name": "a", "model": "clip-xl", "tokens": 8}]}, "stages[0].model: model 'clip-xl': no such preset"),
])
def test_bad_clip_specs(over, message):
    with pytest.raises(CompTError) as e:
        parse_chain(_spec(**over))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_presets_grow_and_step_2x_to_4x():
    from compt_scale.families import clip_family as fam
    from compt_scale.grow import check_growable
    cfgs = [fam.load_config(n) for n in ("clip-xs", "clip-s", "clip-m")]
    params = [fam.param_count(c) for c in cfgs]
    for a, b, pa, pb in zip(cfgs, cfgs[1:], params, params[1:], strict=False):
        check_growable(a, b, "insert", "duplicate")
        assert 2 <= pb / pa <= 4
    spec = parse_chain(_spec())
    assert fam.tokens_per_sample(spec) == 1 and fam.feature_dims(cfgs[1]) == [64, 64]
    macs = fam.stage_macs(cfgs[1], cfgs[0], spec, 16)
    assert macs["macs"] == macs["train_macs"] + macs["teacher_macs"] and macs["teacher_macs"] > 0
