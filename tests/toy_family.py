"""A third model family defined outside the package: a tiny residual-MLP language model.

It is registered only through the environment (COMPT_SCALE_FAMILIES="toy=tests.toy_family", read
by compt_scale.config.load_env_families in every process of a run) and touches no package module:
its growth layout goes into the shared registry with `register_layout` when this module is imported,
its data is the decoder family's (TextDataSpec, packed tokens), its model I/O is InMemoryIO.

Model: embedding -> N blocks x (x + fc2(gelu(fc1(x))), fc1 h -> 4h) -> LayerNorm -> head. No
attention and no positions: each token predicts the next from itself (a bigram model with depth).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from torch import nn

from compt_scale.config import TextDataSpec
from compt_scale.errors import CompTError, read_json
from compt_scale.families import check_successor
from compt_scale.families.base import Family
from compt_scale.families.in_memory_io import InMemoryIO
from compt_scale.flops import ADAMW_UPDATE_MACS_PER_PARAM
from compt_scale.grow.layout import Layout
from compt_scale.grow.layouts import register_layout

MODEL_TYPE = "toy-mlp"
DATA_SPEC = TextDataSpec     # the `data:` section: the decoders' (stdlib/files corpus, tokenizer, seq_len)
PRESETS = {"toy-s": {"hidden_size": 32, "num_layers": 2}, "toy-m": {"hidden_size": 64, "num_layers": 4}}
WEIGHTS, CONFIG = "model.safetensors", "config.json"


@dataclasses.dataclass
class ToyConfig:
    hidden_size: int
    num_layers: int
    vocab_size: int = 512
    model_type: str = MODEL_TYPE

    @property
    def ffn(self) -> int:
        return 4 * self.hidden_size


class Block(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


class ToyLM(nn.Module):
    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config.hidden_size) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(input_ids))


# The growth layout (compt_scale/grow/axes.py notation). LayerNorm over a cloned hidden vector gives
# the cloned normalized vector (same mean and variance), so `clone` preserves the function; fc2 is
# the residual output (`res`), zeroed in the new layers of depth `zero`.
LAYOUT = Layout(
    name=MODEL_TYPE,
    sizes=lambda c: {"hidden": c.hidden_size, "ffn": c.ffn, "vocab": c.vocab_size, "layers": c.num_layers},
    stacks=("layers",),
    tensors={
        "embed.weight": "o:vocab, o:hidden",
        "blocks.{layers}.fc1.weight": "o:ffn, i:hidden",
        "blocks.{layers}.fc1.bias": "o:ffn",
        "blocks.{layers}.fc2.weight": "o:hidden, i:ffn | res",
        "blocks.{layers}.fc2.bias": "o:hidden | res",
        "norm.weight": "o:hidden | norm",
        "norm.bias": "o:hidden",
        "head.weight": "o:vocab, i:hidden",
    })
register_layout(MODEL_TYPE, LAYOUT)


# ---------------------------------------------------------------- models

def preset_names() -> list[str]:
    return sorted(PRESETS)


def load_config(model: str) -> ToyConfig:
    """A preset name, or an export dir / config.json written by `save`."""
    if model in PRESETS:
        return ToyConfig(**PRESETS[model])
    path = Path(model)
    raw = read_json(path / CONFIG if path.is_dir() else path, "toy model config")
    if raw.get("model_type") != MODEL_TYPE:
        raise CompTError(f"model {model!r}: not a toy preset ({', '.join(PRESETS)}) or a {MODEL_TYPE} config")
    return ToyConfig(**raw)


def _with_vocab(cfg: ToyConfig, vocab: int) -> ToyConfig:
    return dataclasses.replace(cfg, vocab_size=vocab)


def plan_config(spec, stage) -> ToyConfig:
    from compt_scale.data.packed import planned_vocab_size
    return _with_vocab(load_config(stage.model), planned_vocab_size(spec.data))


def model_config(spec, stage, data_dir: Path) -> ToyConfig:
    meta = read_json(Path(data_dir) / "meta.json", "prepared data meta")
    return _with_vocab(load_config(stage.model), int(meta["vocab_size"]))


def param_count(cfg: ToyConfig) -> int:
    h, f, v = cfg.hidden_size, cfg.ffn, cfg.vocab_size
    return 2 * v * h + cfg.num_layers * (h * f + f + f * h + h) + 2 * h


def build(cfg: ToyConfig, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ToyLM(dataclasses.replace(cfg))


def config_of(model: torch.nn.Module) -> ToyConfig:
    return model.config


def load_export(path: Path) -> torch.nn.Module:
    from safetensors.torch import load_file
    model = ToyLM(load_config(str(path)))
    model.load_state_dict(load_file(str(Path(path) / WEIGHTS)))
    return model


def save(model: torch.nn.Module, state: dict, data_dir: Path, out: Path) -> None:
    """The export: safetensors + config.json, complete or absent (atomic_dir)."""
    from safetensors.torch import save_file

    from compt_scale.files import atomic_dir
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(dataclasses.asdict(config_of(model)), indent=2))


# ---------------------------------------------------------------- objective

def feature_dims(cfg: ToyConfig) -> list[int]:
    return [cfg.hidden_size]


def losses(model: torch.nn.Module, batch) -> tuple:
    """(next-token cross-entropy, [final hidden state]); labels are already shifted."""
    hidden = model.hidden(batch[0])
    logits = model.head(hidden).float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[1].reshape(-1)), [hidden]


def features(model: torch.nn.Module, batch) -> list:
    return [model.hidden(batch[0])]


def probe(model: torch.nn.Module, batch) -> torch.Tensor:
    return model(batch[0]).float()


def ifd_heads(cfg: ToyConfig, teacher_cfg: ToyConfig, ifd) -> list[torch.nn.Module]:
    from compt_scale.kernels import IFDProjection
    return [IFDProjection(cfg.hidden_size, teacher_cfg.hidden_size, impl=ifd.kernel)]


def evaluate(model: torch.nn.Module, spec, data_dir: Path, val_loss: float) -> dict:
    return {}


# ---------------------------------------------------------------- data and cost

def prepare(spec, data_dir: Path) -> Path:
    from compt_scale.data.packed import prepare_data
    return prepare_data(spec.data, data_dir)


def dataset(spec, data_dir: Path, split: str):
    from compt_scale.data.packed import PackedTokens
    return PackedTokens(data_dir, split, spec.data.seq_len)   # no positions: the model has none


def tokens_per_sample(spec) -> int:
    return spec.data.seq_len


def matmul_macs_per_token(cfg: ToyConfig) -> int:
    """Forward MACs of one token: every Linear weight once (fc1, fc2 per block, the head)."""
    return cfg.num_layers * 2 * cfg.hidden_size * cfg.ffn + cfg.hidden_size * cfg.vocab_size


def stage_macs(cfg: ToyConfig, teacher_cfg: ToyConfig | None, spec, samples: int) -> dict:
    """One optimizer step over `samples` sequences: student forward + backward (1 + 2 x the forward's
    MACs) + AdamW update; with a teacher, its forward and the IFD projection (forward, backward incl.
    its input gradient, update), as compt_scale.flops.stage_macs counts them for decoders."""
    tokens = samples * spec.data.seq_len
    train = 3 * tokens * matmul_macs_per_token(cfg) + ADAMW_UPDATE_MACS_PER_PARAM * param_count(cfg)
    teacher = 0
    if teacher_cfg is not None:
        teacher = tokens * matmul_macs_per_token(teacher_cfg)
        d_s, d_t = cfg.hidden_size, teacher_cfg.hidden_size
        train += 3 * tokens * d_s * d_t + ADAMW_UPDATE_MACS_PER_PARAM * (d_s * d_t + d_t)
    return {"train_macs": int(train), "teacher_macs": int(teacher), "macs": int(train + teacher)}


def flops_per_token(cfg: ToyConfig, spec) -> float:
    return 6.0 * matmul_macs_per_token(cfg)   # 2 FLOPs per MAC x 3 (forward + backward)


def memory_shape(cfg: ToyConfig, spec) -> tuple:
    """One attention-free stack (heads 1) and the largest parameter (embedding or head)."""
    return [(spec.data.seq_len, cfg.hidden_size, 1, cfg.num_layers)], cfg.vocab_size * cfg.hidden_size


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    raise CompTError("train.activation_checkpointing: the toy family has none")


def liger_supported(cfg: ToyConfig) -> bool:
    return False


def apply_liger(model: torch.nn.Module) -> None:
    raise CompTError("train.liger: the toy family has no liger kernels")


def validate_chain(spec) -> None:
    """Every model resolves; each chain stage is larger than and growable from its predecessor."""
    prev = None
    for where, stage in [(f"stages[{i}]", s) for i, s in enumerate(spec.stages)] + \
                        [(f"baselines[{i}]", s) for i, s in enumerate(spec.baselines)]:
        try:
            cfg = _with_vocab(load_config(stage.model), spec.data.vocab_size)
        except CompTError as e:
            raise CompTError(f"{where}.model: {e}") from None
        if where.startswith("stages"):
            if prev is not None:
                check_successor(spec, spec.index(stage.name), cfg, prev, param_count)
            prev = cfg


io = InMemoryIO(build, ifd_heads, load_export, save, config_of)
FAMILY = Family.from_module(sys.modules[__name__], name="toy", budget_unit="tokens")
