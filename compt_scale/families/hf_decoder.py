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

from ..errors import CompTError

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


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
    if not path.is_file():
        raise CompTError(f"model config not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CompTError(f"{path}: invalid JSON: {e.msg} at line {e.lineno}") from None
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


def hidden_size(config: PretrainedConfig) -> int:
    return int(config.hidden_size)


def num_layers(config: PretrainedConfig) -> int:
    return int(config.num_hidden_layers)


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


def forward_features(model, input_ids: torch.Tensor, labels: torch.Tensor):
    """Returns (task loss, final hidden state [B, T, d]) in one forward pass.

    `labels` are already shifted (next-token targets), so the loss is computed here rather than by
    HF's internal shift, which would drop the last position of every packed sequence.
    """
    out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    logits = out.logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))
    return loss, out.hidden_states[-1]


def validate_chain(spec) -> None:
    """Config-level checks that need the family: presets exist, sizes grow, growth is possible."""
    vocab = spec.data.vocab_size
    prev = None
    for i, stage in enumerate(spec.stages):
        where = f"stages[{i}].model"
        try:
            cfg = load_config(stage.model)
        except CompTError as e:
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
            if param_count(cfg) <= param_count(p_cfg):
                raise CompTError(f"{where}: {stage.model!r} is not larger than its predecessor {p_stage.model!r}")
            g = spec.growth_for(stage)
            from ..grow import check_growable
            try:
                check_growable(p_cfg, cfg, width=g.width, depth=g.depth)
            except CompTError as e:
                raise CompTError(f"{where}: cannot grow from {p_stage.model!r}: {e}") from None
        prev = (cfg, stage)
    for i, stage in enumerate(spec.baselines):
        try:
            load_config(stage.model)
        except CompTError as e:
            raise CompTError(f"baselines[{i}].model: {e}") from None
