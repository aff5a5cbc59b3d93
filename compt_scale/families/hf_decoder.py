"""Hugging Face decoder LMs (Llama-style, GPT-2, ...) as a CoM-PT family.

Models are plain `transformers` models built from a config: a preset name (`configs/models/<name>.json`),
a `config.json` path, or an HF model directory. The family knows how to build one, what its IFD
features are (final hidden state per token), and which chain specs are impossible before any work.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..errors import CompTError, read_json
from ..resources import MODELS, resource
from .base import Family
from .hf_attention import use_causal_sdpa
from .hf_io import PartitionedHFIO

PRESET_DIR = resource(MODELS, "hf_decoder")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_config(model: str, vocab_size: int | None = None, **overrides) -> PretrainedConfig:
    """Resolve a preset name / config.json / model dir into a transformers config."""
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    elif not path.suffix == ".json":
        path = PRESET_DIR / f"{model}.json"
        if not path.is_file():
            raise CompTError(f"model {model!r}: no such preset (presets: {', '.join(preset_names())}) "
                             "and not a config.json path")
    raw = read_json(path, "model config")
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise CompTError(f"{path}: config has no model_type")
    if vocab_size is not None:
        raw["vocab_size"] = vocab_size
    raw.update(overrides)
    try:
        return AutoConfig.for_model(model_type, **raw)
    except Exception as e:  # transformers/huggingface_hub raise several types for invalid configs
        msg = " ".join(l.strip() for l in str(e).splitlines() if l.strip())
        raise CompTError(f"{path}: {msg}") from None


def stage_config(spec, stage, **kw) -> PretrainedConfig:
    """A stage's config: its `model:`, or for `grow_to:` derived from the predecessor's (recursively)."""
    if not stage.grow_to:
        return load_config(stage.model, **kw)
    from ..grow.targets import derive_config
    base = stage_config(spec, spec.predecessor(stage.name), **kw)
    return derive_config(base, stage.grow_to, spec.growth_for(stage).depth)


def hidden_size(config: PretrainedConfig) -> int:
    return int(config.hidden_size)


def num_heads(config: PretrainedConfig) -> int:
    return int(config.num_attention_heads)


def param_count(config: PretrainedConfig) -> int:
    from ..flops import decoder_param_count
    return decoder_param_count(config)


def build(config: PretrainedConfig, seed: int) -> torch.nn.Module:
    """A freshly initialized model; the same seed gives the same weights on every rank. With an
    HfDeepSpeedConfig for ZeRO-3 alive, transformers builds it inside deepspeed.zero.Init (partitioned,
    in the DeepSpeed config's dtype)."""
    from transformers.integrations import is_deepspeed_zero3_enabled
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    use_causal_sdpa(model)
    return model if is_deepspeed_zero3_enabled() else model.float()


CE_CHUNK_TOKENS = 2048   # tokens per chunk of the loss: fp32 logits of at most this many are alive


def model_inputs(batch, model=None) -> dict:
    """Keyword inputs of an HF decoder for a batch (input_ids, labels[, position_ids]).

    Without position ids no mask at all: the attention is causal SDPA (`is_causal=True`, flash/cuDNN
    eligible; hf_attention.py). With position ids (packed documents, `data.doc_mask`), positions
    restart after each EOS and attention stays inside each document: a flex-attention BlockMask on
    CUDA, a block-diagonal causal mask [B, 1, T, T] (bool, True = attend) elsewhere.
    """
    if len(batch) < 3:
        return {"input_ids": batch[0]}
    from .hf_attention import attention_inputs
    return {"input_ids": batch[0], "position_ids": batch[2], **attention_inputs(model, batch[2])}


def _chunk_ce(head, hidden, labels):
    return torch.nn.functional.cross_entropy(head(hidden).float(), labels, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, head, labels: torch.Tensor, chunk: int = CE_CHUNK_TOKENS):
    """Mean cross-entropy of head(hidden) against labels, computed `chunk` tokens at a time.

    Each chunk's logits are recomputed in backward (non-reentrant checkpoint), so neither the forward
    nor the autograd graph ever holds the fp32 logits of the whole micro-batch: what is saved is the
    hidden state (which IFD keeps anyway) and the labels. The head is called as a module, so ZeRO-3
    gathers its partitioned weight for each chunk as it does for any forward.
    """
    from torch.utils.checkpoint import checkpoint
    h, y = hidden.reshape(-1, hidden.size(-1)), labels.reshape(-1)
    total = None
    for s in range(0, y.numel(), chunk):
        part = checkpoint(_chunk_ce, head, h[s:s + chunk], y[s:s + chunk], use_reentrant=False)
        total = part if total is None else total + part
    return total / y.numel()


def _plain_head(model) -> bool:
    """Whether logits are exactly lm_head(final hidden): no softcapping or logit scaling after it."""
    c = model.config
    return not any(getattr(c, k, None) not in (None, 1, 1.0) for k in
                   ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"))


def losses(model, batch):
    """(task loss, [final hidden state [B, T, d]]) in one forward pass.

    `batch` is (input_ids, labels[, position_ids]) with labels already shifted (next-token targets),
    so the loss is computed here rather than by HF's internal shift, which would drop the last
    position of every packed sequence. The base model gives the final hidden state (IFD's feature);
    the LM head and the loss run chunk by chunk on it (chunked_cross_entropy).
    """
    labels = batch[1]
    if getattr(model, LIGER_ATTR, False):
        # liger's fused linear cross-entropy: the [B*T, vocab] logits are never materialized. The
        # final hidden state is the same tensor out.hidden_states[-1] would be (post final norm).
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        h = model.base_model(**model_inputs(batch, model), use_cache=False).last_hidden_state
        loss = LigerFusedLinearCrossEntropyLoss()(model.get_output_embeddings().weight,
                                                  h.reshape(-1, h.size(-1)), labels.reshape(-1))
        return loss, [h]
    if not _plain_head(model):
        out = model(**model_inputs(batch, model), output_hidden_states=True, use_cache=False)
        logits = out.logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))
        return loss, [out.hidden_states[-1]]
    hidden = model.base_model(**model_inputs(batch, model), use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is None and not hasattr(head.weight, "ds_id"):
        # Whole weight (ZeRO-0/1/2): gradients computed in the forward, no logits recomputed.
        from .chunked_ce import linear_cross_entropy
        return linear_cross_entropy(hidden, head.weight, labels, CE_CHUNK_TOKENS), [hidden]
    return chunked_cross_entropy(hidden, head, labels), [hidden]


def memory_shape(config, spec) -> tuple[list[tuple[int, int, int, int]], int]:
    """For train/memory.py: the transformer stacks (tokens per sample, hidden, heads, layers) and the
    largest parameter (the vocab x hidden embedding or LM head, or an MLP matrix if larger)."""
    h = hidden_size(config)
    ffn = int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h)
    return ([(spec.data.seq_len, h, num_heads(config), int(config.num_hidden_layers))],
            max(int(config.vocab_size) * h, ffn * h))


