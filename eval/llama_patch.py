"""An engine experiment: the pinned llama.cpp against the same source with one patch of ``docs/llama-cpp-patches/``,
on the original and the exports, in one run. The patch may change speed, not results: the perplexity of a float32
export is measured with both builds on one-token batches (``-ub 1``, the decode path) and must agree; then decode
speed by depth.

    python -m eval.llama_patch ORIGINAL.gguf EXPORT.gguf [EXPORT.gguf ...] --check EXPORT-F32.gguf \\
        [--reference EXPORT_FOLDER] --patch mla-decode --out out/llama-patch

Both builds run back to back per model, so their ratio is measured under the same machine load. Results go to
OUT/results.json and a markdown table on stdout (written as they come). Nothing here is shipped: the engine users
run is the stock one.
"""

import argparse
import json
from pathlib import Path

from convert.data import load_texts
from convert.errors import MLAError, run_command
from convert.files import write_text

from .llama_bench import bench
from .llama_cpp import build
from .llama_run import perplexity, reference_perplexity, tokenize, write_text_file

TOOLS = ("llama-perplexity", "llama-bench", "llama-tokenize")
EXACT = 1e-5  # relative perplexity difference allowed where the patch only regroups float32 products


def transformers_perplexity(folder: Path, gguf: Path, text: Path, ctx: int, chunks: int) -> float:
    """The export ``folder``'s float32 perplexity in transformers on the token ids llama.cpp reads ``text`` as."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        return reference_perplexity(model, tokenize(gguf, text), ctx, None, chunks)


def same_results(model: Path, text: Path, variant: str, ctx: int, chunks: int,
                 reference: float | None = None) -> list[dict]:
    """Perplexity of a float32 GGUF with a float32 cache, both builds, both attention paths, one token per batch
    (the decode path), one thread. ``-fa 0`` (where the patch scores the heads as one product) must agree within
    EXACT; ``-fa 1`` is reported with the stock build's own spread between its two paths, and with each build's
    distance from transformers' ``reference`` when given."""
    got = {}
    for which in ("stock", variant):
        for fa in (0, 1):
            got[which, fa] = perplexity(model, text, ctx, 1, "--chunks", chunks, "-ub", 1, "-fa", fa, "-ctk", "f32",
                                        "-ctv", "f32", variant=None if which == "stock" else variant)["ppl"]
    spread = abs(got["stock", 0] - got["stock", 1]) / got["stock", 0]
    rows = [{"model": model.name, "fa": fa, "stock": got["stock", fa], "patched": got[variant, fa],
             "rel_diff": abs(got[variant, fa] - got["stock", fa]) / got["stock", fa], "stock_fa_spread": spread}
            for fa in (0, 1)]
    for r in rows if reference else []:
        r.update(transformers=reference, stock_vs_transformers=r["stock"] / reference - 1,
                 patched_vs_transformers=r["patched"] / reference - 1)
    if rows[0]["rel_diff"] > EXACT:
        raise MLAError(f"the {variant} patch changes the float32 perplexity of {model.name} with -fa 0: "
                       f"{rows[0]['stock']} -> {rows[0]['patched']}")
    return rows


def speed(models: list[Path], variant: str, depths: str, threads: str, fa: str, n: int) -> list[dict]:
    """llama-bench rows of both builds, one model at a time (stock then patched), tagged with their build."""
    rows = []
    for m in models:
        rows += [{**r, "build": "stock"} for r in bench([m], depths, threads, fa, n)]
        rows += [{**r, "build": variant} for r in bench([m], depths, threads, fa, n, variant=variant)]
    return rows


def table(rows: list[dict], variant: str) -> str:
    """Markdown: tokens/s per (model, fa, depth) for both builds, patched/stock, and each export over the original
    in the same build."""
    by = {(r["model"], r["build"], r["threads"], r["fa"], r["depth"]): r["tok_s"] for r in rows}
    orig = rows[0]["model"]
    lines = ["| model | threads | -fa | depth | stock tok/s | patched tok/s | patched / stock | "
             "/ original, stock | / original, patched |", "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["model"], r["threads"], r["fa"], r["depth"]) for r in rows}, key=lambda k: (k[0] != orig, k))
    for m, t, fa, d in keys:
        a, b = by[(m, "stock", t, fa, d)], by[(m, variant, t, fa, d)]
        oa, ob = by[(orig, "stock", t, fa, d)], by[(orig, variant, t, fa, d)]
        lines.append(f"| {m} | {t} | {fa} | {d} | {a:.2f} | {b:.2f} | {b / a:.2f}x | {a / oa:.2f}x | {b / ob:.2f}x |")
    return "\n".join(lines)


def _check_line(r: dict) -> str:
    line = (f"{r['model']} -fa {r['fa']}: stock {r['stock']:.4f}, patched {r['patched']:.4f} (relative difference "
            f"{r['rel_diff']:.1e}; the stock build's -fa 0 and -fa 1 differ by {r['stock_fa_spread']:.1e})")
    if "transformers" in r:
        line += (f"; transformers {r['transformers']:.4f}: stock {r['stock_vs_transformers']:+.1e}, patched "
                 f"{r['patched_vs_transformers']:+.1e}")
    return line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.llama_patch", description=__doc__.split("\n\n")[0])
    p.add_argument("models", type=Path, nargs="+", help="the original GGUF first, then exports")
    p.add_argument("--patch", default="mla-decode", help="a patch of docs/llama-cpp-patches, by name")
    p.add_argument("--check", type=Path, required=True, help="a float32 export GGUF for the perplexity check")
    p.add_argument("--reference", type=Path, default=None,
                   help="the export folder of --check: its transformers perplexity on the same token ids")
    p.add_argument("--text", default="bbc:tech", help="text for the perplexity check (a mla text source)")
    p.add_argument("--ctx", type=int, default=64, help="llama-perplexity chunk size of the check")
    p.add_argument("--chunks", type=int, default=2)
    p.add_argument("--depths", default="0,2048,8192")
    p.add_argument("--threads", default="2")
    p.add_argument("--fa", default="0,1")
    p.add_argument("-n", type=int, default=16, help="tokens decoded per measurement")
    p.add_argument("--out", type=Path, default=Path("out/llama-patch"))
    args = p.parse_args(argv)
    for m in [*args.models, args.check]:
        if not m.is_file():
            raise MLAError(f"no GGUF file {m}")
    if args.reference and not (args.reference / "config.json").is_file():
        raise MLAError(f"--reference {args.reference} is not an export folder (no config.json)")
    build(TOOLS)
    build(TOOLS, variant=args.patch)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"patch": args.patch, "models": [str(m) for m in args.models]}

    def save(part, value, text):
        results[part] = value
        write_text(args.out / "results.json", json.dumps(results, indent=2) + "\n")
        print(f"\n## {part}\n\n{text}", flush=True)

    text = write_text_file(args.out / "text.txt", "\n\n".join(load_texts(args.text)))
    ref = args.reference and transformers_perplexity(args.reference, args.check, text, args.ctx, args.chunks)
    same = same_results(args.check, text, args.patch, args.ctx, args.chunks, ref)
    save("perplexity", same, "\n".join(_check_line(r) for r in same))
    rows = speed(args.models, args.patch, args.depths, args.threads, args.fa, args.n)
    save("decode_by_depth", rows, table(rows, args.patch))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
