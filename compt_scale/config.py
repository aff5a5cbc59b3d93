"""Typed chain specs, validated when loaded.

A chain spec is YAML. Every problem is reported as one CompTError naming the field, e.g.
`stages[1].model: 'llama-s' is not larger than its predecessor 'llama-m'`, before anything is written.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from .errors import CompTError
from .grow.ops import DEPTH_OPS, WIDTH_OPS
from .numbers import as_float, as_int, as_number

# A Hugging Face tokenizer directory holds at least one of these (fast, slow SentencePiece, BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")
# The spec name goes into job names and file names: identifier-like, never a newline or a quote.
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Top-level entries of --out a stage dir must not collide with (manifest.json, chain.yaml, report.html
# and the plots are excluded by the no-'.' rule already).
RESERVED_STAGE_NAMES = ("data", "slurm")


@dataclass
class DataSpec:
    """Data options every family has; each family adds its own in a subclass (below), so an option
    that means nothing to the spec's family is an unknown-field error, not silently ignored."""
    CORPORA: ClassVar[tuple[str, ...]] = ()
    corpus: str = ""
    paths: list[str] = field(default_factory=list)   # user files (format per family)
    text_field: str = "text"          # the column/key holding text (decoders) or captions (CLIP CSV)
    val_fraction: float = 0.02
    max_chars: int = 6_000_000        # cap on the corpus size, so small demos stay small
    cache_dir: str | None = None      # default: <out>/data


@dataclass
class TextDataSpec(DataSpec):
    """`data:` of decoder chains (family hf_decoder)."""
    CORPORA: ClassVar[tuple[str, ...]] = ("stdlib", "files")
    corpus: str = "stdlib"            # "stdlib" (Python's own source + docs) or "files" (txt/jsonl/parquet)
    tokenizer: str = "train"          # "train" (SentencePiece trained here), an HF tokenizer dir, or
                                      # "auto": the first `init:` model's own (default when stage 0 has init:)
    vocab_size: int = 4096
    seq_len: int = 128
    doc_mask: bool = True             # positions restart after each EOS, attention stays in its document
    num_proc: int | None = None       # tokenizer processes (datasets.map); default min(8, CPU count)


@dataclass
class ImageTextDataSpec(DataSpec):
    """`data:` of CLIP chains (family open_clip)."""
    CORPORA: ClassVar[tuple[str, ...]] = ("shapes", "files", "webdataset")
    corpus: str = "shapes"            # "shapes" (scenes rendered here), "files" (CSV/TSV/tar) or
                                      # "webdataset" (shards streamed: data/webdataset_shards.py)
    image_field: str = "filepath"     # the CSV column with image paths
    captions_per_image: int = 1       # M captions per image in each step (LaCLIP; paper: 4)
    caption_variants: int = 1         # "shapes": paraphrased captions per scene (paper: 16)
    caption_fields: list[str] = field(default_factory=list)  # CSV: caption columns
    caption_sep: str | None = None    # CSV/tar: separator splitting one caption into several
    image_size: int = 64              # images are resized to this
    num_samples: int = 20000          # "shapes": how many image-caption pairs to render
    shards: list[str] = field(default_factory=list)      # webdataset: shard URLs, {000..099} and '::'
    val_shards: list[str] = field(default_factory=list)  # webdataset: eval shards (default: last of shards)
    train_num_samples: int | None = None  # webdataset: pairs per epoch (open_clip's --train-num-samples)
    resampled: bool = False           # webdataset: shards drawn with replacement per reader (multi-node)
    shuffle_buffer: int = 5000        # webdataset: samples in each reader's shuffle buffer
    workers: int = 2                  # webdataset: loader processes per rank (0: in the prefetch thread)
    val_samples: int = 1000           # webdataset: pairs read from the eval shards


# The family registry's torch-free half: family name -> (the module holding its FAMILY, its `data:`
# section). It lives here, at the bottom, so parsing a spec imports nothing above config;
# families.register_family adds to it (a family can be registered from outside the package).
FAMILY_MODULES: dict[str, str] = {"hf_decoder": "compt_scale.families.hf_decoder",
                                  "open_clip": "compt_scale.families.clip_family"}
