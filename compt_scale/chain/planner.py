"""Chain planning: per-stage training cost, the paper's design rules, and budget filling.

Rule 1 (the smallest model sized to the data) is checked as tokens per parameter of the first model;
rule 2 (expansion ratio 2x-4x between consecutive models) is checked and warned about; rule 3 (m1 on
the standard budget, the grown models' budgets decreasing linearly) is how `fill_budgets` shapes the
budgets when the spec gives only `budget: {baseline_tokens, target_speedup}`. The cost model is compt_scale.flops
(paper, appendix C.2): the chain's cost includes every stage's own training and its teacher's forwards.
"""
from __future__ import annotations

from ..errors import CompTError
from ..families import get_family
from ..flops import human
from ..train import lr_rule

TARGET_TOLERANCE = 0.05  # how far (relative) step rounding may move the predicted speedup off target


def _plan(spec, stage, world: int | None = None, tokens: int | None = None):
    from .plan import plan_stage
    return plan_stage(spec, stage.name, world, tokens=tokens)


def samples_per_step(spec, stage, world: int | None = None, train=None) -> int:
    """Samples in one optimizer step of `stage` on `world` ranks (default: the spec's nproc)."""
    from .plan import samples_per_step as per_step
    return per_step(spec, train or spec.train_for(stage), spec.nproc if world is None else world)


def tokens_per_step(spec, stage, world: int | None = None) -> int:
    """Budget units (decoders: tokens; CLIP: image-caption pairs) consumed by one optimizer step."""
    return samples_per_step(spec, stage, world) * get_family(spec.family).tokens_per_sample(spec)


def stage_cost(spec, stage, tokens: int, world: int | None = None) -> dict:
    """MACs of `stage` trained on `tokens`, teacher forwards included when its plan has a teacher
    (IFD on: the predecessor only initializing the weights costs nothing per token)."""
    return _plan(spec, stage, world, tokens).cost()


def baseline_cost(spec, tokens: int) -> dict:
    """The largest chain model trained independently (no teacher) for `tokens`."""
    fam, largest = get_family(spec.family), spec.stages[-1]
    samples = samples_per_step(spec, largest)
    per_step = fam.stage_macs(fam.plan_config(spec, largest), None, spec, samples)
    from .plan import steps_for_tokens
    steps = steps_for_tokens(tokens, samples * fam.tokens_per_sample(spec))
    return {k: v * steps for k, v in per_step.items() if k in ("train_macs", "teacher_macs", "macs")}


def budget_weights(n: int) -> list[int]:
    """Rule 3's shape for a chain of n models: m1 is not on the ramp (it gets the standard budget);
    the n-1 grown models get budgets proportional to n, n-1, ..., 2 - equal decrements, the largest
    model keeping two of them. This is the paper's CC3M allocation: ViT-T 128 epochs, then ViT-S/B/L
    24, 18, 12 epochs = 6 x (4, 3, 2) (Table 4a; the measured minima, Fig. 8, are 23.45, 18.28, 12.34)."""
    return [n + 1 - i for i in range(1, n)]


