"""``mla bench-convert SHAPE``: peak memory and time of converting a random-weight checkpoint of a real shape.

    mla bench-convert llama-3.2-1b --json docs/bench-convert-llama-3.2-1b.json
    mla bench-convert llama-3.1-8b -- --kv-budget 0.25 --calib pydoc --calib-seqs 4 --calib-len 256

No real 1B+ model can be had here, so this writes (once, into the user cache) a bf16 checkpoint of the named shape
with random weights, tensor by tensor (never the whole model in memory), and the SmolLM2 tokenizer (or
``--tokenizer``). Then ``mla convert`` runs on it in a child process; its own peak RSS (``VmHWM``, which the child
records), wall time and the per-stage times it records in ``mla_conversion.json`` are reported. ``--load-check`` then loads the export
with ``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True, dtype=torch.bfloat16)`` in another child and
checks finite logits. The perplexity of random weights means nothing: exactness is tested on tiny models and SmolLM2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from convert.adapters import HEAD
from convert.cache import cache_dir
from convert.errors import MLAError
from convert.files import atomic_dir, check_out, check_out_file, out_lock, write_text
from convert.readers import skeleton
from convert.save import ShardWriter
from convert.sources import input_paths, load_tokenizer, resolve_source

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
# Published configs (config.json of each model on the Hub), the fields that fix tensor shapes and the maths.
SHAPES = {
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0, "factor": 32.0}),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0, "factor": 8.0}),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
                       tie_word_embeddings=False, max_position_embeddings=32768, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       tie_word_embeddings=True, max_position_embeddings=40960, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     tie_word_embeddings=False, max_position_embeddings=40960, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "gemma-3-1b": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                       num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                       query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6,
                       tie_word_embeddings=True, max_position_embeddings=32768, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, rope_local_base_freq=10000.0),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    # a small stand-in with the same structure, for tests
    "tiny-llama": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       tie_word_embeddings=False, max_position_embeddings=1024, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
DEFAULT_ARGS = ["--kv-budget", "0.25", "--calib", "pydoc", "--calib-seqs", "4", "--calib-len", "256"]
INIT_STD = 0.02


def shape_config(shape: str, vocab_size: int | None = None):
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise MLAError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    kwargs = dict(SHAPES[shape])
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, bos_token_id=1, eos_token_id=2, **kwargs)
    if vocab_size is not None and vocab_size > config.vocab_size:
        raise MLAError(f"the tokenizer has {vocab_size} tokens, more than the {shape} vocabulary ({config.vocab_size})")
    config.dtype = "bfloat16"
    return config


def write_random_checkpoint(shape: str, folder: Path, tokenizer_src: str, seed: int = 0) -> Path:
    """A bf16 checkpoint of ``shape`` with N(0, 0.02) weights (norms 1) in ``folder``, written tensor by tensor."""
    import torch


    if (folder / "mla_shape.json").is_file():
        return folder
    with out_lock(folder, what="the random checkpoint", wait=True, make_parent=True):
        if (folder / "mla_shape.json").is_file():
            return folder
        tokenizer = load_tokenizer(resolve_source(tokenizer_src))
        config = shape_config(shape, len(tokenizer))
        names = skeleton(config).state_dict()
        gen = torch.Generator().manual_seed(seed)
        with atomic_dir(folder, overwrite=True, make_parent=True) as tmp:
            writer = ShardWriter(tmp, max_bytes=2 * 2**30)
            from tqdm.auto import tqdm

            for name, meta in tqdm(names.items(), desc=f"write random {shape}", unit="tensor"):
                if name == HEAD and config.tie_word_embeddings:
                    continue
                if name.endswith("norm.weight"):
                    t = torch.ones(meta.shape, dtype=torch.bfloat16)
                elif name.endswith(".bias"):
                    t = torch.zeros(meta.shape, dtype=torch.bfloat16)
                else:
                    t = torch.empty(meta.shape, dtype=torch.float32).normal_(0, INIT_STD, generator=gen)
                    t = t.to(torch.bfloat16)
                writer.add(name, t)
            writer.close()
            config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "mla_shape.json").write_text(json.dumps({"shape": shape, "seed": seed, "init_std": INIT_STD,
                                                            "tokenizer": tokenizer_src}, indent=2) + "\n")
    return folder


def _child(cmd: list[str]) -> tuple[int, float, int, str]:
    """Run ``cmd``; return (exit code, wall seconds, output tail). Peaks come from the child itself (VmHWM): the
    kernel's ``wait4`` figure of a vfork/posix_spawn child starts from this process's own peak."""
    import tempfile

    with tempfile.TemporaryFile("w+") as log:
        started = time.time()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            _, status = os.waitpid(proc.pid, 0)
        except BaseException:  # Ctrl-C, SIGTERM: the child goes too (and cleans up after itself)
            proc.terminate()
            proc.wait()
            raise
        wall = time.time() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read()[-4000:]
    return proc.returncode, wall, tail


_LOAD_CHECK = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from convert.device import peak_rss_bytes
out = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16).eval()
ids = torch.randint(3, min(1000, model.config.vocab_size), (1, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = model(input_ids=ids).logits
out = model(input_ids=ids, use_cache=True)
cache = out["cache"] if "cache" in out.keys() else out["past_key_values"]  # renamed in transformers 5.24
per_token = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
                if t is not None) // ids.shape[1]
print(json.dumps({"model_type": model.config.model_type,
                  "dtype": str(next(model.parameters()).dtype), "finite": bool(torch.isfinite(logits).all()),
                  "cache_bytes_per_token": per_token,
                  "peak_rss_bytes": peak_rss_bytes()}))
"""


