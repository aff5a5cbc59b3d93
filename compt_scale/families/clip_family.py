"""open_clip CLIP models as a CoM-PT family (the paper's own setting).

Models are plain `open_clip.CLIP` built from an open_clip model-config dict: a preset name
(`configs/models/clip-*.json`), a model-config JSON path (raw, or HF-hub style {"model_cfg": ...}), an
export dir, or a built-in open_clip model name (config only; never downloaded). The task loss is
open_clip's ClipLoss, the IFD streams are the image and text embeddings (the paper averages the two).

Budgets: a CLIP sample is one image-caption pair, so `tokens_per_sample` is 1 and every `tokens` field
of a CLIP chain (stage budgets, metrics, manifest) counts image-caption pairs.

Exports are open_clip "local-dir" folders (open_clip_config.json + open_clip_model.safetensors), so
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:DIR/<stage>/model")
    tokenizer = open_clip.get_tokenizer("local-dir:DIR/<stage>/model")
load them with no project code and no network.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import CompTError, read_json
from ..grow.layouts.open_clip import check_supported
from ..resources import MODELS, resource
from .clip import load_model_config

PRESET_DIR = resource(MODELS, "open_clip")
SIMPLE_TOKENIZER_VOCAB = 49408
MAX_LOGIT_SCALE = 100.0      # open_clip training clamps exp(logit_scale) to 100
CONFIG_ATTR = "compt_open_clip_cfg"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_config(model: str) -> dict:
    """Resolve a preset name / JSON path / export dir / open_clip model name to a model-config dict."""
    p = Path(model)
    if p.is_dir() or p.suffix == ".json":
        return copy.deepcopy(load_model_config(str(p)))
    preset = PRESET_DIR / f"{model}.json"
    if preset.is_file():
        return copy.deepcopy(load_model_config(str(preset)))
    try:
        return copy.deepcopy(load_model_config(model))
    except CompTError:
        raise CompTError(f"model {model!r}: no such preset (presets: {', '.join(preset_names())}), not a "
                         "model-config .json and not an open_clip model name") from None


def _vision(cfg: dict) -> dict:
    from ..grow.layouts.open_clip import _full
    return _full(cfg)[0]


def _text(cfg: dict) -> dict:
    from ..grow.layouts.open_clip import _full
    return _full(cfg)[1]


def param_count(cfg: dict) -> int:
    from ..flops import clip_param_count
    return clip_param_count(cfg, (_vision(cfg)["image_size"],) * 2)


def context_length(spec) -> int:
    return int(_text(load_config(spec.stages[0].model))["context_length"])


# ---------------------------------------------------------------- models

def _scalar_logit_scale(module, state_dict, prefix, local_metadata) -> None:
    v = state_dict.get(prefix + "logit_scale")
    # numel 1 only: under ZeRO-3 the live parameter is an empty placeholder, the data is elsewhere.
    if v is not None and not isinstance(v, torch.nn.Parameter) and v.dim() == 1 and v.numel() == 1:
        state_dict[prefix + "logit_scale"] = v.reshape(())


def _vector_logit_scale(module, state_dict, prefix, *args) -> None:
    v = state_dict.get(prefix + "logit_scale")
    if v is not None and v.dim() == 0:
        state_dict[prefix + "logit_scale"] = v.reshape(1)


def build(cfg: dict, seed: int) -> torch.nn.Module:
    """A freshly initialized open_clip.CLIP; the same seed gives the same weights on every rank.

    DeepSpeed cannot broadcast a 0-dim parameter (it views every parameter as bytes), so the live
    logit_scale is open_clip's `nonscalar_logit_scale` [1]; state-dict hooks keep open_clip's standard
    scalar in every state dict, so growth, checkpoints and exports all see the plain open_clip layout
    and the export's config is the preset unchanged.
    """
    import open_clip
    torch.manual_seed(seed)
    model = open_clip.CLIP(**{**cfg, "nonscalar_logit_scale": True}).float()
    model.register_state_dict_post_hook(_scalar_logit_scale)
    model.register_load_state_dict_pre_hook(_vector_logit_scale)
    setattr(model, CONFIG_ATTR, copy.deepcopy(cfg))
    return model


def config_of(model) -> dict:
    cfg = getattr(model, CONFIG_ATTR, None)
    if cfg is None:
        raise CompTError("open_clip model has no recorded model config (build it with clip_family.build)")
    return cfg


def feature_dims(cfg: dict) -> list[int]:
    return [int(cfg["embed_dim"])] * 2


def _embed(model, batch):
    """(image_features, text_features, logit_scale) through CLIP.forward, never encode_* directly:
    under ZeRO-3 the root module's own parameters (text_projection, positional_embedding,
    logit_scale) are gathered only by its forward hook."""
    images, texts = batch
    dtype = next(model.parameters()).dtype  # a bf16 teacher/engine needs bf16 pixels for its conv
    out = model(images.to(dtype), texts)
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[0], out[1], out[2]


_LOSS: dict[tuple[int, int], object] = {}


def _clip_loss():
    import open_clip
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if (rank, world) not in _LOSS:
        # With > 1 rank, features are all-gathered with gradient as in open_clip's training, so the
        # contrastive batch is the global batch: every rank computes the same global loss, and
        # all_gather's backward routes each rank's share of the gradient back to its own samples.
        _LOSS[(rank, world)] = open_clip.ClipLoss(gather_with_grad=world > 1, rank=rank, world_size=world)
    return _LOSS[(rank, world)]


def losses(model, batch):
    """(contrastive loss, [image_features, text_features]) in one forward.

    IFD uses the L2-normalized embeddings (what CLIP.forward returns): the contrastive loss sees only
    their directions, so an embedding's norm is a free, unanchored quantity; an MSE on raw embeddings
    would mostly teach the student to match the teacher's arbitrary norms (which also differ between
    model sizes), while on unit vectors it transfers exactly what the task uses - the geometry of the
    joint space. It also keeps L_IFD's scale independent of width, so alpha calibrates the same way
    at every stage.
    """
    img, txt, scale = _embed(model, batch)
    # open_clip's trainer clamps logit_scale after each step; clamping its value here has the same
    # effect for the loss (the generic loop has no per-family post-step hook).
    task = _clip_loss()(img.float(), txt.float(), scale.float().clamp(max=MAX_LOGIT_SCALE))
    return task, [img, txt]


def features(model, batch):
    img, txt, _ = _embed(model, batch)
    return [img, txt]


def enable_activation_checkpointing(model) -> None:
    """`train.activation_checkpointing`: open_clip's own (non-reentrant) per-block checkpointing."""
    model.set_grad_checkpointing(True)


