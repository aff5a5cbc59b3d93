"""`compt-scale grow`: grow a checkpoint into a larger configuration.

SRC is an HF model dir (safetensors; streamed tensor by tensor) or an open_clip checkpoint
(.safetensors/.pt/.bin, or a dir holding open_clip_model.safetensors + open_clip_config.json) whose
model config comes from --from-config or an open_clip_config.json next to it. TARGET is an HF
config.json, a model dir, a preset name (given the source's vocab_size), or for open_clip a model
config JSON / built-in open_clip model name.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import CompTError
from .grow.ops import DEPTH_OPS, WIDTH_OPS


def register(subparsers) -> None:
    p = subparsers.add_parser("grow", help="grow a trained checkpoint into a larger model (width/depth operators)")
    p.add_argument("--from", dest="src", required=True, help="HF model dir, or open_clip checkpoint")
    p.add_argument("--from-config", dest="src_config", default=None,
                   help="open_clip model config of SRC (default: open_clip_config.json next to it)")
    p.add_argument("--to", dest="target", default=None,
                   help="config.json, model dir, preset name, or open_clip config (or give factors below)")
    p.add_argument("--width-factor", default=None, help="HF decoders: target = source widened by this (e.g. 2x)")
    p.add_argument("--depth-factor", default=None, help="HF decoders: target = source deepened by this (e.g. 2x)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="HF decoders: explicit target config field (repeatable), e.g. --set hidden_size=4096")
    p.add_argument("--width", choices=WIDTH_OPS, default="insert")
    p.add_argument("--depth", choices=DEPTH_OPS, default="duplicate")
    p.add_argument("--out", required=True, help="output dir (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0, help="seed of the student's init for non-inserted parts")
    p.add_argument("--noise-snr", type=float, default=None,
                   help="clone only: symmetry-breaking noise with this signal-to-noise power ratio")
    p.set_defaults(func=run)


def _is_hf_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file()


def _clip_src_config(src: Path, explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    here = src if src.is_dir() else src.parent
    return here / "open_clip_config.json"


def run(args) -> int:
    from .files import check_out_dir
    src = Path(args.src)
    if not src.exists():
        raise CompTError(f"--from: {src} does not exist")
    check_out_dir(args.out)   # before the growth's work: a read-only or file-blocked --out is one line
    derived = args.width_factor is not None or args.depth_factor is not None or args.overrides
    if derived and args.target is not None:
        raise CompTError("--to: give either a target config or --width-factor/--depth-factor/--set, not both")
    if not derived and args.target is None:
        raise CompTError("--to: missing (a target config, or --width-factor/--depth-factor/--set)")
    if derived and not _is_hf_dir(src):
        raise CompTError("--width-factor/--depth-factor/--set: only for HF decoder sources")
    if _is_hf_dir(src):
        report = _grow_hf(src, args)
    else:
        report = _grow_clip(src, args)
    n = len(report["tensors"])
    print(f"grew {report['layout']} {args.src} -> {args.out} ({n} tensors, width={args.width}, "
          f"depth={args.depth}{', embeddings untied' if report['untied_embeddings'] else ''}); "
          f"report: {Path(args.out) / 'grow_report.json'}")
    return 0


def _grow_hf(src: Path, args) -> dict:
    from transformers import AutoConfig

    from .families.hf_decoder import load_config
    from .grow.stream import grow_hf_checkpoint

    try:
        src_cfg = AutoConfig.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:  # unparsable JSON, an unknown or missing model_type
        raise CompTError(f"--from {src / 'config.json'}: {str(e).strip().splitlines()[0]}") from None
    from .grow.targets import derive_config
    if args.target is None:
        grow_to = {"width": args.width_factor or 1, "depth": args.depth_factor or 1,
                   **parse_overrides(args.overrides)}
        tgt_cfg = derive_config(src_cfg, grow_to, args.depth)
        return grow_hf_checkpoint(src, tgt_cfg, args.out, args.width, args.depth, args.seed, args.noise_snr)
    t = Path(args.target)
    if t.suffix == ".json" or t.is_dir():
        raw = t / "config.json" if t.is_dir() else t
        if raw.is_file() and "vision_cfg" in json.loads(raw.read_text()):
            raise CompTError(f"--to {t}: an open_clip config, but the source is a {src_cfg.model_type} model")
        tgt_cfg = load_config(str(t))   # an explicit config keeps its own vocab (mismatch is an error)
    else:   # a preset: its vocab is a placeholder for the tokenizer's, i.e. the source's
        tgt_cfg = load_config(args.target, vocab_size=src_cfg.vocab_size)
    return grow_hf_checkpoint(src, tgt_cfg, args.out, args.width, args.depth, args.seed, args.noise_snr)


def parse_overrides(items: list[str]) -> dict:
    """['hidden_size=4096', 'rope_theta=5e5'] -> {field: YAML-typed value}."""
    import yaml
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise CompTError(f"--set {item!r}: expected FIELD=VALUE")
        try:
            value = yaml.safe_load(v)
        except yaml.YAMLError:
            raise CompTError(f"--set {item!r}: unreadable value") from None
        if isinstance(value, str):   # YAML 1.1 reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        out[k.strip()] = value
    return out


def _grow_clip(src: Path, args) -> dict:
    from .families.clip import grow_open_clip_checkpoint, load_model_config

    cfg_path = _clip_src_config(src, args.src_config)
    if not cfg_path.is_file():
        raise CompTError(f"--from {src}: not an HF model dir, and no open_clip model config "
                         f"({cfg_path}; give --from-config)")
    src_cfg = load_model_config(str(cfg_path))
    ckpt = src / "open_clip_model.safetensors" if src.is_dir() else src
    tgt_cfg = load_model_config(args.target)
    return grow_open_clip_checkpoint(ckpt, src_cfg, tgt_cfg, args.out, args.width, args.depth,
                                     args.seed, args.noise_snr)
