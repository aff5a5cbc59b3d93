"""Chains of tiny open_clip CLIP models end to end through the CLI: 1 rank (3 stages, ZeRO-1) and 2 gloo
ranks with ZeRO-3 (global-batch contrastive loss). Exports load with plain open_clip, offline."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from compt_scale.data.image_text import ImageText
from conftest import read_metrics, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.dist]

# One thread per rank: on a shared 2-core machine OpenMP's spinning threads make small ops ~20x
# slower under contention.
ENV = {"OMP_NUM_THREADS": "1"}
TRAIN = {"micro_batch_size": 16, "eval_every": 4, "eval_batches": 2, "save_every": 4, "log_every": 1,
         "warmup_steps": 2, "lr": 3.0e-3}


def write_clip_spec(path: Path, stages, **top) -> Path:
    spec = {"name": path.stem, "family": "open_clip", "seed": 0,
            "data": {"corpus": "shapes", "num_samples": 480, "image_size": 64},
            "train": dict(TRAIN), "stages": stages}
    for k, v in top.items():
        spec[k] = {**spec[k], **v} if isinstance(v, dict) and isinstance(spec.get(k), dict) else v
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def check_export(stage_dir: Path, data_dir: Path, monkeypatch):
    """The export loads with open_clip alone (no network) and gives the trained engine's embeddings."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    where = f"local-dir:{stage_dir / 'model'}"
    model, _, preprocess = open_clip.create_model_and_transforms(where)
    model.eval()
    images, tokens = ImageText(data_dir, "val").batch([0, 1])
    with torch.no_grad():
        img, txt, _ = model(images, tokens)
    torch.testing.assert_close(torch.cat([img, txt], -1), torch.load(stage_dir / "probe_logits.pt"),
                               atol=1e-5, rtol=1e-5)
    # The export's own preprocess turns the stored picture into exactly the training input.
    raw = ImageText(data_dir, "val").images[0].transpose(1, 2, 0)
    torch.testing.assert_close(preprocess(Image.fromarray(np.ascontiguousarray(raw))), images[0],
                               atol=1e-5, rtol=1e-5)
    tok = open_clip.get_tokenizer(where)
    assert isinstance(tok, SimpleTokenizer)
    caption = (data_dir / "val_captions.txt").read_text().splitlines()[0]
    assert torch.equal(tok([caption]), tokens[:1])
    return model


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clip1")
    spec = write_clip_spec(tmp / "c1.yaml", [
        {"name": "xs", "model": "clip-xs", "tokens": 12 * 16},
        {"name": "s", "model": "clip-s", "tokens": 8 * 16},
        {"name": "m", "model": "clip-m", "tokens": 6 * 16},
    ])
    proc = run_cli("chain", spec, "--out", tmp / "out", env=ENV)
    return tmp / "out", proc


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clip2")
    # The same global batch as the one-rank chain (2 ranks x 8 = 16) and the same xs budget.
    spec = write_clip_spec(tmp / "c2.yaml", [
        {"name": "xs", "model": "clip-xs", "tokens": 12 * 16},
        {"name": "s", "model": "clip-s", "tokens": 6 * 16},
    ], train={"zero_stage": 3, "micro_batch_size": 8})
    run_cli("chain", spec, "--out", tmp / "out", "--nproc", 2, env=ENV)
    return tmp / "out"


@pytest.mark.heavy   # make test keeps the users' configuration: the ZeRO-3 2-rank grown chain below
def test_three_stage_clip_chain_one_rank(one_rank, monkeypatch):
    out, proc = one_rank
    manifest = json.loads((out / "manifest.json").read_text())["stages"]
    names = ("xs", "s", "m")
    assert [manifest[n]["status"] for n in names] == ["done"] * 3
    assert [manifest[n]["steps"] for n in names] == [12, 8, 6]
    assert [manifest[n]["tokens"] for n in names] == [192, 128, 96]  # budgets count image-caption pairs
    params = [manifest[n]["params"] for n in names]
    assert params == sorted(params) and len(set(params)) == 3
    for n in names:
        model = check_export(out / n, out / "data", monkeypatch)
    assert model.visual.transformer.layers == 8 and model.text_projection.shape == (64, 128)
    assert manifest["xs"]["teacher_macs"] == 0
    for name, teacher in (("s", "xs"), ("m", "s")):
        assert manifest[name]["teacher"] == teacher and manifest[name]["teacher_macs"] > 0
        assert manifest[name]["alpha"] > 0 and (out / name / "growth.json").is_file()
        train_lines = [r for r in read_metrics(out / name) if "loss" in r]
        assert train_lines and all(r["ifd_loss"] > 0 for r in train_lines)
    # The contrastive loss learns something even in a dozen steps: below chance, log(16).
    assert read_metrics(out / "xs")[-1]["final"] and manifest["xs"]["final_val_loss"] < 2.77
    row = next(l for l in proc.stdout.splitlines() if l.split()[:1] == ["m"])
    assert float(row.split()[6]) == pytest.approx(manifest["m"]["final_val_loss"], abs=1e-4)
    # Resuming a finished stage loads its DeepSpeed checkpoint (open_clip's scalar logit_scale
    # included) into a fresh grown engine: the same weights, the same embeddings.
    before = torch.load(out / "s" / "probe_logits.pt")
    run_cli("stage", out / "chain.yaml", "--stage", "s", "--out", out, "--resume", env=ENV)
    torch.testing.assert_close(torch.load(out / "s" / "probe_logits.pt"), before, atol=0, rtol=0)


def test_clip_chain_zero3_two_ranks(two_ranks, monkeypatch):
    out = two_ranks
    manifest = json.loads((out / "manifest.json").read_text())["stages"]
    for n in ("xs", "s"):
        rec = manifest[n]
        assert rec["status"] == "done" and rec["zero_stage"] == 3 and rec["world_size"] == 2
        check_export(out / n, out / "data", monkeypatch)
    assert manifest["s"]["steps"] == 6 and manifest["s"]["tokens"] == 96
    assert all(r["ifd_loss"] > 0 for r in read_metrics(out / "s") if "loss" in r)
    assert os.path.getsize(out / "s" / "model" / "open_clip_model.safetensors") > 4 * 2_000_000


@pytest.mark.heavy
def test_two_ranks_train_on_the_global_batch(one_rank, two_ranks):
    """Features are gathered with grad across ranks, so 2 ranks x 8 train exactly like 1 rank x 16 on
    the same samples: the same first loss (near log 16, not log 8) and the same trajectory after."""
    one = [r["task_loss"] for r in read_metrics(one_rank[0] / "xs") if "loss" in r]
    two = [r["task_loss"] for r in read_metrics(two_ranks / "xs") if "loss" in r]
    assert abs(two[0] - math.log(16)) < 0.3
    assert two == pytest.approx(one, abs=2e-3)