DATA_SPECS: dict[str, type[DataSpec]] = {"hf_decoder": TextDataSpec, "open_clip": ImageTextDataSpec}
# Families outside the package, for every process of a run (`chain` starts each stage as a child,
# which inherits the environment): "name=module[,name=module...]"; the module holds the family's
# FAMILY and its `data:` dataclass as DATA_SPEC (e.g. COMPT_SCALE_FAMILIES=toy=tests.toy_family).
FAMILIES_ENV = "COMPT_SCALE_FAMILIES"


def load_env_families() -> None:
    """Register the families named in $COMPT_SCALE_FAMILIES (see above); one-line errors."""
    import importlib
    import os
    for item in filter(None, (x.strip() for x in os.environ.get(FAMILIES_ENV, "").split(","))):
        name, _, module = (x.strip() for x in item.partition("="))
        if not NAME_RE.fullmatch(name) or not re.fullmatch(r"[A-Za-z_][\w.]*", module):
            raise CompTError(f"{FAMILIES_ENV}: expected name=module[,name=module...], got {item!r}")
        if FAMILY_MODULES.get(name) == module:
            continue
        if name in FAMILY_MODULES:
            raise CompTError(f"{FAMILIES_ENV}: family {name!r} is already {FAMILY_MODULES[name]}")
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise CompTError(f"{FAMILIES_ENV}: cannot import {module}: {e}") from None
        data_spec = getattr(mod, "DATA_SPEC", None)
        if getattr(getattr(mod, "FAMILY", None), "name", None) != name:
            raise CompTError(f"{FAMILIES_ENV}: module {module} has no FAMILY named {name!r}")
        if not (isinstance(data_spec, type) and issubclass(data_spec, DataSpec)):
            raise CompTError(f"{FAMILIES_ENV}: module {module} has no DATA_SPEC (a DataSpec subclass)")
        FAMILY_MODULES[name], DATA_SPECS[name] = module, data_spec


@dataclass
class TrainSpec:
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-3
    lr_base_width: int | None = None   # muP-style: hidden matrices at lr * this / hidden_size (train/lr_rule.py)
    zero_init_residual: bool = False   # from-scratch students: residual outputs start at 0 (train/init_rule.py)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    zero_stage: int | str = "auto"     # 0-3, or "auto": the ds_configs preset picked by size
    ds_config: str | None = None       # explicit DeepSpeed JSON (overrides the preset)
    precision: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = False  # recompute each layer in backward (non-reentrant)
    gpu_mem: str | None = None         # e.g. "80GB": what zero_stage auto fits into (default: the device's)
    eval_every: int = 50
    eval_batches: int = 8              # validation: this many global batches, the same samples on any world size
    save_every: int = 100
    log_every: int = 10
    export_shard_bytes: int = 5 * 2**30   # max safetensors shard of a stage's export (HF's default)
    compile: bool | str = "auto"       # torch.compile per block, student and teacher: auto (CUDA only) | true | false
    liger: str | bool = "auto"         # liger-kernel for HF Llama-family: auto (if installed + CUDA) | on | off


@dataclass
class IFDSpec:
    # a number; "auto": L_ifd ~= ratio * L_task, calibrated on calib batches (and held, unless
    # recalibrate); or {schedule: linear, start: A, end: B} (B defaults to 0) over the stage's steps
    alpha: float | str | dict = "auto"
    ratio: float = 0.1
    calib_batches: int = 4
    # auto: calibrate once on the first batches and hold it for the stage (false: the paper's one fixed
    # alpha, its r = 0.1 measured at the stage's start), or re-set it at every eval (true: alpha then
    # grows 20-80x within a stage as the student matches its teacher, and IFD hurt in fidelity.py)
    recalibrate: bool = False
    normalize: Literal["before", "after"] = "before"   # CLIP: T before ("before") or after the embeddings' L2 norm
    enabled: bool = True
    kernel: Literal["auto", "triton", "reference"] = "auto"   # the fused IFD loss: auto (Triton on CUDA) | triton | reference


@dataclass
class GrowthSpec:
    width: str = "insert"
    depth: str = "duplicate"
    init: Literal["grow", "random"] = "grow"   # "random": keep the student's own init, teacher only (paper Table 4(b) "IFD only")