def flops_per_token(config, spec) -> float:
    """Model FLOPs per trained token, the MFU convention of shared/gpu/README.md:
    6 N (forward + backward over every parameter) + 12 n_layers d_model seq (attention, not halved)."""
    return 6 * param_count(config) + 12 * int(config.num_hidden_layers) * hidden_size(config) * spec.data.seq_len


# liger-kernel: model types whose RMSNorm / SwiGLU / RoPE it patches, and the patch function's name.
LIGER_PATCHES = {"llama": "apply_liger_kernel_to_llama", "mistral": "apply_liger_kernel_to_mistral",
                 "qwen2": "apply_liger_kernel_to_qwen2"}
LIGER_ATTR = "compt_liger"


def liger_supported(config) -> bool:
    return config.model_type in LIGER_PATCHES


def apply_liger(model) -> None:
    """Patch `model` in place with liger's Triton RMSNorm, SwiGLU and RoPE; `losses` then uses liger's
    fused linear cross-entropy (called directly: the loss takes pre-shifted labels, which liger's
    patched forward would shift again)."""
    import liger_kernel.transformers as liger
    patch = getattr(liger, LIGER_PATCHES[model.config.model_type])
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False,
          model=model)
    setattr(model, LIGER_ATTR, True)


def features(model, batch):
    """The teacher's side: the same final hidden state, without the LM head (only the last hidden
    state is asked for: no output_hidden_states, so no layer's activations are kept)."""
    return [model.base_model(**model_inputs(batch, model), use_cache=False).last_hidden_state]


