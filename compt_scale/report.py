"""The report of a chain run: a terminal table, PNG plots and report.html, from the run's own records.

Inputs are only DIR/manifest.json and DIR/<stage>/metrics.jsonl (schemas in docs/internals.md), so a
report can be written for a finished, failed or still-running chain, on any machine.

The shared compute axis: a chain stage starts where the previous chain stages' MACs (their recorded
totals, teacher forwards included) end, so the chain reads as one curve whose x is the compute spent
on the whole chain so far; independent baselines start at 0. Where a baseline's curve reaches a
loss at less x than the chain's, the chain bought nothing.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

from .errors import CompTError, read_json
from .flops import human
from .quality import ahead_at_equal_tokens, describe, describe_fairness, eval_curve, matched_quality

PLOTS = {"loss": "loss_vs_macs.png", "val": "val_loss_vs_macs.png", "cost": "stage_cost.png"}


def _read_manifest(out_dir: Path) -> dict:
    path = out_dir / "manifest.json"
    if not path.is_file():
        raise CompTError(f"{out_dir}: no manifest.json (not a chain output directory)")
    data = read_json(path)
    if not isinstance(data.get("stages"), dict):
        raise CompTError(f"{path}: no 'stages' mapping")
    for name, rec in data["stages"].items():
        if not isinstance(rec, dict):
            raise CompTError(f"{path}: stages.{name}: expected a mapping, got {rec!r}")
        _check_numbers(rec, MANIFEST_NUMBERS, f"{path}: stages.{name}.")
        for key in ("status", "kind"):
            if not isinstance(rec.get(key, ""), str):
                raise CompTError(f"{path}: stages.{name}.{key}: expected a string, got {rec[key]!r}")
    return data


# Fields the report computes with; any other field is shown as text or ignored.
MANIFEST_NUMBERS = ("params", "tokens", "steps", "macs", "train_macs", "teacher_macs", "final_val_loss", "index")
METRICS_NUMBERS = ("step", "tokens", "macs", "loss", "val_loss")


def _check_numbers(rec: dict, keys, prefix: str) -> None:
    for k in keys:
        v = rec.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise CompTError(f"{prefix}{k}: expected a number, got {v!r}")


def read_metrics(path: Path) -> list[dict]:
    """A stage's metrics.jsonl records ([] if absent); a line torn by a killed writer is skipped."""
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a killed writer; the rest of the file is still good
        if not isinstance(rec, dict):
            raise CompTError(f"{path} line {i}: expected a JSON object, got {line.strip()[:40]}")
        _check_numbers(rec, METRICS_NUMBERS, f"{path} line {i}: ")
        out.append(rec)
    return out


def _stages(out_dir: Path) -> tuple[dict, list[dict]]:
    """Manifest + one record per stage, chain stages (by index) first, then baselines, each with its
    metrics lines, final values (manifest first, else the metrics' final line) and x offset."""
    manifest = _read_manifest(out_dir)
    recs = []
    for name, rec in manifest["stages"].items():
        r = dict(rec, name=name, kind=rec.get("kind", "chain"), metrics=read_metrics(out_dir / name / "metrics.jsonl"))
        final: dict = next((m for m in reversed(r["metrics"]) if m.get("final")), {})
        r["final_metrics"] = final
        for key in ("tokens", "macs", "val_loss"):
            mkey = "final_val_loss" if key == "val_loss" else key
            if r.get(mkey) is None and final.get(key) is not None:
                r[mkey] = final[key]
        for axis in ("macs", "gpu_seconds"):
            if r.get(axis) is None and r["metrics"]:
                r[axis] = max((m.get(axis) or 0) for m in r["metrics"]) or None
        recs.append(r)
    recs.sort(key=lambda r: (r["kind"] != "chain", r.get("index", 0), r["name"]))
    offset, offset_s = 0, 0.0
    for r in recs:
        # Where a chain stage starts on each axis: what the earlier chain stages spent.
        r["offset"] = offset if r["kind"] == "chain" else 0
        r["offset_gpu_seconds"] = offset_s if r["kind"] == "chain" else 0.0
        if r["kind"] == "chain":
            offset += r.get("macs") or 0
            offset_s += r.get("gpu_seconds") or 0.0
    return manifest, recs


def _totals(recs: list[dict]) -> dict:
    chain = sum(r.get("macs") or 0 for r in recs if r["kind"] == "chain")
    base = sum(r.get("macs") or 0 for r in recs if r["kind"] == "baseline")
    chain_s = sum(r.get("gpu_seconds") or 0 for r in recs if r["kind"] == "chain")
    base_s = sum(r.get("gpu_seconds") or 0 for r in recs if r["kind"] == "baseline")
    return {"chain_macs": chain, "baseline_macs": base or None, "ratio": (base / chain) if base and chain else None,
            "chain_gpu_seconds": chain_s or None, "baseline_gpu_seconds": base_s or None}