@dataclass
class StageSpec:
    name: str
    model: str | None = None           # preset name (configs/models/<name>.json) or a config.json path;
                                       # optional when `init` gives it
    tokens: int | None = None          # training budget in tokens (0: an `init` model used as-is)
    train: dict = field(default_factory=dict)   # per-stage overrides of TrainSpec fields
    growth: dict = field(default_factory=dict)  # per-stage overrides of GrowthSpec fields
    ifd: dict = field(default_factory=dict)     # per-stage overrides of IFDSpec fields
    init: str | None = None            # an HF model dir (safetensors) whose weights the stage starts from
    grow_to: dict = field(default_factory=dict)  # instead of model: {width: 2x, depth: 2x, <field>: v}
                                                 # derived from the predecessor (grow/targets.py)


@dataclass
class BudgetSpec:
    """Rule 3 of the paper: give the independent baseline's budget and a target speedup, and the
    planner fills stage budgets that decrease linearly along the chain."""
    baseline_tokens: int
    target_speedup: float


@dataclass
class ChainSpec:
    name: str
    stages: list[StageSpec]
    family: str = "hf_decoder"
    seed: int = 0
    data: DataSpec = field(default_factory=TextDataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    ifd: IFDSpec = field(default_factory=IFDSpec)
    growth: GrowthSpec = field(default_factory=GrowthSpec)
    budget: BudgetSpec | None = None
    baselines: list[StageSpec] = field(default_factory=list)  # independent runs, for comparison
    nproc: int = 1                     # local ranks per stage when `chain` launches stages itself
    source: str | None = None          # where the spec came from

    # ---- per-stage resolved views ----
    def stage(self, name: str) -> StageSpec:
        for s in self.stages + self.baselines:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.stages + self.baselines)
        raise CompTError(f"--stage: no stage named {name!r} (stages: {known})")

    def index(self, name: str) -> int:
        return [s.name for s in self.stages].index(name) if self.is_chain_stage(name) else -1

    def is_chain_stage(self, name: str) -> bool:
        return any(s.name == name for s in self.stages)

    def predecessor(self, name: str) -> StageSpec | None:
        i = self.index(name)
        return self.stages[i - 1] if i > 0 else None

    def train_for(self, stage: StageSpec) -> TrainSpec:
        return _merge(self.train, stage.train, f"{self._where(stage)}.train")

    def ifd_for(self, stage: StageSpec) -> IFDSpec:
        return _merge(self.ifd, stage.ifd, f"{self._where(stage)}.ifd")

    def growth_for(self, stage: StageSpec) -> GrowthSpec:
        return _merge(self.growth, stage.growth, f"{self._where(stage)}.growth")

    def _where(self, stage: StageSpec) -> str:
        if stage in self.stages:
            return f"stages[{self.stages.index(stage)}]"
        return f"baselines[{self.baselines.index(stage)}]"


# ---------------------------------------------------------------- parsing with field names

def _check_keys(raw: dict, cls, where: str) -> None:
    if not isinstance(raw, dict):
        raise CompTError(f"{where}: expected a mapping, got {type(raw).__name__}")
    names = {f.name for f in fields(cls)}
    for k in raw:
        if k not in names:
            raise CompTError(f"{where}.{k}: unknown field (allowed: {', '.join(sorted(names))})")


def _coerce(value: Any, typ: Any, where: str) -> Any:
    t = str(typ)
    if value is None and ("None" in t or t.endswith("| None")):
        return None
    if t in ("int", "<class 'int'>"):
        return as_int(value, where)   # also 2.0e9 / 1_000_000, which YAML 1.1 hands over as strings
    if t in ("float", "<class 'float'>"):
        return as_float(value, where)
    if t in ("str", "<class 'str'>"):
        if not isinstance(value, str):
            raise CompTError(f"{where}: expected a string, got {value!r}")
        return value
    if t in ("bool", "<class 'bool'>"):
        if not isinstance(value, bool):
            raise CompTError(f"{where}: expected true/false, got {value!r}")
        return value
    if t == "int | None":
        return None if value is None else _coerce(value, "int", where)
    if t == "str | None":
        return None if value is None else _coerce(value, "str", where)
    if t == "float | str | dict" and isinstance(value, dict):
        return value
    if t in ("float | str", "float | str | dict"):
        if isinstance(value, str) and value != "auto":
            try:
                value = float(value)
            except ValueError:
                raise CompTError(f"{where}: expected a number or 'auto', got {value!r}") from None
        return value if isinstance(value, str) else _coerce(value, "float", where)
    if t == "int | str":
        return value if isinstance(value, str) and as_number(value) == value else _coerce(value, "int", where)
    if t.startswith("list"):
        if not isinstance(value, list):
            raise CompTError(f"{where}: expected a list, got {value!r}")
        return [str(v) for v in value]
    if t == "dict":
        if not isinstance(value, dict):
            raise CompTError(f"{where}: expected a mapping, got {value!r}")
        return value
    if t.startswith("Literal["):   # an enumerated option: validated from its annotation
        options = ast.literal_eval(f"({t[len('Literal['):-1]},)")
        if value not in options:
            names = [repr(o) for o in options]
            raise CompTError(f"{where}: must be {', '.join(names[:-1])} or {names[-1]}, got {value!r}")
        return value
    if t in ("bool | str", "str | bool"):   # train.compile / train.liger: true/false or a word
        if not isinstance(value, (bool, str)):
            raise CompTError(f"{where}: expected true/false or a word, got {value!r}")
        return value
    raise TypeError(f"{where}: no coercion for the annotation {t!r}")   # a new field type: add it above


