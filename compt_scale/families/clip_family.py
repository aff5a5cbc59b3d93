"""open_clip CLIP models as a CoM-PT family (the paper's own setting).

Models are plain `open_clip.CLIP` built from an open_clip model-config dict: a preset name
(`configs/models/clip-*.json`), a model-config JSON path (raw, or HF-hub style {"model_cfg": ...}), an
export dir, or a built-in open_clip model name (config only; never downloaded). The task loss is
LaCLIP's loss over M captions per image (clip_loss.py, paper eq. 2-3), the IFD streams are the image
and text embeddings (the paper averages the two). Evaluation: clip_eval.py.

Budgets: a CLIP sample is one image with its M captions, so `tokens_per_sample` is 1 and every `tokens`
field of a CLIP chain (stage budgets, metrics, manifest) counts images (image-caption pairs for M=1).

Exports are open_clip "local-dir" folders (open_clip_config.json + open_clip_model.safetensors), so
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:DIR/<stage>/model")
    tokenizer = open_clip.get_tokenizer("local-dir:DIR/<stage>/model")
load them with no project code and no network.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from ..errors import CompTError, read_json
from ..grow.layouts.open_clip import check_supported
from .base import Family
from .clip import PRESET_DIR, preset_names  # noqa: F401  (part of the family's interface)
from .clip import load_model_config as load_config
from .in_memory_io import InMemoryIO

SIMPLE_TOKENIZER_VOCAB = 49408
MAX_LOGIT_SCALE = 100.0      # open_clip training clamps exp(logit_scale) to 100
CONFIG_ATTR = "compt_open_clip_cfg"


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


def ifd_heads(cfg: dict, teacher_cfg: dict, ifd) -> list[torch.nn.Module]:
    """One T per stream (image, text). `ifd.normalize: before` (default, as the official code): T
    sits before the L2 normalization, L_IFD = ||normalize(T s) - t||^2; `after`: T maps the unit
    embedding, L_IFD = ||T(s) - t||^2 with the fused kernel."""
    from ..kernels import IFDProjection
    from ..kernels.unit_ifd import UnitIFDProjection
    dims = zip(feature_dims(cfg), feature_dims(teacher_cfg), strict=True)
    if ifd.normalize == "before":
        return [UnitIFDProjection(d_s, d_t) for d_s, d_t in dims]
    return [IFDProjection(d_s, d_t, impl=ifd.kernel) for d_s, d_t in dims]


def _embed(model, batch):
    """(image_features [B, D], text_features [B, M, D], logit_scale) through CLIP.forward, never
    encode_* directly: under ZeRO-3 the root module's own parameters (text_projection,
    positional_embedding, logit_scale) are gathered only by its forward hook. Tokens are [B, L] (one
    caption per image) or [B, M, L] (M captions per image, LaCLIP): all B*M captions go through the
    text tower in one forward."""
    images, texts = batch
    b = texts.shape[0]
    dtype = next(model.parameters()).dtype  # a bf16 teacher/engine needs bf16 pixels for its conv
    out = model(images.to(dtype), texts.reshape(-1, texts.shape[-1]))
    img, txt, scale = (out["image_features"], out["text_features"], out["logit_scale"]) \
        if isinstance(out, dict) else out[:3]
    return img, txt.reshape(b, -1, txt.shape[-1]), scale


def losses(model, batch):
    """(LaCLIP contrastive loss over M captions per image (clip_loss.py, paper eq. 2-3), [image
    features, text features]) in one forward.

    IFD uses the L2-normalized embeddings (what CLIP.forward returns; `ifd.normalize` places T before
    or after that normalization, see ifd_heads): the contrastive loss sees only
    their directions, so an embedding's norm is a free, unanchored quantity; an MSE on raw embeddings
    would mostly teach the student to match the teacher's arbitrary norms (which also differ between
    model sizes), while on unit vectors it transfers exactly what the task uses - the geometry of the
    joint space. It also keeps L_IFD's scale independent of width, so alpha calibrates the same way
    at every stage.
    """
    from .clip_loss import laclip_loss
    img, txt, scale = _embed(model, batch)
    # open_clip's trainer clamps logit_scale after each step; clamping its value here has the same
    # effect for the loss (the generic loop has no per-family post-step hook).
    task = laclip_loss(img.float(), txt.float(), scale.float().clamp(max=MAX_LOGIT_SCALE))
    return task, [img, txt.flatten(0, 1)]


def features(model, batch):
    img, txt, _ = _embed(model, batch)
    return [img, txt.flatten(0, 1)]


def evaluate(model, spec, data_dir: Path, val_loss: float) -> dict:
    """Extra eval metrics for metrics.jsonl: zero-shot top-1 (labelled split) and retrieval R@1/R@5."""
    from .clip_eval import evaluate as clip_evaluate
    return clip_evaluate(model, data_dir, _embed, next(model.parameters()).device)


def enable_activation_checkpointing(model) -> None:
    """`train.activation_checkpointing`: open_clip's own (non-reentrant) per-block checkpointing."""
    model.set_grad_checkpointing(True)


