"""open_clip checkpoints: model configs, building, loading and growing a checkpoint file.
The towers' growth layout is growth data: compt_scale/grow/layouts/open_clip.py."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..errors import CompTError, read_json
from ..resources import MODELS, resource

PRESET_DIR = resource(MODELS, "open_clip")

# ---------------------------------------------------------------- checkpoints

def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_model_config(model) -> dict:
    """The one open_clip model-config loader: a dict, a preset name, a JSON file (raw, or HF-hub
    style {"model_cfg": ...}), an export dir, or a built-in open_clip model name (config only:
    nothing is downloaded). Returns a fresh dict the caller may edit."""
    if isinstance(model, dict):
        raw = model
    else:
        p = Path(model)
        if p.is_dir():
            p = p / "open_clip_config.json"
        elif p.suffix != ".json" and (PRESET_DIR / f"{model}.json").is_file():
            p = PRESET_DIR / f"{model}.json"
        if p.suffix == ".json":
            raw = read_json(p, "open_clip model config")
            raw = raw.get("model_cfg", raw)
        else:
            import open_clip
            raw = open_clip.get_model_config(str(model))
            if raw is None:
                raise CompTError(f"model {model!r}: no such preset (presets: {', '.join(preset_names())}), "
                                 "not a model-config .json and not an open_clip model name")
    if not isinstance(raw, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(raw):
        raise CompTError("open_clip model config needs embed_dim, vision_cfg and text_cfg")
    return copy.deepcopy(raw)


def build(cfg: dict, seed: int = 0) -> torch.nn.Module:
    import open_clip
    torch.manual_seed(seed)
    return open_clip.CLIP(**cfg).float()


def load_state(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise CompTError(f"open_clip checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(p))
    else:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    return {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}


def grow_open_clip_checkpoint(src_path, src_cfg: dict, tgt_cfg: dict, out_dir, width: str, depth: str,
                              seed: int = 0, noise_snr: float | None = None) -> dict:
    """Grow an open_clip checkpoint. CLIP towers are small next to decoders, so this holds the
    source and target in memory; the student's init is open_clip's own (seeded)."""
    from safetensors.torch import save_file

    from ..files import atomic_dir
    from ..grow.registry import check_growable, grow_state

    check_growable(src_cfg, tgt_cfg, width, depth)
    src = load_state(src_path)
    student = build(tgt_cfg, seed).state_dict()
    g = torch.Generator().manual_seed(seed)
    state, report = grow_state(src, src_cfg, tgt_cfg, student, width, depth, noise_snr, g)
    report.update(source=str(src_path), seed=seed, noise_snr=noise_snr)
    with atomic_dir(out_dir, replace=False) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "open_clip_model.safetensors"))
        (tmp / "open_clip_config.json").write_text(json.dumps({"model_cfg": tgt_cfg}, indent=2))
        (tmp / "grow_report.json").write_text(json.dumps(report, indent=1))
    return report