def _build(cls, raw: dict, where: str):
    _check_keys(raw, cls, where)
    kwargs = {}
    for f in fields(cls):
        if f.name in raw:
            kwargs[f.name] = _coerce(raw[f.name], f.type, f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise CompTError(f"{where}.{f.name}: required field is missing")
    return cls(**kwargs)


def _merge(base, overrides: dict, where: str):
    merged = _build(type(base), {**dataclasses.asdict(base), **overrides}, where)
    _validate_section(merged, where)
    return merged


def _check_alpha_schedule(sched: dict, where: str) -> None:
    """{schedule: linear, start: A, end: B=0}: alpha goes linearly from A at step 0 to B at the last step."""
    for k in sched:
        if k not in ("schedule", "start", "end"):
            raise CompTError(f"{where}.{k}: unknown field (allowed: end, schedule, start)")
    if sched.get("schedule") != "linear":
        raise CompTError(f"{where}.schedule: only 'linear' is supported, got {sched.get('schedule')!r}")
    for key in ("start", "end"):
        if key == "start" and key not in sched:
            raise CompTError(f"{where}.start: required for a schedule")
        if key in sched:
            sched[key] = as_number(sched[key])   # 1e-1 is a string to YAML 1.1
        v = sched.get(key, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise CompTError(f"{where}.{key}: must be a number >= 0, got {v!r}")


def _validate_section(obj, where: str) -> None:
    """Value checks beyond the types (`_coerce` checked those, Literal options included)."""
    if isinstance(obj, TrainSpec):
        _validate_train(obj, where)
    elif isinstance(obj, IFDSpec):
        _validate_ifd(obj, where)
    elif isinstance(obj, DataSpec):
        _validate_data(obj)
    elif isinstance(obj, GrowthSpec):
        _validate_growth(obj, where)


def _validate_train(obj: TrainSpec, where: str) -> None:
    for k in ("micro_batch_size", "grad_accum", "eval_every", "eval_batches", "save_every", "log_every",
              "export_shard_bytes"):
        if getattr(obj, k) <= 0:
            raise CompTError(f"{where}.{k}: must be positive, got {getattr(obj, k)}")
    if obj.warmup_steps < 0:
        raise CompTError(f"{where}.warmup_steps: must be >= 0")
    if not obj.lr > 0 or not math.isfinite(obj.lr):
        raise CompTError(f"{where}.lr: must be a positive number, got {obj.lr}")
    if obj.lr_base_width is not None and obj.lr_base_width <= 0:
        raise CompTError(f"{where}.lr_base_width: must be a positive integer, got {obj.lr_base_width}")
    if not 0 <= obj.min_lr_ratio <= 1:
        raise CompTError(f"{where}.min_lr_ratio: must be in [0, 1]")
    if obj.zero_stage != "auto" and obj.zero_stage not in (0, 1, 2, 3):
        raise CompTError(f"{where}.zero_stage: must be 0, 1, 2, 3 or 'auto', got {obj.zero_stage!r}")
    if obj.gpu_mem is not None:
        from .units import parse_bytes
        try:
            parse_bytes(obj.gpu_mem)
        except ValueError as e:
            raise CompTError(f"{where}.gpu_mem: {e}") from None
    if isinstance(obj.liger, bool):  # YAML 1.1 reads a bare on/off as true/false
        obj.liger = "on" if obj.liger else "off"
    if obj.liger not in ("auto", "on", "off"):
        raise CompTError(f"{where}.liger: must be auto, on or off, got {obj.liger!r}")
    if obj.compile not in (True, False, "auto"):
        raise CompTError(f"{where}.compile: must be true, false or auto, got {obj.compile!r}")
    if obj.ds_config is not None and not Path(obj.ds_config).is_file():
        raise CompTError(f"{where}.ds_config: file not found: {obj.ds_config}")


def _validate_ifd(obj: IFDSpec, where: str) -> None:
    if isinstance(obj.alpha, dict):
        _check_alpha_schedule(obj.alpha, f"{where}.alpha")
    elif obj.alpha != "auto" and (not isinstance(obj.alpha, float) or obj.alpha < 0):
        raise CompTError(f"{where}.alpha: must be 'auto', a number >= 0 or {{schedule: linear, start, end}}, "
                         f"got {obj.alpha!r}")
    if obj.ratio <= 0:
        raise CompTError(f"{where}.ratio: must be positive")
    if obj.calib_batches <= 0:
        raise CompTError(f"{where}.calib_batches: must be positive")


def _validate_growth(obj: GrowthSpec, where: str) -> None:
    if obj.width not in WIDTH_OPS:
        raise CompTError(f"{where}.width: unknown operator {obj.width!r} (known: {', '.join(WIDTH_OPS)})")
    if obj.depth not in DEPTH_OPS:
        raise CompTError(f"{where}.depth: unknown operator {obj.depth!r} (known: {', '.join(DEPTH_OPS)})")


def _validate_data(obj: DataSpec) -> None:
    if obj.corpus not in obj.CORPORA:
        raise CompTError(f"data.corpus: must be {' or '.join(map(repr, obj.CORPORA))}, got {obj.corpus!r}")
    if obj.corpus == "files":
        if not obj.paths:
            raise CompTError("data.paths: corpus 'files' needs at least one path")
        for p in obj.paths:
            if not Path(p).exists():
                raise CompTError(f"data.paths: file not found: {p}")
            if Path(p).is_file() and Path(p).stat().st_size == 0:
                raise CompTError(f"data.paths: empty file: {p}")
    if obj.cache_dir is not None and Path(obj.cache_dir).exists() and not Path(obj.cache_dir).is_dir():
        raise CompTError(f"data.cache_dir: exists and is not a directory: {obj.cache_dir}")
    if not 0 < obj.val_fraction < 0.5:
        raise CompTError(f"data.val_fraction: must be in (0, 0.5), got {obj.val_fraction}")
    if obj.max_chars <= 0:
        raise CompTError("data.max_chars: must be positive")
    if isinstance(obj, ImageTextDataSpec):
        for k in ("captions_per_image", "caption_variants"):
            if getattr(obj, k) < 1:
                raise CompTError(f"data.{k}: must be >= 1, got {getattr(obj, k)}")
    if isinstance(obj, TextDataSpec):
        _validate_text_data(obj)


def _validate_text_data(obj: TextDataSpec) -> None:
    if obj.num_proc is not None and obj.num_proc < 1:
        raise CompTError(f"data.num_proc: must be >= 1, got {obj.num_proc}")
    if obj.tokenizer != "train" and not (Path(obj.tokenizer).is_dir() and any(
            (Path(obj.tokenizer) / f).is_file() for f in TOKENIZER_FILES)):
        raise CompTError(f"data.tokenizer: not 'train' and not a tokenizer directory (none of "
                         f"{', '.join(TOKENIZER_FILES)}): {obj.tokenizer}")
    if obj.vocab_size < 256:
        raise CompTError(f"data.vocab_size: must be >= 256, got {obj.vocab_size}")
    if obj.seq_len < 8:
        raise CompTError(f"data.seq_len: must be >= 8, got {obj.seq_len}")


def _resolve_path(p: str, base: Path) -> str:
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base / q))


