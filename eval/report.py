"""The files of ``mla eval``: ``results.json`` (everything measured), ``report.md`` (one table, models side by side)
and ``report.png`` (task scores and perplexity as bars with error bars; quality vs KV cache with several models)."""

from __future__ import annotations

import json
import math
from pathlib import Path

SKIP = {"samples"}


def _task_metrics(rows: list[dict]) -> list[tuple[str, str]]:
    """(task, metric) pairs reported by any model, in a stable order; stderr columns are shown with their metric."""
    pairs = []
    for row in rows:
        for task, metrics in row.get("tasks", {}).items():
            for metric in metrics:
                if metric in SKIP or metric.endswith("_stderr") or (task, metric) in pairs:
                    continue
                pairs.append((task, metric))
    return sorted(pairs)


def _fmt(value, digits=4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}"


def _cell(value, err=None, base=None, kind="diff") -> str:
    text = _fmt(value)
    if err is not None and not (isinstance(err, float) and math.isnan(err)):
        text += f" ± {_fmt(err, 2)}"
    if base not in (None, 0) and value is not None:
        if kind == "ratio":
            text += f" ({value / base:.3f}x)"
        elif kind == "percent":
            text += f" ({value / base:.1%})"
        else:
            text += f" ({value - base:+.4f})"
    return text


def table(results: dict) -> str:
    rows = results["models"]
    base = rows[0] if results.get("baseline") else None
    s = results["settings"]
    lines = ["| | " + " | ".join(f"{r['name']}" for r in rows) + " |", "|---|" + "---|" * len(rows)]

    def add(label, key_fn, err_fn=lambda r: None, kind="diff"):
        values = [key_fn(r) for r in rows]
        if all(v is None for v in values):
            return
        ref = key_fn(base) if base else None
        cells = [_cell(v, err_fn(r), ref if r is not base else None, kind) for r, v in zip(rows, values)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    add("KV cache, bytes/token", lambda r: r.get("kv_bytes_per_token"), kind="percent")
    if s.get("ppl_text"):
        add(f"perplexity, {s['ppl_text']} ({s['ppl_tokens']} tokens) ↓", lambda r: r.get("ppl"),
            lambda r: r.get("ppl_stderr"), kind="ratio")
    if s.get("speed_prompt"):
        add(f"decode tokens/s, batch 1 after {s['speed_prompt']} tokens ↑",
            lambda r: (r.get("speed") or {}).get("decode_tok_s"), kind="ratio")
    for task, metric in _task_metrics(rows):
        arrow = " ↓" if "perplexity" in metric or metric == "bits_per_byte" else " ↑"
        add(f"{task} {metric}{arrow}", lambda r, t=task, m=metric: r.get("tasks", {}).get(t, {}).get(m),
            lambda r, t=task, m=metric: r.get("tasks", {}).get(t, {}).get(f"{m}_stderr"),
            kind="ratio" if "perplexity" in metric else "diff")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    s, env = results["settings"], results["environment"]
    rows = results["models"]
    out = ["# mla eval report", ""]
    if results.get("command"):
        out += ["```", results["command"], "```", ""]
    out += [f"- {r['name']}: `{r['path']}` ({r['model_type']}, {r['parameters']:,} parameters)" for r in rows]
    samples = {t: m.get("samples") for r in rows for t, m in r.get("tasks", {}).items()}
    out += ["", table(results), "",
            "Values ± one standard error. In brackets: against the original "
            "(KV cache as a share of it, perplexity and speed as ratios, task scores as differences).", ""]
    if samples:
        out.append("lm-eval documents per task: " + ", ".join(f"{t} {n}" for t, n in sorted(samples.items())) +
                   f"; {s['num_fewshot']}-shot.")
    out.append(f"Measured with torch {env['torch']}, transformers {env['transformers']}, lm-eval {env['lm_eval']} "
               f"on {env.get('gpu') or env['device']} ({env['threads']} threads), {s['dtype']}, "
               f"in {results['seconds']} s.")
    out.append("")
    return "\n".join(out)


def _bars(ax, labels, rows, value_fn, err_fn, title, ylabel):
    import numpy as np

    x = np.arange(len(labels))
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        vals = [value_fn(r, lab) for lab in labels]
        errs = [err_fn(r, lab) for lab in labels]
        vals = [np.nan if v is None else v for v in vals]
        errs = [0 if e is None or (isinstance(e, float) and math.isnan(e)) else e for e in errs]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, vals, width, yerr=errs, capsize=3, label=r["name"])
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["models"]
    scores = [(t, m) for t, m in _task_metrics(rows) if m in ("acc", "acc_norm", "exact_match", "f1", "mcc")]
    has_ppl = any(r.get("ppl") is not None for r in rows)
    converted = [r for r in rows if r["name"] != "original"]
    tradeoff = len(converted) >= 2 and (has_ppl or scores)
    panels = [p for p, on in (("scores", scores), ("ppl", has_ppl), ("tradeoff", tradeoff)) if on]
    if not panels:
        panels = ["kv"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "scores":
            labels = [f"{t.removeprefix('mla_bb_')}\n{m}" for t, m in scores]
            keys = dict(zip(labels, scores))
            _bars(ax, labels, rows, lambda r, lab: r.get("tasks", {}).get(keys[lab][0], {}).get(keys[lab][1]),
                  lambda r, lab: r.get("tasks", {}).get(keys[lab][0], {}).get(f"{keys[lab][1]}_stderr"),
                  "lm-eval tasks (± 1 s.e.)", "score")
        elif panel == "ppl":
            _bars(ax, ["perplexity"], rows, lambda r, _: r.get("ppl"), lambda r, _: r.get("ppl_stderr"),
                  f"perplexity on {results['settings']['ppl_text']} (± 1 s.e.)", "perplexity (lower is better)")
        elif panel == "tradeoff":
            _tradeoff(ax, results, has_ppl, scores)
        else:
            _bars(ax, ["KV bytes/token"], rows, lambda r, _: r.get("kv_bytes_per_token"), lambda r, _: None,
                  "KV cache", "bytes per token")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tradeoff(ax, results, has_ppl, scores):
    """Quality against KV cache size, one point per model."""
    rows = results["models"]
    base = rows[0] if results.get("baseline") else None

    def quality(r):
        if has_ppl:
            return r.get("ppl")
        vals = [r.get("tasks", {}).get(t, {}).get(m) for t, m in scores]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    pts = [(r["kv_bytes_per_token"] / (base["kv_bytes_per_token"] if base else 1), quality(r), r) for r in rows]
    pts = [p for p in pts if p[1] is not None]
    for x, y, r in sorted(pts, key=lambda p: p[0]):
        ax.scatter([x], [y], s=80 if r is base else 40, marker="*" if r is base else "o",
                   color="black" if r is base else None, zorder=3)
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, -10 if r is base else 4), fontsize=8)
    conv = sorted((p for p in pts if p[2] is not base), key=lambda p: p[0])
    ax.plot([p[0] for p in conv], [p[1] for p in conv], "--", alpha=0.5)
    ax.set_xlabel("KV cache per token" + (" (share of the original)" if base else " (bytes)"))
    ax.set_ylabel("perplexity" if has_ppl else "mean task score")
    ax.set_title("quality vs KV cache")
    ax.grid(alpha=0.3)


def write_report(results: dict, folder: Path) -> None:
    folder = Path(folder)
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (folder / "report.md").write_text(markdown(results))
    chart(results, folder / "report.png")
