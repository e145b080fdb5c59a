"""``mla sweep``: perplexity ratio vs KV budget for several conversion methods, the original measured in the same run.

    mla sweep smollm2-135m --budgets 0.5,0.3125,0.1875,0.125 --out sweeps/smollm2-135m

The source is loaded and calibrated once; every (method, budget) point is converted in memory (nothing exported) and
evaluated on the same held-out windows as the original. Writes ``sweep.json``, ``sweep.csv``, ``sweep.md`` and
``sweep.png`` into ``--out`` (atomically) and prints the table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from dataclasses import replace
from pathlib import Path

import torch

from mla_modeling.modeling_mla import MLAForCausalLM

from convert.adapters import HEAD, attention_prefix, is_attention, read_layout, text_config
from convert.allocate import check_plan, layer_converter
from convert.calibrate import sweep as calibrate
from convert.config import ConvertConfig, add_config_args, config_from_args
from convert.data import EVALUATION_DEFAULT, calibration_windows, load_sources, load_texts, read_budget, source_paths
from convert.device import compute_dtype, resolve_device
from convert.errors import MLAError
from convert.export import build_config
from convert.files import atomic_dir, check_out, out_lock
from convert.layerwise import LayerwiseModel, Spill
from convert.nll import perplexity
from convert.readers import StateDictReader, text_reader
from convert.sources import check_positions, input_paths, load_config, load_model, resolve_source
from eval.perplexity import check_eval_size, eval_windows

PRESETS = {
    "default": ({}, "rotate (loss-scored) + fisher latent + per-layer allocation (the default)"),
    "uniform": ({"rank_alloc": "uniform"}, "as default, same ranks in every layer"),
    "rotate-pca": ({"rope_method": "rotate-norm", "factor_method": "pca", "rank_alloc": "uniform", "rope_share": 0.4},
                   "cross-head rotation ranked by |q||k| + balanced activation PCA, uniform ranks"),
    "norm-pca": ({"rope_method": "norm", "factor_method": "pca", "rank_alloc": "uniform", "rope_share": 0.4},
                 "MHA2MLA 2-norm selection + balanced activation PCA, uniform ranks"),
    "norm-svd": ({"rope_method": "norm", "factor_method": "svd", "rank_alloc": "uniform", "rope_share": 0.4},
                 "MHA2MLA 2-norm selection + weight-only joint SVD (baseline)"),
}
DEFAULT_BUDGETS = "0.5,0.3125,0.1875,0.125"
DEFAULT_METHODS = "default,uniform,rotate-pca,norm-svd"


def parse_list(text: str, kind, what: str) -> list:
    try:
        items = [kind(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError:
        raise MLAError(f"--{what} must be a comma-separated list, got {text!r}") from None
    if not items:
        raise MLAError(f"--{what} is empty")
    return items


def _in_memory(state: dict, config):
    model = MLAForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(k != HEAD for k in missing):
        raise MLAError(f"internal error: converted weights do not fit the MLA model ({(unexpected or missing)[0]})")
    model.tie_weights()
    return model.eval()


def _table(rows: list[dict], original: float) -> str:
    lines = [f"original perplexity: {original:.2f}", "",
             "| method | KV budget | values/token/layer | perplexity | ratio |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget']:g} | {r['values_per_layer']:.1f} | {r['perplexity']:.2f} | "
                     f"{r['ratio']:.2f}x |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["budget"], r["ratio"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xlabel("KV cache budget (fraction of the original)")
    ax.set_ylabel("perplexity / original perplexity")
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def default_out(src: str) -> Path:
    """``sweeps/<name of the source>``, the name taken from the resolved path (so ``..`` or ``.`` cannot escape)."""
    path = Path(src).expanduser()
    name = path.resolve().name if path.exists() else src.rstrip("/").split("/")[-1]
    name = re.sub(r"[^\w.+-]", "_", name.removesuffix(".gguf")).lstrip(".")
    return Path("sweeps") / (name or "source")


def sweep(src: str, out: str | Path | None, budgets: list[float], methods: list[str], base: ConvertConfig,
          text: str = EVALUATION_DEFAULT, tokens: int = 16384, seq_len: int = 512, overwrite: bool = False,
          plot: bool = True, log=print) -> dict:
    """Sweep into ``out`` (default ``sweeps/<source name>``, its parent created only when the results are written)."""
    make_parent = out is None
    out = default_out(src) if out is None else out
    unknown = [m for m in methods if m not in PRESETS]
    if unknown:
        raise MLAError(f"unknown sweep method {unknown[0]!r}; choose from {', '.join(PRESETS)}")
    for b in budgets:
        if not 0 < b <= 1:
            raise MLAError(f"every budget must be in (0, 1], got {b}")
    check_eval_size(seq_len, tokens)
    if base.calib == text:
        raise MLAError(f"--calib and --text are both {text!r}: never evaluate on the calibration text")
    configs = {m: replace(base, **PRESETS[m][0]) for m in methods}
    for c in configs.values():
        c.validate()
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise MLAError("the plot needs matplotlib: pip install matplotlib (or pass --no-plot)") from None
    out = check_out(out, overwrite, [*input_paths(src), *source_paths(text, base.calib)], make_parent=make_parent)
    with out_lock(out, make_parent=make_parent):
        return _sweep(src, out, budgets, methods, base, configs, text, tokens, seq_len, overwrite, plot, log)


def _usable_methods(layout, methods: list[str], configs: dict, log) -> list[str]:
    """``methods`` without those a source with QK-norm cannot use (the weight-only SVD cannot see the key norm)."""
    if not layout.qk_norm:
        return methods
    dropped = [m for m in methods if configs[m].factor_method == "svd"]
    kept = [m for m in methods if m not in dropped]
    if not kept:
        raise MLAError(f"{', '.join(dropped)}: a weight-only SVD cannot see the key norm of {layout.model_type}; "
                       "choose other --methods")
    if dropped:
        log(f"skipping {', '.join(dropped)}: a weight-only SVD cannot see the key norm of {layout.model_type}")
    return kept


def _point(method: str, budget: float, cfg: ConvertConfig, setup: dict, original: float, log) -> dict:
    """One (method, budget) point: every layer converted from the statistics in memory, then its perplexity."""
    t0 = time.time()
    layout, reader, src_config, device, out = (setup[k] for k in ("layout", "reader", "src_config", "device", "out"))
    state = dict(part for n in reader.names() if not is_attention(n)
                 for part in layout.export_tensors(n, reader.get([n])[n]))

    def sink(i, tensors, freq_index, state=state):
        state.update({attention_prefix(i) + n: t.float() for n, t in tensors.items()})

    converter = layer_converter(layout, cfg, check_plan(layout, cfg), reader, sink, Spill(out.parent, float("inf")))
    for i, st in enumerate(setup["stats"]):
        converter.add(i, st)
    plans, freqs = converter.finish()
    mla = _in_memory(state, build_config(src_config, layout, plans, freqs, torch.float32)).to(device)
    ppl = perplexity(mla, setup["windows"], cfg.batch_size, desc=f"ppl {method} {budget:g}")
    del mla, state
    values = sum(p.rank + p.d_rope for p in plans) / layout.num_layers
    log(f"{method:>10} budget {budget:<7g} ppl {ppl:9.2f}  ratio {ppl / original:7.2f}x")
    return {"method": method, "budget": budget, "achieved_budget": values / layout.kv_values_per_token_layer,
            "values_per_layer": values, "perplexity": ppl, "ratio": ppl / original,
            "seconds": round(time.time() - t0, 1), "kv_lora_rank": [p.rank for p in plans],
            "qk_rope_head_dim": [p.d_rope for p in plans]}


def _write(out: Path, overwrite: bool, result: dict, table: str, plot_title: str | None) -> None:
    """sweep.json, .md, .csv (and .png) into ``out``, atomically."""
    with atomic_dir(out, overwrite) as tmp:
        (tmp / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "sweep.md").write_text(table + "\n")
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["method", "budget", "achieved_budget", "values_per_layer",
                                                 "perplexity", "ratio", "seconds"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["rows"])
        (tmp / "sweep.csv").write_text(buf.getvalue())
        if plot_title is not None:
            _plot(result["rows"], tmp / "sweep.png", plot_title)


def _sweep(src: str, out: Path, budgets, methods, base: ConvertConfig, configs: dict, text: str, tokens: int,
           seq_len: int, overwrite: bool, plot: bool, log) -> dict:
    started = time.time()
    source = resolve_source(src)
    full_config = load_config(source)
    layout = read_layout(full_config)
    src_config = text_config(full_config)
    check_positions(full_config, base.calib_len, "--calib-len", src)
    check_positions(full_config, seq_len, "--seq-len", src)
    methods = _usable_methods(layout, methods, configs, log)
    calib_texts = load_sources(base.calib, read_budget((base.calib_seqs + base.verify_seqs) * base.calib_len))
    eval_texts = load_texts(text, read_budget(tokens))  # a long file: only what the windows use
    torch.manual_seed(base.seed)
    device = resolve_device(base.device)
    model, tokenizer = load_model(source, config=full_config)
    calib, _ = calibration_windows(tokenizer, calib_texts, base)
    windows = eval_windows(tokenizer, eval_texts, seq_len, tokens)
    original = perplexity(model.to(device), windows, base.batch_size, desc="ppl original")
    log(f"original perplexity {original:.2f} on {windows.numel()} tokens of {text}")
    reader = text_reader(StateDictReader(model))
    lw = LayerwiseModel(src_config, reader, device, compute_dtype(device, full_config), layout.layer_types,
                        layout.decoder)
    stats = [None] * layout.num_layers
    calibrate(lw, layout, calib, base.batch_size, True, stats.__setitem__, Spill(out.parent, float("inf")))
    setup = {"layout": layout, "reader": reader, "src_config": src_config, "device": device, "out": out,
             "stats": stats, "windows": windows}
    rows = [_point(method, budget, replace(configs[method], kv_budget=budget), setup, original, log)
            for method in methods for budget in budgets]
    table = _table(rows, original)
    result = {
        "source": src, "text": text, "tokens": int(windows.numel()), "seq_len": seq_len,
        "calibration": {"data": base.calib, "sequences": int(calib.shape[0]), "seq_len": int(calib.shape[1]),
                        "seed": base.seed},
        "original_perplexity": original, "methods": {m: PRESETS[m][1] for m in methods}, "rows": rows,
        "elapsed_s": round(time.time() - started, 1),
    }
    title = f"{src}: held-out {text}, {windows.numel()} tokens, no fine-tuning"
    _write(out, overwrite, result, table, title if plot else None)
    log(table)
    best = min((r for r in rows if not math.isnan(r["ratio"])), key=lambda r: r["ratio"], default=None)
    log(f"swept {len(methods)} methods x {len(budgets)} budgets on {src} -> {out} in {time.time() - started:.0f}s"
        + (f"; best ratio {best['ratio']:.2f}x ({best['method']} at {best['budget']:g})" if best else ""))
    return result


def sweep_arguments(p) -> None:
    p.description = ("Convert SRC in memory at each budget with each method and measure held-out perplexity against "
                     "the original in the same run. Writes sweep.json/.csv/.md/.png into --out.")
    methods = "; ".join(f"{name}: {text}" for name, (_, text) in PRESETS.items())
    p.add_argument("src", metavar="SRC", help="model folder, Hugging Face Hub id, .gguf file, or smollm2-135m")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, help=f"comma-separated KV budgets (default: {DEFAULT_BUDGETS})")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated presets (default: {DEFAULT_METHODS}). {methods}")
    p.add_argument("--text", default=EVALUATION_DEFAULT, help=f"held-out evaluation text (default: {EVALUATION_DEFAULT})")
    p.add_argument("--tokens", type=int, default=16384, help="evaluation tokens (default: 16384)")
    p.add_argument("--seq-len", type=int, default=512, help="evaluation window length (default: 512)")
    p.add_argument("--out", help="output folder (default: sweeps/<source name>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    add_config_args(p, ConvertConfig, only={"calib", "calib_seqs", "calib_len", "seed", "batch_size", "device"})


def sweep_command(args) -> int:
    base = config_from_args(args, ConvertConfig, {})
    sweep(args.src, args.out, parse_list(args.budgets, float, "budgets"), parse_list(args.methods, str, "methods"), base,
          text=args.text, tokens=args.tokens, seq_len=args.seq_len, overwrite=bool(args.overwrite), plot=not args.no_plot)
    return 0
