"""Typed chain specs, validated when loaded.

A chain spec is YAML. Every problem is reported as one CompTError naming the field, e.g.
`stages[1].model: 'llama-s' is not larger than its predecessor 'llama-m'`, before anything is written.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import CompTError

WIDTH_OPS = ("insert", "clone")
DEPTH_OPS = ("duplicate", "stack", "zero")


@dataclass
class DataSpec:
    corpus: str = "stdlib"            # decoders: "stdlib" (Python's own source + docs) or "files";
                                      # open_clip: "shapes" (scenes rendered here) or "files" (CSV)
    paths: list[str] = field(default_factory=list)   # txt / jsonl / parquet (decoders), csv (open_clip)
    text_field: str = "text"
    image_field: str = "filepath"     # open_clip: the CSV column with image paths
    image_size: int = 64              # open_clip: images are resized to this
    num_samples: int = 20000          # open_clip "shapes": how many image-caption pairs to render
    tokenizer: str = "train"          # "train" (SentencePiece trained here) or an HF tokenizer dir
    vocab_size: int = 4096
    seq_len: int = 128
    val_fraction: float = 0.02
    max_chars: int = 6_000_000        # cap on the corpus size, so small demos stay small
    cache_dir: str | None = None      # default: <out>/data
    doc_mask: bool = True             # decoders: positions restart after each EOS, attention stays in its document
    num_proc: int | None = None       # tokenizer processes (datasets.map); default min(8, CPU count)


@dataclass
class TrainSpec:
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    zero_stage: int | str = "auto"     # 0-3, or "auto": the ds_configs preset picked by size
    ds_config: str | None = None       # explicit DeepSpeed JSON (overrides the preset)
    precision: str = "fp32"            # fp32 | bf16
    activation_checkpointing: bool = False  # recompute each layer in backward (non-reentrant)
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    log_every: int = 10


@dataclass
class IFDSpec:
    alpha: float | str = "auto"        # a number, or "auto": L_ifd ~= ratio * L_task on calib batches
    ratio: float = 0.1
    calib_batches: int = 4
    enabled: bool = True


@dataclass
class GrowthSpec:
    width: str = "insert"
    depth: str = "duplicate"


@dataclass
class StageSpec:
    name: str
    model: str = ""                    # preset name (configs/models/<name>.json) or a config.json path
    tokens: int | None = None          # training budget in tokens
    train: dict = field(default_factory=dict)   # per-stage overrides of TrainSpec fields
    growth: dict = field(default_factory=dict)  # per-stage overrides of GrowthSpec fields
    ifd: dict = field(default_factory=dict)     # per-stage overrides of IFDSpec fields
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
    data: DataSpec = field(default_factory=DataSpec)
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
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise CompTError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if t in ("float", "<class 'float'>"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)  # YAML reads 3e-4 as a string
            except (TypeError, ValueError):
                raise CompTError(f"{where}: expected a number, got {value!r}") from None
        return float(value)
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
    if t == "float | str":
        if isinstance(value, str) and value != "auto":
            try:
                return float(value)
            except ValueError:
                raise CompTError(f"{where}: expected a number or 'auto', got {value!r}") from None
        return value if isinstance(value, str) else _coerce(value, "float", where)
    if t == "int | str":
        return value if isinstance(value, str) else _coerce(value, "int", where)
    if t.startswith("list"):
        if not isinstance(value, list):
            raise CompTError(f"{where}: expected a list, got {value!r}")
        return [str(v) for v in value]
    if t == "dict":
        if not isinstance(value, dict):
            raise CompTError(f"{where}: expected a mapping, got {value!r}")
        return value
    return value


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


def _validate_section(obj, where: str) -> None:
    if isinstance(obj, TrainSpec):
        for k in ("micro_batch_size", "grad_accum", "eval_every", "eval_batches", "save_every", "log_every"):
            if getattr(obj, k) <= 0:
                raise CompTError(f"{where}.{k}: must be positive, got {getattr(obj, k)}")
        if obj.warmup_steps < 0:
            raise CompTError(f"{where}.warmup_steps: must be >= 0")
        if not obj.lr > 0 or not math.isfinite(obj.lr):
            raise CompTError(f"{where}.lr: must be a positive number, got {obj.lr}")
        if not 0 <= obj.min_lr_ratio <= 1:
            raise CompTError(f"{where}.min_lr_ratio: must be in [0, 1]")
        if obj.zero_stage != "auto" and obj.zero_stage not in (0, 1, 2, 3):
            raise CompTError(f"{where}.zero_stage: must be 0, 1, 2, 3 or 'auto', got {obj.zero_stage!r}")
        if obj.precision not in ("fp32", "bf16"):
            raise CompTError(f"{where}.precision: must be fp32 or bf16, got {obj.precision!r}")
        if obj.ds_config is not None and not Path(obj.ds_config).is_file():
            raise CompTError(f"{where}.ds_config: file not found: {obj.ds_config}")
    elif isinstance(obj, IFDSpec):
        if obj.alpha != "auto" and (not isinstance(obj.alpha, float) or obj.alpha < 0):
            raise CompTError(f"{where}.alpha: must be 'auto' or a number >= 0, got {obj.alpha!r}")
        if obj.ratio <= 0:
            raise CompTError(f"{where}.ratio: must be positive")
        if obj.calib_batches <= 0:
            raise CompTError(f"{where}.calib_batches: must be positive")
    elif isinstance(obj, GrowthSpec):
        if obj.width not in WIDTH_OPS:
            raise CompTError(f"{where}.width: unknown operator {obj.width!r} (known: {', '.join(WIDTH_OPS)})")
        if obj.depth not in DEPTH_OPS:
            raise CompTError(f"{where}.depth: unknown operator {obj.depth!r} (known: {', '.join(DEPTH_OPS)})")
    elif isinstance(obj, DataSpec):
        if obj.corpus not in ("stdlib", "files", "shapes"):
            raise CompTError(f"data.corpus: must be 'stdlib', 'shapes' or 'files', got {obj.corpus!r}")
        if obj.corpus == "files":
            if not obj.paths:
                raise CompTError("data.paths: corpus 'files' needs at least one path")
            for p in obj.paths:
                if not Path(p).exists():
                    raise CompTError(f"data.paths: file not found: {p}")
        if obj.tokenizer != "train" and not Path(obj.tokenizer).is_dir():
            raise CompTError(f"data.tokenizer: not 'train' and not a tokenizer directory: {obj.tokenizer}")
        if obj.vocab_size < 256:
            raise CompTError(f"data.vocab_size: must be >= 256, got {obj.vocab_size}")
        if obj.seq_len < 8:
            raise CompTError(f"data.seq_len: must be >= 8, got {obj.seq_len}")
        if not 0 < obj.val_fraction < 0.5:
            raise CompTError(f"data.val_fraction: must be in (0, 0.5), got {obj.val_fraction}")
        if obj.max_chars <= 0:
            raise CompTError("data.max_chars: must be positive")
        if obj.num_proc is not None and obj.num_proc < 1:
            raise CompTError(f"data.num_proc: must be >= 1, got {obj.num_proc}")


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


def parse_chain(raw: Any, source: str | None = None, base_dir: Path | None = None) -> ChainSpec:
    """Build and validate a ChainSpec from parsed YAML. Relative paths resolve against base_dir."""
    base_dir = base_dir or Path.cwd()
    if not isinstance(raw, dict):
        raise CompTError(f"{source or 'spec'}: top level must be a mapping of fields")
    _check_keys(raw, ChainSpec, "spec")
    for req in ("name", "stages"):
        if req not in raw:
            raise CompTError(f"spec.{req}: required field is missing")
    raw = dict(raw)
    data_raw = dict(raw.get("data") or {})
    if "paths" in data_raw and isinstance(data_raw["paths"], list):
        data_raw["paths"] = [_resolve_path(str(p), base_dir) for p in data_raw["paths"]]
    if isinstance(data_raw.get("tokenizer"), str) and data_raw["tokenizer"] != "train":
        data_raw["tokenizer"] = _resolve_path(data_raw["tokenizer"], base_dir)
    train_raw = dict(raw.get("train") or {})
    if isinstance(train_raw.get("ds_config"), str):
        train_raw["ds_config"] = _resolve_path(train_raw["ds_config"], base_dir)

    def stages_of(key: str) -> list[StageSpec]:
        items = raw.get(key) or []
        if not isinstance(items, list):
            raise CompTError(f"spec.{key}: expected a list of stages")
        out = []
        for i, s in enumerate(items):
            st = _build(StageSpec, s, f"{key}[{i}]")
            if not st.name or not all(c.isalnum() or c in "-_." for c in st.name):
                raise CompTError(f"{key}[{i}].name: {st.name!r} must be non-empty letters, digits, '-', '_' or '.'")
            if st.grow_to:
                _derived_model(st, out, f"{key}[{i}]", key)
            elif not st.model:
                raise CompTError(f"{key}[{i}].model: required field is missing (or give grow_to:)")
            elif st.model.endswith(".json") or "/" in st.model:
                st.model = _resolve_path(st.model, base_dir)
            if st.tokens is not None and st.tokens <= 0:
                raise CompTError(f"{key}[{i}].tokens: budget must be positive, got {st.tokens}")
            out.append(st)
        return out

    spec = ChainSpec(
        name=_coerce(raw["name"], "str", "spec.name"),
        stages=stages_of("stages"),
        baselines=stages_of("baselines"),
        family=_coerce(raw.get("family", "hf_decoder"), "str", "spec.family"),
        seed=_coerce(raw.get("seed", 0), "int", "spec.seed"),
        nproc=_coerce(raw.get("nproc", 1), "int", "spec.nproc"),
        data=_build(DataSpec, data_raw, "data"),
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
    names = [s.name for s in spec.stages + spec.baselines]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise CompTError(f"stages: duplicate stage name(s): {', '.join(sorted(dup))}")
    from .families import FAMILIES
    if spec.family not in FAMILIES:
        raise CompTError(f"spec.family: unknown family {spec.family!r} (known: {', '.join(FAMILIES)})")
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
    # Model-level checks (presets exist, each successor larger, head_dim divisibility, vocab) need the
    # family; they live there so a new family brings its own rules.
    from .families import get_family
    get_family(spec.family).validate_chain(spec)
    if spec.budget is not None:
        from .chain.planner import fill_budgets
        fill_budgets(spec)


def load_chain(path: str | Path) -> ChainSpec:
    p = Path(path)
    if not p.is_file():
        raise CompTError(f"chain spec not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise CompTError(f"{p}: invalid YAML{at}: {problem}") from None
    return parse_chain(raw, source=str(p.resolve()), base_dir=p.resolve().parent)