def probe(model, batch) -> torch.Tensor:
    """Image and text embeddings on a fixed batch, concatenated: tests compare the export with them."""
    img, txt, _ = _embed(model, batch)
    return torch.cat([img.float(), txt.float()], dim=-1)


# ---------------------------------------------------------------- data, budgets, export

def prepare(spec, data_dir: Path) -> Path:
    from ..data.image_text import prepare_image_text
    return prepare_image_text(spec.data, context_length(spec), data_dir)


def plan_config(spec, stage) -> dict:
    """The stage's config before any data exists (the planner's view)."""
    return load_config(stage.model)


def model_config(spec, stage, data_dir: Path) -> dict:
    return load_config(stage.model)


def dataset(spec, data_dir: Path, split: str):
    from ..data.image_text import ImageText
    return ImageText(data_dir, split)


def tokens_per_sample(spec) -> int:
    return 1  # budgets count image-caption pairs (module docstring)


def stage_macs(student_cfg: dict, teacher_cfg: dict | None, spec, samples: int) -> dict:
    """MACs of one optimizer step over `samples` pairs (paper appendix C.2, one caption per image):
    student forward + backward + AdamW update; with a teacher, its forward and the two IFD heads
    (forward, backward incl. input grad, update), as flops.stage_macs counts them for decoders."""
    from ..flops import ADAMW_UPDATE_MACS_PER_PARAM as UPD
    from ..flops import clip_macs
    s = clip_macs(student_cfg, captions=1)
    train = samples * (s["forward_per_sample"] + s["backward_per_sample"]) + s["update_per_step"]
    teacher = 0
    if teacher_cfg is not None:
        teacher = samples * clip_macs(teacher_cfg, captions=1)["forward_per_sample"]
        for d_s, d_t in zip(feature_dims(student_cfg), feature_dims(teacher_cfg)):
            train += samples * 3 * d_s * d_t + UPD * (d_s * d_t + d_t)
    return {"train_macs": int(train), "teacher_macs": int(teacher), "macs": int(train + teacher)}


