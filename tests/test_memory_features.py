"""Memory features of decoder training: chunked cross-entropy, activation checkpointing, packed
documents (positions reset at EOS, attention within documents), multi-process tokenization."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from compt_scale.config import TextDataSpec
from compt_scale.data.packed import PackedTokens, doc_positions, prepare_data
from compt_scale.families import hf_decoder
from conftest import run_cli, write_spec

EOS = 2


def tiny_llama(**kw):
    cfg = AutoConfig.for_model("llama", **{"vocab_size": 97, "hidden_size": 32, "num_attention_heads": 4,
                                           "num_key_value_heads": 2, "intermediate_size": 64,
                                           "num_hidden_layers": 2, **kw})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()


def saved_numels(fn):
    """Run fn() with a saved-tensors hook; the numel of every tensor autograd stores for backward."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


@pytest.mark.parametrize("chunk", [10, 74, 1000])   # 74 = all tokens; 10 does not divide 74
def test_chunked_cross_entropy_equals_full_logits(chunk):
    torch.manual_seed(1)
    hidden = torch.randn(2, 37, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (2, 37))
    full = F.cross_entropy(head(hidden).float().reshape(-1, 50), labels.reshape(-1))
    g_full = torch.autograd.grad(full, [hidden, head.weight])
    got, sizes = saved_numels(lambda: hf_decoder.chunked_cross_entropy(hidden, head, labels, chunk))
    g_got = torch.autograd.grad(got, [hidden, head.weight])
    torch.testing.assert_close(got, full, atol=1e-6, rtol=1e-6)
    for a, b in zip(g_got, g_full, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # Memory: the full path stores the [tokens, vocab] logits for backward; the chunked one stores
    # no tensor as large as one chunk's logits (only hidden slices and labels).
    _, full_sizes = saved_numels(lambda: F.cross_entropy(head(hidden).reshape(-1, 50), labels.reshape(-1)))
    assert max(full_sizes) >= 74 * 50
    assert max(sizes) < min(chunk, 74) * 50 and max(sizes) <= 74 * 16


def test_losses_equal_hf_logits_and_grads():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    x, y = torch.randint(3, 97, (2, 24)), torch.randint(0, 97, (2, 24))
    loss, (h,) = hf_decoder.losses(model, (x, y))
    out = ref(input_ids=x, output_hidden_states=True)
    want = F.cross_entropy(out.logits.float().reshape(-1, 97), y.reshape(-1))
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h, out.hidden_states[-1], atol=1e-6, rtol=1e-6)
    loss.backward()
    want.backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_activation_checkpointing_same_loss_and_grads():
    off = tiny_llama(num_hidden_layers=3).train()
    on = copy.deepcopy(off)
    hf_decoder.enable_activation_checkpointing(on)
    x, y = torch.randint(3, 97, (2, 32)), torch.randint(0, 97, (2, 32))
    x[0, 9] = EOS
    batch = (x, y, torch.from_numpy(doc_positions(x.numpy(), EOS)))
    (l_off, _), s_off = saved_numels(lambda: hf_decoder.losses(off, batch))
    (l_on, _), s_on = saved_numels(lambda: hf_decoder.losses(on, batch))
    assert sum(s_on) < sum(s_off) / 2      # the layers' activations are really not kept
    torch.testing.assert_close(l_on, l_off, atol=1e-6, rtol=1e-6)
    l_on.backward()
    l_off.backward()
    for (n, p), q in zip(on.named_parameters(), off.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_packed_loss_is_sum_of_per_document_losses():
    model = tiny_llama().eval()
    x = torch.randint(3, 97, (2, 30))
    x[0, 5] = x[0, 17] = x[1, 20] = EOS
    y = torch.randint(0, 97, (2, 30))
    pos = torch.from_numpy(doc_positions(x.numpy(), EOS))
    assert pos[0].tolist() == [*range(6), *range(12), *range(12)]
    with torch.no_grad():
        loss, _ = hf_decoder.losses(model, (x, y, pos))
        total = 0.0
        for b, bounds in ((0, [0, 6, 18, 30]), (1, [0, 21, 30])):   # documents end at their EOS
            for s, e in zip(bounds[:-1], bounds[1:], strict=True):
                logits = model(input_ids=x[b:b + 1, s:e]).logits[0]   # the document alone, from position 0
                total += F.cross_entropy(logits.double(), y[b, s:e], reduction="sum").item()
        unmasked, _ = hf_decoder.losses(model, (x, y))
    assert loss.item() == pytest.approx(total / 60, abs=1e-6)
    assert abs(unmasked.item() - total / 60) > 1e-4   # without document masking it differs


def test_packed_batches_carry_positions(tiny_data):
    plain = PackedTokens(tiny_data, "train", 32)
    packed = PackedTokens(tiny_data, "train", 32, doc_positions=True)
    eos = json.loads((tiny_data / "meta.json").read_text())["eos_id"]
    # find samples with an EOS inside
    idx = [i for i in range(len(plain)) if (plain.batch([i])[0] == eos).any()][:3]
    assert idx
    x, y, pos = packed.batch(idx)
    assert torch.equal(x, plain.batch(idx)[0]) and torch.equal(y, plain.batch(idx)[1])
    for row, p in zip(x.tolist(), pos.tolist(), strict=True):
        expect, k = [], 0
        for t in row:                     # by hand: count up, restart after each EOS
            expect.append(k)
            k = 0 if t == eos else k + 1
        assert p == expect


def test_num_proc_gives_identical_tokens(tmp_path, tiny_data):
    docs = [f"def f_{i}(x):\n    return x * {i}  # doc {i} " + "word " * (i % 13) for i in range(600)]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    outs = []
    for n in (1, 2):
        spec = TextDataSpec(corpus="files", paths=[str(src)], tokenizer=str(tiny_data / "tokenizer"), seq_len=16,
                        val_fraction=0.1, num_proc=n)
        outs.append(prepare_data(spec, tmp_path / f"d{n}"))
    for split in ("train", "val"):
        a, b = (np.fromfile(o / f"{split}.bin", dtype=np.uint16) for o in outs)
        assert a.size > 1000 and np.array_equal(a, b)


@pytest.mark.slow
@pytest.mark.dist
def test_zero3_two_ranks_with_activation_checkpointing(tmp_path, tiny_data):
    tok = 3 * 2 * 2 * 32
    spec = write_spec(tmp_path / "ac.yaml", [
        {"name": "a", "model": "llama-xs", "tokens": tok},
        {"name": "b", "grow_to": {"width": "2x"}, "tokens": tok},
    ], data_dir=tiny_data, train={"zero_stage": 3, "micro_batch_size": 2, "activation_checkpointing": True,
                                  "eval_batches": 1})
    out = tmp_path / "out"
    run_cli("chain", spec, "--out", out, "--nproc", 2)
    manifest = json.loads((out / "manifest.json").read_text())["stages"]
    assert [manifest[n]["status"] for n in "ab"] == ["done", "done"]
    assert manifest["b"]["zero_stage"] == 3 and manifest["b"]["world_size"] == 2
    lines = [json.loads(l) for l in (out / "b" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) and r["ifd_loss"] > 0 for r in lines if "loss" in r)
    cfg = json.loads((out / "b" / "model" / "config.json").read_text())
    assert cfg["hidden_size"] == 128 and cfg["num_attention_heads"] == 4