AXES = {"macs": ("offset", "MACs"), "gpu_seconds": ("offset_gpu_seconds", "GPU-seconds")}


def _matched(recs: list[dict], axis: str = "macs") -> list[str]:
    """The matched-quality line (compt_scale.quality) of every chain model that has an independent
    baseline of the same model with a final val loss, on the MACs or the GPU-seconds axis (the
    stages' own timers x ranks: train/loop.py; stages run before they were recorded have none)."""
    offset_key, unit = AXES[axis]
    lines = []
    for r in recs:
        if r["kind"] != "chain":
            continue
        base = next((b for b in recs if b["kind"] == "baseline" and b.get("model") == r.get("model")
                     and b.get("final_val_loss") is not None and b.get(axis)), None)
        curve = eval_curve(r["metrics"], axis)
        if base is None or not curve:
            continue
        final = r["final_val_loss"] if r.get("final_val_loss") is not None else curve[-1][1]
        q = matched_quality(curve, r[offset_key], final, eval_curve(base["metrics"], axis), base[axis],
                            base["final_val_loss"])
        lines.append(describe(r["name"], base["name"], q, unit) + _unfair_caveat(recs, base, q))
    return lines


def _unfair_caveat(recs: list[dict], base: dict, q: dict) -> str:
    """What a matched-quality line against a baseline that trails the chain's smaller first model
    at equal tokens (the fairness check below) cannot mean: the speedup is partly that handicap.
    A line that claims no speedup (`q`: the chain never reached the baseline) has nothing to qualify."""
    first = next((r for r in recs if r["kind"] == "chain" and r.get("metrics")), None)
    if q["chain_macs_to_match"] is None or first is None or (base.get("params") or 0) <= (first.get("params") or 0):
        return ""
    fair = ahead_at_equal_tokens(first["metrics"], base["metrics"])
    if not fair["behind"]:
        return ""
    return (f"; NOT A FAIR MATCH: {base['name']} trails the smaller {first['name']} at {len(fair['behind'])} "
            f"of {fair['compared']} evals at equal tokens, so this speedup partly measures its handicap")


def _fairness(recs: list[dict]) -> list[str]:
    """Each baseline against the chain's first (smallest) model at equal tokens, the learning rate
    every stage trained at (train/lr_rule.py) and how each started (train/init_rule.py): the recipe
    a reader needs to judge the baseline."""
    first = next((r for r in recs if r["kind"] == "chain" and r.get("metrics")), None)
    lines = [describe_fairness(b["name"], first["name"], ahead_at_equal_tokens(first["metrics"], b["metrics"]))
             for b in recs if first is not None and b["kind"] == "baseline" and b.get("metrics")
             and (b.get("params") or 0) > (first.get("params") or 0)]
    rates = [f"{r['name']} {r['lr']:.3g} (hidden matrices {r['hidden_lr']:.3g})" for r in recs if r.get("lr")]
    rule = next((r["lr_rule"] for r in reversed(recs) if r.get("lr_rule")), None)
    inits = [f"{r['name']}: {r['init']}" for r in recs if r.get("init")]
    return (lines + ([f"learning rates: {'; '.join(rates)}; rule: {rule}"] if rates else [])
            + ([f"init: {'; '.join(inits)}"] if inits else []))


