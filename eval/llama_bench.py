"""The original and its MLA export side by side in llama.cpp, in one run: perplexity, KV cache, quantized pairs,
decode speed by depth, batched decode and the context a fixed KV budget holds.

    python -m eval.llama_bench ORIGINAL.gguf EXPORT.gguf --text bbc:tech --out out/llama-bench

ORIGINAL.gguf is the source as llama.cpp's own converter writes it (``convert_hf_to_gguf.py``), EXPORT.gguf what
``mla gguf`` writes, both of the same type (f16). Every speed figure is a ratio to the original measured in the same
invocation. Results go to OUT/results.json and a markdown table on stdout (written as it goes). Quantized runs pass
``--no-repack``: llama.cpp's AMX int8 kernels crash on CPUs that list AMX in a VM that does not enable it.
"""

import argparse
import json
import re
import subprocess
from pathlib import Path

from convert.data import load_texts
from convert.errors import MLAError

from .llama_cpp import binary, env
from .llama_run import perplexity, run, run_complete, write_text_file

_KV_MIB = re.compile(r"llama_kv_cache: size = +([0-9.]+) MiB")
_BATCHED = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*([0-9.]+)\s*\|\s*([0-9.]+)\s*\|"
                      r"\s*([0-9.]+)\s*\|\s*([0-9.]+)\s*\|\s*([0-9.]+)\s*\|\s*([0-9.]+)\s*\|", re.M)


def bench(models: list[Path], depths: str, threads: str, fa: str, n: int = 16, reps: int = 1, *extra,
          variant: str | None = None) -> list[dict]:
    """llama-bench decode rows (one per model x threads x fa x depth), both models in one invocation."""
    args = [str(binary("llama-bench", variant))]
    for m in models:
        args += ["-m", str(m)]
    args += ["-d", depths, "-n", str(n), "-p", "0", "-t", threads, "-fa", fa, "-r", str(reps), "-o", "json", *extra]
    done = subprocess.run(args, capture_output=True, text=True, env=env(variant))
    if done.returncode:
        raise MLAError(f"llama-bench failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return [{"model": Path(r["model_filename"]).name, "threads": r["n_threads"], "fa": int(r["flash_attn"]),
             "depth": r["n_depth"], "tok_s": r["avg_ts"], "stdev": r["stddev_ts"]} for r in json.loads(done.stdout)]


def batched(model: Path, npp: int, ntg: int, npl: int, ctx: int, threads: int, *extra) -> dict:
    """llama-batched-bench: ``npl`` sequences of an ``npp``-token prompt then ``ntg`` decoded tokens each."""
    out = run_complete("llama-batched-bench", "-m", model, "-c", ctx, "-b", 2048, "-ub", 512, "-npp", npp, "-ntg",
                       ntg, "-npl", npl, "-t", threads, "-lv", 4, *extra,
                       done=lambda o: _BATCHED.search(o) and _KV_MIB.search(o))
    rows, kv = _BATCHED.findall(out), _KV_MIB.search(out)
    pp, tg, b, n_kv, t_pp, s_pp, t_tg, s_tg, t, s = rows[-1]
    return {"npp": int(pp), "ntg": int(tg), "npl": int(b), "n_kv": int(n_kv), "prefill_tok_s": float(s_pp),
            "decode_tok_s": float(s_tg), "kv_mib": float(kv.group(1)), "ctx": ctx}


def quantize(src: Path, dst: Path, qtype: str) -> Path:
    if not dst.exists():
        run("llama-quantize", src, dst, qtype)
    return dst