def bench_convert(shape: str, convert_args: list[str] | None = None, out: str | None = None,
                  tokenizer: str = "smollm2-135m", load_check: bool = False, json_path: str | None = None,
                  overwrite: bool = False, log=print) -> dict:
    """Convert the random checkpoint of ``shape`` in a child process and report its peak RSS and times.

    ``out`` follows the rules of every command's OUT (a non-empty folder is replaced only with ``overwrite``); the
    default, a folder of the user cache, is this command's own and is replaced each run. ``json_path`` may not be or
    lie inside an input (the tokenizer's model, the random checkpoint) or OUT."""
    if shape not in SHAPES:
        raise MLAError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    src = cache_dir("shapes") / shape
    inputs = input_paths(tokenizer) + [src.resolve()]
    if out is None:
        out, overwrite = cache_dir("bench") / f"{shape}-mla", True
    out = check_out(out, overwrite, inputs, what="--out")
    if json_path:
        json_path = check_out_file(json_path, inputs + [out])
    write_random_checkpoint(shape, src, tokenizer)
    args = list(DEFAULT_ARGS if convert_args is None else convert_args)
    cmd = [sys.executable, "-m", "convert.cli", "convert", str(src), str(out), *(["--overwrite"] if overwrite else []),
           *args]
    log("running: " + " ".join(cmd[2:]))
    code, wall, tail = _child(cmd)
    if code != 0:
        raise MLAError(f"mla convert failed on {shape} (exit {code}): {tail.strip().splitlines()[-1] if tail else ''}")
    record = json.loads((out / "mla_conversion.json").read_text())
    prof = record["profile"]
    rss = prof["peak_rss_bytes"]  # the child's own peak (VmHWM), recorded by mla convert at its end
    result = {
        "shape": shape, "source": str(src), "out": str(out), "convert_args": args,
        "source_bytes": prof["source_bytes"], "export_bytes": prof["export_bytes"],
        "export_dtype": record["method"]["dtype"], "device": prof["device"],
        "peak_rss_bytes": rss, "peak_rss_gib": round(rss / 2**30, 2), "wall_s": round(wall, 1),
        "stage_s": prof["stage_s"], "layer_maths_s": prof["layer_maths_s"],
        "layer_maths_s_per_layer": prof["layer_maths_s_per_layer"], "num_layers": record["source"]["num_layers"],
        "kv_cache_ratio": record["kv_cache"]["ratio"], "verify": record["verify"],
        "cpu_count": os.cpu_count(),
    }
    if load_check:
        code, _, tail = _child([sys.executable, "-c", _LOAD_CHECK, str(out)])
        if code != 0:
            raise MLAError(f"the export of {shape} did not load: {tail.strip().splitlines()[-1] if tail else ''}")
        check = json.loads(tail.strip().splitlines()[-1])
        check["original_bytes_per_token"] = record["kv_cache"]["original_values_per_token"] * 2  # bf16
        check["cache_ratio"] = check["cache_bytes_per_token"] / check["original_bytes_per_token"]
        result["load_check"] = check
    if json_path:

        write_text(json_path, json.dumps(result, indent=2) + "\n")
    log(summary(result))
    return result


def summary(r: dict) -> str:
    lines = [
        "| shape | source | export | peak RSS | wall | stages (s) | layer maths / layer | KV cache |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['shape']} | {r['source_bytes'] / 1e9:.2f} GB bf16 | {r['export_bytes'] / 1e9:.2f} GB "
        f"{r['export_dtype']} | {r['peak_rss_gib']:.2f} GiB | {r['wall_s'] / 60:.1f} min | "
        + ", ".join(f"{k} {v:.0f}" for k, v in r["stage_s"].items())
        + f" | {r['layer_maths_s_per_layer']:.2f} s | {r['kv_cache_ratio']:.1%} |",
    ]
    if "load_check" in r:
        c = r["load_check"]
        lines.append(f"load check: {c.get('model_type', '')} {c['dtype']}, finite logits {c['finite']}, cache "
                     f"{c['cache_bytes_per_token']} bytes/token ({c['cache_ratio']:.1%} of the original), peak RSS "
                     f"{c['peak_rss_bytes'] / 2**30:.2f} GiB")
    return "\n".join(lines)


def bench_convert_arguments(p) -> None:
    p.usage = ("mla bench-convert SHAPE [--out OUT] [--overwrite] [--tokenizer T] [--load-check] [--json F] "
               "[-- CONVERT-OPTIONS]")
    p.description = ("Write (once, into the user cache) a random-weight bf16 checkpoint of SHAPE, run mla convert on "
                     "it in a child process and report its peak RSS, wall time and stage times. Arguments after -- go "
                     f"to mla convert (default: {' '.join(DEFAULT_ARGS)}).")
    p.add_argument("shape", choices=list(SHAPES), help="the real model whose tensor shapes are used")
    p.add_argument("--out", help="where the export goes (default: the user cache, replaced each run)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--tokenizer", default="smollm2-135m", help="model whose tokenizer the checkpoint gets")
    p.add_argument("--load-check", action="store_true",
                   help="then load the export in bf16 with AutoModelForCausalLM and check finite logits")
    p.add_argument("--json", help="also write the results to this JSON file")


def bench_convert_command(args) -> int:
    bench_convert(args.shape, args.convert_args or None, out=args.out, tokenizer=args.tokenizer,
                  load_check=args.load_check, json_path=args.json, overwrite=args.overwrite)
    return 0
