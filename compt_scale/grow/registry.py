"""The registry: layouts (what each architecture's tensors are) + generic width/depth operators.

`plan` resolves every target tensor to (source tensor, spec, whether it is zeroed); `grow_tensor`
applies the width operator to one tensor. Everything above (in-memory `grow_state`, streaming over
shards, ZeRO-3 in-engine growth) is a loop over `plan` + `grow_tensor`, one tensor at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CompTError
from .axes import CLONE_FIXED_KINDS, CLONED_KINDS, Source, TensorSpec, factor_sizes, kind, parse_spec, place
from .layout import Layout
from .ops import DEPTH_OPS, WIDTH_OPS

# ---------------------------------------------------------------- depth operators

def depth_map(depth: str, n_src: int, n_tgt: int) -> list[tuple[int | None, bool]]:
    """For each target layer: (source layer, or None to keep the student's own init; zero its
    residual output projections). `constant` and `interval` are the paper's depth ablations (App.
    D.1, Fig. A (d), (e)): the first p of q layers from the source, or source layer i at target
    layer ceil(i q / p) (the first copy `duplicate` makes of it); the other layers keep their init."""
    if depth == "duplicate":   # the paper: L -> 2L gives 0,0,1,1,...
        return [(j * n_src // n_tgt, False) for j in range(n_tgt)]
    if depth == "stack":       # G_stack: the whole stack repeated
        return [(j % n_src, False) for j in range(n_tgt)]
    if depth == "zero":        # source layers kept in order, new layers are identity residual blocks
        return [(j, False) if j < n_src else (j * n_src // n_tgt, True) for j in range(n_tgt)]
    if depth == "constant":
        return [(j, False) if j < n_src else (None, False) for j in range(n_tgt)]
    if depth == "interval":
        at = {-(-i * n_tgt // n_src): i for i in range(n_src)}
        return [(at.get(j), False) for j in range(n_tgt)]
    raise CompTError(f"unknown depth operator {depth!r} (known: {', '.join(DEPTH_OPS)})")


# ---------------------------------------------------------------- checks

def layout_for(config) -> Layout:
    from .layouts import get_layout
    return get_layout(config)


def check_growable(src_config, tgt_config, width: str, depth: str) -> None:
    """Config-only: raise a one-line CompTError if this growth is impossible."""
    if width not in WIDTH_OPS:
        raise CompTError(f"unknown width operator {width!r} (known: {', '.join(WIDTH_OPS)})")
    if depth not in DEPTH_OPS:
        raise CompTError(f"unknown depth operator {depth!r} (known: {', '.join(DEPTH_OPS)})")
    src_l, tgt_l = layout_for(src_config), layout_for(tgt_config)
    if src_l.name != tgt_l.name:
        raise CompTError(f"architecture {tgt_l.name!r} differs from the source's {src_l.name!r}")
    s, t = src_l.sizes(src_config), tgt_l.sizes(tgt_config)
    for name in s:
        a, b = s[name], t[name]
        k = kind(name)
        if k == "vocab" and a != b:
            raise CompTError(f"vocab mismatch: source {name}={a}, target {b} (the chain shares one tokenizer)")
        if k == "qpg" and b < a:
            raise CompTError(f"q-heads-per-kv-head grouping {a} -> {b} cannot be preserved "
                             "(grow kv heads by at most the heads' ratio)")
        if b < a:
            raise CompTError(f"target shrinks {name} from {a} to {b}; growth can only keep or enlarge axes")
        if width == "clone" and a != b:
            if k in CLONE_FIXED_KINDS:
                raise CompTError(f"width 'clone' cannot change {name} ({a} -> {b}): only 'insert' can "
                                 "(clone keeps head_dim so attention is unchanged)")
            if k in CLONED_KINDS and b % a:
                raise CompTError(f"width 'clone' needs an integer ratio: {name} {a} -> {b}")
        if k == "qpg" and width == "clone" and b % a:
            raise CompTError(f"q-heads-per-kv-head grouping {a} -> {b}: not an integer ratio for clone")


# ---------------------------------------------------------------- planning

def clone_unties(layout: Layout, s_sizes: dict, t_sizes: dict, width: str, tgt_config) -> bool:
    """Whether this growth must untie tied embeddings: cloning splits the output head (each copy
    scaled by 1/copies) but duplicates the input embedding, so once an axis of the tied tensors grows
    they differ and can no longer share storage. A growth that keeps those axes (depth only) keeps
    the model tied: untying would add a vocab x hidden matrix for nothing."""
    if width != "clone" or not layout.is_tied(tgt_config):
        return False
    factors = {f for key in layout.tied for f in parse_spec(layout.tensors[key]).factors}
    return any(s_sizes.get(f) != t_sizes.get(f) for f in factors)


@dataclass
class Step:
    key: str                 # target key
    src_key: str | None      # None: zeroed entirely (new layer's residual output)
    spec: TensorSpec
    zero: bool
    alias_of: str | None = None   # target key that this tied key shares storage with


def plan(src_config, tgt_config, tgt_keys, width: str, depth: str, noise_snr: float | None = None):
    """Resolve every target key. Returns (steps, report skeleton, layout)."""
    check_growable(src_config, tgt_config, width, depth)
    if noise_snr is not None and (width != "clone" or not noise_snr > 0):
        raise CompTError(f"noise_snr={noise_snr}: symmetry-breaking noise needs width 'clone' and a positive SNR")
    layout = layout_for(tgt_config)
    s_sizes, t_sizes = layout.sizes(src_config), layout.sizes(tgt_config)
    dmaps = {st: depth_map(depth, s_sizes[st], t_sizes[st]) for st in layout.stacks}
    untie = clone_unties(layout, s_sizes, t_sizes, width, tgt_config)
    steps = []
    for key in tgt_keys:
        tmpl, spec, stack, i = layout.match(key)
        zero = False
        src_key = key
        if stack is not None:
            src_i, zero = dmaps[stack][i]
            src_key = None if src_i is None else tmpl.replace("{" + stack + "}", str(src_i))
            zero = zero and spec.res
        alias = None
        if key in layout.tied and layout.is_tied(tgt_config) and not untie:
            alias = layout.tied[key]
        steps.append(Step(key, None if zero else src_key, spec, zero, alias))
    report = {
        "layout": layout.name, "width": width, "depth": depth,
        "sizes": {k: [s_sizes[k], t_sizes[k]] for k in t_sizes},
        "depth_map": {st: [m[0] for m in dm] for st, dm in dmaps.items()},
        "zeroed_layers": {st: [j for j, m in enumerate(dm) if m[1]] for st, dm in dmaps.items()},
        "init_layers": {st: [j for j, m in enumerate(dm) if m[0] is None] for st, dm in dmaps.items()},
        # Cloning splits the output head (hidden / copies) but duplicates the input embedding, so
        # they can no longer share storage: the output is untied and the target config must say so.
        "untied_embeddings": bool(layout.tied) and layout.is_tied(src_config) and (untie or not layout.is_tied(tgt_config)),
        "config_changes": {"tie_word_embeddings": False} if untie else {},
        "tensors": {},
    }
    return steps, report, layout


def source_key(layout: Layout, src_config, key: str, available) -> str:
    """The source tensor for `key`: itself, its on-disk name, or (only when the source config ties
    them) the tensor it shares storage with. An untied source missing the key is an error, never a
    silent read of another tensor."""
    for k in (key, layout.saved_as.get(key)):
        if k is not None and k in available:
            return k
    if key in layout.tied and layout.is_tied(src_config) and layout.tied[key] in available:
        return layout.tied[key]
    raise CompTError(f"source checkpoint has no tensor {key!r}")


def grow_tensor(step: Step, src: Source | None, out: torch.Tensor, layout: Layout, src_config, tgt_config,
                width: str, noise_snr=None, generator=None) -> dict:
    """Grow one tensor into `out` (holding the student's init), in place; returns its report entry."""
    if step.zero:
        out.zero_()
        return {"from": None, "op": "zeroed (new layer's residual output)"}
    if src is None:
        return {"from": None, "op": "student init (a layer the depth operator leaves new)"}
    s_sizes, t_sizes = layout.sizes(src_config), layout.sizes(tgt_config)
    src_fs = factor_sizes(step.spec, s_sizes, src.shape, f"source {step.src_key}")
    tgt_fs = factor_sizes(step.spec, t_sizes, tuple(out.shape), f"target {step.key}")
    for (_, fs), a, b in zip(step.spec.dims, src_fs, tgt_fs, strict=True):
        for f, x, y in zip(fs, a, b, strict=True):
            if f == "_" and x != y:
                raise CompTError(f"{step.key}: fixed size changes {x} -> {y} (patch/grid/context size must match)")
    info = place(out, src, step.spec, src_fs, tgt_fs, width, noise_snr if width == "clone" else None, generator)
    entry = {"from": step.src_key, "op": width, "src_shape": list(src.shape), "shape": list(out.shape)}
    if info.get("scale", 1.0) != 1.0:
        entry["scale"] = info["scale"]
    if info.get("noise_sigma"):
        entry["noise_sigma"] = info["noise_sigma"]
    return entry


def grow_state(src_state: dict, src_config, tgt_config, tgt_state: dict, width: str = "insert",
               depth: str = "duplicate", noise_snr: float | None = None,
               generator: torch.Generator | None = None):
    """Grow a source state dict into the target's shapes, starting from the student's own init.

    Returns (state, report): `state` has exactly tgt_state's keys and shapes (fresh tensors; tied
    keys share one tensor unless clone untied them, see report["config_changes"]).
    """
    steps, report, layout = plan(src_config, tgt_config, list(tgt_state), width, depth, noise_snr)
    out = {}
    for st in steps:
        if st.alias_of is not None and st.alias_of in tgt_state:
            continue  # filled after its canonical key
        t = tgt_state[st.key].detach().clone()
        src = None
        if st.src_key is not None:
            k = source_key(layout, src_config, st.src_key, src_state)
            src = Source(src_state[k].detach())
            st.src_key = k
        report["tensors"][st.key] = grow_tensor(st, src, t, layout, src_config, tgt_config, width,
                                                noise_snr, generator)
        out[st.key] = t
    for st in steps:
        if st.key not in out:
            out[st.key] = out[st.alias_of]
            report["tensors"][st.key] = {"tied_to": st.alias_of}
    return {k: out[k] for k in tgt_state}, report
