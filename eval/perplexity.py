"""Perplexity of a model (and optionally its original) on the same non-overlapping token windows, in fp32.

    mla perplexity MODEL [--baseline ORIG] [--text bbc:tech] [--seq-len 512] [--tokens 16384]
    python -m eval.perplexity MODEL ...      (the same command)

Evaluation text must not be calibration or training text (see ``convert.data``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from convert.data import EVALUATION_DEFAULT, load_texts, read_budget, token_windows
from convert.device import device_name
from convert.errors import MLAError, Parser, run_command
from convert.files import check_out_file, write_text
from convert.nll import perplexity
from convert.sources import (check_positions, input_paths, load_config, load_tokenizer, quiet_library_warnings,
                             resolve_source)
from convert.sources import load_model as load_source


def load_model(path_or_name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(model in eval mode, tokenizer) from a local folder, Hub id, .gguf file or built-in source name.

    Our exports load with this package's code; a model's own Python code runs only with ``trust_remote_code``.
    """
    return load_source(resolve_source(path_or_name), dtype, trust_remote_code=trust_remote_code)


def _vocab_size(path_or_name: str, trust_remote_code: bool = False) -> int:
    config = load_config(resolve_source(path_or_name), trust_remote_code=trust_remote_code)
    return getattr(config.get_text_config(), "vocab_size", None)


def check_lengths(paths, lengths: dict[str, int], trust_remote_code: bool = False) -> None:
    """MLAError, before any model is loaded, when a length of ``lengths`` ({what: positions}) exceeds a model's
    ``max_position_embeddings``."""
    for path in filter(None, paths):
        config = load_config(resolve_source(path), trust_remote_code=trust_remote_code)
        for what, length in lengths.items():
            check_positions(config, length, what, path)


def check_eval_size(seq_len: int, tokens: int) -> None:
    if seq_len < 2 or tokens < seq_len:
        raise MLAError(f"need --seq-len >= 2 and --tokens >= --seq-len, got {seq_len} and {tokens}")


def eval_windows(tokenizer, texts, seq_len: int = 512, tokens: int = 16384, seed: int = 0) -> torch.LongTensor:
    """The evaluation windows: ``tokens // seq_len`` non-overlapping windows of ``seq_len`` tokens."""
    check_eval_size(seq_len, tokens)
    return token_windows(tokenizer, texts, seq_len, tokens // seq_len, seed=seed)


def run(model_path: str, baseline: str | None = None, text: str = EVALUATION_DEFAULT, seq_len: int = 512,
        tokens: int = 16384, batch_size: int = 4, seed: int = 0, device: str = "cpu",
        trust_remote_code: bool = False) -> dict:
    """Perplexities of ``model_path`` (and ``baseline``) on the same windows; a dict of the results."""
    check_lengths([model_path, baseline], {"--seq-len": seq_len}, trust_remote_code)
    texts = load_texts(text, read_budget(tokens))  # a long file: only the part the windows can use
    if baseline is not None and _vocab_size(baseline, trust_remote_code) != _vocab_size(model_path, trust_remote_code):
        raise MLAError(f"{baseline!r} and {model_path!r} have different vocabulary sizes: not comparable")
    tokenizer = load_tokenizer(resolve_source(model_path), trust_remote_code=trust_remote_code)
    windows = eval_windows(tokenizer, texts, seq_len, tokens, seed)
    result = {"text": text, "seq_len": seq_len, "windows": windows.shape[0], "tokens": windows.numel(),
              "model": model_path, "baseline": baseline}
    for key, path in (("ppl_original", baseline), ("ppl_converted", model_path)):
        if path is None:
            continue
        model, _ = load_model(path, trust_remote_code=trust_remote_code)
        result[key] = perplexity(model.to(device), windows, batch_size, desc=key[4:])
        del model
    if baseline is not None:
        result["ratio"] = result["ppl_converted"] / result["ppl_original"]
    return result


def summary(r: dict) -> str:
    """One line: ``ppl original A | converted B | ratio Cx on N tokens of TEXT``."""
    where = f"on {r['tokens']} tokens of {r['text']}"
    if r.get("baseline") is None:
        return f"ppl {r['ppl_converted']:.2f} {where}"
    return (f"ppl original {r['ppl_original']:.2f} | converted {r['ppl_converted']:.2f} | "
            f"ratio {r['ratio']:.3f}x {where}")


def perplexity_arguments(p) -> None:
    p.description = __doc__.splitlines()[0]
    p.add_argument("model", help="converted (or any) model: folder, Hub id or built-in source name")
    p.add_argument("--baseline", help="original model to compare with, on the same tokens")
    p.add_argument("--text", default=EVALUATION_DEFAULT,
                   help="text source (see convert.data): bbc[:cat], brown[:genres], pydoc, hf:..., a regular "
                        ".txt/.jsonl file or folder, file:PATH for a path with commas; a file is read up to "
                        "max(4 MiB, 16 bytes per --tokens); default %(default)s")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tokens", type=int, default=16384, help="tokens to evaluate (windows = tokens // seq-len)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="which windows are drawn")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... ('auto': cuda when available)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python code of models whose config asks for it (only for models you trust)")


def main(argv: list[str] | None = None) -> int:
    """``python -m eval.perplexity ...``: the same command as ``mla perplexity ...``."""
    p = Parser(prog="python -m eval.perplexity")
    perplexity_arguments(p)
    a = p.parse_args(argv)
    quiet_library_warnings()
    return run_command(perplexity_command, a)


def perplexity_command(a) -> int:
    if a.json:  # checked before the work, not after it
        a.json = check_out_file(a.json, input_paths(a.model, a.baseline))
    r = run(a.model, a.baseline, a.text, a.seq_len, a.tokens, a.batch_size, a.seed, device_name(a.device), a.trust_remote_code)
    if a.json:
        write_text(a.json, json.dumps(r, indent=2) + "\n")
    rows = [("original", a.baseline, r.get("ppl_original")), ("converted", a.model, r["ppl_converted"])]
    print(f"{'model':<10} {'ppl':>10}  path")
    for name, path, ppl in rows:
        if path is not None:
            print(f"{name:<10} {ppl:>10.3f}  {path}")
    print(summary(r))
    kv = _kv_line(a.model)
    if kv:
        print(kv)
    return 0


def _kv_line(model_path: str) -> str | None:
    """The KV saving recorded by ``mla convert`` in the export, if MODEL is one."""
    record = Path(model_path) / "mla_conversion.json"
    if not record.is_file():
        return None
    kv = json.loads(record.read_text())["kv_cache"]
    return (f"KV cache per token: {kv['original_bytes_per_token']} -> {kv['mla_bytes_per_token']} bytes "
            f"({kv['ratio']:.2%} of the original, {1 - kv['ratio']:.1%} saved)")


if __name__ == "__main__":
    sys.exit(main())
