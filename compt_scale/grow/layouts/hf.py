"""Axis-kind layout tables of the Hugging Face decoder architectures (see compt_scale/grow/axes.py
for the notation). A new architecture is a table here, never new growth code.

Factor names: hidden, ffn, heads (MHA), kv (kv heads) x qpg (q heads per kv head) for GQA q
projections, hd (head_dim), vocab, pos (learned positions), wep (OPT's word_embed_proj_dim).
Linear weights are [out, in]; GPT-2's Conv1D weights are [in, out], which the table simply says.
"""
from __future__ import annotations

from ...errors import CompTError
from ..layout import Layout


def _heads(c) -> tuple[int, int, int]:
    h = int(c.num_attention_heads)
    kv = int(getattr(c, "num_key_value_heads", None) or h)
    if h % kv:
        raise CompTError(f"num_key_value_heads {kv} does not divide num_attention_heads {h}")
    hd = getattr(c, "head_dim", None)
    if not hd:
        if c.hidden_size % h:
            raise CompTError(f"hidden_size {c.hidden_size} is not divisible by num_attention_heads {h}")
        hd = c.hidden_size // h
    return h, kv, int(hd)


# ---------------------------------------------------------------- Llama, Mistral, Qwen2

def _llama_sizes(c):
    h, kv, hd = _heads(c)
    return {"hidden": c.hidden_size, "ffn": c.intermediate_size, "kv": kv, "qpg": h // kv, "hd": hd,
            "vocab": c.vocab_size, "layers": c.num_hidden_layers}


_L = "model.layers.{layers}."
LLAMA = {
    "model.embed_tokens.weight": "o:vocab, o:hidden",
    "model.norm.weight": "o:hidden | norm",
    "lm_head.weight": "o:vocab, i:hidden",
    _L + "input_layernorm.weight": "o:hidden | norm",
    _L + "post_attention_layernorm.weight": "o:hidden | norm",
    # q heads are ordered kv-group-major (q head j uses kv head j // qpg): kv*qpg keeps groups whole.
    _L + "self_attn.q_proj.weight": "o:kv*qpg*hd, i:hidden",
    _L + "self_attn.k_proj.weight": "o:kv*hd, i:hidden",
    _L + "self_attn.v_proj.weight": "o:kv*hd, i:hidden",
    _L + "self_attn.o_proj.weight": "o:hidden, i:kv*qpg*hd | res",
    _L + "mlp.gate_proj.weight": "o:ffn, i:hidden",
    _L + "mlp.up_proj.weight": "o:ffn, i:hidden",
    _L + "mlp.down_proj.weight": "o:hidden, i:ffn | res",
}
# Qwen2: Llama plus q/k/v biases (Llama with attention_bias=True has the same keys, plus o_proj.bias).
QWEN2 = {**LLAMA,
         _L + "self_attn.q_proj.bias": "o:kv*qpg*hd",
         _L + "self_attn.k_proj.bias": "o:kv*hd",
         _L + "self_attn.v_proj.bias": "o:kv*hd",
         _L + "self_attn.o_proj.bias": "o:hidden | res",
         _L + "mlp.gate_proj.bias": "o:ffn",
         _L + "mlp.up_proj.bias": "o:ffn",
         _L + "mlp.down_proj.bias": "o:hidden | res"}
_LLAMA_TIED = {"lm_head.weight": "model.embed_tokens.weight"}


# ---------------------------------------------------------------- GPT-2 (Conv1D, packed c_attn)

def _gpt2_sizes(c):
    h, _, hd = _heads(c)
    return {"hidden": c.n_embd, "ffn": c.n_inner or 4 * c.n_embd, "heads": h, "hd": hd,
            "vocab": c.vocab_size, "pos": c.n_positions, "layers": c.n_layer}


_G = "transformer.h.{layers}."
GPT2 = {
    "transformer.wte.weight": "o:vocab, o:hidden",
    "transformer.wpe.weight": "o:pos, o:hidden",
    "transformer.ln_f.weight": "o:hidden | norm",
    "transformer.ln_f.bias": "o:hidden",
    "lm_head.weight": "o:vocab, i:hidden",
    _G + "ln_1.weight": "o:hidden | norm", _G + "ln_1.bias": "o:hidden",
    _G + "ln_2.weight": "o:hidden | norm", _G + "ln_2.bias": "o:hidden",
    _G + "attn.c_attn.weight": "i:hidden, o:3*heads*hd",     # Conv1D [in, out]; out = [q | k | v]
    _G + "attn.c_attn.bias": "o:3*heads*hd",
    _G + "attn.c_proj.weight": "i:heads*hd, o:hidden | res",
    _G + "attn.c_proj.bias": "o:hidden | res",
    _G + "mlp.c_fc.weight": "i:hidden, o:ffn",
    _G + "mlp.c_fc.bias": "o:ffn",
    _G + "mlp.c_proj.weight": "i:ffn, o:hidden | res",
    _G + "mlp.c_proj.bias": "o:hidden | res",
}