def load_export(path: Path) -> torch.nn.Module:
    """Through open_clip's own local-dir loader: the teacher is read exactly as a user would read it."""
    import open_clip
    path = Path(path)
    cfg = read_json(path / "open_clip_config.json", "open_clip export config").get("model_cfg")
    if not isinstance(cfg, dict):
        raise CompTError(f"{path / 'open_clip_config.json'}: no model_cfg")
    model = open_clip.create_model(f"local-dir:{path}", precision="fp32", device="cpu")
    setattr(model, CONFIG_ATTR, cfg)
    return model


def export(student, state: dict, data_dir: Path, out: Path) -> None:
    """open_clip local-dir export, written to a temp dir and renamed (complete or absent)."""
    from safetensors.torch import save_file

    from ..files import atomic_dir
    cfg = config_of(student)
    meta = read_json(Path(data_dir) / "meta.json", "prepared data meta")
    preprocess = {"size": meta["image_size"], "mode": "RGB", "mean": meta["mean"], "std": meta["std"],
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    # ZeRO-3's consolidated state dict bypasses state-dict hooks: it can hold the live [1] logit_scale.
    state = {k: (v.reshape(()) if k == "logit_scale" else v).contiguous() for k, v in state.items()}
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / "open_clip_model.safetensors"))
        (tmp / "open_clip_config.json").write_text(
            json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2))


# ---------------------------------------------------------------- validation

def _check_model(cfg: dict, spec, where: str, ctx0: tuple[int, str] | None) -> None:
    for key in ("custom_text", "multimodal_cfg", "init_logit_bias", "nonscalar_logit_scale"):
        if cfg.get(key):
            raise CompTError(f"{where}: {key} is not supported (plain open_clip CLIP with ClipLoss only)")
    v, t = _vision(cfg), _text(cfg)
    if v["image_size"] != spec.data.image_size:
        raise CompTError(f"{where}: vision_cfg.image_size {v['image_size']} differs from data.image_size "
                         f"{spec.data.image_size}")
    if v["image_size"] % v["patch_size"]:
        raise CompTError(f"{where}: vision_cfg.image_size {v['image_size']} is not a multiple of patch_size "
                         f"{v['patch_size']}")
    if t["vocab_size"] != SIMPLE_TOKENIZER_VOCAB or t.get("hf_tokenizer_name"):
        raise CompTError(f"{where}: text_cfg must use open_clip's SimpleTokenizer (vocab_size "
                         f"{SIMPLE_TOKENIZER_VOCAB}, no hf_tokenizer_name), got vocab_size {t['vocab_size']}")
    if ctx0 is not None and t["context_length"] != ctx0[0]:
        raise CompTError(f"{where}: text_cfg.context_length {t['context_length']} differs from {ctx0[1]}'s "
                         f"{ctx0[0]} (the chain shares one tokenized dataset)")


def validate_chain(spec) -> None:
    """Config-level checks: presets exist, data fits the models, sizes grow, growth is possible."""
    from . import check_successor
    if spec.data.corpus not in ("shapes", "files"):
        raise CompTError(f"data.corpus: open_clip trains on 'shapes' or 'files', got {spec.data.corpus!r}")
    if spec.data.corpus == "files":
        for p in spec.data.paths:
            if Path(p).suffix not in (".csv", ".tsv"):
                raise CompTError(f"data.paths: open_clip reads .csv/.tsv files (image path + caption "
                                 f"columns), got {p}")
    if spec.data.corpus == "shapes" and spec.data.num_samples < 16:
        raise CompTError(f"data.num_samples: need at least 16 image-caption pairs, got {spec.data.num_samples}")
    ctx0, prev = None, None
    for where, stage in [(f"stages[{i}]", s) for i, s in enumerate(spec.stages)] + \
                        [(f"baselines[{i}]", s) for i, s in enumerate(spec.baselines)]:
        try:
            cfg = load_config(stage.model)
            check_supported(cfg)
        except CompTError as e:
            raise CompTError(f"{where}.model: {e}") from None
        _check_model(cfg, spec, f"{where}.model", ctx0)
        ctx0 = ctx0 or (_text(cfg)["context_length"], where)
        if not where.startswith("stages"):
            continue
        if prev is not None:
            check_successor(spec, spec.index(stage.name), cfg, prev, param_count)
        prev = cfg
