"""Run llama.cpp's tools on a GGUF and read what they print; transformers' side of the same perplexity protocol.

``llama-perplexity -c N`` tokenizes the text file (BOS first when the GGUF says ``add_bos``), cuts it into
``len // N`` chunks of N tokens, puts BOS at the start of each chunk when ``add_bos``, and scores the second half of
each chunk: the token after position j for j in [N/2, N-1). ``reference_perplexity`` does exactly that with a
transformers model on the token ids llama.cpp itself produced (``tokenize``), so the two numbers differ only by the
engines' arithmetic.
"""

import math
import re
import subprocess
from pathlib import Path

import torch

from convert.errors import MLAError

from .llama_cpp import binary, env

TRIES = 8  # runs of a tool before giving up on a complete output (see run_complete)
_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+)")
_CHUNKS = re.compile(r"calculating perplexity over (\d+) chunks")
_RUNNING = re.compile(r"\[(\d+)\]([0-9.]+),")
_KV = re.compile(r"llama_kv_cache: size = +([0-9.]+) MiB \( *(\d+) cells, +(\d+) layers, +(\d+)/\d+ seqs\), "
                 r"K \((\w+)\): +([0-9.]+) MiB, V \((\w+)\): +([0-9.]+) MiB")
_WIDTH = re.compile(r"llama_kv_cache: attn_rot_([kv]) = \d+, n_embd_head_k_all = (\d+)")


def run(tool: str, *args, timeout: float = 3600, variant: str | None = None) -> str:
    """Run a llama.cpp tool (of the pinned release, or of its patched ``variant``); its stdout + stderr, or MLAError
    with the last line it printed."""
    cmd = [str(binary(tool, variant)), *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env(variant), timeout=timeout)
    out = done.stdout + done.stderr
    if done.returncode:
        tail = [line for line in out.strip().splitlines() if line.strip()][-1:] or ["(nothing printed)"]
        raise MLAError(f"{tool} failed (exit {done.returncode}): {tail[0]}")
    return out


def run_complete(tool: str, *args, done, variant: str | None = None) -> str:
    """``run`` until ``done(output)`` holds: llama.cpp's logger runs in a thread of its own that its tools do not
    flush at exit, so the last lines (where the results are) are sometimes lost."""
    for _ in range(TRIES):
        out = run(tool, *args, variant=variant)
        if done(out):
            return out
    raise MLAError(f"{tool} printed no complete result in {TRIES} runs")


def tokenize(gguf: Path, text: Path) -> list[int]:
    """The token ids llama.cpp reads ``text`` as (with BOS when the GGUF asks for it), as llama-perplexity does."""
    out = run("llama-tokenize", "-m", gguf, "-f", text, "--ids", "--log-disable")
    line = [ln for ln in out.splitlines() if ln.startswith("[")][-1]
    return [int(x) for x in line.strip("[]\n ").split(",") if x.strip()]


def _final_ppl(out: str) -> float | None:
    """The final estimate, or the running estimate after the last chunk (the same number); None when llama.cpp
    exited before writing either (see run_complete)."""
    final = _PPL.search(out)
    if final:
        return float(final.group(1))
    chunks, running = _CHUNKS.search(out), _RUNNING.findall(out)
    if chunks and running and int(running[-1][0]) == int(chunks.group(1)):
        return float(running[-1][1])
    return None


def perplexity(gguf: Path, text: Path, ctx: int, threads: int = 2, *extra, variant: str | None = None) -> dict:
    """llama-perplexity's final estimate and the KV cache it allocated: MiB, cells per sequence, layers, sequences,
    K/V types and MiB, and the K/V values cached per token and layer (``k_width`` / ``v_width``)."""
    out = run_complete("llama-perplexity", "-m", gguf, "-f", text, "-c", ctx, "-b", ctx, "-t", threads, "-lv", 4,
                       *extra, variant=variant,
                       done=lambda o: _final_ppl(o) is not None and _KV.search(o) and len(_WIDTH.findall(o)) == 2)
    widths = dict(_WIDTH.findall(out))
    total, cells, layers, seqs, k_type, k_mib, v_type, v_mib = _KV.search(out).groups()
    return {"ppl": _final_ppl(out), "kv_mib": float(total), "cells": int(cells), "layers": int(layers),
            "seqs": int(seqs), "k_type": k_type, "k_mib": float(k_mib), "v_type": v_type, "v_mib": float(v_mib),
            "k_width": int(widths["k"]), "v_width": int(widths["v"])}


@torch.no_grad()
def reference_perplexity(model, tokens: list[int], ctx: int, bos_id: int | None, chunks: int | None = None) -> float:
    """llama-perplexity's protocol on ``tokens`` with a transformers causal LM (float32, one chunk at a time; the
    first ``chunks`` only, as ``--chunks`` does)."""
    n_chunk = len(tokens) // ctx if chunks is None else min(chunks, len(tokens) // ctx)
    if n_chunk < 2:
        raise MLAError(f"{len(tokens)} tokens make fewer than 2 chunks of {ctx}")
    first, nll, count = ctx // 2, 0.0, 0
    for i in range(n_chunk):
        ids = torch.tensor(tokens[i * ctx:(i + 1) * ctx])
        if bos_id is not None:
            ids[0] = bos_id
        logits = model(ids[None]).logits[0].float()  # (ctx, V)
        logp = torch.log_softmax(logits[first:ctx - 1], -1)
        nll -= logp.gather(1, ids[first + 1:ctx, None]).sum().item()
        count += ctx - 1 - first
    return math.exp(nll / count)


def write_text_file(path: Path, text: str) -> Path:
    """A text file for llama.cpp's ``-f``: its prompt parser turns backslash escapes into characters, so a text
    meant to be read as transformers reads it carries none."""
    Path(path).write_text(text.replace("\\", " "), encoding="utf-8")
    return Path(path)