def enable_activation_checkpointing(model) -> None:
    """`train.activation_checkpointing`: recompute each decoder layer in backward (non-reentrant,
    which works under ZeRO-3 and with inputs that need no grad)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):   # transformers >= 5.2x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def feature_dims(config) -> list[int]:
    return [hidden_size(config)]


def config_of(model) -> PretrainedConfig:
    return model.config


# ---------------------------------------------------------------- data, budgets, export

def prepare(spec, data_dir: Path) -> Path:
    from ..data.packed import prepare_data
    return prepare_data(spec.data, data_dir)


def init_vocab(spec) -> int | None:
    """The (often padded) vocab_size of the chain's first `init:` model: the whole chain keeps it."""
    first = next((s for s in spec.stages if s.init), None)
    return int(load_config(first.init).vocab_size) if first else None


def plan_config(spec, stage) -> PretrainedConfig:
    """The stage's config before any data exists (the planner's view), with the vocabulary the
    prepared data will have (an init: model's padded vocab is kept along the chain)."""
    from ..data.packed import planned_vocab_size
    return stage_config(spec, stage, vocab_size=init_vocab(spec) or planned_vocab_size(spec.data))


def model_config(spec, stage, data_dir: Path) -> PretrainedConfig:
    """The stage's model config with the prepared tokenizer's special tokens, and its vocab (or the
    init model's padded vocab, which may be larger than the tokenizer)."""
    from transformers import AutoTokenizer
    meta = json.loads((data_dir / "meta.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
    padded = init_vocab(spec)
    vocab = padded if padded is not None and padded >= meta["vocab_size"] else meta["vocab_size"]
    return stage_config(spec, stage, vocab_size=vocab, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def dataset(spec, data_dir: Path, split: str):
    """Samples addressed by index: `.batch(indices)` -> (input_ids, labels)."""
    from ..data.packed import PackedTokens
    return PackedTokens(data_dir, split, spec.data.seq_len, doc_positions=spec.data.doc_mask)


def tokens_per_sample(spec) -> int:
    return spec.data.seq_len


def ifd_heads(config, teacher_config, ifd) -> list[torch.nn.Module]:
    """T for the one stream (the final hidden state): the fused IFD kernel's projection
    (`ifd.normalize` is a CLIP setting; hidden states are not normalized)."""
    from ..kernels import IFDProjection
    return [IFDProjection(d_s, d_t, impl=ifd.kernel)
            for d_s, d_t in zip(feature_dims(config), feature_dims(teacher_config), strict=True)]


def stage_macs(student_config, teacher_config, spec, samples: int) -> dict:
    from ..flops import stage_macs as decoder_stage_macs
    return decoder_stage_macs(student_config, teacher_config, spec.data.seq_len, samples * spec.data.seq_len, 1)


def load_export(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Shard by shard; inside deepspeed.zero.Init (partitioned) when an HfDeepSpeedConfig for ZeRO-3 is alive."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    use_causal_sdpa(model)
    return model


def evaluate(model, spec, data_dir, val_loss: float) -> dict:
    """Extra eval metrics for metrics.jsonl: perplexity of the val loss (nats per token)."""
    import math
    return {"perplexity": math.exp(min(val_loss, 50.0))}


def probe(model, batch) -> torch.Tensor:
    """Logits on a fixed batch: tests compare the export against the trained engine with them."""
    return model(input_ids=batch[0]).logits.float()   # plain inputs: what a user of the export runs


def validate_chain(spec) -> None:
    """Config-level checks that need the family: presets exist, sizes grow, growth is possible."""
    from . import check_successor
    vocab = spec.data.vocab_size
    padded = init_vocab(spec)
    if padded is not None:
        # Before any data work: the tokenizer's ids must all index the init model's embedding.
        n_tok = vocab
        if spec.data.tokenizer != "train":
            from transformers import AutoTokenizer
            try:
                n_tok = len(AutoTokenizer.from_pretrained(spec.data.tokenizer))
            except (OSError, ValueError) as e:
                raise CompTError(f"data.tokenizer: cannot load {spec.data.tokenizer}: {str(e).splitlines()[0]}") from None
        if n_tok > padded:
            raise CompTError(f"data.tokenizer: {n_tok} tokens, more than the init model's embedding "
                             f"(vocab_size {padded})")
    from ..data.packed import planned_vocab_size
    chain_vocab = padded or planned_vocab_size(spec.data)
    prev = None
    for i, stage in enumerate(spec.stages):
        where = f"stages[{i}].model"
        try:
            cfg = stage_config(spec, stage)
        except CompTError as e:
            where = f"stages[{i}].grow_to" if stage.grow_to else where
            raise CompTError(f"{where}: {e}") from None
        _check_limits(cfg, spec.data.seq_len, where)
        if stage.model.endswith(".json") and getattr(cfg, "vocab_size", None) not in (None, vocab) \
                and spec.data.tokenizer == "train":
            raise CompTError(f"{where}: vocab_size {cfg.vocab_size} differs from data.vocab_size {vocab}")
        cfg.vocab_size = chain_vocab   # as a run sizes every stage (a preset's own vocab is a placeholder)
        hd, nh = hidden_size(cfg), num_heads(cfg)
        if hd % nh:
            raise CompTError(f"{where}: hidden_size {hd} is not divisible by num_attention_heads {nh}")
        kv = getattr(cfg, "num_key_value_heads", None)
        if kv and nh % kv:
            raise CompTError(f"{where}: num_attention_heads {nh} is not divisible by num_key_value_heads {kv}")
        if prev is not None:
            p_cfg, p_stage = prev
            if cfg.model_type != p_cfg.model_type:
                raise CompTError(f"{where}: architecture {cfg.model_type!r} differs from predecessor's "
                                 f"{p_cfg.model_type!r}")
            check_successor(spec, i, cfg, p_cfg, param_count)
        prev = (cfg, stage)
    for i, stage in enumerate(spec.baselines):
        try:
            cfg = load_config(stage.model)
        except CompTError as e:
            raise CompTError(f"baselines[{i}].model: {e}") from None
        _check_limits(cfg, spec.data.seq_len, f"baselines[{i}].model")


# Architectures whose position embeddings are a learned table: a longer sequence indexes past its end
# (a crash at step 1). Rotary/ALiBi models extrapolate, so their max_position_embeddings is no limit.
LEARNED_POSITIONS = ("gpt2", "gpt_bigcode", "opt", "biogpt")


def _check_limits(cfg: PretrainedConfig, seq_len: int, where: str) -> None:
    """Sizes a config can hold but no model can be built or run with, named before anything runs."""
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size"):
        v = getattr(cfg, key, None)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise CompTError(f"{where}: {key} must be a positive integer, got {v!r}")
    if cfg.model_type in LEARNED_POSITIONS:
        key = "n_positions" if hasattr(cfg, "n_positions") else "max_position_embeddings"
        limit = getattr(cfg, key, None)
        if limit is not None and seq_len > limit:
            raise CompTError(f"{where}: data.seq_len {seq_len} exceeds the model's {key} {limit} "
                             "(learned position embeddings)")


# Students, teachers and exports go parameter by parameter through HF safetensors.
io = PartitionedHFIO(build, ifd_heads, load_export)
FAMILY = Family.from_module(sys.modules[__name__], name="hf_decoder", budget_unit="tokens")
