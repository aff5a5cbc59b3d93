"""LaCLIP (paper eq. 2-3): the loss against an independent float64 evaluation, 2 gloo ranks against one
rank on the concatenated batch, and multi-caption data (shapes paraphrases, CSV columns/separator,
webdataset tar shards, per-step caption draws)."""
from __future__ import annotations

import io
import json
import math
import re
import socket
import tarfile

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from compt_scale.config import ImageTextDataSpec
from compt_scale.data.image_text import ImageText, prepare_image_text
from compt_scale.families import clip_family
from compt_scale.families.clip_loss import laclip_loss


def eq23_float64(v, t, scale):
    """Eq. 2 and its dual, term by term with Python loops, averaged over N x M (see clip_loss.py)."""
    def unit(x):
        norm = math.sqrt(sum(c * c for c in x))
        return [c / norm for c in x]
    v = [unit(x) for x in v.double().tolist()]
    t = [[unit(x) for x in row] for row in t.double().tolist()]
    n, m = len(t), len(t[0])

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))
    t2v = v2t = 0.0
    for i in range(n):
        for j in range(m):
            t2v -= math.log(math.exp(scale * cos(t[i][j], v[i])) /
                            sum(math.exp(scale * cos(t[i][j], v[k])) for k in range(n)))
            v2t -= math.log(math.exp(scale * cos(v[i], t[i][j])) /
                            sum(math.exp(scale * cos(v[i], t[k][j])) for k in range(n)))
    return (t2v + v2t) / 2 / (n * m)


def test_loss_equals_eq23_in_float64():
    g = torch.Generator().manual_seed(0)
    v, t = torch.randn(6, 8, generator=g), torch.randn(6, 3, 8, generator=g)
    got = laclip_loss(F.normalize(v, dim=-1), F.normalize(t, dim=-1), torch.tensor(4.0))
    assert abs(got.item() - eq23_float64(v, t, 4.0)) < 1e-5


def test_one_caption_is_open_clip_clip_loss():
    import open_clip
    g = torch.Generator().manual_seed(1)
    v, t = F.normalize(torch.randn(5, 8, generator=g), dim=-1), F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    ref = open_clip.ClipLoss()(v, t, torch.tensor(10.0))
    torch.testing.assert_close(laclip_loss(v, t, torch.tensor(10.0)), ref)


