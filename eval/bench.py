"""``mla bench``: prefill and decode speed, KV cache size and peak memory, converted model beside the original.

    mla bench OUT --baseline smollm2-135m --batch 8 --context 4096 --new-tokens 32

Each model runs in its own child process, so that its peak memory is its own. After a short warm-up forward, a
random prompt of ``batch × context`` tokens is prefilled and timed: once, or the median of ``runs`` when it has at
most 4096 tokens. Then ``new_tokens`` greedy decode steps are timed ``runs`` times from the same prefilled cache,
cropped back after each run; the median run is reported. A benchmark, not a test: the numbers depend on the
machine, so compare models only within one run.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from convert.config import opt
from convert.sources import TRUST_HELP
from convert.errors import MLAError


@dataclass
class BenchConfig:
    """Settings of ``mla bench`` (each field is a ``--flag``)."""

    batch: int = opt(1, "sequences decoded together")
    context: int = opt(512, "prompt tokens per sequence (prefilled before decoding)")
    new_tokens: int = opt(32, "timed decode steps per run")
    runs: int = opt(3, "decode runs; the median is reported")
    device: str = opt("auto", "cpu, cuda, cuda:1, ... ('auto': cuda when available)")
    dtype: str = opt("auto", "float32, bfloat16 or float16 ('auto': bfloat16 on cuda, float32 on cpu)")
    threads: int = opt(0, "CPU threads (0: torch's default)")
    attn: str = opt("sdpa", "attention implementation of both models: sdpa or eager")
    seed: int = opt(0, "seed of the random prompt")
    trust_remote_code: bool = opt(False, TRUST_HELP)

    def __post_init__(self):
        if min(self.batch, self.context, self.new_tokens, self.runs) < 1 or self.threads < 0:
            raise MLAError("--batch, --context, --new-tokens and --runs must be >= 1 (and --threads >= 0)")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise MLAError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.attn not in ("sdpa", "eager"):
            raise MLAError(f"--attn must be sdpa or eager, got {self.attn!r}")


def cache_bytes(cache) -> int:
    """Bytes of the tensors a transformers cache holds (its layers' keys and values)."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total


def measure(path: str, cfg: BenchConfig) -> dict:
    """Prefill + decode timings of one model (run in the current process)."""
    import torch

    from eval.perplexity import load_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    cuda = device.startswith("cuda")
    model, _ = load_model(path, getattr(torch, dtype), trust_remote_code=cfg.trust_remote_code)
    model.config._attn_implementation = cfg.attn
    for sub in model.modules():
        if hasattr(sub, "config") and hasattr(sub.config, "_attn_implementation"):
            sub.config._attn_implementation = cfg.attn
    model.to(device)
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(0, vocab, (cfg.batch, cfg.context), generator=gen).to(device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    with torch.no_grad():  # warm-up: first-call costs (kernels, allocator) are not part of either timing
        model(input_ids=prompt[:, : min(16, cfg.context)], use_cache=True, logits_to_keep=1)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # prefill: timed once for long prompts, median of ``runs`` when the prompt is small (and its timing noisy)
    prefill_runs = cfg.runs if cfg.batch * cfg.context <= 4096 else 1
    with torch.no_grad():
        prefill = []
        for _ in range(prefill_runs):
            out = None  # free the previous cache first
            sync()
            t0 = time.perf_counter()
            out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
            sync()
            prefill.append(time.perf_counter() - t0)
        prefill_s = statistics.median(prefill)
        cache = out.past_key_values
        first = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        del out
        times = []
        for _ in range(cfg.runs):
            token = first
            sync()
            t0 = time.perf_counter()
            for _ in range(cfg.new_tokens):
                step = model(input_ids=token, past_key_values=cache, use_cache=True)
                token = step.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            times.append(time.perf_counter() - t0)
            cached = cache_bytes(cache)
            cache.crop(-cfg.new_tokens)  # back to the prompt
    decode_s = statistics.median(times)
    tokens_cached = cfg.context + cfg.new_tokens
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "path": path, "model_type": model.config.model_type, "device": device, "dtype": dtype,
        "threads": torch.get_num_threads(), "prefill_s": prefill_s,
        "prefill_tok_s": cfg.batch * cfg.context / prefill_s,
        "decode_s": decode_s, "decode_runs_s": times, "decode_tok_s": cfg.batch * cfg.new_tokens / decode_s,
        "kv_cache_mib": cached / 2**20, "kv_bytes_per_token": cached / (cfg.batch * tokens_cached),
        "peak_memory_mib": peak / 2**20, "peak_memory_kind": "cuda max allocated" if cuda else "process max RSS",
    }


def _child(path: str, cfg: BenchConfig) -> dict:
    """``measure`` in a fresh Python process, so each model's peak memory is its own."""
    cmd = [sys.executable, "-m", "eval.bench", "--worker", path, json.dumps(asdict(cfg))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0 or not lines:
        err = [ln for ln in run.stderr.strip().splitlines() if ln.startswith("error:")]
        why = err[-1].removeprefix("error: ") if err else (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise MLAError(f"benchmark of {path} failed: {why}")
    return json.loads(lines[-1])


def bench(models: list[str], baseline: str | None, cfg: BenchConfig, json_path: str | None = None,
          log=print) -> dict:
    """Benchmark ``baseline`` (if any) then ``models``; print a side-by-side table; optionally write JSON."""
    from convert.save import check_out_file
    from convert.sources import input_paths

    if json_path:  # checked before the benchmark, not after it
        json_path = check_out_file(json_path, input_paths(baseline, *models))
    entries = ([("original", baseline)] if baseline else []) + [(Path(m.rstrip("/")).name or m, m) for m in models]
    rows = []
    for name, path in entries:
        log(f"[{name}] {path}: prefill {cfg.batch} x {cfg.context} tokens, then {cfg.runs} x {cfg.new_tokens} "
            f"decode steps")
        rows.append({"name": name, **_child(path, cfg)})
    result = {"settings": asdict(cfg), "baseline": "original" if baseline else None, "models": rows}
    if baseline:
        base = rows[0]
        for r in rows[1:]:
            r["vs_original"] = {k: r[k] / base[k] for k in
                                ("decode_tok_s", "prefill_tok_s", "kv_cache_mib", "peak_memory_mib")}
    log(table(result))
    if json_path:
        try:
            Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
        except OSError as e:
            raise MLAError(f"cannot write {json_path}: {e.strerror or e}") from None
    return result


def table(result: dict) -> str:
    rows = result["models"]
    cols = [("decode tok/s", "decode_tok_s", "{:.1f}"), ("prefill tok/s", "prefill_tok_s", "{:.0f}"),
            ("KV cache MiB", "kv_cache_mib", "{:.4g}"), ("peak MiB", "peak_memory_mib", "{:.0f}")]
    lines = [f"{'model':<28}" + "".join(f"{c[0]:>16}" for c in cols)]
    for r in rows:
        lines.append(f"{r['name'][:28]:<28}" + "".join(f"{c[2].format(r[c[1]]):>16}" for c in cols))
        if "vs_original" in r:
            lines.append(f"{'  ÷ original':<28}" + "".join(f"{r['vs_original'][c[1]]:>15.3f}x" for c in cols))
    return "\n".join(lines)


def summary(result: dict) -> str:
    s = result["settings"]
    where = f"batch {s['batch']} after {s['context']} tokens, {s['new_tokens']} new, {result['models'][0]['device']}"
    if not result["baseline"]:
        return "; ".join(f"{r['name']}: decode {r['decode_tok_s']:.1f} tok/s" for r in result["models"]) + f" ({where})"
    return "; ".join(f"{r['name']}: decode {r['vs_original']['decode_tok_s']:.2f}x, KV cache "
                     f"{r['vs_original']['kv_cache_mib']:.1%} of the original" for r in result["models"][1:]) + \
        f" ({where})"


def _worker(argv: list[str]) -> int:
    path, settings = argv
    try:
        print(json.dumps(measure(path, BenchConfig(**json.loads(settings)))))
    except MLAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(_worker(sys.argv[2:]))
    from convert.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