# ---------------------------------------------------------------- GPT-NeoX (per-head interleaved qkv)

def _neox_sizes(c):
    h, _, hd = _heads(c)
    return {"hidden": c.hidden_size, "ffn": c.intermediate_size, "heads": h, "hd": hd,
            "vocab": c.vocab_size, "layers": c.num_hidden_layers}


_N = "gpt_neox.layers.{layers}."
NEOX = {
    "gpt_neox.embed_in.weight": "o:vocab, o:hidden",
    "gpt_neox.final_layer_norm.weight": "o:hidden | norm",
    "gpt_neox.final_layer_norm.bias": "o:hidden",
    "lm_head.weight": "o:vocab, i:hidden",
    "embed_out.weight": "o:vocab, i:hidden",   # older transformers name of the output head
    _N + "input_layernorm.weight": "o:hidden | norm", _N + "input_layernorm.bias": "o:hidden",
    _N + "post_attention_layernorm.weight": "o:hidden | norm", _N + "post_attention_layernorm.bias": "o:hidden",
    # rows are [head, (q,k,v), head_dim]: the model views qkv as (heads, 3*hd) before splitting.
    # Partial rotary acts inside each head's hd, which no operator reorders, so it needs no entry.
    _N + "attention.query_key_value.weight": "o:heads*3*hd, i:hidden",
    _N + "attention.query_key_value.bias": "o:heads*3*hd",
    _N + "attention.dense.weight": "o:hidden, i:heads*hd | res",
    _N + "attention.dense.bias": "o:hidden | res",
    _N + "mlp.dense_h_to_4h.weight": "o:ffn, i:hidden",
    _N + "mlp.dense_h_to_4h.bias": "o:ffn",
    _N + "mlp.dense_4h_to_h.weight": "o:hidden, i:ffn | res",
    _N + "mlp.dense_4h_to_h.bias": "o:hidden | res",
}


# ---------------------------------------------------------------- OPT

def _opt_sizes(c):
    h, _, hd = _heads(c)
    return {"hidden": c.hidden_size, "ffn": c.ffn_dim, "heads": h, "hd": hd, "vocab": c.vocab_size,
            # OPT's learned positions keep 2 extra rows (the fairseq padding offset).
            "pos": c.max_position_embeddings + 2,
            "wep": getattr(c, "word_embed_proj_dim", None) or c.hidden_size,
            "layers": c.num_hidden_layers}


_O = "model.decoder.layers.{layers}."
OPT = {
    "model.decoder.embed_tokens.weight": "o:vocab, o:wep",
    "model.decoder.embed_positions.weight": "o:pos, o:hidden",
    "model.decoder.project_in.weight": "o:hidden, i:wep",     # only when word_embed_proj_dim != hidden
    "model.decoder.project_out.weight": "o:wep, i:hidden",
    "model.decoder.final_layer_norm.weight": "o:hidden | norm",
    "model.decoder.final_layer_norm.bias": "o:hidden",
    "lm_head.weight": "o:vocab, i:wep",
    _O + "self_attn_layer_norm.weight": "o:hidden | norm", _O + "self_attn_layer_norm.bias": "o:hidden",
    _O + "final_layer_norm.weight": "o:hidden | norm", _O + "final_layer_norm.bias": "o:hidden",
    **{_O + f"self_attn.{p}_proj.weight": "o:heads*hd, i:hidden" for p in "qkv"},
    **{_O + f"self_attn.{p}_proj.bias": "o:heads*hd" for p in "qkv"},
    _O + "self_attn.out_proj.weight": "o:hidden, i:heads*hd | res",
    _O + "self_attn.out_proj.bias": "o:hidden | res",
    _O + "fc1.weight": "o:ffn, i:hidden", _O + "fc1.bias": "o:ffn",
    _O + "fc2.weight": "o:hidden, i:ffn | res", _O + "fc2.bias": "o:hidden | res",
}

LAYOUTS = {
    # Llama's attention_bias / mlp_bias add the same bias keys as Qwen2: one superset table.
    "llama": Layout("llama", _llama_sizes, QWEN2, tied=_LLAMA_TIED),
    "mistral": Layout("mistral", _llama_sizes, LLAMA, tied=_LLAMA_TIED),
    "qwen2": Layout("qwen2", _llama_sizes, QWEN2, tied=_LLAMA_TIED),
    "gpt2": Layout("gpt2", _gpt2_sizes, GPT2, tied={"lm_head.weight": "transformer.wte.weight"}),
    "gpt_neox": Layout("gpt_neox", _neox_sizes, NEOX, tied={"lm_head.weight": "gpt_neox.embed_in.weight"},
                       saved_as={"lm_head.weight": "embed_out.weight"}),   # transformers renames on load
    "opt": Layout("opt", _opt_sizes, OPT, tied={"lm_head.weight": "model.decoder.embed_tokens.weight"}),
}
