"""Target configs derived from a predecessor's: `width: 2x`, `depth: 2x`, explicit overrides.

Config-only (plain dicts, as `PretrainedConfig.to_dict()` gives them), shared by `compt-scale grow
--width-factor/--depth-factor/--set` and a chain stage's `grow_to: {width: 2x, depth: 2x, ...}`.

The rule keeps every derived field consistent with the primary ones:
- width ratio r = new hidden / old hidden (from the factor, or from an explicit hidden override);
- attention heads x r and kv heads x r, so head_dim and the q-heads-per-kv-head grouping are kept;
- the MLP width x r (its ratio to hidden is kept); a width that was a multiple of 256 (Llama's own
  `multiple_of` rule) is rounded up to a multiple of 256 again;
- layers x depth; a per-layer `layer_types` list (Qwen2/Mistral/Gemma sliding windows) is extended
  by the same depth map the growth operator uses, so each new layer has its source layer's type;
- OPT's word_embed_proj_dim follows hidden when it equalled it; an explicit head_dim is kept.
Any field given explicitly wins over its derived value.
"""
from __future__ import annotations

import math
import re
from typing import TypedDict

from ..errors import CompTError
from ..numbers import like, parse_decimal


class _SizeNames(TypedDict):
    hidden: str
    heads: str
    kv: str | None
    ffn: str
    layers: str


# Field names of the primary sizes per model_type; None: the architecture has no such field.
_DEFAULT: _SizeNames = {"hidden": "hidden_size", "heads": "num_attention_heads", "kv": "num_key_value_heads",
            "ffn": "intermediate_size", "layers": "num_hidden_layers"}
NAMES: dict[str, _SizeNames] = {
    "gpt2": {"hidden": "n_embd", "heads": "n_head", "kv": None, "ffn": "n_inner", "layers": "n_layer"},
    "gpt_neox": {**_DEFAULT, "kv": None},
    "opt": {**_DEFAULT, "kv": None, "ffn": "ffn_dim"},
}
FACTOR_KEYS = ("width", "depth")
_FACTOR = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*[xX]?\s*$")


def parse_factor(value, where: str) -> float:
    """'2x', '1.5x', 2 or 2.0 -> the factor; a factor below 1 would shrink the model."""
    if isinstance(value, bool):
        raise CompTError(f"{where}: expected a factor like 2x, got {value!r}")
    if isinstance(value, (int, float)):
        f = float(value)
    else:
        m = _FACTOR.match(str(value))
        exact = parse_decimal(str(value))   # also 2.0e0, which YAML 1.1 hands over as a string
        if m:
            f = float(m.group(1))
        elif exact is not None:
            f = float(exact)
        else:
            raise CompTError(f"{where}: expected a factor like 2x or 1.5x, got {value!r}")
    if not (math.isfinite(f) and f >= 1):
        raise CompTError(f"{where}: factor must be >= 1 (growth never shrinks), got {value!r}")
    return f


def parse_grow_to(raw, where: str) -> dict:
    """Validate a stage's `grow_to:` mapping: {width: F, depth: F, <config field>: value, ...}."""
    if not isinstance(raw, dict) or not raw:
        raise CompTError(f"{where}: expected a mapping like {{width: 2x, depth: 2x}}, got {raw!r}")
    for k in FACTOR_KEYS:
        if k in raw:
            parse_factor(raw[k], f"{where}.{k}")
    for k in raw:
        if not isinstance(k, str) or not k:
            raise CompTError(f"{where}: field names must be strings, got {k!r}")
    return raw


def describe(grow_to: dict) -> str:
    """A short label: 'width 2x, depth 2x, hidden_size=4096'."""
    parts = [f"{k} {grow_to[k]}" for k in FACTOR_KEYS if k in grow_to]
    parts += [f"{k}={v}" for k, v in grow_to.items() if k not in FACTOR_KEYS]
    return ", ".join(parts)


def _override(key: str, value, current, size: bool):
    """An explicit field typed like the source config's value (2.0e3 -> 2000; 2.5 or 'abc' for an
    integer field is an error); the primary sizes (hidden, heads, layers, ...) are positive integers."""
    value = like(value, current, key, integer=size)
    if size and value < 1:
        raise CompTError(f"{key}: must be a positive integer, got {value}")
    return value


def _scaled(value: int, ratio: float, what: str, hint: str) -> int:
    x = value * ratio
    if abs(x - round(x)) > 1e-9:
        raise CompTError(f"{what} {value} x {ratio:g} = {x:g} is not an integer; {hint}")
    return round(x)


def _ffn(old: int, ratio: float) -> int:
    x = old * ratio
    if old % 256 == 0:
        return math.ceil(x / 256 - 1e-9) * 256
    return math.ceil(x - 1e-9)


