"""Bytes a decode step must read (its memory floor), original vs MLA export, at batch B after S tokens.

    python docs/decode_floor.py EXPORT SOURCE --batch 16 --context 8192 [--bandwidth-tbs 4.3]

Weights: every tensor of the safetensors files (a decode step reads each weight once; the output head is the tied
embedding where it is tied). Cache, in the model's dtype: the original reads `2 · g · d_h` values per token and layer;
MLA at its floor reads `[ckv | kpe]` once (`r + d_rope`); the batched-matmul decode (`absorbed_attention: bmm`, the GPU
default) reads it for the scores and `ckv` again for `p · ckv` (`2r + d_rope`), and writes and reads the scores
(`B · H · S` per layer, four passes: bmm out, softmax in and out, matmul in).
"""

import argparse
import json
from pathlib import Path

from safetensors import safe_open

BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def weight_bytes(folder: Path) -> int:
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * BYTES[str(sl.get_dtype()).lower().replace("bf16", "bfloat16").replace("f32", "float32")
                                   .replace("f16", "float16")]
    return total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("export")
    p.add_argument("source", help="the original model's folder")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--bandwidth-tbs", type=float, default=4.3, help="memory bandwidth, TB/s (H200: about 4.3)")
    a = p.parse_args()
    export = Path(a.export)
    cfg = json.loads((export / "config.json").read_text())
    source = Path(a.source)
    scfg = json.loads((source / "config.json").read_text())
    L, H = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    per = lambda v: v if isinstance(v, list) else [v] * L  # noqa: E731
    r, dr = per(cfg["kv_lora_rank"]), per(cfg["qk_rope_head_dim"])
    elt = BYTES[cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"]
    tokens = a.batch * a.context
    g, dh = scfg.get("num_key_value_heads", scfg["num_attention_heads"]), scfg.get("head_dim") or \
        scfg["hidden_size"] // scfg["num_attention_heads"]
    rows = {
        "original": (weight_bytes(source), tokens * L * 2 * g * dh * elt),
        "MLA, latent read once (floor)": (weight_bytes(export), tokens * sum(x + y for x, y in zip(r, dr)) * elt),
        "MLA, batched matmuls (bmm)": (weight_bytes(export), tokens * sum(2 * x + y for x, y in zip(r, dr)) * elt
                                       + a.batch * H * a.context * L * 4 * elt),
    }
    base = sum(rows["original"])
    print(f"batch {a.batch} x context {a.context}, {L} layers, mean r {sum(r) / L:.0f}, mean d_rope {sum(dr) / L:.0f}")
    print(f"{'':<32}{'weights GB':>12}{'cache GB':>10}{'step GB':>10}{'floor ms':>10}{'speed-up':>10}")
    for name, (w, c) in rows.items():
        print(f"{name:<32}{w / 1e9:>12.2f}{c / 1e9:>10.2f}{(w + c) / 1e9:>10.2f}"
              f"{(w + c) / (a.bandwidth_tbs * 1e12) * 1e3:>10.2f}{base / (w + c):>9.2f}x")


if __name__ == "__main__":
    main()
