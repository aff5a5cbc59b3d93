"""Hugging Face decoder LMs (Llama-style, GPT-2, ...) as a CoM-PT family.

Models are plain `transformers` models built from a config: a preset name (`configs/models/<name>.json`),
a `config.json` path, or an HF model directory. The family knows how to build one, what its IFD
features are (final hidden state per token), and which chain specs are impossible before any work.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..errors import CompTError, read_json
from ..resources import MODELS, resource

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
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def build(config: PretrainedConfig, seed: int) -> torch.nn.Module:
    """A freshly initialized model; the same seed gives the same weights on every rank."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.float()


CE_CHUNK_TOKENS = 2048   # tokens per chunk of the loss: fp32 logits of at most this many are alive


def model_inputs(batch) -> dict:
    """Keyword inputs of an HF decoder for a batch (input_ids, labels[, position_ids]).

    With position ids (packed documents, `data.doc_mask`), positions restart after each EOS and a
    block-diagonal causal mask [B, 1, T, T] (bool, True = attend) keeps attention inside each
    document: HF passes a 4D mask to sdpa as is.
    """
    if len(batch) < 3:
        return {"input_ids": batch[0]}
    pos = batch[2]
    doc = (pos == 0).cumsum(dim=1)
    T = pos.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=pos.device).tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    return {"input_ids": batch[0], "position_ids": pos, "attention_mask": mask[:, None]}


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
    if not _plain_head(model):
        out = model(**model_inputs(batch), output_hidden_states=True, use_cache=False)
        logits = out.logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))
        return loss, [out.hidden_states[-1]]
    hidden = model.base_model(**model_inputs(batch), use_cache=False).last_hidden_state
    return chunked_cross_entropy(hidden, model.get_output_embeddings(), labels), [hidden]


def features(model, batch):
    """The teacher's side: the same final hidden state, without the LM head."""
    return [model.base_model(**model_inputs(batch), use_cache=False).last_hidden_state]


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


def plan_config(spec, stage) -> PretrainedConfig:
    """The stage's config before any data exists (the planner's view): vocab from the spec."""
    return stage_config(spec, stage, vocab_size=spec.data.vocab_size)


def model_config(spec, stage, data_dir: Path) -> PretrainedConfig:
    """The stage's model config with the prepared tokenizer's vocab and special tokens."""
    from transformers import AutoTokenizer
    meta = json.loads((data_dir / "meta.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
    return stage_config(spec, stage, vocab_size=meta["vocab_size"], bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def dataset(spec, data_dir: Path, split: str):
    """Samples addressed by index: `.batch(indices)` -> (input_ids, labels)."""
    from ..data.packed import PackedTokens
    return PackedTokens(data_dir, split, spec.data.seq_len, doc_positions=spec.data.doc_mask)


def tokens_per_sample(spec) -> int:
    return spec.data.seq_len


def stage_macs(student_config, teacher_config, spec, samples: int) -> dict:
    from ..flops import stage_macs as decoder_stage_macs
    return decoder_stage_macs(student_config, teacher_config, spec.data.seq_len, samples * spec.data.seq_len, 1)


def load_export(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def export(student, state: dict, data_dir: Path, out: Path) -> None:
    """`save_pretrained` + tokenizer into a temp dir, then rename: loadable with no project code."""
    from transformers import AutoTokenizer

    from ..files import atomic_dir
    with atomic_dir(out) as tmp:
        student.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(data_dir / "tokenizer")).save_pretrained(str(tmp))


def probe(model, batch) -> torch.Tensor:
    """Logits on a fixed batch: tests compare the export against the trained engine with them."""
    return model(input_ids=batch[0]).logits.float()   # plain inputs: what a user of the export runs


def validate_chain(spec) -> None:
    """Config-level checks that need the family: presets exist, sizes grow, growth is possible."""
    from . import check_successor
    if spec.data.corpus not in ("stdlib", "files"):
        raise CompTError(f"data.corpus: decoders train on 'stdlib' or 'files', got {spec.data.corpus!r}")
    vocab = spec.data.vocab_size
    prev = None
    for i, stage in enumerate(spec.stages):
        where = f"stages[{i}].model"
        try:
            cfg = stage_config(spec, stage)
        except CompTError as e:
            where = f"stages[{i}].grow_to" if stage.grow_to else where
            raise CompTError(f"{where}: {e}") from None
        if stage.model.endswith(".json") and getattr(cfg, "vocab_size", None) not in (None, vocab) \
                and spec.data.tokenizer == "train":
            raise CompTError(f"{where}: vocab_size {cfg.vocab_size} differs from data.vocab_size {vocab}")
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
            load_config(stage.model)
        except CompTError as e:
            raise CompTError(f"baselines[{i}].model: {e}") from None