def _derived_model(st: StageSpec, earlier: list[StageSpec], where: str, key: str) -> None:
    """A `grow_to:` stage: validate the factors, label its model after the predecessor."""
    from .grow.targets import describe, parse_grow_to
    if st.model:
        raise CompTError(f"{where}: give either model: or grow_to:, not both")
    if key != "stages" or not earlier:
        raise CompTError(f"{where}.grow_to: needs a predecessor stage (not on the first stage or a baseline)")
    parse_grow_to(st.grow_to, f"{where}.grow_to")
    st.model = f"{earlier[-1].name} ({describe(st.grow_to)})"   # a label, unique per predecessor


def _data_paths(data_raw: dict, base_dir: Path) -> dict:
    """The `data:` section with its relative paths resolved against the spec's folder."""
    data_raw = dict(data_raw)
    if "paths" in data_raw and isinstance(data_raw["paths"], list):
        data_raw["paths"] = [_resolve_path(str(p), base_dir) for p in data_raw["paths"]]
    for key in ("shards", "val_shards"):   # URLs, '::'-joined patterns; local ones resolve like paths
        if key in data_raw:
            from .shard_urls import resolve_patterns
            try:
                data_raw[key] = resolve_patterns(data_raw[key], base_dir)
            except CompTError as e:
                raise CompTError(f"data.{key}: {e}") from None
    if isinstance(data_raw.get("tokenizer"), str) and data_raw["tokenizer"] not in ("train", "auto"):
        data_raw["tokenizer"] = _resolve_path(data_raw["tokenizer"], base_dir)
    return data_raw