def resolve_budgets(spec) -> tuple[list[int], dict[str, str]]:
    """Rule 3: every chain stage's tokens from `spec.budget` (the spec is not changed), and what set
    each one. Returns (tokens per chain stage, {stage name: basis}).

    m1 (the first, smallest model) gets the standard budget, budget.baseline_tokens, as individual
    training would (the paper trains ViT-T for the baseline's 128 epochs). The grown models i = 1..n-1
    get tokens_i = s * w_i with w = budget_weights(n), a linear decrease. The scale s is solved so that
    the chain's predicted MACs = baseline cost / target_speedup, where the baseline is the largest
    model trained alone on budget.baseline_tokens (the paper's "relax the ratio and scale every
    model's epochs proportionally" is exactly a change of s). Each grown model's budget is then rounded
    to whole optimizer steps; the target is infeasible (CompTError) when m1 alone already costs the
    target, when a stage would get less than one step, or when the rounded plan's speedup is more than
    TARGET_TOLERANCE off the target. An explicit stage `tokens` other than the filled value is an error.
    """
    b, n = spec.budget, len(spec.stages)
    target = baseline_cost(spec, b.baseline_tokens)["macs"] / b.target_speedup
    first_cost = stage_cost(spec, spec.stages[0], b.baseline_tokens)["macs"]
    if n > 1 and first_cost >= target:
        raise CompTError(
            f"budget.target_speedup: {b.target_speedup:g}x is infeasible: the first model {spec.stages[0].name!r} "
            f"alone on the standard budget costs {human(first_cost)} MACs, more than the target's {human(target)}; "
            f"lower the target or start the chain with a smaller model")
    # Cost is linear in tokens on whole steps: per-token cost = cost of one step / tokens of one step.
    tps = [tokens_per_step(spec, st) for st in spec.stages]
    per_token = [stage_cost(spec, st, tps[i])["macs"] / tps[i] for i, st in enumerate(spec.stages) if i]
    weights = budget_weights(n)
    scale = (target - first_cost) / sum(w * c for w, c in zip(weights, per_token, strict=True)) if n > 1 else 0
    filled = [b.baseline_tokens]   # exactly the baseline's budget: the same steps as individual training
    basis = {spec.stages[0].name: "rule 3: m1 gets the standard budget (budget.baseline_tokens)"}
    for st, w, step_tokens in zip(spec.stages[1:], weights, tps[1:], strict=True):
        steps = round(scale * w / step_tokens)
        if steps < 1:
            raise CompTError(
                f"budget.target_speedup: {b.target_speedup:g}x is infeasible: stage {st.name!r} would get "
                f"{scale * w:.0f} tokens, less than one optimizer step ({step_tokens} tokens); lower the target "
                f"or raise budget.baseline_tokens")
        filled.append(steps * step_tokens)
        basis[st.name] = f"rule 3: linear decrease, {w} x {scale:,.0f} tokens (scale solved for {b.target_speedup:g}x)"
    _check_rounding(spec, filled, tps, target)
    for i, (st, tokens) in enumerate(zip(spec.stages, filled, strict=True)):
        if st.tokens is not None and st.tokens != tokens:
            raise CompTError(f"stages[{i}].tokens: {st.tokens} given together with budget: (which sets "
                             f"{tokens}); give one or the other")
    return filled, basis


