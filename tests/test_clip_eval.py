"""Zero-shot accuracy and retrieval recall against hand-built embeddings with known answers, and the
family's evaluate hook on a real open_clip model over prepared shapes data."""
from __future__ import annotations

import json

import pytest
import torch

from compt_scale.config import ImageTextDataSpec
from compt_scale.families.clip_eval import retrieval_recall, zero_shot_accuracy


def test_zero_shot_one_hot_is_perfect_and_shuffled_is_chance():
    c, per = 10, 50
    labels = torch.arange(c).repeat_interleave(per)
    images = torch.nn.functional.one_hot(labels, c).float() + 0.01 * torch.randn(c * per, c)
    prompts = torch.eye(c)[:, None, :].repeat(1, 3, 1)                 # 3 prompts per class, all on e_c
    prompts[:, 1] += 0.2 * torch.randn(c, c)                            # noisy prompts still average right
    assert zero_shot_accuracy(images, prompts, labels) == 1.0
    g = torch.Generator().manual_seed(0)
    shuffled = labels[torch.randperm(len(labels), generator=g)]
    acc = zero_shot_accuracy(images, prompts, shuffled)
    assert abs(acc - 1 / c) < 0.06                                      # 500 draws: chance 0.1 +- 0.013
    # A hand-counted case: 3 images, 2 classes, the third image is nearer the wrong class.
    img = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.2, 0.8]])
    assert zero_shot_accuracy(img, torch.eye(2)[:, None], torch.tensor([0, 0, 0])) == pytest.approx(2 / 3)


def test_retrieval_recall_hand_built():
    n, k = 40, 2
    img = torch.eye(n)
    owner = torch.arange(n).repeat_interleave(k)                       # 2 captions per image
    txt = img[owner] + 0.01 * torch.randn(n * k, n)
    r = retrieval_recall(img, txt, owner)
    assert r == {"i2t_r1": 1.0, "t2i_r1": 1.0, "i2t_r5": 1.0, "t2i_r5": 1.0}
    g = torch.Generator().manual_seed(1)
    r = retrieval_recall(img, txt, owner[torch.randperm(n * k, generator=g)])
    assert r["t2i_r1"] < 0.1 and r["t2i_r5"] < 0.3                     # chance: 1/40, 5/40
    # Hand-counted: image 0's best caption is image 1's; caption 1 (of image 1) ranks image 0 first.
    img = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.5, 0.0], [0.9, 0.3, 0.0], [0.0, 0.0, 1.0]])
    r = retrieval_recall(img, txt, torch.tensor([0, 1, 2]), ks=(1, 2))
    # i2t@1: img0 -> caption1 (wrong), img1 -> caption0 (wrong), img2 -> caption2: 1/3
    # t2i@1: caption0 -> img0 (right), caption1 -> img0 (wrong), caption2 -> img2: 2/3
    assert r["i2t_r1"] == pytest.approx(1 / 3) and r["t2i_r1"] == pytest.approx(2 / 3)
    assert r["i2t_r2"] == 1.0 and r["t2i_r2"] == 1.0


def test_family_evaluate_on_a_real_model(tmp_path):
    from compt_scale.data.image_text import prepare_image_text
    from compt_scale.families import get_family
    fam = get_family("open_clip")
    d = prepare_image_text(ImageTextDataSpec(corpus="shapes", num_samples=80, image_size=64, caption_variants=2),
                           32, tmp_path / "d")
    meta = json.loads((d / "meta.json").read_text())
    assert len(meta["zeroshot"]["classes"]) == 28
    model = fam.build(fam.load_config("clip-xs"), seed=0)
    out = fam.evaluate(model, None, d, 0.0)
    assert set(out) == {"i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "zeroshot_top1"}
    assert all(0.0 <= v <= 1.0 for v in out.values())
    assert out["i2t_r1"] <= out["i2t_r5"] and out["t2i_r1"] <= out["t2i_r5"]
    assert model.training  # restored
