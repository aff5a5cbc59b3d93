"""`compt-scale plan`, `compt-scale macs` and `compt-scale report`: cost before, and results after, a run."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import CompTError


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="per-stage params, budgets and training MACs of a chain spec; "
                                           "fills budgets from budget: {baseline_tokens, target_speedup}")
    p.add_argument("spec", metavar="CHAIN.yaml")
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks per stage the steps are counted for (default: the spec's nproc)")
    p.add_argument("--gpus", type=int, default=None,
                   help="also print each stage's per-GPU memory and the ZeRO preset `auto` picks on this many GPUs")
    p.add_argument("--gpu-mem", default="80GB", help="memory of one GPU, with --gpus (default 80GB)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="with --gpus (default: min(gpus, 8))")
    p.set_defaults(func=_plan)

    p = subparsers.add_parser("macs", help="params and forward/training MACs per token or sample of a model")
    p.add_argument("model", metavar="MODEL_CONFIG",
                   help="decoder preset / config.json / HF model dir, or an open_clip name / CLIP config .json")
    p.add_argument("--seq-len", type=int, help="decoder sequence length (default: the model's context length)")
    p.add_argument("--vocab-size", type=int, help="decoder vocabulary size (replaces the config's)")
    p.add_argument("--captions", type=int, help="CLIP: captions per image (the paper uses 4)")
    p.add_argument("--image-size", type=int, help="CLIP: image side in pixels (default: the config's)")
    p.set_defaults(func=_macs)

    p = subparsers.add_parser("report", help="write DIR/report.html + PNG plots and print the per-stage table")
    p.add_argument("out", metavar="DIR")
    p.set_defaults(func=_report)


def _plan(args) -> int:
    from .chain.planner import format_plan
    from .chain.resolve import load_resolved
    if args.nproc is not None and args.nproc < 1:
        raise CompTError(f"--nproc must be >= 1, got {args.nproc}")
    spec = load_resolved(args.spec)
    print(format_plan(spec, args.nproc))
    if args.gpus is not None:
        from .chain.memory_plan import format_memory
        from .train.memory import parse_bytes
        if args.gpus < 1 or (args.gpus_per_node is not None and args.gpus_per_node < 1):
            raise CompTError(f"--gpus/--gpus-per-node must be >= 1, got {args.gpus}/{args.gpus_per_node}")
        try:
            gpu_mem = parse_bytes(args.gpu_mem)
        except ValueError as e:
            raise CompTError(f"--gpu-mem: {e}") from None
        print(format_memory(spec, args.gpus, gpu_mem, args.gpus_per_node))
    return 0


def _is_clip(model: str, args) -> bool:
    """Which family `model` names: a preset of either family, a config file, a model dir, or an
    open_clip model name."""
    if args.captions is not None or args.image_size is not None:
        return True
    from .resources import MODELS, resource
    for family in ("hf_decoder", "open_clip"):
        if (resource(MODELS, family) / f"{model}.json").is_file():
            return family == "open_clip"
    p = Path(model)
    if p.suffix == ".json" and p.is_file():
        try:
            cfg = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False  # load_config reports the JSON error
        return isinstance(cfg, dict) and "vision_cfg" in cfg.get("model_cfg", cfg)
    if p.exists():
        return (p / "open_clip_config.json").is_file()
    import open_clip
    return open_clip.get_model_config(model) is not None


def _macs(args) -> int:
    from .flops import clip_macs, decoder_macs, human
    if _is_clip(args.model, args):
        if args.seq_len is not None or args.vocab_size is not None:
            raise CompTError("--seq-len/--vocab-size are for decoders; a CLIP sample is 1 image + --captions")
        captions = 4 if args.captions is None else args.captions
        if args.image_size is not None and args.image_size <= 0:
            raise CompTError(f"--image-size must be positive, got {args.image_size}")
        from .families.clip import load_model_config
        m = clip_macs(load_model_config(args.model), image_size=args.image_size, captions=captions)
        train = m["forward_per_sample"] + m["backward_per_sample"]
        h, w = m["image_size"]
        print(f"model          {args.model} (CLIP; a sample = 1 image {h}x{w} + {captions} captions)")
        print(f"params         {m['params']:,} ({human(m['params'])})")
        print(f"forward        {human(m['forward_per_sample'])} MACs/sample (image {human(m['image_forward'])}, "
              f"text {human(m['text_forward_per_caption'])} per caption)")
        print(f"backward       {human(m['backward_per_sample'])} MACs/sample")
        print(f"training       {human(train)} MACs/sample (fwd + bwd) + {human(m['update_per_step'])} "
              f"per optimizer step (AdamW)")
        return 0
    from .families.hf_decoder import load_config
    if args.vocab_size is not None and args.vocab_size <= 0:
        raise CompTError(f"--vocab-size must be positive, got {args.vocab_size}")
    cfg = load_config(args.model, vocab_size=args.vocab_size)
    max_len = getattr(cfg, "max_position_embeddings", None)
    seq_len = args.seq_len if args.seq_len is not None else (max_len or 2048)
    if seq_len <= 0:
        raise CompTError(f"--seq-len must be positive, got {seq_len}")
    if max_len and seq_len > max_len:
        raise CompTError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {max_len}")
    m = decoder_macs(cfg, seq_len)
    fwd, bwd = m["forward_per_token"], m["backward_per_token"]
    print(f"model          {args.model} ({cfg.model_type}, vocab {cfg.vocab_size}, seq_len {seq_len})")
    print(f"params         {m['params']:,} ({human(m['params'])})")
    print(f"forward        {human(fwd)} MACs/token, {human(fwd * seq_len)} MACs/sequence "
          f"(attention {human(m['attention_per_token'])}/token)")
    print(f"backward       {human(bwd)} MACs/token, {human(bwd * seq_len)} MACs/sequence")
    print(f"training       {human(fwd + bwd)} MACs/token, {human((fwd + bwd) * seq_len)} MACs/sequence "
          f"+ {human(m['update_per_step'])} per optimizer step (AdamW); as a teacher: {human(fwd)} MACs/token")
    return 0


def _report(args) -> int:
    from .report import report_table, write_report
    out = Path(args.out)
    if not out.is_dir():
        raise CompTError(f"{out}: not a directory")
    path = write_report(out)
    print(report_table(out))
    print(f"report: {path}")
    return 0