def derive_target(src: dict, width=1.0, depth=1.0, overrides: dict | None = None,
                  depth_op: str = "duplicate") -> dict:
    """The target config dict for growing `src` (a full config dict, with model_type) by the given
    factors, then explicit `overrides` (config field -> value). Raises a one-line CompTError."""
    overrides = dict(overrides or {})
    width = parse_factor(width, "width")
    depth = parse_factor(depth, "depth")
    mt = src.get("model_type")
    if not mt:
        raise CompTError("source config has no model_type")
    names = NAMES.get(mt, _DEFAULT)
    for key in (names["hidden"], names["heads"], names["layers"]):
        if src.get(key) is None:
            raise CompTError(f"source {mt} config has no {key!r}; cannot derive a target from it")
    unknown = [k for k in overrides if k not in src and k not in names.values()]
    if unknown:
        raise CompTError(f"unknown config field(s) for {mt}: {', '.join(sorted(unknown))}")
    overrides = {k: _override(k, v, src.get(k), k in names.values()) for k, v in overrides.items()}
    out = dict(src)
    get = overrides.get

    h0, n0, L0 = int(src[names["hidden"]]), int(src[names["heads"]]), int(src[names["layers"]])
    set_what = f"set {names['hidden']}/{names['heads']} explicitly"
    h1 = int(get(names["hidden"]) or _scaled(h0, width, names["hidden"], "use a factor that keeps it whole"))
    r = h1 / h0
    n1 = int(get(names["heads"]) or _scaled(n0, r, names["heads"], set_what))
    out[names["hidden"]], out[names["heads"]] = h1, n1

    if names["kv"] and src.get(names["kv"]) is not None:
        kv1 = get(names["kv"]) or _scaled(int(src[names["kv"]]), n1 / n0, names["kv"],
                                          f"set {names['kv']} explicitly")
        out[names["kv"]] = int(kv1)
    if src.get("head_dim") is not None and int(src["head_dim"]) == h0 // n0 and "head_dim" not in overrides:
        out["head_dim"] = h1 // n1   # implicit head_dim (hidden / heads) stays implicit
    if names["ffn"] in overrides:
        out[names["ffn"]] = overrides[names["ffn"]]
    elif src.get(names["ffn"]) is not None:   # GPT-2's n_inner None means 4 x hidden: stays derived
        out[names["ffn"]] = _ffn(int(src[names["ffn"]]), r)
    if mt == "opt" and src.get("word_embed_proj_dim") in (None, h0) and "word_embed_proj_dim" not in overrides:
        out["word_embed_proj_dim"] = h1

    L1 = int(get(names["layers"]) or _scaled(L0, depth, names["layers"], "use a factor that keeps it whole"))
    out[names["layers"]] = L1
    types = src.get("layer_types")
    if isinstance(types, list) and len(types) == L0 and L1 != L0 and "layer_types" not in overrides:
        # the growth operator's own map: new layer j has source layer s_j's type (s_j None: the one at j's depth)
        from .registry import depth_map
        out["layer_types"] = [types[j * L0 // L1 if s is None else s]
                              for j, (s, _) in enumerate(depth_map(depth_op, L0, L1))]
    mwl = src.get("max_window_layers")
    if isinstance(mwl, int) and mwl < L0 and "max_window_layers" not in overrides:
        out["max_window_layers"] = round(mwl * L1 / L0)

    for k, v in overrides.items():
        out[k] = v
    if out[names["hidden"]] % out[names["heads"]] and out.get("head_dim") is None:
        raise CompTError(f"{names['hidden']} {out[names['hidden']]} is not divisible by "
                         f"{names['heads']} {out[names['heads']]}")
    return out


def derive_config(config, grow_to: dict, depth_op: str = "duplicate"):
    """A transformers PretrainedConfig grown by `grow_to` ({width: F, depth: F, <field>: value}, as a
    stage's `grow_to:` or the grow CLI's factors give it); returns a new PretrainedConfig."""
    from transformers import AutoConfig
    rest = {k: v for k, v in grow_to.items() if k not in FACTOR_KEYS}
    raw = derive_target(config.to_dict(), grow_to.get("width", 1), grow_to.get("depth", 1), rest, depth_op)
    raw.pop("transformers_version", None)
    try:
        return AutoConfig.for_model(raw.pop("model_type"), **raw)
    except Exception as e:  # noqa: BLE001 (transformers raises several types for bad configs)
        msg = " ".join(l.strip() for l in str(e).splitlines() if l.strip())
        raise CompTError(f"derived config is invalid: {msg}") from None