def _stage(s: Any, key: str, i: int, earlier: list[StageSpec], base_dir: Path) -> StageSpec:
    """One entry of `stages:` / `baselines:`, validated, its paths resolved."""
    st = _build(StageSpec, s, f"{key}[{i}]")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]*", st.name) or st.name in RESERVED_STAGE_NAMES:
        raise CompTError(f"{key}[{i}].name: {st.name!r} must be letters, digits, '-' and '_', not starting "
                         f"with '-', and not one of the run's own entries ({', '.join(RESERVED_STAGE_NAMES)})")
    if st.init is not None:
        st.init = _resolve_path(st.init, base_dir)
        if not (Path(st.init) / "config.json").is_file():
            raise CompTError(f"{key}[{i}].init: not a Hugging Face model dir (no config.json): {st.init}")
    if st.grow_to:
        _derived_model(st, earlier, f"{key}[{i}]", key)
    elif st.model is None:
        if st.init is None:
            raise CompTError(f"{key}[{i}].model: required field is missing (or give init: or grow_to:)")
        st.model = st.init
    elif st.model.endswith(".json") or "/" in st.model:
        st.model = _resolve_path(st.model, base_dir)
    if st.tokens is not None and (st.tokens < 0 or (st.tokens == 0 and st.init is None)):
        raise CompTError(f"{key}[{i}].tokens: budget must be positive, got {st.tokens}"
                         + (" (0 is only for an init: model used as-is)" if st.tokens == 0 else ""))
    return st


def _stages(raw: dict, key: str, base_dir: Path) -> list[StageSpec]:
    items = raw.get(key) or []
    if not isinstance(items, list):
        raise CompTError(f"spec.{key}: expected a list of stages")
    out: list[StageSpec] = []
    for i, s in enumerate(items):
        out.append(_stage(s, key, i, out, base_dir))
    return out


def _tokenizer_from_init(data_raw: dict, family: str, stages: list[StageSpec]) -> None:
    """`data.tokenizer: auto` (the default when stage 0 has an init: model): the init model's own."""
    if "tokenizer" not in {f.name for f in fields(DATA_SPECS[family])}:
        return
    inits = [s.init for s in stages if s.init]
    if "tokenizer" not in data_raw and stages and stages[0].init:
        data_raw["tokenizer"] = "auto"
    if data_raw.get("tokenizer") == "auto":
        if not inits:
            raise CompTError("data.tokenizer: 'auto' takes the tokenizer of a stage's init: model, and no stage has one")
        data_raw["tokenizer"] = inits[0]