def _check_rounding(spec, filled: list[int], tps: list[int], target: float) -> None:
    """Rounding to whole steps moves the cost; when budgets are only a few steps long that can miss
    the target badly, and a plan far from what was asked for is not the plan that was asked for."""
    b = spec.budget
    cost = sum(stage_cost(spec, st, tok)["macs"] for st, tok in zip(spec.stages, filled, strict=True))
    got = target * b.target_speedup / cost
    if abs(got / b.target_speedup - 1) > TARGET_TOLERANCE:
        steps = ", ".join(str(t // s) for t, s in zip(filled, tps, strict=True))
        raise CompTError(
            f"budget.target_speedup: {b.target_speedup:g}x is infeasible at whole optimizer steps: the "
            f"closest plan ({steps} steps) gives {got:.2f}x; raise budget.baseline_tokens or lower the target")


def with_budgets(spec):
    """The spec with every budget filled from `budget:` (a new value; `spec` is not changed)."""
    from dataclasses import replace
    if spec.budget is None:
        return spec
    filled, _ = resolve_budgets(spec)
    stages = [replace(st, tokens=t) for st, t in zip(spec.stages, filled, strict=True)]
    baselines = [st if st.tokens is not None else replace(st, tokens=spec.budget.baseline_tokens)
                 for st in spec.baselines]
    return replace(spec, stages=stages, baselines=baselines)


def budget_basis(spec) -> dict[str, str]:
    """What set each chain stage's tokens (for `plan`'s "what set each number")."""
    if spec.budget is None:
        return {}
    stripped = _without_filled_tokens(spec)
    return resolve_budgets(stripped)[1]


def _without_filled_tokens(spec):
    """A resolved spec carries rule 3's values; re-deriving the basis must not see them as explicit."""
    from dataclasses import replace
    return replace(spec, stages=[replace(st, tokens=None) for st in spec.stages])


# Rule 1 (the smallest model sized to the data): for decoders, the compute-optimal data scale is
# ~20 training tokens per parameter (Chinchilla, Hoffmann et al. 2022). A first model more than
# RULE1_BAND times off that ratio either way is warned about. CLIP has no such published ratio (the
# paper finds the optimum empirically: ViT-T for CC3M, ViT-S for Merged-15M), so rule 1 is not
# checked for it.
COMPUTE_OPTIMAL_TOKENS_PER_PARAM = {"hf_decoder": 20.0}
RULE1_BAND = 4.0


def rule1_warning(family: str, tokens: int, params: int) -> str | None:
    """A warning when the first model's tokens per parameter are far from compute-optimal, else None."""
    optimal = COMPUTE_OPTIMAL_TOKENS_PER_PARAM.get(family)
    if optimal is None:
        return None
    tpp = tokens / params
    lo, hi = optimal / RULE1_BAND, optimal * RULE1_BAND
    if tpp < lo:
        return (f"{tpp:.2f} tokens/param is below the compute-optimal band {lo:g}-{hi:g} (~{optimal:g}): the "
                f"first model is large for this data; start the chain with a smaller model (rule 1)")
    if tpp > hi:
        return (f"{tpp:.1f} tokens/param is above the compute-optimal band {lo:g}-{hi:g} (~{optimal:g}): the "
                f"first model is small for this data; start the chain with a larger model (rule 1)")
    return None


def _check_tokens(spec) -> None:
    for kind, items in (("stages", spec.stages), ("baselines", spec.baselines)):
        for i, st in enumerate(items):
            if st.tokens is None:
                raise CompTError(f"{kind}[{i}].tokens: missing budget (give tokens, or a top-level budget:)")


def plan_rows(spec, world: int | None = None) -> list[dict]:
    """One dict per chain stage (kind 'chain') then per baseline (kind 'baseline'), read from the
    stages' plans on `world` ranks (default: the spec's nproc; budgets are filled for the spec's nproc).

    Chain rows: name, model, params, ratio (params / predecessor's params, None first), tokens, steps,
    train_macs, teacher_macs, macs, accumulated_macs, warnings, basis (which rule set the budget).
    Baseline rows: the same without ratio and teacher (teacher_macs 0, accumulated_macs None).
    """
    from .plan import plan_stage
    basis = budget_basis(spec)
    spec = with_budgets(spec)
    _check_tokens(spec)
    rows, acc, prev_params = [], 0, None
    for i, st in enumerate(spec.stages):
        plan = plan_stage(spec, st.name, world)
        acc += plan.cost()["macs"]
        ratio: float | None = plan.params / prev_params if prev_params else None
        rows.append(dict(kind="chain", name=st.name, model=st.model, params=plan.params, ratio=ratio,
                         tokens=plan.tokens, steps=plan.steps, **plan.cost(), accumulated_macs=acc,
                         warnings=_warnings(spec, i, plan, ratio),
                         basis=basis.get(st.name, "spec: stages[].tokens"), init=plan.init,
                         **lr_rule.describe(plan.train, plan.student, spec.family)))
        prev_params = plan.params
    for st in spec.baselines:
        plan = plan_stage(spec, st.name, world)
        rows.append(dict(kind="baseline", name=st.name, model=st.model, params=plan.params, ratio=None,
                         tokens=plan.tokens, steps=plan.steps, **plan.cost(), accumulated_macs=None, warnings=[],
                         basis="budget.baseline_tokens" if spec.budget else "spec: baselines[].tokens",
                         init=plan.init, **lr_rule.describe(plan.train, plan.student, spec.family)))
    return rows


def _warnings(spec, i: int, plan, ratio: float | None) -> list[str]:
    """The paper's rules 1 and 2, and a budget that never leaves warmup."""
    warnings = []
    used_as_is = plan.tokens == 0   # an init: model: neither trained nor sized by this chain
    if i == 0 and not used_as_is and (w := rule1_warning(spec.family, plan.tokens, plan.params)):
        warnings.append(w)
    if ratio is not None and not 2.0 <= ratio <= 4.0:
        warnings.append(f"expansion ratio {ratio:.2f}x from {spec.stages[i - 1].name!r} is outside the paper's "
                        f"2x-4x (rule 2)")
    if not used_as_is and plan.steps <= plan.train.warmup_steps:
        warnings.append(f"{plan.steps} steps do not get past warmup ({plan.train.warmup_steps} steps)")
    return warnings


def plan_summary(spec, rows: list[dict] | None = None) -> dict:
    """Chain total vs the independent baseline of the largest model, and the predicted speedup.

    The baseline is budget.baseline_tokens on the largest model when a budget is given, else a
    listed baseline of the largest model; without either there is nothing to compare (None).
    When baselines cover every chain model, `family_speedup` compares training them all independently
    against the chain, which yields all of them too.
    """
    rows = rows if rows is not None else plan_rows(spec)
    spec = with_budgets(spec)
    chain = [r for r in rows if r["kind"] == "chain"]
    bases = [r for r in rows if r["kind"] == "baseline"]
    total = chain[-1]["accumulated_macs"]
    largest = spec.stages[-1]
    source: str | None
    if spec.budget is not None:
        base, source = baseline_cost(spec, spec.budget.baseline_tokens)["macs"], \
            f"{largest.model} alone on budget.baseline_tokens={spec.budget.baseline_tokens}"
    else:
        match = [r for r in bases if r["model"] == largest.model]
        base = match[0]["macs"] if match else None
        source = f"baseline {match[0]['name']!r}" if match else None
    out = {"chain_macs": total, "baseline_macs": base, "baseline": source,
           "speedup": (base / total) if base else None, "family_baseline_macs": None, "family_speedup": None}
    by_model = {r["model"]: r["macs"] for r in bases}
    if bases and all(r["model"] in by_model for r in chain):
        fam = sum(by_model[r["model"]] for r in chain)
        out.update(family_baseline_macs=fam, family_speedup=fam / total)
    return out


def format_plan(spec, world: int | None = None) -> str:
    """The `compt-scale plan` table for `world` ranks per stage (default: the spec's nproc)."""
    rows = plan_rows(spec, world)
    s = plan_summary(spec, rows)
    spec = with_budgets(spec)
    head = f"{'stage':<14}{'model':<16}{'params':>10}{'ratio':>8}{'tokens':>14}{'steps':>8}" \
           f"{'train MACs':>12}{'teacher':>10}{'MACs':>10}{'accum.':>10}"
    unit = f"budgets in {get_family(spec.family).budget_unit}"
    ranks = spec.nproc if world is None else world
    lines = [f"chain {spec.name!r}: {len(spec.stages)} stages, {unit}, {ranks} rank(s) per stage", head, "-" * len(head)]
    for r in rows:
        if r["kind"] == "baseline" and lines[-1] != "-- independent baselines":
            lines.append("-- independent baselines")
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        acc = human(r["accumulated_macs"]) if r["accumulated_macs"] is not None else "-"
        model = r["model"] if len(r["model"]) <= 15 else "..." + r["model"][-12:]
        lines.append(f"{r['name']:<14}{model:<16}{human(r['params']):>10}{ratio:>8}{r['tokens']:>14,}"
                     f"{r['steps']:>8}{human(r['train_macs']):>12}{human(r['teacher_macs']):>10}"
                     f"{human(r['macs']):>10}{acc:>10}")
    lines.append(f"chain total: {human(s['chain_macs'])} MACs ({s['chain_macs']:.4g})")
    if s["baseline_macs"]:
        lines.append(f"independent baseline ({s['baseline']}): {human(s['baseline_macs'])} MACs")
        target = f" (target {spec.budget.target_speedup:g}x)" if spec.budget else ""
        lines.append(f"predicted speedup: {s['speedup']:.2f}x{target}")
    else:
        lines.append("independent baseline: none (add baselines: or budget:) - no speedup to predict")
    if s["family_speedup"]:
        lines.append(f"whole family trained independently: {human(s['family_baseline_macs'])} MACs, "
                     f"speedup {s['family_speedup']:.2f}x")
    lines.append("what set each number:")
    for r in rows:
        lines.append(f"  {r['name']}: tokens <- {r['basis']}")
    for r in rows:   # the learning rate per model size (train/lr_rule.py)
        lines.append(f"  {r['name']}: lr {r['lr']:.3g}, hidden matrices {r['hidden_lr']:.3g} <- {r['lr_rule']}")
    for r in rows:   # how each student starts (train/init_rule.py)
        lines.append(f"  {r['name']}: init <- {r['init']}")
    lines.append(f"  {spec.stages[0].name}: model size <- rule 1 (the smallest model sized to the data): "
                 + ("checked as tokens/param" if spec.family in COMPUTE_OPTIMAL_TOKENS_PER_PARAM
                    else f"not checked for {spec.family} (no compute-optimal ratio)"))
    if len(spec.stages) > 1:
        lines.append("  ratio <- rule 2 (2x-4x parameter steps), checked")
    for r in rows:
        for w in r["warnings"]:
            lines.append(f"warning: {r['name']}: {w}")
    return "\n".join(lines)
