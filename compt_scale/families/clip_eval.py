"""CLIP evaluation the paper reports: zero-shot classification and image<->text retrieval.

Metric math works on L2-normalized embeddings (what CLIP.forward returns), so scores are cosines:
- zero_shot_accuracy: each class's prompts are embedded, averaged and renormalized (CLIP's prompt
  ensemble); an image is assigned the class with the highest cosine.
- retrieval_recall: image-to-text R@k counts an image as found when any of its captions is among the
  k captions most similar to it (COCO convention with several captions per image); text-to-image R@k
  counts a caption as found when its image is among the k images most similar to it.
`evaluate` runs a model over a prepared data dir: the val split for retrieval (every caption of every
image) and, when the data has one ("shapes"), the labelled zero-shot split.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

EVAL_BATCH = 64


def zero_shot_accuracy(image_emb: torch.Tensor, prompt_emb: torch.Tensor, labels: torch.Tensor) -> float:
    """image_emb [Z, D], prompt_emb [C, P, D] (P prompts per class), labels [Z] -> top-1 accuracy."""
    classes = F.normalize(F.normalize(prompt_emb.float(), dim=-1).mean(1), dim=-1)
    pred = (F.normalize(image_emb.float(), dim=-1) @ classes.T).argmax(1)
    return float((pred == labels).float().mean())


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: torch.Tensor,
                     ks=(1, 5)) -> dict:
    """image_emb [N, D], text_emb [T, D], text_image [T]: the image each caption describes."""
    sim = F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T   # [N, T]
    out = {}
    for k in ks:
        top_t = sim.topk(min(k, sim.shape[1]), dim=1).indices                     # [N, k] captions
        i2t = (text_image[top_t] == torch.arange(len(sim))[:, None]).any(1)
        top_i = sim.T.topk(min(k, sim.shape[0]), dim=1).indices                   # [T, k] images
        t2i = (top_i == text_image[:, None]).any(1)
        out[f"i2t_r{k}"] = float(i2t.float().mean())
        out[f"t2i_r{k}"] = float(t2i.float().mean())
    return out


def _encode(model, images, tokens, embed):
    """Image [B, D] and text [B*M, D] embeddings through the family's forward (ZeRO-3 safe)."""
    img, txt, _ = embed(model, (images, tokens))
    return img.float().cpu(), txt.flatten(0, 1).float().cpu()


@torch.no_grad()
def evaluate(model, data_dir: Path, embed, device) -> dict:
    """Zero-shot top-1 (if the data has a labelled split) and retrieval R@1/R@5 on the val split.
    Every rank runs the same forwards (ZeRO-3 gathers parameters collectively), so all agree."""
    from ..data.image_text import ImageText
    d = Path(data_dir)
    meta = json.loads((d / "meta.json").read_text())
    was_training = model.training
    model.eval()
    val = ImageText(d, "val")
    k = val.tokens.shape[1]
    imgs, txts, owner = [], [], []
    for lo in range(0, len(val), EVAL_BATCH):
        idx = np.arange(lo, min(lo + EVAL_BATCH, len(val)))
        tokens = torch.from_numpy(np.ascontiguousarray(val.tokens[idx])).long()
        i, t = _encode(model, val.pixels(idx).to(device), tokens.to(device), embed)
        keep = torch.from_numpy(np.arange(k)[None, :] < val.ncaps[idx][:, None]).flatten()
        imgs.append(i)
        txts.append(t[keep])
        owner.append(torch.from_numpy(np.repeat(idx, k))[keep])
    out = retrieval_recall(torch.cat(imgs), torch.cat(txts), torch.cat(owner))
    zs = meta.get("zeroshot")
    if zs:
        s, ctx, n_cls = meta["image_size"], meta["context_length"], len(zs["classes"])
        images = np.fromfile(d / "zeroshot_images.u8", dtype=np.uint8).reshape(-1, 3, s, s)
        labels = torch.from_numpy(np.fromfile(d / "zeroshot_labels.i32", dtype=np.int32)).long()
        prompts = torch.from_numpy(np.fromfile(d / "zeroshot_prompts.i32", dtype=np.int32)).long()
        prompts = prompts.view(n_cls, zs["prompts"], ctx)
        img_emb, cls_emb = [], []
        # Images and prompts go through the same forward in pairs of batches (CLIP.forward embeds
        # both); the two lists are padded by repetition to the same number of batches.
        n_img = -(-len(images) // EVAL_BATCH)
        per = max(1, EVAL_BATCH // zs["prompts"])
        n_txt = -(-n_cls // per)
        for b in range(max(n_img, n_txt)):
            ii: np.ndarray = np.arange(b * EVAL_BATCH, (b + 1) * EVAL_BATCH) % len(images)
            cc: np.ndarray = np.arange(b * per, (b + 1) * per) % n_cls
            x = (torch.from_numpy(images[ii]).float().div_(255) - val.mean) / val.std
            i, t = _encode(model, x.to(device), prompts[cc].to(device), embed)
            if b < n_img:
                img_emb.append(i[: len(images) - b * EVAL_BATCH])
            if b < n_txt:
                cls_emb.append(t.view(len(cc), zs["prompts"], -1)[: n_cls - b * per])
        out["zeroshot_top1"] = zero_shot_accuracy(torch.cat(img_emb), torch.cat(cls_emb), labels)
    model.train(was_training)
    return out