def _table(rows: list[dict]) -> str:
    """Markdown: one line per (threads, fa, depth), both models' tokens/s and the export's ratio."""
    orig, export = rows[0]["model"], rows[-1]["model"]
    by = {(r["model"], r["threads"], r["fa"], r["depth"]): r["tok_s"] for r in rows}
    lines = ["| threads | -fa | depth | original tok/s | export tok/s | export / original |", "|---|---|---|---|---|---|"]
    for t, fa, d in sorted({(r["threads"], r["fa"], r["depth"]) for r in rows}):
        a, b = by[(orig, t, fa, d)], by[(export, t, fa, d)]
        lines.append(f"| {t} | {fa} | {d} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.llama_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("original", type=Path)
    p.add_argument("export", type=Path)
    p.add_argument("--text", default="bbc:tech", help="held-out text for perplexity (a mla text source)")
    p.add_argument("--ctx", type=int, default=512, help="llama-perplexity chunk size")
    p.add_argument("--chunks", type=int, default=32, help="chunks of --ctx tokens scored")
    p.add_argument("--depths", default="0,1024,2048,4096,8192")
    p.add_argument("--threads", default="2")
    p.add_argument("--fa", default="1", help="llama-bench -fa values (1: flash attention, llama.cpp's CPU default; "
                   "0,1 for both; -fa 0 prefills a width that is not a multiple of 16 slowly)")
    p.add_argument("--out", type=Path, default=Path("out/llama-bench"))
    p.add_argument("--skip", default="", help="comma-separated parts to skip: ppl,quant,depth,batched,capacity")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    results: dict = {"original": str(args.original), "export": str(args.export)}

    def save(part, value, text=None):
        results[part] = value
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"\n## {part}\n\n{text or json.dumps(value, indent=2)}", flush=True)

    text = write_text_file(args.out / "text.txt", "\n\n".join(load_texts(args.text)))
    models = {"original": args.original, "export": args.export}
    if "ppl" not in skip:
        got = {k: perplexity(m, text, args.ctx, 2, "--chunks", args.chunks) for k, m in models.items()}
        ratio = got["export"]["ppl"] / got["original"]["ppl"]
        save("perplexity", {**got, "ratio": ratio},
             f"original {got['original']['ppl']:.4f}, export {got['export']['ppl']:.4f}: {ratio:.4f}x; KV cache "
             f"{got['export']['k_mib'] + got['export']['v_mib']:.2f} vs {got['original']['k_mib'] + got['original']['v_mib']:.2f}"
             f" MiB at {got['original']['cells']} cells")
    if "quant" not in skip:
        quant = {}
        for q in ("Q8_0", "Q4_K_M"):
            pair = {k: perplexity(quantize(m, args.out / f"{k}-{q}.gguf", q), text, args.ctx, 2, "--chunks",
                                  args.chunks, "-nr")["ppl"] for k, m in models.items()}
            quant[q] = {**pair, "ratio": pair["export"] / pair["original"]}
        save("quantized", quant, "\n".join(f"{q}: original {v['original']:.4f}, export {v['export']:.4f}: "
                                           f"{v['ratio']:.4f}x" for q, v in quant.items()))
    if "depth" not in skip:
        rows = bench([args.original, args.export], args.depths, args.threads, args.fa)
        save("decode_by_depth", rows, _table(rows))
    if "batched" not in skip:
        got = {k: batched(m, 4096, 16, 8, 8 * (4096 + 16), 2) for k, m in models.items()}
        ratio = got["export"]["decode_tok_s"] / got["original"]["decode_tok_s"]
        save("batched_8x4096", {**got, "decode_ratio": ratio},
             f"decode {got['export']['decode_tok_s']:.2f} vs {got['original']['decode_tok_s']:.2f} tok/s: {ratio:.2f}x")
    if "capacity" not in skip:
        base = batched(args.original, 1000, 24, 8, 8 * 1024, 2)
        per_seq = {k: batched(m, 1000, 24, 1, 1024, 2) for k, m in models.items()}
        bytes_per = {k: v["kv_mib"] / v["ctx"] for k, v in per_seq.items()}
        seqs = int(8 * bytes_per["original"] / bytes_per["export"])
        wide = batched(args.export, 1000, 24, seqs, seqs * 1024, 2)
        save("capacity", {"original": base, "export": wide, "context_ratio": wide["ctx"] / base["ctx"]},
             f"in {base['kv_mib']:.1f} MiB of KV cache the original holds {base['ctx']} tokens (8 x 1024); the export "
             f"holds {wide['ctx']} ({seqs} x 1024) in {wide['kv_mib']:.1f} MiB: {wide['ctx'] / base['ctx']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
