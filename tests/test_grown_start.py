"""Why the chain pays off: a student grown (width insert + depth duplicate) from a briefly trained
predecessor starts with a far lower loss on held-out real text than a fresh init of the same config.
Data: the stdlib corpus through the project's own preparation (tiny_data)."""
from __future__ import annotations

import json

import pytest
import torch

from compt_scale.data.packed import PackedTokens
from compt_scale.families import hf_decoder
from compt_scale.grow import grow_state


def _val_loss(model, val) -> float:
    with torch.no_grad():
        return sum(hf_decoder.losses(model, val.batch(list(range(i, i + 8))))[0].item()
                   for i in range(0, 32, 8)) / 4


@pytest.mark.slow
def test_grown_student_starts_far_below_fresh_init(tiny_data):
    vocab = json.loads((tiny_data / "meta.json").read_text())["vocab_size"]
    train, val = PackedTokens(tiny_data, "train", 32), PackedTokens(tiny_data, "val", 32)
    src_cfg = hf_decoder.load_config("llama-xs", vocab_size=vocab)
    tgt_cfg = hf_decoder.load_config("llama-s", vocab_size=vocab)
    src = hf_decoder.build(src_cfg, seed=0)
    opt = torch.optim.AdamW(src.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, len(train), (8,), generator=g).tolist()
        loss, _ = hf_decoder.losses(src, train.batch(idx))
        opt.zero_grad()
        loss.backward()
        opt.step()
    src.eval()
    fresh = hf_decoder.build(tgt_cfg, seed=1).eval()
    grown = hf_decoder.build(tgt_cfg, seed=1).eval()
    state, _ = grow_state(src.state_dict(), src_cfg, tgt_cfg, grown.state_dict(), "insert", "duplicate")
    grown.load_state_dict(state)
    fresh_loss, grown_loss, src_loss = _val_loss(fresh, val), _val_loss(grown, val), _val_loss(src, val)
    assert fresh_loss > 0.9 * torch.log(torch.tensor(float(vocab))).item()   # a fresh init is near uniform
    assert grown_loss < fresh_loss - 1.0, (src_loss, grown_loss, fresh_loss)
    print(f"val loss: trained source {src_loss:.3f}, grown {grown_loss:.3f}, fresh {fresh_loss:.3f}")
