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


def losses(model, batch):
    """(task loss, [final hidden state [B, T, d]]) in one forward pass.

    `batch` is (input_ids, labels) with labels already shifted (next-token targets), so the loss is
    computed here rather than by HF's internal shift, which would drop the last position of every
    packed sequence.
    """
    input_ids, labels = batch
    out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    logits = out.logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))
    return loss, [out.hidden_states[-1]]


def features(model, batch):
    """The teacher's side: the same final hidden state, without the LM head."""
    return [model.base_model(input_ids=batch[0], use_cache=False).last_hidden_state]


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
    return PackedTokens(data_dir, split, spec.data.seq_len)


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
    return model(input_ids=batch[0]).logits.float()


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
