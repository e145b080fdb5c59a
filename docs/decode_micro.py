"""The small measurements behind docs/decode-speed.md: one op or one layer's attention, timed in a loop (CPU, fp32).

    python docs/decode_micro.py attention   # SDPA over one latent vs batched matmuls, batch 1 and 2-8, by cache length
    python docs/decode_micro.py gemm        # q_proj and kv_a_proj_with_mqa as two GEMMs or one (SmolLM2's shapes)
    python docs/decode_micro.py prefill     # causal SDPA over 4096 tokens by head width, and a narrower value
    python docs/decode_micro.py norm EXPORT # an export's final RMSNorm module, per call (run with each model code)

Cache-hot by construction (the same tensors each call): what a whole model does is measured by decode_ab.py.
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F


def per_call(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def attention(heads=9, rank=80, rope=40):
    """ms per call and SDPA / matmuls, median of 7 interleaved rounds of 20 calls."""
    width = rank + rope
    for batch in (1, 2, 8):
        for length in (256, 512, 1024, 1536, 2048, 4096, 8192):
            latent = torch.randn(batch, 1, length + 300, width)[:, :, :length]  # a view of a grown buffer
            q = torch.randn(batch, 1, heads, width)

            def sdpa():
                return F.scaled_dot_product_attention(q, latent, latent, scale=0.1)[..., :rank]

            def bmm():
                p = torch.softmax(torch.bmm(q.view(batch, heads, width), latent[:, 0].transpose(1, 2)), -1)
                return torch.bmm(p, latent[:, 0, :, :rank])

            sdpa(), bmm()
            a = [per_call(sdpa, 20) for _ in range(7)]
            b = [per_call(bmm, 20) for _ in range(7)]
            sa, sb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
            print(f"batch {batch} x {length}: sdpa {sa:.3f} ms, bmm {sb:.3f} ms, sdpa / bmm {sa / sb:.2f}")


def gemm(hidden=576, q_out=936, kv_out=120):
    """µs per call of the two projections apart and fused (one GEMM, then a split), median of 5 rounds."""
    for rows in (1, 8):
        x = torch.randn(rows, 1, hidden)
        wq, wk = torch.randn(q_out, hidden), torch.randn(kv_out, hidden)
        wf = torch.cat([wq, wk])

        def two():
            return F.linear(x, wq), F.linear(x, wk)

        def one():
            return F.linear(x, wf).split([q_out, kv_out], -1)

        for f in (two, one):
            per_call(f, 200)
        res = {"two": [], "one": []}
        for _ in range(5):
            for f in (two, one):
                res[f.__name__].append(per_call(f, 2000) * 1e6)
        print(f"batch {rows}: " + ", ".join(f"{k} {statistics.median(v):.1f} us" for k, v in res.items()))


def prefill(tokens=4096, heads=9):
    """ms of one causal SDPA call over a prompt: q/k/v widths equal (64, padded or not) or the value narrower."""
    for qk, v in ((64, 64), (98, 98), (100, 100), (102, 102), (104, 104), (104, 64)):
        q, k = torch.randn(1, heads, tokens, qk), torch.randn(1, heads, tokens, qk)
        val = torch.randn(1, heads, tokens, v)

        def call():
            return F.scaled_dot_product_attention(q, k, val, is_causal=True)

        call()
        print(f"q/k width {qk}, v width {v}: {per_call(call, 3) * 1e3:.1f} ms")


def norm(export: str):
    """µs per call of the export's final norm module (the model code the folder holds)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32).eval()
    x = torch.randn(1, 1, model.config.hidden_size)
    with torch.no_grad():
        per_call(lambda: model.model.norm(x), 200)
        print(f"norm {per_call(lambda: model.model.norm(x), 20000) * 1e6:.1f} us")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "attention":
        attention()
    elif what == "gemm":
        gemm()
    elif what == "prefill":
        prefill()
    elif what == "norm" and len(sys.argv) == 3:
        norm(sys.argv[2])
    else:
        sys.exit("usage: python docs/decode_micro.py attention | gemm | prefill | norm EXPORT")