def _fmt(v, kind: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if kind == "int":
        return str(int(v))
    if kind == "macs":
        return f"{v:.4e}"
    return f"{v:.4f}"


def _throughput(r: dict, key: str) -> float | None:
    """Median of a stage's logged `tokens_per_s` / `mfu`; the first logged window (start-up,
    compilation) is left out when there are others."""
    vals = [m[key] for m in r["metrics"] if m.get(key) is not None and "loss" in m]
    vals = sorted(vals[1:] if len(vals) > 1 else vals)
    return vals[len(vals) // 2] if vals else None


def _table_rows(recs: list[dict]) -> list[list[str]]:
    rows = []
    for r in recs:
        tps, mfu = _throughput(r, "tokens_per_s"), _throughput(r, "mfu")
        rows.append([r["name"], r["kind"], r.get("status", "-"), _fmt(r.get("params"), "int"),
                     _fmt(r.get("tokens"), "int"), _fmt(r.get("macs"), "macs"), _fmt(r.get("final_val_loss"), "loss"),
                     "-" if tps is None else human(tps), "-" if mfu is None else f"{100 * mfu:.1f}%"])
    return rows


HEADER = ["stage", "kind", "status", "params", "tokens", "MACs", "final_val_loss", "tokens/s", "MFU"]
# Family eval metrics of the final eval line (families/*.evaluate), shown when any stage has them.
EXTRA_METRICS = {"zeroshot_top1": "zero-shot top1", "i2t_r1": "i2t R@1", "t2i_r1": "t2i R@1",
                 "i2t_r5": "i2t R@5", "t2i_r5": "t2i R@5", "perplexity": "perplexity"}
EXTRA_PLOT = "eval_metrics_vs_macs.png"


def _extra_columns(recs: list[dict]) -> tuple[list[str], list[list[str]]]:
    keys = [k for k in EXTRA_METRICS if any(r["final_metrics"].get(k) is not None for r in recs)]
    return [EXTRA_METRICS[k] for k in keys], [[_fmt(r["final_metrics"].get(k), "loss") for k in keys] for r in recs]


def _rows_with_extra(recs: list[dict]) -> tuple[list[str], list[list[str]]]:
    head, extra = _extra_columns(recs)
    return HEADER + head, [a + b for a, b in zip(_table_rows(recs), extra, strict=True)]


def report_table(out_dir) -> str:
    """The per-stage table for the terminal: exact params/tokens, MACs as %.4e, and the totals."""
    manifest, recs = _stages(Path(out_dir))
    header, body = _rows_with_extra(recs)
    rows = [header] + body
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    t = _totals(recs)
    lines.append(f"chain total MACs: {_fmt(t['chain_macs'], 'macs')} ({human(t['chain_macs'])})")
    if t["baseline_macs"]:
        lines.append(f"independent baselines total MACs: {_fmt(t['baseline_macs'], 'macs')} "
                     f"({human(t['baseline_macs'])})")
        lines.append(f"baseline / chain total MACs: {t['ratio']:.2f}x (a compute ratio, not matched quality)")
    if t["chain_gpu_seconds"]:
        lines.append(f"chain total GPU-seconds: {t['chain_gpu_seconds']:.1f}" + (
            f"; independent baselines: {t['baseline_gpu_seconds']:.1f} "
            f"({t['baseline_gpu_seconds'] / t['chain_gpu_seconds']:.2f}x)" if t["baseline_gpu_seconds"] else ""))
    for axis, what in (("macs", "MACs"), ("gpu_seconds", "GPU-seconds, wall clock x ranks")):
        matched = _matched(recs, axis)
        if matched:
            lines.append(f"matched quality ({what} the chain spent to reach the baseline's final val loss):")
            lines += [f"  {m}" for m in matched]
    fairness = _fairness(recs)
    if fairness:
        lines.append("baseline fairness and learning rates:")
        lines += [f"  {m}" for m in fairness]
    return "\n".join(lines)


def _plot(recs: list[dict], out_dir: Path) -> dict[str, Path]:
    import matplotlib
    matplotlib.use("Agg")  # no display on compute nodes
    import matplotlib.pyplot as plt

    paths = {k: out_dir / v for k, v in PLOTS.items()}
    for key, ykey, title in (("loss", "loss", "training loss"), ("val", "val_loss", "validation loss")):
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in recs:
            pts = [(r["offset"] + m["macs"], m[ykey]) for m in r["metrics"]
                   if m.get(ykey) is not None and m.get("macs") is not None and not m.get("final")]
            if key == "val":  # the final line is also an eval point
                pts += [(r["offset"] + m["macs"], m[ykey]) for m in r["metrics"]
                        if m.get("final") and m.get(ykey) is not None and m.get("macs") is not None]
            if not pts:
                continue
            xs, ys = zip(*sorted(dict(pts).items()), strict=True)  # one point per x: the final line wins over an eval
            style = "-" if r["kind"] == "chain" else "--"
            ax.plot(xs, ys, style, marker="o" if key == "val" else None, markersize=3,
                    label=f"{r['name']} ({r['kind']})")
        for r in recs[1:]:
            if r["kind"] == "chain" and r["offset"]:
                ax.axvline(r["offset"], color="grey", lw=0.5, ls=":")
        ax.set_xlabel("training MACs (chain stages after the accumulated MACs of earlier stages)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs compute")
        if ax.lines:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(paths[key], dpi=100)
        plt.close(fig)

    _plot_eval_metrics(recs, out_dir)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [r["name"] for r in recs]
    teacher = [r.get("teacher_macs") or 0 for r in recs]
    train = [r["train_macs"] if r.get("train_macs") is not None else max((r.get("macs") or 0) - t, 0)
             for r, t in zip(recs, teacher, strict=True)]
    colors = ["tab:blue" if r["kind"] == "chain" else "tab:grey" for r in recs]
    ax.bar(names, train, color=colors, label="student training (fwd + bwd + update)")
    ax.bar(names, teacher, bottom=train, color="tab:orange", label="teacher forwards (IFD)")
    chain_total = sum(r.get("macs") or 0 for r in recs if r["kind"] == "chain")
    if any(r["kind"] == "baseline" for r in recs):  # the bar a baseline has to beat
        ax.axhline(chain_total, color="tab:blue", ls="--", lw=1, label="chain total")
    ax.set_ylabel("MACs")
    ax.set_title("training cost per stage (grey: independent baselines)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["cost"], dpi=100)
    plt.close(fig)
    return paths


def _plot_eval_metrics(recs: list[dict], out_dir: Path) -> Path | None:
    """Zero-shot top-1 and R@1 over the chain's compute axis (CLIP); nothing when no stage has them."""
    import matplotlib.pyplot as plt
    keys = [k for k in ("zeroshot_top1", "i2t_r1", "t2i_r1")
            if any(m.get(k) is not None for r in recs for m in r["metrics"])]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for r in recs:
            pts = dict((r["offset"] + m["macs"], m[key]) for m in r["metrics"]
                       if m.get(key) is not None and m.get("macs") is not None)
            if pts:
                xs, ys = zip(*sorted(pts.items()), strict=True)
                ax.plot(xs, ys, "-" if r["kind"] == "chain" else "--", marker="o", markersize=3,
                        label=f"{r['name']} ({r['kind']})")
        ax.set_xlabel("training MACs (accumulated along the chain)")
        ax.set_title(EXTRA_METRICS[key])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / EXTRA_PLOT, dpi=100)
    plt.close(fig)
    return out_dir / EXTRA_PLOT


def write_report(out_dir) -> Path:
    """Write DIR/report.html and the PNGs beside it; returns the HTML's path."""
    out_dir = Path(out_dir)
    manifest, recs = _stages(out_dir)
    if not recs:
        raise CompTError(f"{out_dir / 'manifest.json'}: no stages recorded")
    paths = _plot(recs, out_dir)
    t = _totals(recs)
    esc = html.escape
    header, body = _rows_with_extra(recs)
    cells = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in body)
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    summary = f"<p>Chain total: {esc(human(t['chain_macs']))} MACs ({t['chain_macs']:.4e}).</p>"
    if t["baseline_macs"]:
        summary += (f"<p>Independent baselines total: {esc(human(t['baseline_macs']))} MACs "
                    f"({t['baseline_macs']:.4e}); baseline / chain total MACs = {t['ratio']:.2f}x "
                    f"(a compute ratio, not matched quality).</p>")
        matched, matched_s = _matched(recs), _matched(recs, "gpu_seconds")
        if matched:
            summary += ("<h2>Matched quality</h2><p>The MACs the chain (earlier stages and teacher forwards "
                        "included) spent to reach the baseline's final val loss, interpolated on the eval "
                        "curve; lossless = final val within 0.5% of the baseline's.</p><ul>"
                        + "".join(f"<li>{esc(m)}</li>" for m in matched) + "</ul>")
        if matched_s:
            summary += ("<p>The same on a wall-clock axis: GPU-seconds (each stage's own training-loop "
                        "timer, evals and checkpoints included, times its number of ranks).</p><ul>"
                        + "".join(f"<li>{esc(m)}</li>" for m in matched_s) + "</ul>")
        if fairness := _fairness(recs):
            summary += "<ul>" + "".join(f"<li>{esc(m)}</li>" for m in fairness) + "</ul>"
    else:
        summary += "<p>No independent baselines in this run.</p>"
    errors = "".join(f"<li>{esc(r['name'])}: {esc(str(r['error']))}</li>" for r in recs if r.get("error"))
    imgs = "".join(f'<h2>{esc(title)}</h2><img src="{esc(paths[k].name)}" alt="{esc(title)}">'
                   for k, title in (("loss", "Training loss vs compute"), ("val", "Validation loss vs compute"),
                                    ("cost", "Training cost per stage")))
    if (out_dir / EXTRA_PLOT).is_file():
        imgs += f'<h2>Evaluation vs compute</h2><img src="{EXTRA_PLOT}" alt="evaluation metrics">'
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>CoM-PT report: {esc(str(manifest.get('chain')))}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td:first-child{{text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>Chain {esc(str(manifest.get('chain')))}</h1>
<p>Spec: {esc(str(manifest.get('spec')))}. MACs follow the paper's appendix C.2: forward + backward + AdamW
update, plus the teacher's forwards for chain stages. On the plots, a chain stage starts at the MACs
the earlier chain stages spent; baselines start at 0.</p>
<table><tr>{head}</tr>{cells}</table>
{summary}
{f'<h2>Errors</h2><ul>{errors}</ul>' if errors else ''}
{imgs}
</body></html>
"""
    from .files import atomic_write_text
    out = out_dir / "report.html"
    atomic_write_text(out, page)
    return out