def parse_chain(raw: Any, source: str | None = None, base_dir: Path | None = None) -> ChainSpec:
    """Build and validate a ChainSpec from parsed YAML. Relative paths resolve against base_dir."""
    base_dir = base_dir or Path.cwd()
    if not isinstance(raw, dict):
        raise CompTError(f"{source or 'spec'}: top level must be a mapping of fields")
    _check_keys(raw, ChainSpec, "spec")
    for req in ("name", "stages"):
        if req not in raw:
            raise CompTError(f"spec.{req}: required field is missing")
    data_raw = _data_paths(raw.get("data") or {}, base_dir)
    train_raw = dict(raw.get("train") or {})
    if isinstance(train_raw.get("ds_config"), str):
        train_raw["ds_config"] = _resolve_path(train_raw["ds_config"], base_dir)
    family = _coerce(raw.get("family", "hf_decoder"), "str", "spec.family")
    load_env_families()
    if family not in DATA_SPECS:
        raise CompTError(f"spec.family: unknown family {family!r} (known: {', '.join(DATA_SPECS)})")
    stages, baselines = _stages(raw, "stages", base_dir), _stages(raw, "baselines", base_dir)
    _tokenizer_from_init(data_raw, family, stages)
    name = _coerce(raw["name"], "str", "spec.name")
    if not NAME_RE.fullmatch(name):
        raise CompTError(f"spec.name: {name!r} must be letters, digits, '-', '_' or '.' (not starting with "
                         "'-' or '.')")
    spec = ChainSpec(
        name=name, stages=stages, baselines=baselines, family=family,
        seed=_coerce(raw.get("seed", 0), "int", "spec.seed"),
        nproc=_coerce(raw.get("nproc", 1), "int", "spec.nproc"),
        data=_build(DATA_SPECS[family], data_raw, "data"),
        train=_build(TrainSpec, train_raw, "train"),
        ifd=_build(IFDSpec, raw.get("ifd") or {}, "ifd"),
        growth=_build(GrowthSpec, raw.get("growth") or {}, "growth"),
        budget=_build(BudgetSpec, raw["budget"], "budget") if raw.get("budget") is not None else None,
        source=source,
    )
    validate_chain(spec)
    return spec


def validate_chain(spec: ChainSpec) -> None:
    if not spec.stages:
        raise CompTError("spec.stages: a chain needs at least one stage")
    if spec.nproc <= 0:
        raise CompTError(f"spec.nproc: must be positive, got {spec.nproc}")
    if not 0 <= spec.seed < 2**32:   # numpy's and Python's RNGs take no negative seed
        raise CompTError(f"spec.seed: must be in 0..{2**32 - 1}, got {spec.seed}")
    names = [s.name for s in spec.stages + spec.baselines]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise CompTError(f"stages: duplicate stage name(s): {', '.join(sorted(dup))}")
    if spec.family not in FAMILY_MODULES:
        raise CompTError(f"spec.family: unknown family {spec.family!r} (known: {', '.join(FAMILY_MODULES)})")
    for i, s in enumerate(spec.stages):
        if s.grow_to and spec.family != "hf_decoder":
            raise CompTError(f"stages[{i}].grow_to: derived targets are for hf_decoder chains; give model:")
    _validate_section(spec.data, "data")
    _validate_section(spec.train, "train")
    _validate_section(spec.ifd, "ifd")
    _validate_section(spec.growth, "growth")
    for s in spec.stages + spec.baselines:
        spec.train_for(s), spec.ifd_for(s), spec.growth_for(s)
    if spec.budget is not None:
        if spec.budget.baseline_tokens <= 0:
            raise CompTError("budget.baseline_tokens: must be positive")
        if spec.budget.target_speedup <= 1.0:
            raise CompTError("budget.target_speedup: must be > 1")
    else:
        for i, s in enumerate(spec.stages + spec.baselines):
            if s.tokens is None:
                where = f"stages[{i}]" if i < len(spec.stages) else f"baselines[{i - len(spec.stages)}]"
                raise CompTError(f"{where}.tokens: missing budget (give tokens, or a top-level budget:)")
    from .spec_rules import check_init_rules
    check_init_rules(spec)
    # Model-level checks (presets exist, each successor larger, head_dim divisibility, vocab) and
    # budget filling are the chain step compt_scale.chain.resolve, run by every command before use.


def load_chain(path: str | Path) -> ChainSpec:
    p = Path(path)
    if p.exists() and not p.is_file():
        raise CompTError(f"chain spec {p}: not a file")
    if not p.is_file():
        raise CompTError(f"chain spec not found: {p}")
    try:
        raw = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except OSError as e:
        raise CompTError(f"chain spec {p}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise CompTError(f"chain spec {p}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise CompTError(f"chain spec {p}: nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise CompTError(f"{p}: invalid YAML{at}: {problem}") from None
    return parse_chain(raw, source=str(p.resolve()), base_dir=p.resolve().parent)