def _worker(rank, port, v, t, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    b = len(v) // 2
    vl = v[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    tl = t[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    loss = laclip_loss(F.normalize(vl, dim=-1), F.normalize(tl, dim=-1), torch.tensor(5.0))
    loss.backward()
    # Through a real open_clip model (one caption per image, the default): rank-averaged parameter gradients, as DeepSpeed
    # averages them, must equal the single-process gradients on the whole batch.
    model, (images, tokens) = _clip_batch()
    task, _ = clip_family.losses(model, (images[rank * 4:(rank + 1) * 4], tokens[rank * 4:(rank + 1) * 4]))
    task.backward()
    grads = {}
    for k, p in model.named_parameters():
        dist.all_reduce(p.grad)
        grads[k] = p.grad / 2
    torch.save({"loss": loss.detach(), "gv": vl.grad, "gt": tl.grad, "model_grads": grads}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def _clip_batch():
    model = clip_family.build(clip_family.load_config("clip-xs"), seed=0)
    g = torch.Generator().manual_seed(3)
    return model, (torch.randn(8, 3, 64, 64, generator=g), torch.randint(1, 5000, (8, 32), generator=g))


@pytest.mark.dist
def test_two_gloo_ranks_equal_one_rank_on_the_concatenated_batch(tmp_path):
    g = torch.Generator().manual_seed(2)
    v, t = torch.randn(8, 6, generator=g), torch.randn(8, 4, 6, generator=g)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(port, v, t, str(tmp_path)), nprocs=2)
    vf, tf = v.clone().requires_grad_(True), t.clone().requires_grad_(True)
    ref = laclip_loss(F.normalize(vf, dim=-1), F.normalize(tf, dim=-1), torch.tensor(5.0))
    ref.backward()
    assert abs(ref.item() - eq23_float64(v, t, 5.0)) < 1e-5
    for rank in range(2):
        r = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(r["loss"], ref.detach())
        # Each rank's gradient of the (identical) global loss w.r.t. its own samples: the all-gather
        # backward sums the contributions of both ranks' copies, i.e. 2x the single-rank gradient.
        torch.testing.assert_close(r["gv"], 2 * vf.grad[rank * 4:(rank + 1) * 4], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["gt"], 2 * tf.grad[rank * 4:(rank + 1) * 4], atol=1e-6, rtol=1e-5)
    model, batch = _clip_batch()
    clip_family.losses(model, batch)[0].backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")["model_grads"]
        for k, p in model.named_parameters():
            torch.testing.assert_close(got[k], p.grad, atol=1e-5, rtol=1e-4, msg=k)


OBJ = re.compile(r"(small|large)")


def test_shapes_paraphrases_and_per_step_draws(tmp_path):
    from compt_scale.data.image_text import scene
    d = prepare_image_text(ImageTextDataSpec(corpus="shapes", num_samples=40, image_size=32, caption_variants=5),
                           16, tmp_path / "d")
    caps = [json.loads(x) for x in (d / "train_captions.jsonl").read_text().splitlines()]
    assert all(len(c) == 5 and len(set(c)) == 5 for c in caps)
    for i, cs in enumerate(caps):
        for c in cs:  # every paraphrase names every object's size, colour, shape and nothing else
            objs = scene(i)
            assert len(OBJ.findall(c)) == len(objs), c
            for o in objs:
                assert f"{o['color']} {o['shape']}" in c or f"{o['shape']} colored {o['color']}" in c \
                    or f"{o['color']} {o['size']} {o['shape']}" in c, (c, o)
    data = ImageText(d, "train", captions=3)
    _, a = data.batch([0, 1, 2], step=7)
    _, b = data.batch([0, 1, 2], step=7)
    _, c = data.batch([0, 1, 2], step=8)
    assert a.shape == (3, 3, 16) and torch.equal(a, b) and not torch.equal(a, c)
    for row in a:  # three distinct captions of the image
        assert len({tuple(x.tolist()) for x in row}) == 3


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), color).save(buf, format="PNG")
    return buf.getvalue()


def test_multi_caption_csv_and_webdataset_tar(tmp_path):
    (tmp_path / "img").mkdir()
    lines = ["filepath,title,title_1,title_2"]
    for i in range(10):
        Image.new("RGB", (20, 20), (i * 20, 0, 0)).save(tmp_path / "img" / f"{i}.png")
        third = "" if i % 2 else f"third {i}"
        lines.append(f"img/{i}.png,first {i},second {i}|extra {i},{third}")
    (tmp_path / "a.csv").write_text("\n".join(lines) + "\n")
    spec = ImageTextDataSpec(corpus="files", paths=[str(tmp_path / "a.csv")], text_field="title", image_size=16,
                    caption_sep="|")
    d = prepare_image_text(spec, 16, tmp_path / "csv")
    got = [json.loads(x) for s in ("train", "val") for x in (d / f"{s}_captions.jsonl").read_text().splitlines()]
    expected = [[f"first {i}", f"second {i}", f"extra {i}"] + ([] if i % 2 else [f"third {i}"]) for i in range(10)]
    assert sorted(got) == sorted(expected)
    assert json.loads((d / "meta.json").read_text())["captions"] == 4

    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for i in range(9):
            members = {f"s{i:03d}.png": _png((0, i * 25, 0)),
                       f"s{i:03d}.json": json.dumps({"captions": [f"cap {i} a", f"cap {i} b"]}).encode()}
            if i == 0:
                members[f"s{i:03d}.txt"] = b"cap 0 c"
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    spec = ImageTextDataSpec(corpus="files", paths=[str(tmp_path / "shard-0.tar")], image_size=16)
    d = prepare_image_text(spec, 16, tmp_path / "tar")
    rows = {}
    for s in ("train", "val"):
        imgs = ImageText(d, s).images
        for k, x in enumerate((d / f"{s}_captions.jsonl").read_text().splitlines()):
            caps = json.loads(x)
            rows[caps[0]] = (caps, imgs[k])
    assert sorted(rows) == [f"cap {i} a" for i in range(9)]
    for i in range(9):
        caps, img = rows[f"cap {i} a"]
        assert caps == [f"cap {i} a", f"cap {i} b"] + (["cap 0 c"] if i == 0 else [])
        assert int(img[1].mean()) == i * 25 and int(img[0].max()) == 0  # the sample's own image