def probe(model, batch) -> torch.Tensor:
    """Image and text embeddings on a fixed batch, concatenated: tests compare the export with them."""
    img, txt, _ = _embed(model, batch)
    return torch.cat([img.float(), txt[:, 0].float()], dim=-1)


def memory_shape(cfg: dict, spec) -> tuple[list[tuple[int, int, int, int]], int]:
    """For train/memory.py: both towers as (tokens per sample, width, heads, layers), the text tower
    once per caption of a sample (LaCLIP), and the largest parameter (the token embedding, usually)."""
    v, t = _vision(cfg), _text(cfg)
    patches = (v["image_size"] // v["patch_size"]) ** 2 + 1
    m = spec.data.captions_per_image
    towers = [(patches, v["width"], v["width"] // v["head_width"], v["layers"])] + \
        [(t["context_length"], t["width"], t["heads"], t["layers"])] * m
    largest = max(t["vocab_size"] * t["width"], int(v["width"] * v["mlp_ratio"]) * v["width"])
    return towers, largest


def flops_per_token(cfg: dict, spec) -> float:
    """Model FLOPs per image-caption pair (the MFU numerator; a CLIP "token" is a pair): 2 FLOPs per
    MAC x 3 (forward + backward) x the forward MACs, as the decoders' 6 N convention."""
    from ..flops import clip_macs
    return 2 * 3 * clip_macs(cfg, captions=1)["forward_per_sample"]


def liger_supported(cfg: dict) -> bool:
    return False  # liger-kernel patches HF decoders only


def apply_liger(model) -> None:
    raise CompTError("train.liger: liger-kernel supports HF Llama-family decoders, not open_clip models")


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
    if spec.data.corpus == "webdataset" and split == "train":
        from ..data.webdataset_shards import StreamingImageText
        meta = read_json(Path(data_dir) / "meta.json", "prepared data meta")
        return StreamingImageText(spec.data, meta, spec.data.captions_per_image)
    return ImageText(data_dir, split, spec.data.captions_per_image)


def tokens_per_sample(spec) -> int:
    return 1  # budgets count image-caption pairs (module docstring)


def stage_macs(student_cfg: dict, teacher_cfg: dict | None, spec, samples: int) -> dict:
    """MACs of one optimizer step over `samples` images (paper appendix C.2): a sample is 1 image + M
    captions (M = data.captions_per_image; the paper's Table G counts 4). Student forward + backward +
    AdamW update; with a teacher, its forward and the two IFD heads (forward, backward incl. input
    grad, update; the text head sees M rows per image), as flops.stage_macs counts them for decoders."""
    from ..flops import ADAMW_UPDATE_MACS_PER_PARAM as UPD
    from ..flops import clip_macs
    m = spec.data.captions_per_image
    s = clip_macs(student_cfg, captions=m)
    train = samples * (s["forward_per_sample"] + s["backward_per_sample"]) + s["update_per_step"]
    teacher = 0
    if teacher_cfg is not None:
        teacher = samples * clip_macs(teacher_cfg, captions=m)["forward_per_sample"]
        for rows, d_s, d_t in zip((1, m), feature_dims(student_cfg), feature_dims(teacher_cfg), strict=True):
            train += samples * rows * 3 * d_s * d_t + UPD * (d_s * d_t + d_t)
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
            raise CompTError(f"{where}: {key} is not supported (plain open_clip CLIP with the contrastive loss only)")
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
    for i, s in enumerate(spec.stages):
        if s.init:
            raise CompTError(f"stages[{i}].init: open_clip chains cannot start from a checkpoint")
    """Config-level checks: presets exist, data fits the models, sizes grow, growth is possible."""
    from . import check_successor
    if spec.data.corpus == "files":
        for p in spec.data.paths:
            if Path(p).suffix not in (".csv", ".tsv", ".tar"):
                raise CompTError(f"data.paths: open_clip reads .csv/.tsv files (image path + caption "
                                 f"columns) or webdataset .tar shards, got {p}")
    for key in ("captions_per_image", "caption_variants"):
        if not (isinstance(getattr(spec.data, key), int) and getattr(spec.data, key) >= 1):
            raise CompTError(f"data.{key}: must be an integer >= 1, got {getattr(spec.data, key)!r}")
    if spec.data.corpus == "webdataset":
        from ..data.webdataset_shards import validate
        validate(spec.data)
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


# CLIP towers are small: built whole, grown in memory, exported from a gathered state dict.
io = InMemoryIO(build, ifd_heads, load_export, export, config_of)
FAMILY = Family.from_module(sys.modules[__name__], name="open_clip", budget_unit="image-caption pairs")
